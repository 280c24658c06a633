"""Loading the configuration: defaults < the file < ``CTXSTORE_*`` variables < flags.

Each layer's values go through their key's check (:mod:`.keys`); a refusal
names the source (:class:`Origin`), the key and the value. The loader is kept
by the configuration it made, to read the same layers again on SIGHUP
(:mod:`.reload`).
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ctxstore.errors import InvalidInputError

from .checks import HookSpec, _shown
from .keys import _BY_PATH, _TABLES, KEYS, Key
from .settings import _BACKOFF_INITIAL, _BACKOFF_MAX, DaemonConfig, _backoff_problem

CONFIG_FILE_NAME = "ctxstore.toml"


@dataclass(frozen=True)
class Origin:
    """Where a setting's value came from."""

    kind: Literal["default", "file", "env", "flag"]
    name: str = ""  # the file, the variable or the flag

    def __str__(self) -> str:
        what = {"file": "config file", "env": "environment variable", "flag": "flag"}
        return "default" if self.kind == "default" else f"{what[self.kind]} {self.name}"


_DEFAULT = Origin("default")


def _checked(key: Key, value: object, origin: Origin, base: Path | None = None) -> Any:
    """``value`` through ``key``'s check; a refusal names the origin, the key and the value."""
    try:
        checked = key.check(value)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{origin}: {key.path} = {_shown(value)}: {exc}") from None
    if key.is_path and base is not None and checked is not None and not checked.is_absolute():
        checked = base / checked
    return checked


def _unknown(path: str, origin: Origin) -> InvalidInputError:
    close = difflib.get_close_matches(path, list(_BY_PATH), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return InvalidInputError(f"{origin}: unknown key {path!r}{hint} (see docs/configuration.md)")


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's settings by field name, checked; unknown keys and bad TOML are refused."""
    origin = Origin("file", str(path))
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise InvalidInputError(f"{origin}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"{origin}: not valid TOML: {exc}") from None
    values = {}
    for name, value in _flatten(data, origin):
        key = _BY_PATH.get(name)
        if key is None:
            raise _unknown(name, origin)
        values[key.field] = _checked(key, value, origin, base=path.parent)
    return values


def _flatten(data: Mapping[str, Any], origin: Origin) -> Iterator[tuple[str, Any]]:
    for name, value in data.items():
        if name not in _TABLES:
            yield name, value
        elif not isinstance(value, Mapping):
            raise InvalidInputError(f"{origin}: {name} = {_shown(value)}: must be a table [{name}]")
        else:
            for sub, item in value.items():
                yield f"{name}.{sub}", item


# -- loading: the layers in order -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoadedConfig:
    """A configuration with the file it read and each setting's origin (``config show``)."""

    config: DaemonConfig
    file: Path | None
    origins: Mapping[str, Origin]

    def settings(self) -> list[dict[str, Any]]:
        """One row per key: key, value (JSON-ready), source, from, reload ("live"/"restart")."""
        return [
            {
                "key": key.path,
                "value": _json_value(getattr(self.config, key.field)),
                "source": self.origins.get(key.field, _DEFAULT).kind,
                "from": self.origins.get(key.field, _DEFAULT).name or None,
                "reload": "live" if key.live else "restart",
            }
            for key in KEYS
        ]

    def as_json(self) -> dict[str, Any]:
        rows = self.settings()
        return {
            "config_file": None if self.file is None else str(self.file),
            "settings": {row.pop("key"): row for row in rows},
        }


def _json_value(value: object) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [
            item.as_json() if isinstance(item, HookSpec) else _json_value(item) for item in value
        ]
    return value


@dataclass(frozen=True, eq=False)
class ConfigLoader:
    """Reads the layers in order; kept by the config it made, to read them again on SIGHUP.

    ``file`` is ``--config`` (None: look in the environment); ``flags`` maps a
    field name to the flag and value given on the command line.
    """

    file: Path | None = None
    flags: Mapping[str, tuple[str, Any]] = field(default_factory=dict)

    def config_file(self, environ: Mapping[str, str]) -> Path | None:
        """--config, else $CTXSTORE_CONFIG, else $CONFIGURATION_DIRECTORY/ctxstore.toml if any."""
        if self.file is not None:
            return self.file.absolute()
        if environ.get("CTXSTORE_CONFIG"):
            return Path(environ["CTXSTORE_CONFIG"]).absolute()
        directory = environ.get("CONFIGURATION_DIRECTORY", "").split(":")[0]
        candidate = Path(directory) / CONFIG_FILE_NAME
        return candidate if directory and candidate.is_file() else None

    def load(self, environ: Mapping[str, str] | None = None) -> LoadedConfig:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        origins: dict[str, Origin] = {}
        path = self.config_file(environ)
        if path is not None:
            file_values = read_config_file(path)
            values |= file_values
            origins |= dict.fromkeys(file_values, Origin("file", str(path)))
        for key in KEYS:
            if key.env is not None and key.env in environ:
                origins[key.field] = Origin("env", key.env)
                values[key.field] = _from_env(key, environ[key.env], origins[key.field])
        by_field = {key.field: key for key in KEYS}
        for name, (flag, value) in self.flags.items():
            origins[name] = Origin("flag", flag)
            values[name] = _checked(by_field[name], value, origins[name])
        _check_backoff(values, origins)
        config = DaemonConfig(**values, loader=self)
        return LoadedConfig(config, path, MappingProxyType(origins))


def _from_env(key: Key, text: str, origin: Origin) -> Any:
    if not text.strip() and key.optional:
        return None
    try:
        value = key.from_env(text.strip())
    except InvalidInputError as exc:
        raise InvalidInputError(f"{origin}: {key.path} = {text!r}: {exc}") from None
    return _checked(key, value, origin)


def _check_backoff(values: Mapping[str, Any], origins: Mapping[str, Origin]) -> None:
    initial = values.get("jobs_backoff_initial", _BACKOFF_INITIAL)
    maximum = values.get("jobs_backoff_max", _BACKOFF_MAX)
    problem = _backoff_problem(initial, maximum)
    if problem:
        first = origins.get("jobs_backoff_initial", _DEFAULT)
        second = origins.get("jobs_backoff_max", _DEFAULT)
        raise InvalidInputError(f"{problem} (from {first} and {second})")
