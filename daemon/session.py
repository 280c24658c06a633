"""One peer's session, sans-IO: a message in, the replies and effects out.

:class:`Session` holds what the daemon knows of one connection (its name, its
subscriptions) and turns each message the protocol decoded into a list of
effects: :class:`Send` a reply, :class:`Close` the connection, hand a
:class:`Publish` request to the committer, run an :class:`Admin` request
(status, repair) off the loop, :class:`CheckDamage` a reader reported. It
reads the fleet, the current versions and the rules in force through what its
constructor was given, and touches no socket, thread or task: the server
(daemon/server.py) carries the effects out, and tests/test_session.py drives a
session with records alone.

:func:`admission` is the same for a new connection: the fatal error it is
refused with (shutting down, not allowed, too many connections), or None.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import msgpack

from ctxstore.errors import DaemonUnavailableError, InvalidInputError, PermissionDeniedError
from ctxstore.records import Problem
from ctxstore.store import Repair
from ctxstore.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_STATUS_ROWS,
    PROTOCOL_VERSION,
    Ack,
    DamageReport,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    Ping,
    Pong,
    PublishBuild,
    PublishFile,
    PublishShm,
    Repaired,
    RepairRequest,
    StatusRequest,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Welcome,
    encode_body,
    error_for,
)

from .fleet import Fleet
from .limits import Limits
from .listener import PeerCredentials, PeerPolicy
from .logs import peer_events

log = logging.getLogger("ctxstore.daemon")

PublishRequest: TypeAlias = PublishFile | PublishBuild | PublishShm
AdminRequest: TypeAlias = StatusRequest | RepairRequest


# -- effects: what the server does for a session -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``message`` to this session's peer."""

    message: Message


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection, for ``reason`` (logged)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Commit ``request`` (the peer may publish) and answer it when it is done."""

    request: PublishRequest


@dataclass(frozen=True, slots=True)
class Admin:
    """Answer a status or repair request from a worker thread (the peer may ask it)."""

    request: AdminRequest


@dataclass(frozen=True, slots=True)
class CheckDamage:
    """Triage a reader's damage report (and hash the version, if it needs checking)."""

    report: DamageReport
    who: str


Effect: TypeAlias = Send | Close | Publish | Admin | CheckDamage


# -- what a session reads -------------------------------------------------------------------------


@dataclass(slots=True)
class Subscriptions:
    """The slots, groups (or everything) one peer follows."""

    slots: set[int] = field(default_factory=set)
    groups: set[str] = field(default_factory=set)
    everything: bool = False

    def covers(self, slot: int, groups_of: Callable[[int], Collection[str]]) -> bool:
        """Whether ``slot`` is subscribed to; ``groups_of`` (a query) is asked only if need be."""
        if self.everything or slot in self.slots:
            return True
        return bool(self.groups) and not self.groups.isdisjoint(groups_of(slot))


@dataclass(frozen=True, slots=True)
class Catalog:
    """The store as a session sees it: current versions, and the slots of a group."""

    current_versions: Callable[[], Mapping[int, int]]
    slots_in_group: Callable[[str], Iterable[int]]


class Session:
    """What the daemon knows of one connection, and how it answers each message."""

    def __init__(
        self,
        session: int,
        peer: PeerCredentials,
        *,
        fleet: Fleet,
        catalog: Catalog,
        publishers: Callable[[], PeerPolicy],
        daemon_pid: int,
    ) -> None:
        self.session = session
        self.peer = peer
        self.name = f"pid {peer.pid}"
        #: the protocol the peer's hello asked for (announcements carry records from 2 on)
        self.protocol = PROTOCOL_VERSION
        self.subscriptions = Subscriptions()
        self._fleet = fleet
        self._catalog = catalog
        self._publishers = publishers  # read per request: a SIGHUP may replace the policy
        self._daemon_pid = daemon_pid

    def handle(self, message: Message) -> list[Effect]:
        """The effects of one message from the peer, in order."""
        kind = type(message)
        if kind is not Ack and kind is not Heartbeat:  # those two stamp last_seen themselves
            self._fleet.seen(self.session)
        answer = self._ANSWERS.get(kind)
        if answer is None:  # the protocol's state table lets no other message through
            why = f"unexpected {type(message).__name__} from a client"
            return [Send(error_for(InvalidInputError(why))), Close(why)]
        return answer(self, message)

    def _ack(self, ack: Ack) -> list[Effect]:
        log.debug("session %d: ack slot %d version %d", self.session, ack.slot, ack.version)
        self._fleet.ack(self.session, ack.slot, ack.version)
        return []

    def _heartbeat(self, beat: Heartbeat) -> list[Effect]:
        self._fleet.heartbeat(self.session, beat.held, beat.uss, beat.pss)
        return []

    def _damage(self, report: DamageReport) -> list[Effect]:
        return [CheckDamage(report, f"session {self.session} ({self.name})")]

    def _status(self, request: StatusRequest) -> list[Effect]:
        return [Admin(request)]

    def _ping(self, ping: Ping) -> list[Effect]:
        return [Send(Pong(nonce=ping.nonce))]

    def _ignore(self, _message: Message) -> list[Effect]:
        return []

    def _goodbye(self, goodbye: Goodbye) -> list[Effect]:
        return [Close(f"peer said goodbye: {goodbye.reason}")]

    def _hello(self, hello: Hello) -> list[Effect]:
        self.name = f"{hello.name or 'anonymous'} (pid {hello.pid})"
        peer_events.log(
            f"hello: pid {self.peer.pid}",
            logging.INFO,
            "session %d: hello from %s as %s",
            self.session,
            self.name,
            hello.role,
        )
        self._fleet.join(
            self.session, pid=hello.pid, name=hello.name, uid=self.peer.uid, role=hello.role
        )
        versions = dict(self._catalog.current_versions())
        self.protocol = hello.protocol  # checked by the connection: one this daemon speaks
        welcome = Welcome(
            protocol=hello.protocol,
            session=self.session,
            daemon_pid=self._daemon_pid,
            versions=versions,
        )
        return [Send(welcome)]

    def _subscribe(self, message: Subscribe) -> list[Effect]:
        subscriptions = self.subscriptions
        subscriptions.slots.update(message.slots)
        subscriptions.groups.update(message.groups)
        subscriptions.everything |= message.all
        current = self._catalog.current_versions()
        if message.all:
            versions = dict(current)
        else:
            wanted = set(message.slots)
            for group in message.groups:
                wanted.update(self._catalog.slots_in_group(group))
            versions = {slot: current[slot] for slot in wanted if slot in current}
        return [Send(Subscribed(request_id=message.request_id, versions=versions))]

    def _unsubscribe(self, message: Unsubscribe) -> list[Effect]:
        self.subscriptions.slots.difference_update(message.slots)
        self.subscriptions.groups.difference_update(message.groups)
        if message.all:
            self.subscriptions.everything = False
        return []

    def _publish(self, request: PublishRequest) -> list[Effect]:
        if self._publishers().permits(self.peer):
            return [Publish(request)]
        refusal = PermissionDeniedError(
            f"uid {self.peer.uid} may not publish to this daemon (see publish_uids and "
            "publish_gids in its configuration)"
        )
        peer_events.log(
            "publish refused",
            logging.WARNING,
            "session %d: publish to slot %d refused: %s",
            self.session,
            request.slot,
            refusal,
        )
        return [Send(error_for(refusal, request_id=request.request_id, fatal=False))]

    def _repair(self, request: RepairRequest) -> list[Effect]:
        """Repairs move current versions: allowed to the peers that may publish."""
        if self._publishers().permits(self.peer):
            return [Admin(request)]
        scope = "every slot" if request.slot is None else f"slot {request.slot}"
        refusal = PermissionDeniedError(
            f"uid {self.peer.uid} may not repair this daemon's store: repairs move "
            "current versions, so they are allowed to the peers that may publish "
            "(publish_uids and publish_gids in its configuration)"
        )
        log.warning("session %d: repair of %s refused: %s", self.session, scope, refusal)
        return [Send(error_for(refusal, request_id=request.request_id, fatal=False))]

    #: the answer to each message a client may send, by type
    _ANSWERS: ClassVar[Mapping[type[Message], Callable[[Session, Any], list[Effect]]]] = {
        Hello: _hello,
        Subscribe: _subscribe,
        Unsubscribe: _unsubscribe,
        Ack: _ack,
        Heartbeat: _heartbeat,
        DamageReport: _damage,
        PublishFile: _publish,
        PublishBuild: _publish,
        PublishShm: _publish,
        StatusRequest: _status,
        RepairRequest: _repair,
        Ping: _ping,
        Pong: _ignore,
        Error: _ignore,
        Goodbye: _goodbye,
    }


def admission(
    peer: PeerCredentials,
    *,
    stopping: bool,
    policy: PeerPolicy,
    limits: Limits,
    open_connections: int,
    open_by_uid: Mapping[int, int],
) -> Error | None:
    """The fatal error a new peer is refused with, or None to serve it."""
    if stopping:
        return Error(kind="forbidden", message="shutting down", fatal=True)
    if not policy.permits(peer):
        return Error(kind="forbidden", message=f"uid {peer.uid} is not allowed", fatal=True)
    busy = DaemonUnavailableError.kind
    if open_connections >= limits.connections:
        why = (
            f"too many connections: {open_connections} open, the limit is "
            f"limits.connections = {limits.connections}; try again later"
        )
        return Error(kind=busy, message=why, fatal=True)
    mine = open_by_uid.get(peer.uid, 0)
    if mine >= limits.per_uid:
        why = (
            f"too many connections from uid {peer.uid}: {mine} open, the limit is "
            f"limits.connections_per_uid = {limits.per_uid}; try again later"
        )
        return Error(kind=busy, message=why, fatal=True)
    return None


def repaired_answer(
    request_id: int, problems: list[Problem], repairs: list[Repair], *, max_frame_size: int
) -> Repaired:
    """The Repaired frame: every repair, and as many problems as fit one frame (the
    default bound too, which clients read with); ``problems_total`` counts them all."""
    rows = [dataclasses.asdict(repair) for repair in repairs]
    base = len(encode_body(Repaired(request_id=request_id, problems_total=len(problems),
                                    repairs=tuple(rows))))  # fmt: skip
    budget = min(max_frame_size, DEFAULT_MAX_FRAME_SIZE) - base - 16  # the array's header
    shown: list[dict[str, Any]] = []
    for problem in problems[:MAX_STATUS_ROWS]:
        row = problem.as_dict()
        budget -= len(msgpack.packb(row, use_bin_type=True))
        if budget < 0:
            break
        shown.append(row)
    return Repaired(
        request_id=request_id,
        problems=tuple(shown),
        problems_total=len(problems),
        repairs=tuple(rows),
    )
