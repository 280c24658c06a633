"""The typed pieces the admin API's bodies and parameters are made of, with their bounds.

The bounds and patterns are not declared here: each comes from a declaration
of :mod:`ctxstore.checks` (an :class:`~ctxstore.checks.Integer`'s ``low`` and
``high``, the label pattern, the reserved aliases), the one vocabulary the wire,
the settings and the node configs check with, so the schema tells clients what
the store will accept. The store still checks everything itself. Either refusal
is a 400 ``invalid_input`` whose message names the field
(``invalid_input.invalid_request`` words pydantic's errors).
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import Path, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticKnownError

from ctxstore.checks import LABEL_PATTERN as LABEL
from ctxstore.checks import RESERVED_ALIASES, SLOTS, Integer

#: version numbers and ids the API takes: bounds a JSON double holds exactly, so that
#: clients (and schema tools) that read numbers as doubles agree with the server
API_VERSIONS: Final = Integer(1, 10**15 - 1)
API_IDS: Final = Integer(1, 2**53 - 1)
MAX_API_VERSION, MAX_API_ID = API_VERSIONS.high, API_IDS.high

_NO_DOTS = r"(?!.*\.\.)"
#: a label (group, alias, model type), as ctxstore.checks.check_label takes it
LABEL_PATTERN = rf"^{_NO_DOTS}{LABEL}$"
#: an alias a user may set: a label other than the reserved ones (``latest``, ``current``)
ALIAS_PATTERN = rf"^(?!({'|'.join(sorted(RESERVED_ALIASES))})$){_NO_DOTS}{LABEL}$"
#: a version reference: a number the API takes, ``latest``, ``current`` or an alias
VERSION_REF_PATTERN = rf"^([1-9][0-9]{{0,{len(str(API_VERSIONS.high)) - 1}}}|{_NO_DOTS}{LABEL})$"


def bounds(check: Integer) -> dict[str, Any]:
    """pydantic's ``ge`` and ``le`` (a field's, a path's or a query's) for ``check``."""
    return {"ge": check.low, "le": check.high}


def _json_integer(value: object) -> object:
    """JSON integers only: 3 and 3.0 (JSON Schema calls both integers), not true or "3"."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticKnownError("int_type")  # the error pydantic's own strict int gives
    return value


JSON_INT = BeforeValidator(_json_integer)
SlotId = Annotated[int, Field(**bounds(SLOTS)), JSON_INT]
VersionNumber = Annotated[int, Field(**bounds(API_VERSIONS)), JSON_INT]
# Names are checked by ctxstore.validation (a 400 with its message); the patterns only
# document them in the schema (pydantic's regex engine has no look-ahead).
Label = Annotated[str, Field(json_schema_extra={"pattern": LABEL_PATTERN})]
VersionName = Annotated[str, Field(json_schema_extra={"pattern": VERSION_REF_PATTERN})]

SlotPath = Annotated[
    int, Path(**bounds(SLOTS), description=f"slot id, {SLOTS.low} to {SLOTS.high}")
]
#: a slot in a query (a page's offset, an event stream's filter)
SlotQuery = Annotated[int, Query(**bounds(SLOTS))]
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
