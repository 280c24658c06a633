"""Pre- and post-commit hooks: loading them from configuration, running them, the built-ins.

A *pre-commit* hook is ``(slot, context) -> None`` and runs inside
``PersistentStore.save_context`` before anything is written (commit protocol
step 1): raising rejects the commit, and nothing is stored. A *post-commit*
hook is ``(CommitEvent) -> Mapping[str, int] | None`` and runs after the
version is committed and announced (step 6): it reads the store through a
read-only view, may move aliases (``CommitEvent.set_alias``) and returns
the ones it moved. A post-commit hook that fails or runs too long is logged and
reported, never raised: the commit it follows is already durable and stays.

Hooks are registered by configuration, each with a priority. Higher priorities
run first; hooks of equal priority keep their configured order, with the
built-ins (``finite_check``, ``best_version``) ahead of configured hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol

import numpy as np

from ctxstore.context import Array, Context
from ctxstore.dtypes import is_ml_float, ml_dtype_name
from ctxstore.errors import (
    ConflictError,
    CtxStoreError,
    InvalidInputError,
    NotFoundError,
    ReadOnlyError,
)
from ctxstore.store import PersistentStore, StoreView

log = logging.getLogger("ctxstore.daemon.hooks")

#: the entry-point group that ``entrypoint:NAME`` targets are looked up in
ENTRY_POINT_GROUP = "ctxstore.hooks"
FINITE_CHECK_NAME = "builtin:finite_check"
BEST_VERSION_NAME = "builtin:best_version"
BEST_ALIAS = "best"

PreCommitHook = Callable[[int, Context], None]


@dataclass(frozen=True, slots=True, init=False)
class CommitEvent:
    """What a post-commit hook is told: the version just committed, and the store it is in.

    ``store`` is a read-only view (:class:`StoreView`): a hook reads through it and
    cannot even name a write on it. Made with the writer (as the daemon makes it), the
    event keeps the writer to itself and shows the hook the writer's view
    (``PersistentStore.view``, opened when first asked for); the hook's one write,
    moving an alias of this slot, goes through :meth:`set_alias`.
    """

    slot: int
    version: int
    context: Context
    model_type: str | None
    _store: StoreView = field(repr=False)

    def __init__(
        self, slot: int, version: int, context: Context, model_type: str | None, store: StoreView
    ) -> None:
        for name, value in (("slot", slot), ("version", version), ("context", context),
                            ("model_type", model_type), ("_store", store)):  # fmt: skip
            object.__setattr__(self, name, value)

    @property
    def store(self) -> StoreView:
        """The store, read-only: never the writer itself."""
        store = self._store
        return store.view if isinstance(store, PersistentStore) else store

    def set_alias(self, name: str, version: int | None = None) -> int:
        """Point alias ``name`` of this slot at ``version`` (default: this event's version);
        returns the version number. ReadOnlyError when the event was made with a view."""
        if not isinstance(self._store, PersistentStore):
            raise ReadOnlyError(f"store {self._store.root} is open read-only")
        target = self.version if version is None else version
        return self._store.set_alias(self.slot, name, target)


PostCommitHook = Callable[[CommitEvent], Mapping[str, int] | None]


@dataclass(frozen=True, slots=True)
class HookOutcome:
    """How one post-commit hook went: ``ok``, its time, its error, the aliases it moved."""

    name: str
    ok: bool
    seconds: float
    error: str | None = None
    aliases: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


class HookSpecLike(Protocol):
    """One configured hook (``daemon.config.HookSpec`` or anything shaped like it).

    ``target`` is ``"package.module:attribute"`` or ``"entrypoint:NAME"``.
    """

    @property
    def target(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def options(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class RegisteredHook:
    """A hook ready to run: its display name, its priority and the callable."""

    name: str
    priority: int
    hook: Callable[..., Any]


class Hooks:
    """The daemon's pre- and post-commit hooks, sorted by priority (higher first).

    Immutable once built; a configuration reload builds a new one with
    :meth:`load` and swaps it in only if loading succeeded.
    """

    def __init__(
        self,
        pre: Sequence[RegisteredHook] = (),
        post: Sequence[RegisteredHook] = (),
        *,
        post_timeout: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not (isinstance(post_timeout, int | float) and 0 < post_timeout <= 3600):
            raise InvalidInputError(
                f"post-commit hook timeout must be in (0, 3600] seconds, got {post_timeout!r}"
            )
        self.post_timeout = float(post_timeout)
        self._pre = _by_priority(pre)
        self._post = _by_priority(post)
        self._clock = clock
        #: threads of post-commit hooks that timed out, by position in ``_post``
        self._abandoned: dict[int, threading.Thread] = {}

    @classmethod
    def load(
        cls,
        pre: Sequence[HookSpecLike],
        post: Sequence[HookSpecLike],
        *,
        post_timeout: float = 10.0,
        check_finite: bool = False,
        best_metric: str | None = None,
        best_mode: str = "min",
    ) -> Hooks:
        """Resolve every configured hook; InvalidInputError naming the first that cannot load."""
        builtin_pre = [RegisteredHook(FINITE_CHECK_NAME, 0, finite_check)] if check_finite else []
        builtin_post = []
        if best_metric is not None:
            tracker = BestVersionTracker(best_metric, best_mode)
            builtin_post.append(RegisteredHook(BEST_VERSION_NAME, 0, tracker))
        return cls(
            builtin_pre + [load_hook(spec, kind="pre") for spec in pre],
            builtin_post + [load_hook(spec, kind="post") for spec in post],
            post_timeout=post_timeout,
        )

    @property
    def names(self) -> dict[str, list[str]]:
        """The hook names in the order they run, for status and the API."""
        return {"pre": [h.name for h in self._pre], "post": [h.name for h in self._post]}

    # -- pre-commit -------------------------------------------------------------------------

    def pre_commit(self, slot: int, context: Context) -> None:
        """Run the pre-commit hooks in order; the first that raises rejects the commit.

        The rejection is an InvalidInputError (a ConflictError when the hook raised
        one) whose message names the hook and its reason; the hook's own exception
        is chained as ``__cause__``.
        """
        for registered in self._pre:
            try:
                registered.hook(slot, context)
            except Exception as exc:
                message = f"pre-commit hook {registered.name} rejected the commit: {_reason(exc)}"
                if isinstance(exc, ConflictError):
                    raise ConflictError(message) from exc
                raise InvalidInputError(message) from exc

    # -- post-commit ------------------------------------------------------------------------

    async def post_commit(self, event: CommitEvent) -> list[HookOutcome]:
        """Run each post-commit hook in its own thread, in order, each within ``post_timeout``.

        Never raises for a hook's failure. A hook that times out is abandoned:
        Python cannot stop a thread, so it keeps running in the background
        (a daemon thread: it does not hold up exit) and later hooks run
        meanwhile. Until that thread ends, the same hook is skipped on later
        commits, so a hook that hangs costs one thread, not one per commit.
        """
        return [
            await self._run_post(i, registered, event) for i, registered in enumerate(self._post)
        ]

    async def _run_post(
        self, index: int, registered: RegisteredHook, event: CommitEvent
    ) -> HookOutcome:
        name = registered.name
        stuck = self._abandoned.get(index)
        if stuck is not None and stuck.is_alive():
            error = "skipped: its call from an earlier commit timed out and is still running"
            log.warning(
                "post-commit hook %s %s (slot %d version %d)",
                name,
                error,
                event.slot,
                event.version,
            )
            return HookOutcome(name, ok=False, seconds=0.0, error=error)
        self._abandoned.pop(index, None)
        started = self._clock()
        thread, result = _start_in_thread(registered, event)
        try:
            ok, value = await asyncio.wait_for(result, self.post_timeout)
        except TimeoutError:
            self._abandoned[index] = thread
            error = f"timed out after {self.post_timeout:g}s; its thread keeps running"
            log.error(
                "post-commit hook %s %s (slot %d version %d)",
                name,
                error,
                event.slot,
                event.version,
            )
            return HookOutcome(name, ok=False, seconds=self._clock() - started, error=error)
        return _settled(name, event, self._clock() - started, ok, value)


def _settled(name: str, event: CommitEvent, seconds: float, ok: bool, value: object) -> HookOutcome:
    """The outcome of a post-commit hook that returned or raised in time; failures are logged."""
    if not ok:
        assert isinstance(value, BaseException)
        log.error(
            "post-commit hook %s failed for slot %d version %d: %s",
            name,
            event.slot,
            event.version,
            _reason(value),
            exc_info=value,
        )
        return HookOutcome(name, ok=False, seconds=seconds, error=_reason(value))
    aliases = _moved_aliases(value)
    if aliases is None:
        error = f"returned {type(value).__name__}, expected None or a mapping of alias to version"
        log.error("post-commit hook %s %s", name, error)
        return HookOutcome(name, ok=False, seconds=seconds, error=error)
    log.debug("post-commit hook %s done in %.3fs", name, seconds)
    return HookOutcome(name, ok=True, seconds=seconds, aliases=aliases)


def _by_priority(hooks: Sequence[RegisteredHook]) -> tuple[RegisteredHook, ...]:
    return tuple(sorted(hooks, key=lambda h: -h.priority))  # sorted() is stable: ties keep order


def _reason(exc: BaseException) -> str:
    """The exception as one line: our own errors speak for themselves, others get their type."""
    if isinstance(exc, CtxStoreError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _start_in_thread(
    registered: RegisteredHook, event: CommitEvent
) -> tuple[threading.Thread, asyncio.Future[tuple[bool, object]]]:
    """Run the hook in a fresh daemon thread; the future gets (ok, return value or exception).

    A fresh thread rather than the loop's executor: an abandoned hook must not
    occupy an executor worker, nor block the loop's executor shutdown at exit.
    """
    loop = asyncio.get_running_loop()
    result: asyncio.Future[tuple[bool, object]] = loop.create_future()

    def deliver(outcome: tuple[bool, object]) -> None:
        if not result.done():  # cancelled by the timeout
            result.set_result(outcome)

    def run() -> None:
        outcome: tuple[bool, object]
        try:
            outcome = (True, registered.hook(event))
        except BaseException as exc:  # a hook's SystemExit must not vanish with its thread
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed while the hook ran
            loop.call_soon_threadsafe(deliver, outcome)

    thread = threading.Thread(target=run, name=f"ctxstore-hook {registered.name}", daemon=True)
    thread.start()
    return thread, result


def _moved_aliases(value: object) -> Mapping[str, int] | None:
    """The aliases a hook returned, frozen; None when the return value is not of that shape."""
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        return None
    if not all(isinstance(k, str) and type(v) is int for k, v in value.items()):
        return None
    return MappingProxyType(dict(value))


# -- loading ------------------------------------------------------------------------------------


def load_hook(spec: HookSpecLike, *, kind: Literal["pre", "post"]) -> RegisteredHook:
    """Resolve one configured hook; InvalidInputError naming the target and what is wrong.

    The target's attribute is either the hook itself or a factory that returns
    it: a class, any callable when options are given, or a callable that takes
    no arguments is called with ``**options``; anything else is the hook.
    """
    target = spec.target
    if not isinstance(target, str):
        raise InvalidInputError(f"hook target must be a string, got {type(target).__name__}")
    priority = spec.priority
    if type(priority) is not int:
        raise InvalidInputError(f"hook {target!r}: priority must be an integer, got {priority!r}")
    options = spec.options
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise InvalidInputError(f"hook {target!r}: options must be a table of named values")
    attr = _resolve_target(target)
    hook = _instantiate(target, attr, dict(options))
    _check_signature(target, hook, kind)
    return RegisteredHook(target, priority, hook)


def _resolve_target(target: str) -> object:
    prefix, sep, rest = target.partition(":")
    if sep and prefix == "entrypoint":
        if not rest or rest != rest.strip():
            raise InvalidInputError(f"hook {target!r}: 'entrypoint:' needs an entry-point name")
        return _load_entry_point(target, rest)
    if not sep or not _is_dotted_name(prefix) or not _is_dotted_name(rest):
        raise InvalidInputError(
            f"hook {target!r} must be 'package.module:attribute' or 'entrypoint:NAME'"
        )
    try:
        module = importlib.import_module(prefix)
    except ModuleNotFoundError as exc:
        raise InvalidInputError(f"hook {target!r}: cannot import {prefix!r}: {exc}") from exc
    except Exception as exc:
        raise InvalidInputError(
            f"hook {target!r}: importing {prefix!r} failed: {_reason(exc)}"
        ) from exc
    value: object = module
    for part in rest.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise InvalidInputError(
                f"hook {target!r}: {prefix!r} has no attribute {rest!r}"
            ) from None
    return value


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _load_entry_point(target: str, name: str) -> object:
    import importlib.metadata  # only a hook named by entry point needs it

    found = [
        ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name
    ]
    if not found:
        raise InvalidInputError(
            f"hook {target!r}: no entry point {name!r} in group {ENTRY_POINT_GROUP!r} "
            "(is the package that provides it installed?)"
        )
    if len({ep.value for ep in found}) > 1:
        values = ", ".join(sorted({ep.value for ep in found}))
        raise InvalidInputError(
            f"hook {target!r}: entry point {name!r} is provided more than once ({values})"
        )
    try:
        return found[0].load()
    except Exception as exc:
        raise InvalidInputError(
            f"hook {target!r}: loading entry point {found[0].value!r} failed: {_reason(exc)}"
        ) from exc


def _instantiate(target: str, attr: object, options: dict[str, Any]) -> Callable[..., Any]:
    if not callable(attr):
        raise InvalidInputError(
            f"hook {target!r} is a {type(attr).__name__}, not a callable hook or factory"
        )
    if not (isinstance(attr, type) or options or _callable_without_arguments(attr)):
        return attr
    try:
        hook = attr(**options)
    except Exception as exc:
        with_options = f" with options {sorted(options)}" if options else ""
        raise InvalidInputError(
            f"hook {target!r}: its factory failed{with_options}: {_reason(exc)}"
        ) from exc
    if not callable(hook):
        raise InvalidInputError(
            f"hook {target!r}: its factory returned a {type(hook).__name__}, not a callable"
        )
    return hook  # type: ignore[no-any-return]


def _callable_without_arguments(func: Callable[..., Any]) -> bool:
    try:
        inspect.signature(func).bind()
    except TypeError:
        return False
    except ValueError:  # no signature to inspect (some builtins): treat it as the hook
        return False
    return True


def _check_signature(target: str, hook: Callable[..., Any], kind: Literal["pre", "post"]) -> None:
    arguments: tuple[object, ...] = (0, None) if kind == "pre" else (None,)
    try:
        signature = inspect.signature(hook)
    except (TypeError, ValueError):
        return  # nothing to check against; a wrong call fails (and is reported) at run time
    try:
        signature.bind(*arguments)
    except TypeError:
        shape = "(slot, context)" if kind == "pre" else "(event)"
        raise InvalidInputError(
            f"{kind}-commit hook {target!r} must be callable as {shape}, its signature is "
            f"{signature}"
        ) from None


# -- built-in hooks -----------------------------------------------------------------------------

_MAX_NAMED = 5


def finite_check(slot: int, context: Context) -> None:
    """Reject a context whose floating-point values hold NaN or +/-Inf, naming the tensors.

    Float and complex tensors are checked, the ml_dtypes ones (bfloat16, float8...)
    included, and so is every float or complex field of a structured tensor.
    Integer, boolean and other values cannot hold either and are not read.
    """
    bad = [
        f"tensor {name!r}{field} has {counts}"
        for name, array in context.weights.items()
        for field, values in _float_parts(array)
        if (counts := _non_finite_counts(values))
    ]
    if bad:
        more = f" (and {len(bad) - _MAX_NAMED} more tensors)" if len(bad) > _MAX_NAMED else ""
        raise InvalidInputError("; ".join(bad[:_MAX_NAMED]) + more)


def _float_parts(array: Array, path: str = "") -> Iterator[tuple[str, Array]]:
    """(" field 'a.b'" or "", view) of every part of ``array`` that can hold NaN or Inf."""
    dtype = array.dtype
    if dtype.fields is not None:
        for name in dtype.fields:
            field = f"{path}.{name}" if path else str(name)
            yield from _float_parts(array[name], field)  # a view; a subarray field adds axes
    elif is_ml_float(dtype) or (dtype.kind in "fc" and ml_dtype_name(dtype) is None):
        yield (f" field {path!r}" if path else ""), array


def _accumulator(dtype: np.dtype[Any]) -> type[np.generic] | None:
    """The dtype to sum ``dtype``'s values in: its own (None), or for ml_dtypes a wide one."""
    name = ml_dtype_name(dtype)
    if name is None:
        return None
    return np.complex64 if "complex" in name else np.float32


def _non_finite_counts(array: Array) -> str:
    """'' when every value is finite, else e.g. '2 NaN and 1 Inf values (of 300)'."""
    if array.size == 0:
        return ""
    flat = array.reshape(-1)
    with np.errstate(all="ignore"):
        # Any NaN or Inf makes the sum NaN or Inf, so a finite sum clears the whole
        # tensor in one vectorised pass with no temporary; an infinite sum may just
        # be overflow, and only then is every value examined. ml_dtypes values are
        # summed in float32 / complex64: in their own type a sum overflows (float8
        # to NaN) at a few hundred.
        if np.isfinite(flat.sum(dtype=_accumulator(array.dtype))):
            return ""
        nan = int(np.count_nonzero(np.isnan(flat)))
        inf = int(np.count_nonzero(np.isinf(flat)))
    if not nan and not inf:
        return ""
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
    return f"{' and '.join(parts)} values (of {array.size})"


class BestVersionTracker:
    """Post-commit hook: move alias ``best`` to a new version whose metric beats the best's.

    The metric is read from the version's metadata (a top-level key, or a
    dotted path into nested metadata such as ``"eval.loss"``). Versions without
    it are ignored; a non-numeric or non-finite value is ignored with a warning.
    A ``best`` alias that is missing, or names a version without a usable
    metric, is replaced. Ties keep the older version.
    """

    def __init__(self, metric: str, mode: str = "min") -> None:
        if not isinstance(metric, str) or not metric.strip():
            raise InvalidInputError(
                f"best-version metric must be a non-empty string, got {metric!r}"
            )
        if mode not in ("min", "max"):
            raise InvalidInputError(f"best-version mode must be 'min' or 'max', got {mode!r}")
        self.metric = metric
        self.mode = mode
        self._lock = threading.Lock()  # read-compare-move is one step per tracker

    def __repr__(self) -> str:
        return f"BestVersionTracker(metric={self.metric!r}, mode={self.mode!r})"

    def __call__(self, event: CommitEvent) -> Mapping[str, int] | None:
        value = self._score(event.context.metadata, event.slot, event.version)
        if value is None:
            return None
        with self._lock:
            best = self._current_best(event.store, event.slot)
            if best is not None and not self._better(value, best):
                return None
            event.set_alias(BEST_ALIAS)
        log.info(
            "slot %d: alias %r -> version %d (%s = %s)",
            event.slot,
            BEST_ALIAS,
            event.version,
            self.metric,
            value,
        )
        return {BEST_ALIAS: event.version}

    def _better(self, value: float, best: float) -> bool:
        return value < best if self.mode == "min" else value > best

    def _current_best(self, store: StoreView, slot: int) -> float | None:
        try:
            info = store.get_metadata(slot, BEST_ALIAS, tensors=False)
        except NotFoundError:
            return None
        return self._score(info.metadata, slot, info.version)

    def _score(self, metadata: Mapping[str, Any], slot: int, version: int) -> float | None:
        found, value = _lookup(metadata, self.metric)
        if not found:
            log.debug("slot %d version %d has no metric %r", slot, version, self.metric)
            return None
        number = _as_float(value)
        if number is None:
            log.warning(
                "slot %d version %d: metric %r is %r, not a finite number; ignored",
                slot,
                version,
                self.metric,
                value,
            )
            return None
        return number


def _as_float(value: object) -> float | None:
    """A finite float from an int or float metric; None for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)  # metadata ints fit in 64 bits, so this never overflows
    return number if math.isfinite(number) else None


def _lookup(metadata: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    if path in metadata:
        return True, metadata[path]
    value: Any = metadata
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


__all__ = [
    "BEST_ALIAS",
    "ENTRY_POINT_GROUP",
    "BestVersionTracker",
    "CommitEvent",
    "HookOutcome",
    "HookSpecLike",
    "Hooks",
    "PostCommitHook",
    "PreCommitHook",
    "RegisteredHook",
    "finite_check",
    "load_hook",
]
