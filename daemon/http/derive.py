"""Response models made from the store's record types, so each field is declared once.

A record (a dataclass or a NamedTuple of ``ctxstore.records`` or
``ctxstore.hierarchy``) names its fields and their types; :func:`model_of`
turns it into a pydantic model with the same fields in the same order, for
FastAPI to validate responses and write the OpenAPI schema. Only what the
HTTP side adds is given here: descriptions, a default, a docstring. Tuples
become lists and mappings dicts (their JSON shapes); a record nested in a
record becomes the model made from it. Every field of a response is
required unless given a default, whatever the record's own default.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel, create_model


def record_fields(record: type) -> dict[str, Any]:
    """The record's field names and resolved types, in declaration order."""
    hints = get_type_hints(record)
    if dataclasses.is_dataclass(record):
        names = [field.name for field in dataclasses.fields(record)]
    else:  # a NamedTuple
        names = list(record._fields)  # type: ignore[attr-defined]
    return {name: hints[name] for name in names}


def json_type(annotation: Any, nested: Mapping[type, type[BaseModel]]) -> Any:
    """``annotation`` as its JSON shape: tuples as lists, mappings as dicts, records as models."""
    if isinstance(annotation, type) and annotation in nested:
        return nested[annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if (origin is tuple and len(args) == 2 and args[1] is Ellipsis) or origin is list:
        item = json_type(args[0], nested)
        return list[item]  # type: ignore[valid-type]
    if origin is Mapping or origin is dict:
        key, value = args[0], json_type(args[1], nested)
        return dict[key, value]  # type: ignore[valid-type]
    if origin is Union or origin is types.UnionType:
        members = tuple(json_type(arg, nested) for arg in args)
        return Union[members]  # noqa: UP007 - a Union built at run time
    return annotation


def model_of(
    record: type,
    name: str,
    *,
    doc: str | None = None,
    fields: Mapping[str, Any] | None = None,
    nested: Mapping[type, type[BaseModel]] | None = None,
) -> type[BaseModel]:
    """A pydantic model named ``name`` with the fields of ``record``.

    ``fields``: pydantic ``Field(...)`` for the fields that carry a description or
    a default in the API; ``nested``: the models made from records that
    appear inside this one.
    """
    extra = dict(fields or {})
    unknown = set(extra) - set(record_fields(record))
    if unknown:
        raise TypeError(f"{record.__name__} has no fields {sorted(unknown)}")
    definitions: dict[str, Any] = {
        field: (json_type(annotation, nested or {}), extra.get(field, ...))
        for field, annotation in record_fields(record).items()
    }
    model: type[BaseModel] = create_model(name, __doc__=doc, **definitions)
    return model
