"""The writer daemon: one asyncio loop serving the socket, committing, announcing.

Start order: what needs no store (the token file, the hooks, the socket's
group, directory and path, the HTTP address), then the writer lock (by opening
the store), version table (reclaiming a stale one), socket (replacing only a
stale one), then READY. A start that fails is undone quietly and raises: the
caller says why, and a daemon refused before the store leaves none behind.
Stop order on SIGTERM / SIGINT: stop accepting, let the commit in flight
finish, say goodbye to every peer, remove the socket and the segment, close
the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ctxstore.context import Context
from ctxstore.errors import CtxStoreError
from ctxstore.store import PersistentStore
from ctxstore.versiontable import VersionTable, VersionTableWriter, segment_name
from ctxstore.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    RECORD_PROTOCOL,
    Announce,
    DamageReport,
    Message,
    encode_frame,
)

from .answers import Answers
from .budgets import PartialPool, UidBudgets
from .cluster import Cluster
from .committer import Committer
from .config import DaemonConfig
from .fleet import Fleet
from .hooks import Hooks
from .integrity import DamageDesk, verify_current_versions
from .jobs import JobQueue
from .limits import UNIX_BACKLOG, Limits, derive_limits, return_freed_memory, stream_sizes
from .listener import (
    BoundSocket,
    PeerCredentials,
    PeerPolicy,
    bind_socket,
    check_socket_path,
    peer_credentials,
)
from .logs import flush_all, limit_repeats, limited_exception_handler, peer_events
from .notify import Notifier, status_loop, watchdog_loop
from .pipeline import apply_job_settings, hooks_changed, load_hooks
from .segments import reclaim_orphans
from .session import (
    Admin,
    Catalog,
    CheckDamage,
    Close,
    Effect,
    Publish,
    Send,
    Session,
    admission,
)
from .subscriber import PeerBudget, Subscriber
from .wiring import build_writer

if TYPE_CHECKING:
    from .http.serving import ApiServer

log = logging.getLogger("ctxstore.daemon")

#: how long SIGTERM lets build jobs in flight finish before they go back to pending
JOB_STOP_TIMEOUT_S = 30.0
#: extra start-up time asked of systemd while the store opens (recovery of a big store)
STORE_OPEN_ALLOWANCE = 300.0

#: how often counts of repeated log lines are reported once the events stopped
LOG_FLUSH_INTERVAL = 10.0
#: close reasons of a peer that left as it should; any other is a drop, counted apart
_ORDINARY_ENDS = ("peer said goodbye", "peer closed the connection", "connection ended")


class Daemon:
    """The long-running writer process (see module docstring for the lifecycle)."""

    def __init__(self, config: DaemonConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.fleet = Fleet(on_ack=self._observe_ack)
        self.subscribers: dict[int, Subscriber] = {}
        #: the sans-IO side of each connection in ``subscribers`` (daemon/session.py)
        self.sessions: dict[int, Session] = {}
        #: open socket connections per uid (refused ones are never counted)
        self.connections_by_uid: dict[int, int] = {}
        self.pool = PartialPool(0)
        self.uid_budgets = UidBudgets(0, time.monotonic)
        self.limits: Limits
        self.budget: PeerBudget
        self._apply_policies(config)  # sets limits, the pool's limit and budget
        self._sessions = itertools.count(1)
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.store: PersistentStore | None = None
        self.table: VersionTableWriter | None = None
        self.committer: Committer | None = None
        self.damage: DamageDesk | None = None
        self.answers: Answers | None = None
        self._bound: BoundSocket | None = None
        self._server: asyncio.Server | None = None
        self.hooks = Hooks()
        self.jobs: JobQueue | None = None
        self.api: ApiServer | None = None
        self.cluster = Cluster()
        self.on_reload: list[Callable[[DaemonConfig, DaemonConfig], None]] = [self._reload_work]
        #: when this daemon was made, on the monotonic clock (its uptime needs no /proc/stat,
        #: which systemd's ProcSubset=pid hides)
        self.created_monotonic = time.monotonic()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, bind the sockets and serve; a failed start is undone, then raises.

        What can be refused without the store is checked first (see
        :meth:`_check_before_store`), so such a failure leaves no store
        directory behind. The undoing logs nothing and sends no STOPPING=1: no
        daemon ran, and the caller logs why it could not start.
        """
        try:
            self._check_before_store()
            await self._open_and_serve()
        except BaseException as exc:
            self.notifier.status(f"start failed: {exc}")
            self._stop.set()
            try:
                await self._close("start failed")
            except Exception:
                log.exception("undoing a failed start failed too")
            raise

    def _check_before_store(self) -> None:
        """Refuse what needs no store: token file, hooks, socket group and path, HTTP address."""
        config = self.config
        config.token()  # an unreadable or weak token file stops the start, not the first request
        self.hooks = load_hooks(config)
        check_socket_path(config.socket, group=config.socket_group)
        address = config.http_address()
        if address is not None:  # a taken port; bound for good once the store is open
            from .http.serving import bind as bind_http

            bind_http(*address).close()

    async def _open_and_serve(self) -> None:
        config = self.config
        # Recovery of a large store can outlast systemd's start timeout: ask for more.
        self.notifier.status(f"opening store {config.store} (recovery)")
        self.notifier.extend_timeout(STORE_OPEN_ALLOWANCE)
        self.store = PersistentStore(config.store, retention=config.retention)
        self.notifier.status(f"store open; binding {config.socket}")
        for problem in self.store.recovery_problems:
            log.error("store recovery found: %s", problem)
        if config.verify_after_commit:  # before the table: it shows any pointer moved back
            self.notifier.status("verifying the current versions not verified since boot")
            await asyncio.to_thread(verify_current_versions, self.store)
        self.store.protected_versions = self.fleet.held_versions
        self.table = VersionTable.create(
            segment_name(self.store.root), capacity=config.table_capacity
        )
        self.table.set_many(self.store.current_versions())
        self.store.pre_commit_hooks.append(self._pre_commit)
        address = config.http_address()
        if address is not None:  # bound before the socket: a taken port stops us before peers
            from .http.serving import ApiServer  # the HTTP stack loads only when it is used

            self.api = ApiServer(self, *address)  # its metrics observe the commits below
            self.api.bind()
        writer = build_writer(
            self.store,
            self.table,
            config=lambda: self.config,  # a reload replaces it
            announce=self.announce,
            hooks=lambda: self.hooks,
            on_commit=None if self.api is None else self.api.metrics.observe_commit,
        )
        self.committer, self.damage, self.jobs = writer.committer, writer.damage, writer.jobs
        self.answers = Answers(
            self.store,
            self.committer,
            self.fleet,
            config=lambda: self.config,
            spawn=self._spawn,
            daemon_row=self.status_row,
            on_verify=None if self.api is None else self.api.metrics.observe_verify,
        )
        self._bound = bind_socket(config.socket, group=config.socket_group, backlog=UNIX_BACKLOG)
        self._server = await asyncio.start_unix_server(
            self._accept,
            sock=self._bound.sock,
            limit=stream_sizes(config.peer_read_buffer)[0],
            backlog=UNIX_BACKLOG,
        )
        log.info("limits: %s", self.limits.describe())
        self._spawn(self._flush_logs())
        if self.api is not None:
            await self.api.start()
        await self.jobs.start()
        self.cluster = Cluster.start(config, self.store, self.committer)
        self._spawn(self._reclaim_segments_loop())
        log.info(
            "ctxstore daemon pid %d: store %s, socket %s, %d slots",
            os.getpid(),
            self.store.root,
            config.socket,
            len(self.store.current_versions()),
        )
        self.notifier.ready(f"serving {config.socket}")
        interval = self.notifier.watchdog_interval()
        if interval:
            self._spawn(watchdog_loop(self.notifier, interval, lambda: not self._stop.is_set()))
        if self.notifier.enabled:
            self._spawn(status_loop(self.notifier, self.describe, lambda: not self._stop.is_set()))

    def describe(self) -> str:
        """One line for ``systemctl status``: peers, commits, the last commit."""
        committer = self.committer
        commits = committer.commits if committer is not None else 0
        text = (
            f"serving {self.config.socket}: {len(self.subscribers)} peers, "
            f"{commits} commits since start"
        )
        last = committer.last_commit if committer is not None else None
        if last is not None:
            text += f"; last: slot {last[0]} version {last[1]}"
        return text

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """A stop was asked for (SIGTERM, SIGINT): new peers are refused."""
        return self._stop.is_set()

    @property
    def listening(self) -> bool:
        """The socket accepts connections."""
        return self._server is not None and self._server.is_serving()

    def reload(self) -> None:
        """SIGHUP (systemctl reload): re-read the configuration, apply what can change live.

        The file and the CTXSTORE_* variables are read again; flags stay as given.
        Applied now: log level and format, retention, the peer allowlists and reader
        timeouts (for new connections), and the token file (read again). Everything
        else live (hooks, job retries, the /ready threshold) is read from
        ``self.config`` by its owner, or handed to each ``on_reload(old, new)``
        callback when the daemon has such a list. Settings bound at start (store,
        socket, HTTP address, ...) are logged and wait for a restart. A bad
        configuration is logged and the running one stays; no reader is dropped.
        """
        from .config import plan_reload
        from .logs import setup_logging

        self.notifier.reloading("reloading configuration")
        old = self.config
        try:
            plan = plan_reload(old)
        except CtxStoreError as exc:
            log.error("SIGHUP: configuration not reloaded, the running one stays: %s", exc)
            self.notifier.ready("reload failed; running configuration kept")
            return
        except Exception:
            log.exception("SIGHUP: configuration not reloaded, the running one stays")
            self.notifier.ready("reload failed; running configuration kept")
            return
        new = plan.config
        for key, running, configured in plan.pending:
            log.warning(
                "SIGHUP: %s changed (%s -> %s); it takes effect at the next restart",
                key,
                running,
                configured,
            )
        setup_logging(new.log_level, new.log_format)
        if self.store is not None:
            self.store.retention = new.retention
        self._apply_policies(new)
        self.config = new
        for callback in getattr(self, "on_reload", ()):
            try:
                callback(old, new)
            except Exception:
                log.exception("SIGHUP: reload callback %r failed", callback)
        log.info(
            "SIGHUP: configuration reloaded (changed: %s); %d peers stay connected",
            plan.describe(),  # names a new token ("admin token rotated"), never shows it
            len(self.subscribers),
        )
        log.debug("SIGHUP: running with %s", new)
        self.notifier.ready("reloaded")

    def _apply_policies(self, config: DaemonConfig) -> None:
        """Who may connect, who may publish among them (empty lists: everyone), how many,
        and what each may cost (for connections made from now on)."""
        self.policy = PeerPolicy(config.allow_uids, config.allow_gids)
        self.publishers = PeerPolicy(config.publish_uids, config.publish_gids)
        self.limits = derive_limits(config)
        self.pool.limit = self.limits.partial_bytes
        self.uid_budgets.rate = self.limits.uid_rate
        api = getattr(self, "api", None)  # None in __init__, before the API exists
        if api is not None:
            api.events.max_streams = self.limits.event_streams
        self.budget = PeerBudget(
            frame_timeout=config.frame_timeout,
            rate=config.peer_rate,
            frames_per_turn=config.peer_frames_per_turn,
            pool=self.pool,
            read_size=config.peer_read_buffer,
            uids=self.uid_budgets,
        )

    async def _flush_logs(self) -> None:
        """Report counts of repeated per-peer log lines once their events stopped coming."""
        while not self._stop.is_set():
            await asyncio.sleep(LOG_FLUSH_INTERVAL)
            flush_all()

    def _observe_ack(self, session: int, slot: int, version: int) -> None:
        """A reader's ack, for the API's ack-latency metric (when the API runs)."""
        if self.api is not None:
            self.api.metrics.observe_ack(session, slot, version)

    def _pre_commit(self, slot: int, context: Context) -> None:
        """The hooks in force now (SIGHUP may have replaced them) vet each commit."""
        self.hooks.pre_commit(slot, context)

    def _reload_work(self, old: DaemonConfig, new: DaemonConfig) -> None:
        """SIGHUP: hooks and job retries follow the new configuration."""
        if hooks_changed(old, new):
            try:
                self.hooks = load_hooks(new)
            except CtxStoreError as exc:
                log.error("SIGHUP: hooks not reloaded, the running ones stay: %s", exc)
            else:
                log.info("SIGHUP: hooks now %s", self.hooks.names)
        if self.jobs is not None:
            apply_job_settings(self.jobs, new)
        if self.committer is not None:
            self.committer.max_publish_bytes = new.max_publish_bytes
            self.committer.verify_after_commit = new.verify_after_commit
            self.committer.reread_after_commit = new.reread_after_commit
            self.committer.announce_record_bytes = new.announce_record_bytes

    async def _reclaim_segments_loop(self) -> None:
        """At start and every ``shm_reclaim_interval``: unlink segments of dead publishers."""
        while not self._stop.is_set():
            busy = frozenset(self.committer.segments_in_use if self.committer else ())
            try:
                count = await asyncio.to_thread(
                    reclaim_orphans, busy, min_age=self.config.shm_reclaim_interval
                )
            except Exception:
                log.exception("sweep for orphaned publish segments failed")
            else:
                if count:
                    log.info("reclaimed %d shared-memory segment(s) of publishers that died", count)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.config.shm_reclaim_interval)

    async def serve_until_stopped(self) -> None:
        await self._stop.wait()
        await self.stop("daemon shutting down")

    async def stop(self, reason: str) -> None:
        self._stop.set()  # ends the status loop: nothing overwrites the line sent next
        self.notifier.stopping(reason)
        await self._close(reason)
        log.info("ctxstore daemon stopped: %s", reason)

    async def _close(self, reason: str) -> None:
        """Undo whatever start() did, in order; what it did not get to is skipped."""
        if self.api is not None:
            await self.api.stop()
        if self._server is not None:
            self._server.close()
        await self.cluster.stop()  # before the committer drains: a pull commits through it
        if self.jobs is not None:
            await self.jobs.stop(timeout=JOB_STOP_TIMEOUT_S)
        if self.committer is not None:
            await self.committer.drain()
        for subscriber in list(self.subscribers.values()):
            subscriber.goodbye(reason)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._bound is not None:
            self._bound.sock.close()
            self._bound.remove()
        if self.table is not None:
            self.table.close()
            self.table.unlink()
        if self.store is not None:
            self.store.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- connections ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if hasattr(writer.transport, "max_size"):  # asyncio's selector transport
            writer.transport.max_size = stream_sizes(self.config.peer_read_buffer)[1]
        sock = writer.get_extra_info("socket")
        peer = peer_credentials(sock)
        session = next(self._sessions)
        peer_events.log(
            f"connection from pid {peer.pid}",  # per process: one flooder is not everyone
            logging.INFO,
            "session %d: connection from pid %d uid %d gid %d",
            session,
            peer.pid,
            peer.uid,
            peer.gid,
        )
        subscriber = Subscriber(
            session,
            reader,
            writer,
            peer,
            max_frame_size=self.config.max_frame_size,
            stuck_timeout=self.config.stuck_timeout,
            silent_timeout=self.config.silent_timeout,
            budget=self.budget,
        )
        refusal = admission(
            peer,
            stopping=self._stop.is_set(),
            policy=self.policy,
            limits=self.limits,
            open_connections=len(self.subscribers),
            open_by_uid=self.connections_by_uid,
        )
        if refusal is not None:
            peer_events.log(
                "refused", logging.WARNING, "session %d: refused: %s", session, refusal.message
            )
            subscriber.fail(refusal)
            return
        self.subscribers[session] = subscriber
        self.sessions[session] = self._new_session(session, peer)
        self.connections_by_uid[peer.uid] = self.connections_by_uid.get(peer.uid, 0) + 1
        flusher = self._spawn(subscriber.flush_loop())
        try:
            await subscriber.receive_loop(self._handle)
        finally:
            subscriber.close(subscriber.close_reason or "connection ended")
            flusher.cancel()
            self.subscribers.pop(session, None)
            self.sessions.pop(session, None)
            left = self.connections_by_uid.pop(peer.uid, 1) - 1
            if left:
                self.connections_by_uid[peer.uid] = left
            self.fleet.leave(session)
            reason = subscriber.close_reason or ""
            peer_events.log(
                f"{'closed' if reason.startswith(_ORDINARY_ENDS) else 'dropped'}: pid {peer.pid}",
                logging.INFO,
                "session %d (%s): closed: %s",
                session,
                subscriber.name,
                subscriber.close_reason,
            )

    def status_row(self) -> dict[str, Any]:
        """The daemon's own row of a status answer: the process, its store, its peers."""
        assert self.store is not None and self.committer is not None
        root = self.store.root
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.created_monotonic, 3),
            "store": str(root),
            "socket": str(self.config.socket),
            "commits": self.committer.commits,
            "subscribers": len(self.subscribers),
            **self.input_held(),
            "version_table": segment_name(root),
            **({"cluster": cluster} if (cluster := self.cluster.summary()) else {}),
        }

    def input_held(self) -> dict[str, int]:
        """What peers' input costs the daemon now: bytes of it held (complete frames waiting
        for their peer's rate budget, unfinished frames) and the part in unfinished frames."""
        held = sum(subscriber.input_bytes for subscriber in self.subscribers.values())
        return {"input_bytes": held, "partial_bytes": self.pool.total}

    def _new_session(self, session: int, peer: PeerCredentials) -> Session:
        assert self.store is not None
        store = self.store
        catalog = Catalog(store.current_versions, store.hierarchy.list_by_group)
        return Session(
            session,
            peer,
            fleet=self.fleet,
            catalog=catalog,
            publishers=lambda: self.publishers,
            daemon_pid=os.getpid(),
        )

    async def _handle(self, sub: Subscriber, message: Message) -> None:
        """Feed ``message`` to the connection's session and carry out what it asks for."""
        session = self.sessions[sub.session]
        for effect in session.handle(message):
            self._carry_out(sub, effect)
        sub.name = session.name  # its log lines name the peer as its hello did

    def _carry_out(self, sub: Subscriber, effect: Effect) -> None:
        match effect:
            case Send(message=message):
                sub.send(message)
            case Close(reason=reason):
                sub.close(reason)
            case Publish(request=request):
                assert self.answers is not None
                self._spawn(self.answers.publish(sub, request))
            case Admin(request=request):
                assert self.answers is not None
                self._spawn(self.answers.admin(sub, request))
            case CheckDamage(report=report, who=who):
                self._damage_reported(report, who)

    def _damage_reported(self, report: DamageReport, who: str) -> None:
        """Count the report; hash the version in the background if it needs checking."""
        assert self.damage is not None
        try:
            key = self.damage.triage(report, who)
        except CtxStoreError as exc:  # the index's trouble: the report is lost, nothing else
            log.error("%s: damage report not checked: %s", who, exc)
            return
        if key is not None:
            self._spawn(self.damage.check(key))

    # -- announcing -------------------------------------------------------------------------

    def announce(self, announce: Announce) -> None:
        """Offer ``announce`` to every subscriber that covers its slot; never waits.

        Encoded at most twice whatever the number of subscribers: as it is, for the
        peers that speak protocol 2 (its version record spares each one a read of the
        index), and without its record for older peers.
        """
        assert self.store is not None
        groups_of = functools.cache(self.store.hierarchy.get_groups)
        frames: dict[bool, tuple[Announce, bytes] | None] = {}
        told = []
        for session in list(self.sessions.values()):
            if session.subscriptions.covers(announce.slot, groups_of):
                subscriber = self.subscribers[session.session]
                full = announce.record is not None and session.protocol >= RECORD_PROTOCOL
                if full not in frames:  # encoded once, and only when someone wants it
                    frames[full] = self._announce_frame(announce, full)
                encoded = frames[full]
                if encoded is None:
                    break
                subscriber.offer(*encoded)
                told.append(subscriber.session)
        if self.api is not None:
            self.api.announced(announce, told)
        self.cluster.changed(announce.slot)

    def _announce_frame(self, announce: Announce, full: bool) -> tuple[Announce, bytes] | None:
        """``announce`` (without its record unless ``full``) and its frame; None when it
        cannot be encoded (logged: the version is committed all the same)."""
        if not full and announce.record is not None:
            announce = dataclasses.replace(announce, record=None)
        limit = self.config.max_frame_size
        if full:  # what every reader accepts, whatever this daemon's own limit
            limit = min(limit, DEFAULT_MAX_FRAME_SIZE)
        try:
            return announce, encode_frame(announce, max_frame_size=limit)
        except CtxStoreError as exc:
            if full:  # a record too large for the frame: announce without it
                return self._announce_frame(announce, False)
            log.error("slot %d version %d is not announced: %s",
                      announce.slot, announce.version, exc)  # fmt: skip
            return None


async def run_daemon(config: DaemonConfig, notifier: Notifier | None = None) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly."""
    # asyncio's own lines about peers ("socket.send() raised exception.", "socket.accept()
    # out of system resource" on EMFILE, which it retries a second later) and uvicorn's
    # come at most a few times per interval, with a count
    limit_repeats("asyncio", "uvicorn.error")
    return_freed_memory()
    daemon = Daemon(config, notifier)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(limited_exception_handler)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    try:
        await daemon.start()  # a failed start is undone and raises, for the caller to tell why
        await daemon.serve_until_stopped()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
