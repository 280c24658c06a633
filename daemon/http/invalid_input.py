"""What FastAPI refused in a request, in plain words, as the store's own InvalidInputError.

So a refused request is a 400 like any other: the message names the field and
what it must be, and shows the value it got. No pydantic type names, locations
or URLs reach the client: those describe our code, not the request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError

from ctxstore.errors import InvalidInputError


def invalid_request(
    exc: RequestValidationError,
    *,
    content_type: str | None,
    body_fields: Sequence[str] | None = None,
    limit: int = 5,
) -> InvalidInputError:
    """What FastAPI refused, in plain words, as the store's own error (so a 400 like any other).

    Each message names the field and what it must be, and shows the value it got
    (``version: must be an integer >= 1, got 0``); a body that is not JSON says so
    with its parser's complaint and position, and a body sent without
    ``Content-Type: application/json`` says that. No pydantic type names, locations
    or URLs: those describe our code, not the request. ``body_fields`` are the
    fields the route's body takes, named when the body is missing or has unknown ones.
    """
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            return InvalidInputError(_not_json(error, exc.body))
    sent_body = any(_where(e) == "body" and e.get("type") != "missing" for e in errors)
    if sent_body and not is_json_content_type(content_type):
        got = "the request has none" if not content_type else f"got {content_type[:100]}"
        return InvalidInputError(f"expected Content-Type: application/json; {got}")
    unknown = [_shown(_field_name(e), "") for e in errors if e.get("type") == "extra_forbidden"]
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for error in errors:
        if error.get("type") != "extra_forbidden":
            groups.setdefault((_where(error), _field_name(error)), []).append(error)
    parts = [_field_message(w, name, group, body_fields) for (w, name), group in groups.items()]
    if unknown:
        takes = f" (it takes: {', '.join(body_fields)})" if body_fields else ""
        plural = "s" if len(unknown) > 1 else ""
        names = ", ".join(unknown[:limit]) + (", ..." if len(unknown) > limit else "")
        parts.append(f"{names}: unknown field{plural} in the request body{takes}")
    more = len(parts) - limit
    return InvalidInputError("; ".join(parts[:limit]) + (f" (and {more} more)" if more > 0 else ""))


def is_json_content_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/<name>+json``, with any parameters (FastAPI's rule)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


#: pydantic error types that say a value has the wrong type, rather than a wrong value of the
#: right type; of a union's failed members, those with a wrong value say more
_WRONG_TYPE = frozenset(
    {
        "bool_parsing",
        "bool_type",
        "dict_type",
        "float_parsing",
        "float_type",
        "int_parsing",
        "int_type",
        "list_type",
        "model_attributes_type",
        "model_type",
        "none_required",
        "string_type",
    }
)
#: what a value must be, by error type (formatted with the error's context)
_KINDS = {
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "dict_type": "a JSON object",
    "float_parsing": "a number",
    "float_type": "a number",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "list_type": "a list",
    "model_attributes_type": "a JSON object",
    "model_type": "a JSON object",
    "none_required": "null",
    "string_type": "a string",
    "literal_error": "one of {expected}",
    "enum": "one of {expected}",
    "too_long": "at most {max_length} values",
    "too_short": "at least {min_length} values",
    "string_too_long": "at most {max_length} characters",
    "string_too_short": "at least {min_length} characters",
}
_BOUNDS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}
_SHOWN_CHARS = 40


def _where(error: Mapping[str, Any]) -> str:
    """``body``, ``path``, ``query`` or ``header``: the first element of pydantic's location."""
    loc = error.get("loc") or ("request",)
    return str(loc[0])


def _field_name(error: Mapping[str, Any]) -> str:
    """The field a location names (``""``: the whole body): ``slot``, ``slot[2]``.

    Our bodies are flat, so after the field a location holds only list indexes and the
    names pydantic gives the members of a union (``str``, ``function-before[...]``),
    which are dropped.
    """
    loc = tuple(error.get("loc") or ())
    if len(loc) < 2:
        return ""
    return str(loc[1]) + "".join(f"[{part}]" for part in loc[2:] if isinstance(part, int))


def _field_message(
    where: str, name: str, errors: list[Mapping[str, Any]], body_fields: Sequence[str] | None
) -> str:
    if not name and where == "body" and errors[0].get("type") == "missing":
        takes = f" (its fields: {', '.join(body_fields)})" if body_fields else ""
        return f"request body is missing: expected a JSON object{takes}"
    label = name or f"request {where}"
    kinds = {error.get("type") for error in errors}
    if "missing" in kinds:
        return (
            f"{label}: is required" if where == "body" else f"{where} parameter {label} is required"
        )
    # a union: the members the value had the right type for say what was wrong with it
    wrong_value = [e for e in errors if e.get("type") not in _WRONG_TYPE]
    chosen = wrong_value or errors
    expected = list(dict.fromkeys(x for x in map(_expected, chosen) if x is not None))
    got = _shown(chosen[0].get("input"), where)
    if not expected:
        return f"{label}: {_plain(str(chosen[0].get('msg', 'invalid')))}, got {got}"
    return f"{label}: must be {' or '.join(expected)}, got {got}"


def _expected(error: Mapping[str, Any]) -> str | None:
    """What a value must be for one pydantic error, as a noun phrase; None when unknown."""
    kind, ctx = str(error.get("type")), error.get("ctx") or {}
    if kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        bound = ctx.get(key)
        return f"{'an integer' if isinstance(bound, int) else 'a number'} {op} {bound}"
    template = _KINDS.get(kind)
    if template is None:
        return None
    try:
        return template.format_map(ctx)
    except (KeyError, ValueError):
        return None


def _plain(message: str) -> str:
    """pydantic's own sentence for an error type we do not know, in our voice."""
    for prefix, replacement in (("Value error, ", ""), ("Input should be ", "must be ")):
        if message.startswith(prefix):
            return replacement + message[len(prefix) :]
    return message[:1].lower() + message[1:]


def _shown(value: object, where: str) -> str:
    """A value as the client sent it: JSON in a body; the text itself in a path or query."""
    if isinstance(value, Mapping):
        return "a JSON object"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str) and where != "body":
        text = value if value else '""'
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = type(value).__name__
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _not_json(error: Mapping[str, Any], body: object) -> str:
    """``request body is not valid JSON: Expecting value at line 1 column 1``."""
    reason = str((error.get("ctx") or {}).get("error", "cannot parse it"))
    loc = tuple(error.get("loc") or ())
    position = loc[1] if len(loc) > 1 else None
    if not isinstance(position, int) or not isinstance(body, str):  # (FastAPI gives both)
        return f"request body is not valid JSON: {reason}"
    line = body.count("\n", 0, position) + 1
    column = position - body.rfind("\n", 0, position)
    return f"request body is not valid JSON: {reason} at line {line} column {column}"


def unreadable_body(cause: BaseException | None) -> InvalidInputError | None:
    """Why FastAPI could not decode a JSON body to text (it answers a bare 400 for that)."""
    if not isinstance(cause, UnicodeDecodeError):
        return None
    byte = cause.object[cause.start : cause.start + 1].hex()
    return InvalidInputError(
        f"request body is not valid JSON: it is not UTF-8 text "
        f"(byte 0x{byte} at offset {cause.start})"
    )
