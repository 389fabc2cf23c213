"""The bridge's plan (who gets what) and its BEFORE_BRIDGE_VIDEO gate, alone: pure functions and a fake hub."""
from __future__ import annotations

from services.bridge.hookgate import HookGate
from services.bridge.plan import Member, bridged, plan
from services.bridge.room import members_of


def m(sid: str, codec: str = "h264", accepts: tuple[str, ...] | None = ("h264",), joined: float = 0.0,
      video: bool = True, audio: bool = True) -> Member:
    return Member(sid, video=sid if video else "", codec=codec if video else "", audio=f"{sid}-audio" if audio else "",
                  accepts=accepts, joined=joined)


def test_two_members_get_each_other_and_one_alone_gets_nothing():
    alone = plan([m("a")])
    assert alone["a"].video == "" and alone["a"].audio == "" and alone["a"].path == "none"
    routes = plan([m("a"), m("b")])
    assert (routes["a"].video, routes["a"].audio, routes["a"].path) == ("b", "b-audio", "pass-through")
    assert (routes["b"].video, routes["b"].audio) == ("a", "a-audio")


def test_more_members_hear_a_mix_without_themselves_and_see_the_speaker_or_the_previous_one():
    members = [m("a", joined=1), m("b", joined=2), m("c", joined=3)]
    routes = plan(members, speaker="c", previous="a")
    assert routes["a"].source == "c" and routes["b"].source == "c"
    assert routes["c"].source == "a", "the speaker sees the previous speaker"
    for target, r in routes.items():
        assert r.audio == f"mix-{target}-audio" and target not in r.heard and len(r.heard) == 2
    nobody = plan(members)
    assert {t: r.source for t, r in nobody.items()} == {"a": "b", "b": "a", "c": "a"}, "the first to join"


def test_pin_wins_over_the_speaker_and_the_pinned_one_sees_the_speaker():
    members = [m("a"), m("b"), m("c")]
    routes = plan(members, policy="pin", pinned="b", speaker="c")
    assert routes["a"].source == "b" and routes["c"].source == "b"
    assert routes["b"].source == "c"


def test_codecs_pass_through_transcode_waiting_and_impossible():
    routes = plan([m("web", codec="vp8", accepts=("vp8",)), m("phone")])
    assert routes["web"].path == "transcode" and routes["web"].video == "phone-to-vp8" \
        and routes["web"].transcode == ("phone", "vp8")
    assert routes["phone"].video == "web-to-h264" and routes["phone"].codec == "h264"
    assert plan([m("a", codec="vp8", accepts=()), m("b")])["a"].path == "pass-through", "() takes any codec"
    waiting = plan([m("a", codec=""), m("b")])
    assert waiting["b"].path == "waiting" and waiting["b"].video == ""
    h265 = plan([m("a", accepts=("h265",)), m("b")])
    assert h265["a"].path == "none" and "h265" in h265["a"].note


def test_members_without_video_are_heard_not_seen_and_cameras_are_sources_only():
    members = [m("cam", accepts=None), m("a"), m("voice", video=False)]
    routes = plan(members)
    assert set(routes) == {"a", "voice"}, "a camera takes nothing"
    assert routes["a"].source == "cam" and "voice" in routes["a"].heard


def test_grid_names_every_other_member_and_never_the_target():
    routes = plan([m("a"), m("b"), m("c", accepts=("vp8", "h264"))], policy="grid")
    assert routes["a"].path == "grid" and routes["a"].grid == ("b", "c") and routes["a"].video == "grid-a"
    assert routes["c"].codec == "vp8"


def test_past_max_participants_the_latest_are_refused():
    ins, out = bridged([m("c", joined=3), m("a", joined=1), m("b", joined=2)], 2)
    assert [x.id for x in ins] == ["a", "b"] and [x.id for x in out] == ["c"]


def test_members_of_the_hubs_sessions():
    sessions = [
        {"session": "cam", "kind": "video", "since": 1.0,
         "tracks": [{"id": "video", "kind": "video", "stream": "cam", "format": "h264"}]},
        {"session": "sip-1", "kind": "call", "since": 2.0, "tracks": [],
         "accepts": {"video": ["h264"], "raw_video": False, "audio": ["s16"]}},
        {"session": "idle", "kind": "video", "tracks": []},
    ]
    got = {x.id: x for x in members_of(sessions)}
    assert set(got) == {"cam", "sip-1"}
    assert got["cam"].accepts is None and got["cam"].codec == "h264"
    assert (got["sip-1"].video, got["sip-1"].codec, got["sip-1"].audio) == ("sip-1", "h264", "sip-1-audio"), \
        "a call is routed to before its first packet, by the names its media will have"


class FakeHub:
    def __init__(self) -> None:
        self.calls: list = []

    def ask(self, body, done) -> None:
        self.calls.append((body, done))


def test_the_gate_asks_once_per_route_then_on_recheck_and_after_the_interval():
    hub, changed, counted = FakeHub(), [], []
    now = [100.0]
    gate = HookGate(hub.ask, lambda: changed.append(1), lambda d, r: counted.append((d, r)), clock=lambda: now[0])
    d = gate.decide(("a", "b"), {"source": "a"}, recheck=10.0)
    assert d.decision == "" and len(hub.calls) == 1
    gate.decide(("a", "b"), {"source": "a"}, recheck=10.0)
    assert len(hub.calls) == 1, "never a second question while one is out"
    hub.calls[0][1]({"decision": "block", "reason": "answered"}, None)
    assert d.decision == "block" and changed == [1] and counted == [("block", "answered")]
    now[0] += 5
    gate.decide(("a", "b"), {}, recheck=10.0)
    assert len(hub.calls) == 1, "not before the interval"
    now[0] += 6
    gate.decide(("a", "b"), {}, recheck=10.0)
    assert len(hub.calls) == 2
    hub.calls[1][1]({"decision": "replace", "data": {"stream": "censored"}, "reason": "answered"}, None)
    assert (d.decision, d.stream) == ("replace", "censored") and changed == [1, 1]
    assert gate.recheck(lambda key: key[1] == "b") == 1
    gate.decide(("a", "b"), {}, recheck=0.0)
    assert len(hub.calls) == 3, "recheck asks again even with no interval"


def test_the_gate_survives_a_hub_error_and_a_replace_without_a_stream():
    hub = FakeHub()
    gate = HookGate(hub.ask, lambda: None, lambda d, r: None)
    d = gate.decide(("a", "b"), {}, recheck=0)
    hub.calls[0][1](None, RuntimeError("hub away"))
    assert d.decision == "allow" and d.reason == "error"
    d2 = gate.decide(("c", "b"), {}, recheck=0)
    hub.calls[1][1]({"decision": "replace", "data": {}, "reason": "answered"}, None)
    assert d2.decision == "block" and "replace without" in d2.reason
    gate.forget({("a", "b")})
    assert ("c", "b") not in gate.decisions


def test_a_target_with_several_video_tracks_gets_each_other_member_on_its_own():
    members = [m("a", joined=1), m("b", joined=2), m("c", joined=3), Member("d", "d", "h264", "d-audio", ("h264",),
                                                                           4, video_tracks=3)]
    routes = plan(members, speaker="c", previous="a")
    d = routes["d"]
    assert d.source == "c", "the first track follows the policy"
    assert [(r.slot, r.source, r.video) for r in d.slots] == [(2, "a", "a"), (3, "b", "b")], "the rest in join order"
    assert all(r.audio == "" for r in d.slots), "further tracks carry video only"
    assert plan(members[:1] + members[3:])["d"].slots == (), "with one other member there is nothing more to show"
    two = plan([m("a"), Member("d", "d", "h264", "d-audio", ("h264",), video_tracks=2), m("b")], speaker="a")
    assert [r.source for r in two["d"].slots] == ["b"]


def test_raw_pictures_are_transcoded_for_a_target_that_takes_no_raw_and_pass_to_one_that_does():
    """An avatar (or a raw camera) sends rgb24 pictures: a phone gets the bridge's H.264 of them, a peer that takes
    any encoded video gets one too (raw pictures are no encoded video), a WebSocket client takes them as they are."""
    avatar = Member("host", video="host", codec="rgb24", audio="host-audio")
    phone = Member("phone", video="phone", codec="h264", audio="phone-audio", accepts=("h264",))
    any_encoded = Member("whep", accepts=())
    ws = Member("ws", accepts=("h264",), takes_raw=True)
    for target, path, video, codec in ((phone, "transcode", "host-to-h264", "h264"),
                                       (any_encoded, "transcode", "host-to-h264", "h264"),
                                       (ws, "pass-through", "host", "rgb24")):
        r = plan([avatar, target])[target.id]
        assert (r.source, r.path, r.video, r.codec, r.audio) == ("host", path, video, codec, "host-audio"), r
    assert "host" not in plan([avatar, phone]), "an avatar takes nothing"
    [m] = members_of([{"session": "ws", "accepts": {"video": ["h264"], "raw_video": True}, "tracks": []}])
    assert m.takes_raw and m.accepts == ("h264",)
    vp8 = Member("browser", accepts=("vp8",))
    assert plan([avatar, vp8])["browser"].video == "host-to-vp8"
