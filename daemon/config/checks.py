"""The checks of the daemon's settings: each returns the canonical value or raises
InvalidInputError saying why; the ``_env_*`` parsers read a ``CTXSTORE_*`` variable's text.

Integers, booleans and optional values are ``ctxstore.checks``' checks, in the
settings' words. The settings table (:mod:`.keys`) names one check per setting; every value,
from the file, the environment, a flag or code, goes through it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from ctxstore.checks import SETTING, boolean, integer
from ctxstore.checks import kind as _kind
from ctxstore.errors import InvalidInputError
from ctxstore.validation import freeze_mapping, thaw_json

_MAX_ID = 2**32 - 2  # uid/gid: (uid_t)-1 means "no change" to the kernel

Check = Callable[[Any], Any]


def _int_in(low: int, high: int) -> Check:
    return integer(low, high, SETTING)


def _power_of_two(low: int, high: int) -> Check:
    def check(value: object) -> int:
        number: int = _int_in(low, high)(value)
        if number & (number - 1):
            raise InvalidInputError("must be a power of two")
        return number

    return check


def _seconds(high: float) -> Check:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(f"must be a number of seconds, not {_kind(value)}")
        if not 0 < value <= high:
            raise InvalidInputError(f"must be more than 0 and at most {high:g} seconds")
        return float(value)

    return check


def _fraction(high: float) -> Check:
    """A share: 0 (included) up to ``high`` (excluded)."""

    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(f"must be a number, not {_kind(value)}")
        if not 0 <= value < high:
            raise InvalidInputError(f"must be at least 0 and below {high:g}")
        return float(value)

    return check


def _seconds_or_zero(high: float) -> Check:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInputError(f"must be a number of seconds, not {_kind(value)}")
        if not 0 <= value <= high:
            raise InvalidInputError(f"must be at least 0 and at most {high:g} seconds")
        return float(value)

    return check


def _choice(options: tuple[str, ...], fold: Callable[[str], str]) -> Check:
    def check(value: object) -> str:
        if not isinstance(value, str) or fold(value) not in options:
            raise InvalidInputError(f"must be one of {', '.join(options)}")
        return fold(value)

    return check


_bool: Final = boolean(SETTING)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"must be a string, not {_kind(value)}")
    if not value or len(value) > 256 or not value.isprintable():
        raise InvalidInputError("must be 1 to 256 printable characters")
    return value


def _path(value: object) -> Path:
    if not isinstance(value, str | os.PathLike):
        raise InvalidInputError(f"must be a path, not {_kind(value)}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\0" in text:
        raise InvalidInputError("must be a non-empty path")
    return Path(os.path.expanduser(text))


def _roots(value: object) -> tuple[Path, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidInputError(f"must be an array of directories, not {_kind(value)}")
    roots = tuple(_path(item) for item in value)
    relative = [os.fspath(root) for root in roots if not root.is_absolute()]
    if relative:
        raise InvalidInputError(f"import roots must be absolute paths, not {relative[0]!r}")
    return tuple(dict.fromkeys(roots))


def _env_paths(text: str) -> list[str]:
    return [part for part in text.split(os.pathsep) if part]


def _ids(value: object) -> frozenset[int]:
    if not isinstance(value, list | tuple | set | frozenset):
        raise InvalidInputError(f"must be an array of ids, not {_kind(value)}")
    check = _int_in(0, _MAX_ID)
    return frozenset(check(item) for item in value)


_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?")


def _split_http(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise InvalidInputError('must be HOST:PORT (e.g. "127.0.0.1:8470") or "off"')
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise InvalidInputError(f"{host} is not an IPv6 address") from None
    elif ":" in host:
        raise InvalidInputError("an IPv6 address goes in brackets: [::1]:8470")
    elif not _HOSTNAME.fullmatch(host):
        raise InvalidInputError(f"{host!r} is not a host name or an IPv4 address")
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise InvalidInputError(f"port {port!r} is not a number from 0 to 65535")
    return host, int(port)


def _http(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f'must be "HOST:PORT" or "off", not {_kind(value)}')
    value = value.strip()
    if value.lower() == "off":
        return "off"
    _split_http(value)
    return value


_TARGET = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_ENTRY_POINT = re.compile(r"entrypoint:([A-Za-z0-9][A-Za-z0-9_.-]*)")
_HOOK_FIELDS = ("target", "priority", "options")


@dataclass(frozen=True)
class HookSpec:
    """One configured hook: where its callable lives, its priority, its options.

    ``target`` is ``"package.module:attribute"`` (imported) or
    ``"entrypoint:NAME"`` (an entry point in the ``ctxstore.hooks`` group).
    ``options`` is read-only JSON-like data handed to the hook.
    """

    target: str
    priority: int = 0
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not (
            _ENTRY_POINT.fullmatch(self.target) or _TARGET.fullmatch(self.target)
        ):
            raise InvalidInputError(
                f"hook target {self.target!r} must be 'package.module:attribute' "
                "or 'entrypoint:NAME'"
            )
        try:
            _int_in(-(2**31), 2**31 - 1)(self.priority)
        except InvalidInputError as exc:
            raise InvalidInputError(f"hook priority {self.priority!r} {exc}") from None
        object.__setattr__(self, "options", freeze_mapping(self.options, "hook options"))

    @property
    def entry_point(self) -> str | None:
        """The entry point name for ``entrypoint:NAME`` targets, else None."""
        match = _ENTRY_POINT.fullmatch(self.target)
        return match.group(1) if match else None

    def as_json(self) -> dict[str, Any]:
        options = thaw_json(self.options)
        return {"target": self.target, "priority": self.priority, "options": options}


def _hook(value: object) -> HookSpec:
    if isinstance(value, HookSpec):
        return value
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"must be a table with a target, not {_kind(value)}")
    unknown = sorted(set(value) - set(_HOOK_FIELDS))
    if unknown:
        known = ", ".join(_HOOK_FIELDS)
        raise InvalidInputError(f"unknown key {unknown[0]!r} (a hook has {known})")
    if "target" not in value:
        raise InvalidInputError("has no target")
    priority = value.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidInputError(f"priority must be an integer, not {_kind(priority)}")
    return HookSpec(value["target"], priority, value.get("options", {}))


def _hooks(value: object) -> tuple[HookSpec, ...]:
    if not isinstance(value, list | tuple):
        raise InvalidInputError(f"must be an array of tables, not {_kind(value)}")
    hooks = []
    for index, item in enumerate(value):
        try:
            hooks.append(_hook(item))
        except InvalidInputError as exc:
            raise InvalidInputError(f"hook #{index + 1}: {exc}") from None
    return tuple(hooks)


def _s3_url(value: object) -> str:
    """An origin: s3://BUCKET/PREFIX (checked by the origin package's parser)."""
    text = _text(value)
    from ctxstore.origin.layout import Origin  # sans-IO: no boto3 behind it

    return str(Origin.parse(text))


def _nats_url(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(r"(nats|tls)://[^\s/]+(:\d+)?/?", text):
        raise InvalidInputError("a feed is nats://HOST:PORT (or tls://HOST:PORT)")
    return text


def _kv_bucket(value: object) -> str:
    text = _text(value)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise InvalidInputError("a feed bucket name is 1-64 of A-Z a-z 0-9 _ -")
    return text


def _env_int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise InvalidInputError("must be an integer") from None


def _env_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidInputError("must be a number") from None


def _env_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise InvalidInputError("must be true or false (also 1/0, yes/no, on/off)")


def _env_ids(text: str) -> list[int]:
    return [_env_int(part) for part in re.split(r"[,\s]+", text.strip()) if part]


def _shown(value: object) -> str:
    """``value`` as an error message shows it (a path as text, cut at 120 characters)."""
    text = repr(os.fspath(value) if isinstance(value, Path) else value)
    return text if len(text) <= 120 else text[:117] + "..."
