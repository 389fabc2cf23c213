"""Unit tests of the hub's bookkeeping: Registry, SessionBook and HookBroker (no sockets, explicit clocks)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from services.control.protocol import ProtocolError
from services.hub.hooks import HookBroker
from services.hub.registry import Registry, check_heartbeat
from services.hub.sessions import ENDED, STARTED, TRACK_ADDED, TRACK_REMOVED, SessionBook, check_sessions


def hb(service="capture@cam1", pid=100, state="ready", **extra) -> dict:
    return {"service": service, "pid": pid, "started": 1000.0, "state": state, **extra}


# --- Registry --------------------------------------------------------------------------------

def test_first_heartbeat_creates_a_record():
    reg = Registry(heartbeat_interval=1.0, stale_after=10.0)
    rec, previous, restarted = reg.heartbeat(hb(state="starting", status="warming up", rate=2, streams=["s1", 5]),
                                             now=50.0)
    assert previous is None and restarted is False
    assert (rec.id, rec.kind, rec.pid, rec.state, rec.restarts) == ("capture@cam1", "capture", 100, "starting", 0)
    assert rec.status == "warming up" and rec.rate == 2.0 and rec.streams == ["s1"]
    assert rec.last_seen == 50.0
    assert reg.counts()["starting"] == 1


def test_same_pid_updates_state_without_restart():
    reg = Registry(1.0, 10.0)
    reg.heartbeat(hb(state="starting"), 1.0)
    rec, previous, restarted = reg.heartbeat(hb(state="ready"), 2.0)
    assert (previous, restarted, rec.state, rec.restarts, rec.last_seen) == ("starting", False, "ready", 0, 2.0)


def test_new_pid_is_a_restart_and_counts():
    reg = Registry(1.0, 10.0)
    reg.heartbeat(hb(pid=100), 1.0)
    rec, previous, restarted = reg.heartbeat(hb(pid=200, state="starting"), 2.0)
    assert restarted is True and previous == "ready"
    assert rec.pid == 200 and rec.restarts == 1 and rec.state == "starting"
    rec, _, restarted = reg.heartbeat(hb(pid=300), 3.0)
    assert restarted is True and rec.restarts == 2
    assert reg.services["capture@cam1"] is rec


def test_status_is_capped():
    reg = Registry(1.0, 10.0)
    rec, _, _ = reg.heartbeat(hb(status="x" * 500), 1.0)
    assert len(rec.status) == 200


def test_sweep_degrades_then_stales_then_recovers():
    reg = Registry(heartbeat_interval=1.0, stale_after=10.0)
    rec, _, _ = reg.heartbeat(hb(), now=100.0)
    assert reg.sweep(102.5) == []                       # exactly 2.5 intervals late: still fine
    assert reg.sweep(102.6) == [(rec, "ready")]         # later than 2.5x interval: degraded
    assert rec.state == "degraded"
    assert reg.sweep(105.0) == []                       # no change, nothing reported
    assert reg.sweep(110.0) == []                       # exactly stale_after: not yet stale
    assert reg.sweep(110.1) == [(rec, "degraded")]
    assert rec.state == "stale"
    _, previous, restarted = reg.heartbeat(hb(), now=111.0)
    assert previous == "stale" and restarted is False and rec.state == "ready"
    assert reg.sweep(111.5) == []


def test_sweep_keeps_a_reported_degraded_state():
    reg = Registry(1.0, 10.0)
    rec, _, _ = reg.heartbeat(hb(state="degraded"), 0.0)
    assert reg.sweep(1.0) == [] and rec.state == "degraded"


def test_sweep_goes_straight_to_stale():
    reg = Registry(1.0, 3.0)
    rec, _, _ = reg.heartbeat(hb(), 0.0)
    assert reg.sweep(4.0) == [(rec, "ready")] and rec.state == "stale"


def test_bye_needs_the_matching_pid():
    reg = Registry(1.0, 10.0)
    rec, _, _ = reg.heartbeat(hb(pid=100), 0.0)
    assert reg.bye("capture@cam1", 999) is None
    assert rec.state == "ready"
    assert reg.bye("nosuch", 100) is None
    assert reg.bye("capture@cam1", 100) is rec
    assert rec.state == "stopped"
    assert reg.sweep(1000.0) == []  # a stopped service never goes stale
    assert reg.counts() == {"starting": 0, "ready": 0, "degraded": 0, "stale": 0, "stopped": 1}


def test_rows_are_sorted_and_complete():
    reg = Registry(1.0, 10.0)
    reg.heartbeat(hb(service="vision"), 10.0)
    reg.heartbeat(hb(service="capture@b"), 10.0)
    rows = reg.rows(now=12.0, wall=1010.0)
    assert [r["service"] for r in rows] == ["capture@b", "vision"]
    assert rows[0]["uptime"] == 10.0 and rows[0]["last_seen"] == 2.0 and rows[0]["kind"] == "capture"


def test_check_heartbeat_accepts_a_full_body():
    body = hb(sessions=[], streams=["a"], metrics=[], rate=1.5, status="ok")
    assert check_heartbeat(body) is body
    assert check_heartbeat(hb(service="hub", started=5)) is not None


@pytest.mark.parametrize("body, message", [
    ({k: v for k, v in hb().items() if k != "service"}, "heartbeat 'service' must be a service id, got NoneType"),
    (hb(service=7), "heartbeat 'service' must be a service id, got int"),
    (hb(service="Capture"), "service id 'Capture' must look like 'kind' or 'kind@instance'"),
    (hb(service="capture@"), "service id 'capture@' must look like 'kind' or 'kind@instance'"),
    (hb(service="capture@-x"), "service id 'capture@-x' must look like 'kind' or 'kind@instance'"),
    (hb(pid=True), "heartbeat 'pid' must be an integer, got bool"),
    (hb(pid="100"), "heartbeat 'pid' must be an integer, got str"),
    (hb(pid=1.0), "heartbeat 'pid' must be an integer, got float"),
    (hb(started=None), "heartbeat 'started' must be a number, got NoneType"),
    (hb(started=False), "heartbeat 'started' must be a number, got bool"),
    (hb(state="stale"), "heartbeat 'state' must be starting, ready or degraded, got 'stale'"),
    (hb(state=None), "heartbeat 'state' must be starting, ready or degraded, got None"),
    (hb(sessions={}), "heartbeat 'sessions' must be a list"),
    (hb(streams="s1"), "heartbeat 'streams' must be a list"),
    (hb(metrics=None), "heartbeat 'metrics' must be a list"),
    (hb(rate="fast"), "heartbeat 'rate' must be a number"),
])
def test_check_heartbeat_rejections(body, message):
    with pytest.raises(ProtocolError) as info:
        check_heartbeat(body)
    assert (info.value.code, info.value.message) == ("bad_args", message)


# --- SessionBook -----------------------------------------------------------------------------

def sess(sid="cam1", room="lobby", tracks=("v0",), **extra) -> dict:
    return {"id": sid, "room": room, "tracks": [{"id": t, "kind": "video"} for t in tracks], **extra}


def topics(changes) -> list[str]:
    return [topic for topic, _ in changes]


def test_update_starts_a_session_and_its_tracks_once():
    book = SessionBook()
    changes = book.update("capture@cam1", 100, [sess(tracks=("v0", "a0"))])
    assert topics(changes) == [STARTED, TRACK_ADDED, TRACK_ADDED]
    started = changes[0][1]
    assert started["session"] == "cam1" and started["room"] == "lobby" and started["service"] == "capture@cam1"
    assert started["kind"] == "video" and started["tracks"] == []
    assert [c[1]["track"]["id"] for c in changes[1:]] == ["v0", "a0"]
    assert changes[1][1]["session"] == "cam1" and changes[1][1]["room"] == "lobby"
    assert book.update("capture@cam1", 100, [sess(tracks=("v0", "a0"))]) == []
    assert book.rooms()["lobby"][0]["tracks"] == [{"id": "v0", "kind": "video"}, {"id": "a0", "kind": "video"}]


def test_default_room():
    book = SessionBook()
    book.update("capture@cam1", 1, [{"id": "s"}])
    assert list(book.rooms()) == ["default"]


def test_track_removed_and_added():
    book = SessionBook()
    book.update("capture@cam1", 100, [sess(tracks=("v0", "a0"))])
    changes = book.update("capture@cam1", 100, [sess(tracks=("v0",))])
    assert topics(changes) == [TRACK_REMOVED]
    assert changes[0][1]["track"]["id"] == "a0" and changes[0][1]["reason"] == "removed"
    changes = book.update("capture@cam1", 100, [sess(tracks=("v1",))])
    assert topics(changes) == [TRACK_REMOVED, TRACK_ADDED]
    assert changes[0][1]["track"]["id"] == "v0" and changes[1][1]["track"]["id"] == "v1"


def test_a_send_track_that_switches_stream_is_updated_without_a_hook():
    """A call's route is a track that keeps its id while the stream it sends changes: `sessions` shows the
    new stream, and no ON_VIDEO_TRACK_ADDED/REMOVED fires for a switch."""
    book = SessionBook()
    send = {"id": "send-video", "kind": "video", "direction": "send", "stream": "cam1", "state": "sending"}
    assert topics(book.update("rtp@a", 1, [{"id": "call", "tracks": [send]}])) == [STARTED, TRACK_ADDED]
    switched = {**send, "stream": "cam2", "state": "switching"}
    assert book.update("rtp@a", 1, [{"id": "call", "tracks": [switched]}]) == []
    assert book.rooms()["default"][0]["tracks"] == [switched]


def test_session_disappearing_removes_tracks_then_ends():
    book = SessionBook()
    book.update("capture@cam1", 100, [sess(tracks=("v0", "a0"))])
    changes = book.update("capture@cam1", 100, [])
    assert topics(changes) == [TRACK_REMOVED, TRACK_REMOVED, ENDED]
    assert all(c[1]["reason"] == "ended" for c in changes)
    assert changes[2][1]["session"] == "cam1"
    assert book.sessions == {}
    assert book.update("capture@cam1", 100, []) == []


def test_pid_change_ends_and_restarts():
    book = SessionBook()
    book.update("capture@cam1", 100, [sess()])
    changes = book.update("capture@cam1", 200, [sess()])
    assert topics(changes) == [TRACK_REMOVED, ENDED, STARTED, TRACK_ADDED]
    assert changes[1][1]["reason"] == "service restarted"
    assert book.sessions["cam1"].pid == 200


def test_other_services_sessions_are_untouched():
    book = SessionBook()
    book.update("capture@a", 1, [sess("a")])
    book.update("capture@b", 2, [sess("b")])
    assert topics(book.update("capture@a", 1, [])) == [TRACK_REMOVED, ENDED]
    assert list(book.sessions) == ["b"]


def test_first_owner_of_a_session_id_wins():
    book = SessionBook()
    book.update("capture@a", 1, [sess("shared", room="r1")])
    assert book.update("capture@b", 2, [sess("shared", room="r2", tracks=("x",))]) == []
    s = book.sessions["shared"]
    assert (s.service, s.room, list(s.tracks)) == ("capture@a", "r1", ["v0"])
    # The loser's next heartbeat without it ends nothing of the owner's.
    assert book.update("capture@b", 2, []) == []
    assert "shared" in book.sessions


def test_end_service():
    book = SessionBook()
    book.update("capture@a", 1, [sess("a1"), sess("a2", tracks=())])
    book.update("capture@b", 2, [sess("b1")])
    changes = book.end_service("capture@a", "service stale")
    assert topics(changes) == [TRACK_REMOVED, ENDED, ENDED]
    assert all(c[1]["reason"] == "service stale" for c in changes)
    assert list(book.sessions) == ["b1"]
    assert book.end_service("capture@a", "again") == []


def test_save_load_confirm_without_events(tmp_path):
    path = tmp_path / "hub-state.json"
    book = SessionBook(path)
    book.update("capture@cam1", 100, [sess(tracks=("v0", "a0"))])
    since = book.sessions["cam1"].since
    book.save()
    assert not path.with_suffix(".tmp").exists()

    again = SessionBook(path)
    assert again.load(now=50.0, grace=10.0) == 1
    s = again.sessions["cam1"]
    assert s.confirmed is False and s.since == since and set(s.tracks) == {"v0", "a0"}
    assert again.remembered_until == 60.0
    assert again.update("capture@cam1", 100, [sess(tracks=("v0", "a0"))]) == []
    assert again.sessions["cam1"].confirmed is True
    assert again.expire(61.0) == []


def test_load_then_restarted_service_ends_and_restarts(tmp_path):
    path = tmp_path / "hub-state.json"
    book = SessionBook(path)
    book.update("capture@cam1", 100, [sess()])
    book.save()
    again = SessionBook(path)
    again.load(0.0, 10.0)
    changes = again.update("capture@cam1", 101, [sess()])
    assert topics(changes) == [TRACK_REMOVED, ENDED, STARTED, TRACK_ADDED]


def test_expire_after_grace_ends_unconfirmed(tmp_path):
    path = tmp_path / "hub-state.json"
    book = SessionBook(path)
    book.update("capture@a", 1, [sess("a")])
    book.update("capture@b", 2, [sess("b", tracks=())])
    book.save()

    again = SessionBook(path)
    assert again.load(now=100.0, grace=5.0) == 2
    again.update("capture@a", 1, [sess("a")])       # confirmed
    assert again.expire(104.9) == []                 # grace not over
    changes = again.expire(105.0)
    assert topics(changes) == [ENDED]
    assert changes[0][1]["session"] == "b" and changes[0][1]["reason"] == "not confirmed after hub restart"
    assert list(again.sessions) == ["a"]
    assert again.expire(200.0) == []                 # only once


def test_load_without_file_or_path(tmp_path):
    assert SessionBook().load(0.0, 5.0) == 0
    book = SessionBook(tmp_path / "missing.json")
    assert book.load(0.0, 5.0) == 0 and book.remembered_until == 0.0
    book.save()
    assert json.loads((tmp_path / "missing.json").read_text()) == []
    assert SessionBook(tmp_path / "missing.json").load(0.0, 5.0) == 0


@pytest.mark.parametrize("content", ["{not json", "[1]", '{"a": 1}', '[{"id": "x"}]', "null", "\udcff"])
def test_corrupt_state_file_names_the_file(tmp_path, content):
    path = tmp_path / "hub-state.json"
    path.write_text(content, errors="surrogateescape")
    with pytest.raises(ValueError) as info:
        SessionBook(path).load(0.0, 5.0)
    assert str(path) in str(info.value)
    assert "unreadable" in str(info.value)


def test_corrupt_state_file_leaves_the_book_empty(tmp_path):
    path = tmp_path / "hub-state.json"
    good = SessionBook(path)
    good.update("capture@a", 1, [sess("a")])
    good.save()
    saved = json.loads(path.read_text())
    path.write_text(json.dumps(saved + [{"id": "broken"}]))
    book = SessionBook(path)
    with pytest.raises(ValueError):
        book.load(0.0, 5.0)
    assert book.sessions == {}


def test_check_sessions_accepts_valid():
    good = [sess(), {"id": "x:y@z-1.2"}, sess("b", tracks=()), {"id": "c", "tracks": [{"id": "a0", "kind": "audio"}]},
            {"id": "call", "tracks": [{"id": "send-audio", "kind": "audio", "direction": "send", "stream": "c-audio",
                                       "state": "waiting"}]}]
    assert check_sessions(good) is good


@pytest.mark.parametrize("sessions, message", [
    (["cam1"], "each session must be an object with an 'id' matching"),
    ([{"room": "x"}], "each session must be an object with an 'id' matching"),
    ([{"id": "-bad"}], "each session must be an object with an 'id' matching"),
    ([{"id": "a b"}], "each session must be an object with an 'id' matching"),
    ([{"id": "s", "room": 5}], "session 's': 'room' must be a string and 'tracks' a list"),
    ([{"id": "s", "tracks": {}}], "session 's': 'room' must be a string and 'tracks' a list"),
    ([{"id": "s", "tracks": ["v0"]}], "each track must be an object with an 'id' matching"),
    ([{"id": "s", "tracks": [{"id": ""}]}], "each track must be an object with an 'id' matching"),
    ([{"id": "s", "tracks": [{"id": "d0", "kind": "data"}]}], "track 'd0': kind must be video or audio"),
    ([{"id": "s", "tracks": [{"id": "v", "direction": "out"}]}], "track 'v': direction must be recv or send"),
    ([{"id": "s", "tracks": [{"id": "v", "stream": 5}]}], "track 'v': a send track's 'stream' is the stream"),
    ([{"id": "s", "tracks": [{"id": "v", "direction": "send"}]}], "track 'v': a send track's 'stream' is the stream"),
    ([{"id": "s", "tracks": [{"id": "v", "direction": "send", "stream": "a.b"}]}], "track 'v': a send track's"),
    ([{"id": "s", "tracks": [{"id": "v", "direction": "send", "stream": "cam", "state": "lost"}]}],
     "track 'v': state must be one of sending, switching, waiting, refused"),
])
def test_check_sessions_rejections(sessions, message):
    with pytest.raises(ProtocolError) as info:
        check_sessions(sessions)
    assert info.value.code == "bad_args"
    assert info.value.message.startswith(message)


# --- HookBroker ------------------------------------------------------------------------------

BRIDGE, VISION = "BEFORE_BRIDGE_VIDEO", "ON_VISION_RESULT"


@pytest.fixture
def broker() -> HookBroker:
    return HookBroker({BRIDGE: SimpleNamespace(deadline=0.5, on_timeout="block"),
                       VISION: SimpleNamespace(deadline=0.2, on_timeout="allow")})


def test_register_and_expire_by_ttl(broker):
    assert broker.handler(BRIDGE, 0.0) is None
    broker.register(BRIDGE, "ctx-1", ttl=10.0, now=100.0)
    h = broker.handler(BRIDGE, 109.9)
    assert h is not None and h.ctx == "ctx-1" and h.expires == 110.0
    assert broker.handler(VISION, 105.0) is None
    assert broker.handler(BRIDGE, 110.0) is None       # expired at exactly now + ttl
    assert BRIDGE not in broker.handlers
    broker.register(BRIDGE, "ctx-2", ttl=1.0, now=200.0)
    broker.register(BRIDGE, "ctx-3", ttl=1.0, now=200.5)  # the latest registration wins
    assert broker.handler(BRIDGE, 201.2).ctx == "ctx-3"


@pytest.mark.parametrize("ttl", [0.05, 3600.5, 0.0, -1.0])
def test_register_bad_ttl(broker, ttl):
    with pytest.raises(ProtocolError) as info:
        broker.register(BRIDGE, "ctx", ttl=ttl, now=0.0)
    assert info.value.code == "bad_args"
    assert info.value.message == f"ttl must be within 0.1..3600 seconds, got {ttl}"
    assert broker.handlers == {}


@pytest.mark.parametrize("ttl", [0.1, 3600])
def test_register_ttl_bounds(broker, ttl):
    broker.register(VISION, "ctx", ttl=ttl, now=0.0)
    assert broker.handler(VISION, 0.0) is not None


def test_open_call_and_answer_allow(broker):
    p = broker.open_call(BRIDGE, "caller", now=10.0)
    assert (p.hook, p.caller, p.started, p.deadline) == (BRIDGE, "caller", 10.0, 10.5)
    assert broker.pending == {p.call: p}
    done, result = broker.answer(p.call, "allow", {"ignored": True})
    assert done is p
    assert result == {"decision": "allow", "data": None, "reason": "answered"}
    assert broker.pending == {}


def test_call_ids_are_unique(broker):
    ids = {broker.open_call(BRIDGE, None, 0.0).call for _ in range(5)}
    assert len(ids) == 5


def test_answer_block(broker):
    p = broker.open_call(VISION, "c", 0.0)
    assert broker.answer(p.call, "block", None)[1] == {"decision": "block", "data": None, "reason": "answered"}


def test_answer_replace(broker):
    p = broker.open_call(VISION, "c", 0.0)
    _, result = broker.answer(p.call, "replace", {"labels": ["cat"]})
    assert result == {"decision": "replace", "data": {"labels": ["cat"]}, "reason": "answered"}


@pytest.mark.parametrize("data", [None, [1], "x"])
def test_replace_without_object_data_is_rejected_and_stays_pending(broker, data):
    p = broker.open_call(BRIDGE, "c", 0.0)
    with pytest.raises(ProtocolError) as info:
        broker.answer(p.call, "replace", data)
    assert (info.value.code, info.value.message) == ("bad_args", "decision 'replace' needs 'data', an object")
    assert broker.pending[p.call] is p
    assert broker.answer(p.call, "allow", None)[1]["decision"] == "allow"


@pytest.mark.parametrize("decision", ["maybe", "ALLOW", None, ""])
def test_bad_decision_stays_pending(broker, decision):
    p = broker.open_call(BRIDGE, "c", 0.0)
    with pytest.raises(ProtocolError) as info:
        broker.answer(p.call, decision, None)
    assert info.value.code == "bad_args"
    assert info.value.message == f"decision must be one of allow, block, replace, got {decision!r}"
    assert p.call in broker.pending


def test_answer_unknown_or_twice_is_not_found(broker):
    with pytest.raises(ProtocolError) as info:
        broker.answer("h999", "allow", None)
    assert info.value.code == "not_found"
    assert info.value.message == ("no pending hook call 'h999' for this handler "
                                  "(answered already, too late, or sent to another handler)")
    p = broker.open_call(BRIDGE, "c", 0.0)
    broker.answer(p.call, "block", None)
    with pytest.raises(ProtocolError) as info:
        broker.answer(p.call, "block", None)
    assert info.value.code == "not_found"


def test_expire_answers_with_the_policy(broker):
    b = broker.open_call(BRIDGE, "cb", now=0.0)   # deadline 0.5, on_timeout block
    v = broker.open_call(VISION, "cv", now=0.0)   # deadline 0.2, on_timeout allow
    assert broker.expire(0.19) == []
    assert broker.expire(0.2) == [(v, {"decision": "allow", "data": None, "reason": "timeout"})]
    assert list(broker.pending) == [b.call]
    assert broker.expire(0.6) == [(b, {"decision": "block", "data": None, "reason": "timeout"})]
    assert broker.pending == {}
    with pytest.raises(ProtocolError) as info:
        broker.answer(b.call, "allow", None)  # too late
    assert info.value.code == "not_found"


def test_policy_result_without_handler(broker):
    assert broker.policy_result(BRIDGE, "no_handler") == {"decision": "block", "data": None, "reason": "no_handler"}
    assert broker.policy_result(VISION, "no_handler") == {"decision": "allow", "data": None, "reason": "no_handler"}


@pytest.mark.parametrize("action", [
    lambda b: b.register("NOPE", "ctx", 1.0, 0.0),
    lambda b: b.open_call("NOPE", "caller", 0.0),
    lambda b: b.policy_result("NOPE", "no_handler"),
])
def test_unknown_hook_is_not_found(broker, action):
    with pytest.raises(ProtocolError) as info:
        action(broker)
    assert info.value.code == "not_found"
    assert info.value.message == f"no synchronous hook named 'NOPE' (known: {BRIDGE}, {VISION})"
    assert broker.pending == {} and broker.handlers == {}


def test_only_the_handler_a_call_went_to_may_answer_it():
    broker = HookBroker({"BEFORE_BRIDGE_VIDEO": SimpleNamespace(deadline=0.5, on_timeout="block")})
    p = broker.open_call("BEFORE_BRIDGE_VIDEO", "caller", now=0.0)
    p.handler = [b"handler-a"]
    with pytest.raises(ProtocolError) as info:
        broker.answer(p.call, "allow", None, [b"someone-else"])
    assert info.value.code == "not_found"
    assert p.call in broker.pending  # still waiting for the real handler
    done, result = broker.answer(p.call, "allow", None, [b"handler-a"])
    assert done is p and result["reason"] == "answered"
