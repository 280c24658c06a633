"""What the admin API answers to requests it refuses before any handler runs.

A path, query or body value of the wrong type or out of range, a missing or
unknown body field, a body that is not JSON and a body not sent as JSON are
all ``400 invalid_input``, like a value the store refuses, in the API's one
error shape, with a message that names the field and what was wrong in plain
words: nothing of pydantic (error type names, locations, URLs) reaches the
client. The harness is test_api.py's: a real Daemon, the app called in-process.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.inprocess import commit, error_of, run

from ctxstore.daemon.server import Daemon

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"

#: words of pydantic's and FastAPI's own error format, which mean nothing to an API client
INTERNALS = re.compile(
    r"int_parsing|int_type|greater_than|extra_forbidden|model_attributes|"
    r"json_invalid|Input should|Field required|Extra inputs|function-before|"
    r"pydantic|errors\.|https?://|\bloc\b|\bbody\.|\bpath\.|\bquery\.|Value error",
)

#: (method, path, request keywords, the whole message)
REFUSALS: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "PUT",
        "/slots/1/aliases/x",
        {"json": {"version": 0}},
        "version: must be an integer >= 1, got 0",
    ),
    (
        "PUT",
        "/slots/1/aliases/x",
        {"json": {"version": 10**16}},
        "version: must be an integer <= 999999999999999, got 10000000000000000",
    ),
    (
        "PUT",
        "/slots/1/aliases/x",
        {"json": {"version": 1.5}},
        "version: must be an integer, got 1.5",
    ),
    (
        "PUT",
        "/slots/1/aliases/x",
        {"json": {"version": True}},
        "version: must be an integer or a string, got true",
    ),
    ("PUT", "/slots/1/aliases/x", {"json": {}}, "version: is required"),
    ("PUT", "/slots/1/aliases/x", {"json": []}, "request body: must be a JSON object, got a list"),
    (
        "PUT",
        "/slots/1/aliases/x",
        {"json": {"version": 1, "extra": 1}},
        "extra: unknown field in the request body (it takes: version)",
    ),
    (
        "PUT",
        "/slots/1/aliases/x",
        {},
        "request body is missing: expected a JSON object (its fields: version)",
    ),
    (
        "POST",
        "/slots/1/rollback",
        {"json": {"version": 0}},
        "version: must be an integer >= 1, got 0",
    ),
    ("GET", "/slots/-1", {}, "slot: must be an integer >= 0, got -1"),
    ("GET", "/slots/abc", {}, "slot: must be an integer, got abc"),
    ("GET", "/slots/1.5/versions", {}, "slot: must be an integer, got 1.5"),
    ("GET", "/slots/2147483648", {}, "slot: must be an integer <= 2147483647, got 2147483648"),
    ("GET", "/slots?limit=0", {}, "limit: must be an integer >= 1, got 0"),
    ("GET", "/slots?offset=x", {}, "offset: must be an integer, got x"),
    (
        "GET",
        "/jobs?state=weird",
        {},
        "state: must be one of 'pending', 'processing', 'done', 'failed' or 'cancelled', got weird",
    ),
    ("GET", "/jobs/0", {}, "job_id: must be an integer >= 1, got 0"),
    ("POST", "/verify?rehash=maybe", {}, "rehash: must be true or false, got maybe"),
    ("GET", "/events?slot=2&slot=-1", {}, "slot[1]: must be an integer >= 0, got -1"),
    ("POST", "/nodes/3/parent", {"json": {"parent": "1"}}, 'parent: must be an integer, got "1"'),
    (
        "POST",
        "/nodes/3/parent",
        {"json": {"parent": -1}},
        "parent: must be an integer >= 0, got -1",
    ),
    ("POST", "/nodes/3/groups", {"json": {"group": 5}}, "group: must be a string, got 5"),
    (
        "POST",
        "/jobs",
        {"json": {"node_type": 3}},
        "slot: is required; node_type: must be a string, got 3",
    ),
    (
        "POST",
        "/jobs",
        {"json": {"slot": 1, "node_type": "llm", "config": []}},
        "config: must be a JSON object, got a list",
    ),
    (
        "POST",
        "/jobs",
        {"json": {"slot": 1, "node_type": "llm", "priority": "high"}},
        'priority: must be an integer, got "high"',
    ),
    (
        "POST",
        "/jobs",
        {"json": {"slot": 1, "node_type": "llm", "a": 1, "b": 2}},
        "a, b: unknown fields in the request body (it takes: slot, node_type, config, priority)",
    ),
]


def _check(response: httpx.Response, expected: str) -> None:
    message = error_of(response, 400, "invalid_input")
    assert message == expected
    assert not INTERNALS.search(message), message


def test_schema_refusals_are_400_naming_the_field_in_plain_words(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await commit(daemon, 1)
        for method, path, kwargs, expected in REFUSALS:
            _check(await http.request(method, path, **kwargs), expected)

    run(tmp_path, scenario)


def test_version_zero_is_the_same_400_in_a_path_and_in_a_body(tmp_path: Path) -> None:
    """docs/api.md: version 0 is a 400; it was a 422 in a body and a 400 in a path."""

    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await commit(daemon, 1)
        for response in (
            await http.get("/slots/1/versions/0"),
            await http.post("/slots/1/versions/0/pin"),
            await http.put("/slots/1/aliases/x", json={"version": 0}),
            await http.post("/slots/1/rollback", json={"version": 0}),
        ):
            assert "got 0" in error_of(response, 400, "invalid_input")

    run(tmp_path, scenario)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "request body is missing: expected a JSON object (its fields: version)"),
        (
            b"{not json",
            "request body is not valid JSON: "
            "Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        (b"nope", "request body is not valid JSON: Expecting value at line 1 column 1"),
        (
            b'{"version": 1,\n "x": }',
            "request body is not valid JSON: Expecting value at line 2 column 7",
        ),
        (
            b'{"version": "\xff"}',
            "request body is not valid JSON: it is not UTF-8 text (byte 0xff at offset 13)",
        ),
    ],
    ids=["empty", "not-json", "bare-word", "second-line", "not-utf8"],
)
def test_a_body_that_is_not_json_says_what_and_where(
    tmp_path: Path, body: bytes, expected: str
) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await commit(daemon, 1)
        json_type = {"content-type": "application/json"}
        _check(await http.put("/slots/1/aliases/x", content=body, headers=json_type), expected)

    run(tmp_path, scenario)


def test_a_body_not_sent_as_json_names_the_content_type(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        await commit(daemon, 1)
        body = b'{"version": 1}'
        expected = "expected Content-Type: application/json; "
        _check(
            await http.put("/slots/1/aliases/x", content=body), expected + "the request has none"
        )
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            answer = await http.put(
                "/slots/1/aliases/x", content=body, headers={"content-type": content_type}
            )
            _check(answer, expected + "got " + content_type)
        rollback = await http.post(  # an optional body too
            "/slots/1/rollback", content=body, headers={"content-type": "text/plain"}
        )
        _check(rollback, expected + "got text/plain")
        for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
            fine = await http.put(
                "/slots/1/aliases/x", content=body, headers={"content-type": content_type}
            )
            assert fine.json() == {"slot": 1, "alias": "x", "version": 1}

    run(tmp_path, scenario)


def test_openapi_documents_the_400_it_answers_and_no_422(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon, http: httpx.AsyncClient) -> None:
        schema = (await http.get("/openapi.json")).json()
        error_body = {"$ref": "#/components/schemas/ErrorBody"}
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                responses = operation["responses"]
                assert "422" not in responses, (method, path)
                assert responses["400"]["content"]["application/json"]["schema"] == error_body
        assert "HTTPValidationError" not in schema["components"]["schemas"]

    run(tmp_path, scenario)


def test_the_error_table_in_the_docs_has_no_422() -> None:
    """docs/api.md lists every status the API answers; a refused request is a 400 there too."""
    rows = re.findall(r"^\| (\d{3}) \| ", DOCS.read_text(), flags=re.MULTILINE)
    assert "400" in rows and "422" not in rows
