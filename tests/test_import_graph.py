"""What importing one part of the package loads (``ctxstore/__init__`` loads its names lazily).

Each check runs in a fresh interpreter, so what this test process already
imported does not hide what the import pulls in.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import ctxstore


def modules_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    )
    return set(json.loads(done.stdout))


def loaded(modules: set[str], *roots: str) -> list[str]:
    """The modules that are one of ``roots`` or inside one of them."""
    return sorted(m for m in modules if any(m == r or m.startswith(f"{r}.") for r in roots))


def test_the_wire_protocol_loads_neither_sqlite_nor_the_store_nor_the_importers() -> None:
    modules = modules_after("import ctxstore.protocol")
    assert "ctxstore.protocol" in modules
    assert loaded(modules, "sqlite3", "zipfile", "ctxstore.store", "ctxstore.nodes") == []


def test_the_wire_package_loads_neither_sqlite_nor_the_store_nor_the_importers() -> None:
    modules = modules_after("import ctxstore.wire")
    assert "ctxstore.wire.connection" in modules
    unwanted = ("sqlite3", "zipfile", "ctxstore.store", "ctxstore.nodes", "ctxstore.store.db",
                "ctxstore.daemon", "ctxstore.readers")  # fmt: skip
    assert loaded(modules, *unwanted) == []


def test_the_readers_load_neither_the_importers_nor_the_daemon_nor_the_http_stack() -> None:
    modules = modules_after("import ctxstore.readers")
    assert "ctxstore.readers.reader" in modules
    unwanted = ("ctxstore.nodes", "zipfile", "ctxstore.daemon", "ctxstore.cli", "fastapi",
                "uvicorn", "starlette", "pydantic")  # fmt: skip
    assert loaded(modules, *unwanted) == []


def test_the_package_alone_loads_none_of_its_parts() -> None:
    modules = modules_after("import ctxstore")
    assert loaded(modules, "ctxstore") == ["ctxstore"]


@pytest.mark.parametrize("name", sorted(set(ctxstore.__all__) - {"__version__"}))
def test_every_public_name_is_still_importable_from_the_package(name: str) -> None:
    value = getattr(ctxstore, name)
    home = sys.modules[value.__module__]
    assert getattr(home, name) is value
    assert name in dir(ctxstore)


def test_a_name_the_package_does_not_have_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = ctxstore.no_such_name  # type: ignore[attr-defined]


def test_star_import_gives_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from ctxstore import *", namespace)
    assert set(ctxstore.__all__) <= set(namespace)


def test_the_command_line_parser_reads_the_daemon_settings_without_the_server_stack() -> None:
    """Every ``ctxstore`` command builds the whole parser (the daemon's flags included)."""
    modules = modules_after("from ctxstore.cli import build_parser\nbuild_parser()")
    assert "ctxstore.daemon.config" in modules
    unwanted = ("ctxstore.daemon.server", "ctxstore.daemon.http", "ctxstore.readers", "fastapi",
                "uvicorn")  # fmt: skip
    assert loaded(modules, *unwanted) == []


def test_a_daemon_without_http_loads_neither_the_http_package_nor_its_stack() -> None:
    """docs/architecture.md: ``ctxstore.daemon.http`` is imported only when serving HTTP."""
    modules = modules_after("import ctxstore.daemon.server, ctxstore.daemon.main")
    assert "ctxstore.daemon.jobs" in modules
    assert loaded(modules, "ctxstore.daemon.http", "fastapi", "uvicorn", "pydantic") == []


@pytest.mark.parametrize("old", ["ctxstore.messages", "ctxstore.protocol"])
def test_the_old_import_paths_give_every_name_of_the_wire_package(old: str) -> None:
    """``ctxstore.messages`` and ``ctxstore.protocol`` (kept for outside code) give each
    name of ``ctxstore.wire``, the same object, from the wire's one export list."""
    import importlib

    import ctxstore.wire

    module = importlib.import_module(old)
    assert module.__all__ == ctxstore.wire.__all__
    assert [
        n for n in ctxstore.wire.__all__ if getattr(module, n) is not getattr(ctxstore.wire, n)
    ] == []
