"""The daemon's per-connection session, driven with records alone: no socket, no loop, no store.

Each test hands a :class:`~ctxstore.daemon.session.Session` the messages a
client may send and checks the effects it asks the server to carry out (and
the fleet it keeps), and :func:`admission` the connections it refuses.
"""

from __future__ import annotations

import os

from ctxstore.daemon.fleet import Fleet
from ctxstore.daemon.limits import Limits
from ctxstore.daemon.listener import PeerCredentials, PeerPolicy
from ctxstore.daemon.session import (
    Admin,
    Catalog,
    CheckDamage,
    Close,
    Publish,
    Send,
    Session,
    admission,
)
from ctxstore.wire import (
    Ack,
    DamageReport,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Ping,
    Pong,
    PublishFile,
    RepairRequest,
    StatusRequest,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Welcome,
)

#: never the test's own uid: the daemon's own uid passes every policy
OTHER_UID = os.getuid() + 1000
PEER = PeerCredentials(pid=4242, uid=OTHER_UID, gid=OTHER_UID, groups=frozenset({OTHER_UID}))
CURRENT = {1: 3, 2: 7, 5: 1}
GROUPS = {"vision": [2, 5, 9]}  # slot 9 has no version yet


def session_for(
    peer: PeerCredentials = PEER, publishers: PeerPolicy | None = None
) -> tuple[Session, Fleet]:
    fleet = Fleet(clock=lambda: 100.0)
    catalog = Catalog(lambda: dict(CURRENT), lambda group: GROUPS.get(group, []))
    policy = publishers or PeerPolicy()
    session = Session(
        11, peer, fleet=fleet, catalog=catalog, publishers=lambda: policy, daemon_pid=77
    )
    return session, fleet


def greeted(peer: PeerCredentials = PEER, publishers: PeerPolicy | None = None) -> Session:
    session, _ = session_for(peer, publishers)
    session.handle(Hello(role="reader", name="worker", pid=peer.pid))
    return session


def test_hello_is_welcomed_with_the_current_versions_and_joins_the_fleet() -> None:
    session, fleet = session_for()
    effects = session.handle(Hello(role="reader", name="worker", pid=4242))
    assert effects == [Send(Welcome(session=11, daemon_pid=77, versions=CURRENT))]
    assert session.name == "worker (pid 4242)"
    [state] = fleet.snapshot()
    assert (state.session, state.pid, state.uid, state.role) == (11, 4242, OTHER_UID, "reader")


def test_subscribe_answers_the_current_versions_it_covers() -> None:
    session = greeted()
    effects = session.handle(Subscribe(request_id=3, slots=(1, 4), groups=("vision",)))
    assert effects == [Send(Subscribed(request_id=3, versions={1: 3, 2: 7, 5: 1}))]
    covers = session.subscriptions.covers
    assert covers(1, lambda slot: ()) and covers(4, lambda slot: ())
    assert covers(8, lambda slot: ("vision",)) and not covers(8, lambda slot: ("text",))
    assert session.handle(Subscribe(request_id=4, all=True)) == [
        Send(Subscribed(request_id=4, versions=CURRENT))
    ]


def test_unsubscribe_stops_covering_and_answers_nothing() -> None:
    session = greeted()
    session.handle(Subscribe(request_id=1, slots=(1, 2), groups=("vision",), all=True))
    assert session.handle(Unsubscribe(slots=(1,), groups=("vision",), all=True)) == []
    covers = session.subscriptions.covers
    assert not covers(1, lambda slot: ("vision",)) and covers(2, lambda slot: ())


def test_ack_and_heartbeat_update_what_the_fleet_says_the_peer_holds() -> None:
    session, fleet = session_for()
    session.handle(Hello(role="reader", name="worker", pid=4242))
    assert session.handle(Ack(slot=1, version=3)) == []
    assert fleet.held_versions(1) == {3}
    assert session.handle(Heartbeat(pid=4242, name="worker", held=((2, 7),), uss=10, pss=5)) == []
    [state] = fleet.snapshot()
    assert (state.held, state.uss, state.pss, state.acks) == ({(2, 7)}, 10, 5, 1)


def test_ping_is_answered_and_pong_or_error_are_not() -> None:
    session = greeted()
    assert session.handle(Ping(nonce=99)) == [Send(Pong(nonce=99))]
    assert session.handle(Pong(nonce=99)) == []
    assert session.handle(Error(kind="internal", message="x", fatal=False)) == []


def test_status_and_damage_reports_go_to_the_server() -> None:
    session = greeted()
    assert session.handle(StatusRequest(request_id=5)) == [Admin(StatusRequest(request_id=5))]
    report = DamageReport(slot=1, version=3, detail="checksum")
    assert session.handle(report) == [CheckDamage(report, "session 11 (worker (pid 4242))")]


def publish_request(request_id: int = 8) -> PublishFile:
    return PublishFile(request_id=request_id, slot=2, path="/data/w.npz", metadata={})


def test_a_publish_is_forwarded_to_the_committer_when_the_peer_may_publish() -> None:
    session = greeted(publishers=PeerPolicy(frozenset({PEER.uid})))
    assert session.handle(publish_request()) == [Publish(publish_request())]
    assert session.handle(RepairRequest(request_id=9)) == [Admin(RepairRequest(request_id=9))]


def test_a_peer_that_may_not_publish_is_answered_with_an_error_and_stays() -> None:
    uid = OTHER_UID + 1
    outsider = PeerCredentials(pid=1, uid=uid, gid=uid, groups=frozenset({uid}))
    session = greeted(outsider, PeerPolicy(frozenset({PEER.uid})))
    [refused] = session.handle(publish_request(8))
    assert isinstance(refused, Send) and isinstance(refused.message, Error)
    error = refused.message
    assert (error.kind, error.request_id, error.fatal) == ("permission_denied", 8, False)
    assert f"uid {uid} may not publish" in error.message
    [refused] = session.handle(RepairRequest(request_id=9, slot=2))
    assert isinstance(refused, Send) and isinstance(refused.message, Error)
    assert (refused.message.kind, refused.message.request_id) == ("permission_denied", 9)


def test_goodbye_closes_and_a_message_no_client_sends_is_refused() -> None:
    session = greeted()
    assert session.handle(Goodbye(reason="done")) == [Close("peer said goodbye: done")]
    send, close = session.handle(Welcome(session=1, daemon_pid=1, versions={}))
    assert isinstance(send, Send) and isinstance(send.message, Error)
    assert (send.message.kind, send.message.fatal) == ("invalid_input", True)
    assert close == Close("unexpected Welcome from a client")


LIMITS = Limits(nofile=1024, connections=3, per_uid=2, http_connections=8,
                event_streams=4, partial_bytes=1 << 20)  # fmt: skip


def refusal(**changes: object) -> Error | None:
    arguments: dict[str, object] = {
        "stopping": False,
        "policy": PeerPolicy(),
        "limits": LIMITS,
        "open_connections": 0,
        "open_by_uid": {},
    }
    return admission(PEER, **{**arguments, **changes})  # type: ignore[arg-type]


def test_admission_refuses_past_the_limits_and_while_stopping() -> None:
    assert refusal() is None
    assert refusal(open_connections=2, open_by_uid={PEER.uid: 1}) is None
    stopping = refusal(stopping=True)
    assert stopping is not None and (stopping.kind, stopping.fatal) == ("forbidden", True)
    full = refusal(open_connections=3)
    assert full is not None and full.kind == "daemon_unavailable"
    assert "limits.connections = 3" in full.message
    mine = refusal(open_connections=2, open_by_uid={PEER.uid: 2})
    assert mine is not None and "limits.connections_per_uid = 2" in mine.message


def test_admission_refuses_a_uid_the_policy_does_not_allow() -> None:
    refused = refusal(policy=PeerPolicy(frozenset({1})))
    assert refused is not None and refused.message == f"uid {PEER.uid} is not allowed"
