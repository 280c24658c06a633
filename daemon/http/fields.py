"""The typed pieces the admin API's bodies and parameters are made of, with their bounds.

Identifiers carry the same bounds and patterns as ``ctxstore.validation``, so
the schema tells clients what the store will accept; the store still checks
everything itself. Either refusal is a 400 ``invalid_input`` whose message
names the field (``invalid_input.invalid_request`` words pydantic's errors).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticKnownError

from ctxstore.validation import MAX_SLOT

#: a label (group, alias, model type): a letter, then up to 63 of [A-Za-z0-9_.-], no ".."
LABEL_PATTERN = r"^(?!.*\.\.)[A-Za-z][A-Za-z0-9_.-]{0,63}$"
#: an alias a user may set: a label other than the reserved ``latest`` and ``current``
ALIAS_PATTERN = r"^(?!(latest|current)$)(?!.*\.\.)[A-Za-z][A-Za-z0-9_.-]{0,63}$"
#: a version reference: a number, ``latest``, ``current`` or an alias
VERSION_REF_PATTERN = r"^([1-9][0-9]{0,14}|(?!.*\.\.)[A-Za-z][A-Za-z0-9_.-]{0,63})$"
#: version numbers and ids the API takes: bounds a JSON double holds exactly, so that
#: clients (and schema tools) that read numbers as doubles agree with the server
MAX_API_VERSION = 10**15 - 1
MAX_API_ID = 2**53 - 1


def _json_integer(value: object) -> object:
    """JSON integers only: 3 and 3.0 (JSON Schema calls both integers), not true or "3"."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticKnownError("int_type")  # the error pydantic's own strict int gives
    return value


JSON_INT = BeforeValidator(_json_integer)
SlotId = Annotated[int, Field(ge=0, le=MAX_SLOT), JSON_INT]
VersionNumber = Annotated[int, Field(ge=1, le=MAX_API_VERSION), JSON_INT]
# Names are checked by ctxstore.validation (a 400 with its message); the patterns only
# document them in the schema (pydantic's regex engine has no look-ahead).
Label = Annotated[str, Field(json_schema_extra={"pattern": LABEL_PATTERN})]
VersionName = Annotated[str, Field(json_schema_extra={"pattern": VERSION_REF_PATTERN})]

SlotPath = Annotated[int, Path(ge=0, le=MAX_SLOT, description="slot id, 0 to 2**31-1")]
VersionPath = Annotated[
    str,
    Path(
        json_schema_extra={"pattern": VERSION_REF_PATTERN},
        description="version number, latest, current or an alias",
    ),
]
AliasPath = Annotated[
    str, Path(json_schema_extra={"pattern": ALIAS_PATTERN}, description="alias name")
]
GroupPath = Annotated[
    str, Path(json_schema_extra={"pattern": LABEL_PATTERN}, description="group name")
]
LabelQuery = Annotated[str | None, Query(json_schema_extra={"pattern": LABEL_PATTERN})]


class Body(BaseModel):
    """Request bodies refuse unknown keys, so a typo is an error rather than a no-op."""

    model_config = ConfigDict(extra="forbid")
