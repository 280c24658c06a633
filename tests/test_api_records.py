"""The admin API's responses that show a store record are made from the record's type.

A field is declared once, in ``ctxstore.records`` or ``ctxstore.hierarchy``:
the response model has the record's fields, in its order, with JSON shapes
(tuples as lists, mappings as objects, nested records as their models), and a
record's value becomes a response body with nothing copied by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import pytest
from pydantic import BaseModel, Field, ValidationError

from ctxstore.daemon.http import schemas
from ctxstore.daemon.http.derive import model_of, record_fields
from ctxstore.hierarchy import HierarchyStats, NodeInfo
from ctxstore.records import ContextMetadata, Problem, SlotInfo, TensorInfo, VersionInfo

RECORD_MODELS = [
    (SlotInfo, schemas.SlotOut),
    (VersionInfo, schemas.VersionOut),
    (TensorInfo, schemas.TensorOut),
    (ContextMetadata, schemas.VersionDetailOut),
    (Problem, schemas.ProblemOut),
    (NodeInfo, schemas.NodeHierarchyOut),
    (HierarchyStats, schemas.HierarchyStatsOut),
]


@pytest.mark.parametrize(("record", "model"), RECORD_MODELS, ids=lambda x: x.__name__)
def test_a_response_model_has_its_records_fields_in_order(
    record: type, model: type[BaseModel]
) -> None:
    assert list(model.model_fields) == list(record_fields(record))


class Part(NamedTuple):
    name: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Whole:
    id: int
    tags: tuple[str, ...]
    config: Mapping[str, Any]
    parts: tuple[Part, ...] | None
    note: str | None = None


def test_a_new_record_field_reaches_the_schema_with_its_json_shape() -> None:
    part = model_of(Part, "PartOut")
    whole = model_of(
        Whole,
        "WholeOut",
        fields={"parts": Field(default=None, description="the parts")},
        nested={Part: part},
    )
    schema = whole.model_json_schema()
    assert list(schema["properties"]) == ["id", "tags", "config", "parts", "note"]
    assert schema["properties"]["tags"] == {
        "items": {"type": "string"},
        "title": "Tags",
        "type": "array",
    }
    assert schema["properties"]["config"]["type"] == "object"
    assert schema["properties"]["parts"]["description"] == "the parts"
    # a response always carries every field: the record's own default does not make one optional
    assert schema["required"] == ["id", "tags", "config", "note"]
    body = whole.model_validate(
        Whole(7, ("a",), {"k": 1}, (Part("w", (2, 3)),)), from_attributes=True
    ).model_dump(mode="json")
    assert body == {
        "id": 7,
        "tags": ["a"],
        "config": {"k": 1},
        "parts": [{"name": "w", "shape": [2, 3]}],
        "note": None,
    }


def test_a_field_the_record_does_not_have_is_refused() -> None:
    with pytest.raises(TypeError, match="no fields"):
        model_of(Part, "PartOut", fields={"size": Field(description="not in Part")})


def test_a_response_missing_a_record_field_is_refused() -> None:
    with pytest.raises(ValidationError):
        schemas.SlotOut.model_validate({"slot": 1}, from_attributes=True)
