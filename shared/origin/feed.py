"""The change feed: a NATS JetStream key-value bucket, one key per slot (nats-py).

The feed is a hint, never the truth: an entry ``{slot, version, seq}`` tells
followers that a head moved, and they read the head itself from the origin. So a
lost, late, repeated or forged entry costs at most a needless read of one head;
the followers' head poll converges without the feed at all.

:meth:`Feed.hints` is the watcher. It does not trust nats-py's watcher to live
through a server restart (a known bug class: a KV watcher's ordered consumer is
gone with the server's state, and the client waits on it forever). It starts a
new watcher after every reconnect and whenever the old one fails, and keeps
trying to connect while the server is down, so the feed resumes by itself when
the server comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import InvalidInputError, StorageError
from ..validation import check_slot

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "ctxstore"
#: how long a watcher waits for an entry before it checks whether it must be renewed
_WATCH_TICK = 1.0
_RETRY_MIN, _RETRY_MAX = 0.2, 5.0


def check_feed_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        raise InvalidInputError(f"a feed is nats://HOST:PORT, got {url!r}")
    return url


@dataclass(frozen=True, slots=True)
class Hint:
    """One feed entry: a head of ``slot`` moved (to ``version``, sequence ``seq``)."""

    slot: int
    version: int
    seq: int

    def to_bytes(self) -> bytes:
        return json.dumps({"slot": self.slot, "version": self.version, "seq": self.seq}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Hint | None:
        """The hint, or None for a value that is none (logged by the caller's caller)."""
        try:
            body = json.loads(data)
            return cls(check_slot(body["slot"]), int(body["version"]), int(body["seq"]))
        except (ValueError, TypeError, KeyError, InvalidInputError):
            return None


class Feed:
    """One connection to the feed's server, made on first use and kept up by nats-py."""

    def __init__(
        self,
        url: str,
        *,
        bucket: str = DEFAULT_BUCKET,
        creds: str | None = None,
        connect_timeout: float = 2.0,
    ) -> None:
        self.url = check_feed_url(url)
        self.bucket = bucket
        self.creds = creds
        self.connect_timeout = connect_timeout
        self._nc: Any = None
        self._kv: Any = None
        self._lock = asyncio.Lock()
        #: bumped by every reconnect: a watcher made before it is renewed
        self.generation = 0
        self.puts = 0
        self.hints_seen = 0
        self.watchers_started = 0
        #: called (on the loop) after every reconnect: the writer's uploader puts the
        #: hints the feed could not take meanwhile at once, not at its next retry
        self.on_reconnect: list[Callable[[], object]] = []

    @property
    def connected(self) -> bool:
        """Whether the connection to the feed's server is up now."""
        return self._nc is not None and bool(self._nc.is_connected)

    async def _on_reconnect(self) -> None:
        self.generation += 1
        self._kv = None
        log.info("feed %s: reconnected; the watcher is renewed", self.url)
        for callback in self.on_reconnect:
            callback()

    async def _on_disconnect(self) -> None:
        log.warning("feed %s: disconnected; followers rely on the head poll meanwhile", self.url)

    async def _on_error(self, exc: Exception) -> None:
        log.debug("feed %s: %s", self.url, exc)

    async def _key_value(self) -> Any:
        """The bucket, connecting (and creating it) first when needed; StorageError if down."""
        async with self._lock:
            if self._kv is not None and self._nc is not None and self._nc.is_connected:
                return self._kv
            import nats
            from nats.js.api import KeyValueConfig
            from nats.js.errors import BucketNotFoundError

            try:
                if self._nc is None or self._nc.is_closed:
                    self._nc = await nats.connect(
                        servers=[self.url],
                        user_credentials=self.creds,
                        connect_timeout=self.connect_timeout,
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=0.5,
                        reconnected_cb=self._on_reconnect,
                        disconnected_cb=self._on_disconnect,
                        error_cb=self._on_error,
                    )
                if not self._nc.is_connected:
                    raise StorageError(f"feed {self.url} is not connected (reconnecting)")  # noqa: TRY301
                js = self._nc.jetstream(timeout=self.connect_timeout)
                try:
                    self._kv = await js.key_value(self.bucket)
                except BucketNotFoundError:
                    self._kv = await js.create_key_value(
                        KeyValueConfig(bucket=self.bucket, history=1)
                    )
            except StorageError:
                raise
            except Exception as exc:
                if self._nc is not None and not self._nc.is_connected:
                    with contextlib.suppress(Exception):
                        await self._nc.close()
                    self._nc = None
                raise StorageError(f"feed {self.url}: {type(exc).__name__}: {exc}") from exc
            return self._kv

    async def put(self, hint: Hint) -> None:
        """Announce ``hint``; StorageError when the feed cannot take it (the head moved
        all the same: followers find it by their poll)."""
        kv = await self._key_value()
        try:
            await kv.put(f"slot.{hint.slot}", hint.to_bytes())
        except Exception as exc:
            self._kv = None
            raise StorageError(f"feed {self.url}: put failed: {exc}") from exc
        self.puts += 1

    async def hints(self) -> AsyncIterator[Hint]:
        """Every entry from now on (each slot's last one first), across outages, forever."""
        delay = _RETRY_MIN
        while True:
            try:
                kv = await self._key_value()
                generation = self.generation
                watcher = await kv.watchall()
                self.watchers_started += 1
            except Exception as exc:
                log.debug("feed %s: no watcher yet (%s); retrying in %.1fs", self.url, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            delay = _RETRY_MIN
            try:
                async for hint in self._entries(watcher, generation):
                    yield hint
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()

    async def _entries(self, watcher: Any, generation: int) -> AsyncIterator[Hint]:
        """A watcher's entries until it must be renewed (a reconnect, an error)."""
        import nats.errors

        while generation == self.generation:
            try:
                entry = await watcher.updates(timeout=_WATCH_TICK)
            except (TimeoutError, nats.errors.TimeoutError):
                if self._nc is None or not self._nc.is_connected:
                    return
                continue
            except Exception as exc:
                log.warning("feed %s: watcher failed (%s); renewing it", self.url, exc)
                return
            if entry is None or entry.value is None:
                continue  # the end of the initial values, or a deletion
            hint = Hint.from_bytes(entry.value)
            if hint is None:
                log.warning("feed %s: entry %s is no hint; ignored", self.url, entry.key)
                continue
            self.hints_seen += 1
            yield hint

    async def close(self) -> None:
        nc, self._nc, self._kv = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
