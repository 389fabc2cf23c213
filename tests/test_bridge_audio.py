"""The bridge's audio against real rings of the bus (in one process): Mixer's mix-minus (every target hears
the others, never itself; 8 kHz and 48 kHz, mono and stereo sources; checked by FFT on what the
targets' streams carry, run by the service loop in real time), sums saturated, capture times, sources
that stop, flood, come late, leave or send the wrong thing; and SpeakerPicker's hysteresis."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import framebus
from services.bridge.mixer import LEVEL_FLOOR_DB, Mixer
from services.bridge.speaker import SpeakerPicker
from services.runtime.loop import Loop

RATE = 48000
FRAME_NS = 20_000_000
MS = 1_000_000


class Source:
    """A participant's audio stream: a tone (or a constant) at its own rate, written chunk by chunk."""

    def __init__(self, prefix: str, stream: str, rate: int, *, freq: float = 0.0, level: int = 0, channels: int = 1,
                 amp: int = 6000, slots: int = 64) -> None:
        self.producer = framebus.Producer.create(stream, "audio", payload=rate // 10 * channels * 2, slots=slots,
                                                 prefix=prefix, history=True)
        self.rate, self.freq, self.level, self.channels, self.amp = rate, freq, level, channels, amp
        self.sent = 0       # samples

    def chunk(self, n: int) -> np.ndarray:
        if self.freq:
            t = (self.sent + np.arange(n)) / self.rate
            mono = np.round(self.amp * np.sin(2 * np.pi * self.freq * t)).astype(np.int16)
        else:
            mono = np.full(n, self.level, np.int16)
        return np.repeat(mono[:, None], self.channels, axis=1)

    def send(self, ms: float = 20, capture_ns: int | None = None) -> None:
        n = round(self.rate * ms / 1000)
        self.producer.publish_audio(self.chunk(n), self.rate, pts=self.sent, time_base=(1, self.rate),
                                    capture_ns=capture_ns)
        self.sent += n

    def close(self) -> None:
        self.producer.close()


def read_all(prefix: str, stream: str) -> tuple[np.ndarray, list[int]]:
    """Everything a stream's ring still holds (a Sink keeps 10 s): its samples (mono) and each chunk's capture_ns."""
    chunks, captures = [], []
    with framebus.Consumer.attach(stream, prefix=prefix, start="oldest") as c:
        while (item := c.poll()) is not None:
            assert item.kind == "audio" and item.rate == RATE and item.channels == 1
            chunks.append(item.copy()[:, 0])
            captures.append(item.capture_ns)
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.int16)), captures


def magnitude(pcm: np.ndarray, freq: float) -> float:
    """The windowed spectrum's peak within 5 Hz of `freq`."""
    x = pcm.astype(np.float64) * np.hanning(len(pcm))
    spec = np.abs(np.fft.rfft(x))
    bins = np.fft.rfftfreq(len(pcm), 1 / RATE)
    return float(spec[np.abs(bins - freq) <= 5].max())


def consumers_of(prefix: str, stream: str) -> int | None:
    """Consumers the stream's ring has now, None if there is no such ring."""
    for info in framebus.list_streams(prefix):
        if info.stream == stream:
            return len(info.consumers)
    return None


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.fixture
def made(prefix):
    """made(obj) -> obj, closed at the end (mixers before the sources they read)."""
    things: list = []

    def keep(thing):
        things.append(thing)
        return thing
    yield keep
    for thing in reversed(things):
        thing.close()


def test_each_target_hears_the_others_and_never_itself_in_real_time_on_the_service_loop(prefix, made):
    a = made(Source(prefix, "a-audio", 8000, freq=440))                  # a G.711 phone
    b = made(Source(prefix, "b-audio", 48000, freq=660))                 # WebRTC, mono
    c = made(Source(prefix, "c-audio", 48000, freq=880, channels=2))     # WebRTC, stereo
    registry = CollectorRegistry()
    mixer = made(Mixer("lobby", prefix=prefix, registry=registry))
    mixer.set_participants({"a": "a-audio", "b": "b-audio", "c": "c-audio"},
                           {"a": "mix-a", "b": "mix-b", "c": "mix-c", "z": "mix-z"})   # z only listens
    assert mixer.output_of("a") == "mix-a-audio"

    loop = Loop()
    t0 = time.monotonic()

    def send() -> None:    # real time by the clock, in 20 ms chunks (a late timer sends what is due)
        for s in (a, b, c):
            due = round((time.monotonic() - t0) * s.rate) - s.sent
            while due >= s.rate // 50:
                s.send(20)
                due -= s.rate // 50

    try:
        send()
        loop.add_reader(mixer.fileno(), mixer.pump)
        loop.every(0.005, send)
        loop.every(mixer.frame_ms / 1000, mixer.tick)
        while time.monotonic() - t0 < 1.2:
            loop.run_once(cap=0.02)
    finally:
        loop.remove_reader(mixer.fileno())
        loop.close()
    elapsed = time.monotonic() - t0

    st = mixer.status()
    assert st["frames"] >= int(elapsed / 0.02) - 3, st          # the clock kept up with real time
    tones = {"a": 440, "b": 660, "c": 880}
    for target in ("a", "b", "c", "z"):
        pcm, _ = read_all(prefix, f"mix-{target}-audio")
        assert len(pcm) == st["targets"][target]["frames"] * 960 and len(pcm) >= RATE
        pcm = pcm[RATE // 5:]                                     # past the start
        heard = {who: magnitude(pcm, f) for who, f in tones.items()}
        others = [heard[w] for w in tones if w != target]
        assert min(others) > 0.25 * max(others), (target, heard)  # the others, both well heard
        if target in heard:
            assert heard[target] < 0.01 * min(others), (target, heard)   # never itself
        assert st["targets"][target]["hears"] == [w for w in tones if w != target]
    for who in tones:
        s = st["sources"][who]
        assert s["state"] in ("live", "silent") and s["chunks"] >= 45, s
        assert s["dropped"] == {}
        assert s["rate_in"] == (8000 if who == "a" else 48000) and s["channels_in"] == (2 if who == "c" else 1)
        assert s["buffered_ms"] <= 200
        assert -12 > mixer.levels()[who] > -25, mixer.levels()      # 6000 peak: about -17.7 dBFS
    assert value(registry, "edgeroom_bridge_audio_frames_out_total", room="lobby", target="z") == \
        st["targets"]["z"]["frames"]
    assert value(registry, "edgeroom_bridge_audio_chunks_in_total", room="lobby", source="a") == \
        st["sources"]["a"]["chunks"]


def test_sums_saturate_capture_times_follow_the_newest_input_and_a_source_that_stops_is_silence(prefix, made):
    base = 10_000 * 1_000_000_000
    src = {"a": made(Source(prefix, "a-audio", RATE, level=20000)),
           "b": made(Source(prefix, "b-audio", RATE, level=15000)),
           "c": made(Source(prefix, "c-audio", RATE, level=-5000))}
    late = {"a": 0, "b": 1 * MS, "c": 3 * MS}      # c's chunks were captured last
    registry = CollectorRegistry()
    mixer = made(Mixer("lobby", prefix=prefix, registry=registry))
    mixer.set_participants({k: f"{k}-audio" for k in src}, {k: f"mix-{k}" for k in ("a", "b", "c", "z")})
    k = 0

    def step(senders: str) -> None:
        nonlocal k
        for who in senders:
            src[who].send(20, capture_ns=base + k * FRAME_NS + late[who])
        mixer.tick(now_ns=base + 50 * MS + k * FRAME_NS)
        k += 1

    for _ in range(10):
        step("abc")
    for _ in range(10):
        step("ab")           # c stops sending: silence for it, never a stall
    for _ in range(5):
        step("")             # nobody sends

    st = mixer.status()
    assert st["frames"] == 25 and all(t["frames"] == 25 for t in st["targets"].values())
    assert st["sources"]["c"]["underruns"] == 15 and st["sources"]["c"]["underrun_ms"] == 300
    assert st["sources"]["c"]["state"] == "silent"
    assert st["sources"]["a"]["underruns"] == 5 and st["sources"]["a"]["overflows_ms"] == 0
    assert value(registry, "edgeroom_bridge_audio_underruns_total", room="lobby", source="c") == 15
    assert value(registry, "edgeroom_bridge_audio_silence_seconds_total", room="lobby", source="c") == \
        pytest.approx(0.3)

    expect = {   # (all three, c stopped) for each target: the others' sum, saturated
        "a": (10000, 15000), "b": (15000, 20000), "c": (32767, 32767), "z": (30000, 32767)}
    newest = {"a": "c", "b": "c", "c": "b", "z": "c"}   # whose capture time each mix carries
    for target, (three, two) in expect.items():
        pcm, captures = read_all(prefix, f"mix-{target}-audio")
        frames = pcm.reshape(25, 960)
        assert (frames[:10] == three).all() and (frames[10:20] == two).all() and not frames[20:].any(), target
        assert captures[:10] == [base + i * FRAME_NS + late[newest[target]] for i in range(10)], target
        after = "a" if target == "b" else "b"       # c stopped: the newest of those left
        assert captures[10:20] == [base + i * FRAME_NS + late[after] for i in range(10, 20)], target
        assert captures[20:] == [base + 50 * MS + i * FRAME_NS for i in range(20, 25)], target   # the frames' times
    levels = mixer.levels()
    # a (20000: -4.3 dBFS) silent for 100 ms, c (-5000: -16.3) for 300 ms: falling about 4.3 dB per 100 ms
    assert levels["a"] == pytest.approx(-4.3 - 4.3, abs=0.5) and levels["c"] == pytest.approx(-16.3 - 13.0, abs=1)
    assert all(lv >= LEVEL_FLOOR_DB for lv in levels.values())


def test_a_late_timer_catches_up_and_a_stall_skips(prefix, made):
    made(Source(prefix, "a-audio", RATE, level=100))        # a stream that sends nothing
    mixer = made(Mixer("lobby", prefix=prefix, registry=CollectorRegistry()))
    mixer.set_participants({"a": "a-audio"}, {"b": "mix-b"})
    t = 1_000 * 1_000_000_000
    mixer.tick(now_ns=t)
    mixer.tick(now_ns=t + 5 * MS)                 # early: nothing due
    assert mixer.status()["frames"] == 1
    mixer.tick(now_ns=t + 61 * MS)                # three frames due at once: all made
    assert mixer.status()["frames"] == 4
    mixer.tick(now_ns=t + 2_000 * MS)             # a 2 s stall: the clock jumps, nothing piles up
    st = mixer.status()
    assert st["frames"] == 5 and st["skipped"] == (2_000 - 80) // 20
    mixer.tick(now_ns=t + 2_020 * MS)
    assert mixer.status()["frames"] == 6
    assert mixer.status()["sources"]["a"]["underruns"] == 0       # it never sent: waiting, not underrunning
    assert mixer.status()["sources"]["a"]["state"] == "attached"


def test_a_flooding_source_is_trimmed_to_the_bound_and_counted(prefix, made):
    flood = made(Source(prefix, "a-audio", RATE, freq=440, slots=128))
    registry = CollectorRegistry()
    mixer = made(Mixer("lobby", prefix=prefix, registry=registry, max_buffer_ms=200))
    mixer.set_participants({"a": "a-audio"}, {"b": "mix-b"})
    for _ in range(50):
        flood.send(20)                             # a second of audio at once
    mixer.pump()
    s = mixer.status()["sources"]["a"]
    assert s["buffered_ms"] == 200 and s["overflows_ms"] == 800 and s["chunks"] == 50
    assert value(registry, "edgeroom_bridge_audio_overflow_seconds_total", room="lobby", source="a") == \
        pytest.approx(0.8)
    assert value(registry, "edgeroom_bridge_audio_buffered_seconds", room="lobby", source="a") == pytest.approx(0.2)
    t = 5_000 * 1_000_000_000
    for i in range(12):
        mixer.tick(now_ns=t + i * FRAME_NS)
    s = mixer.status()["sources"]["a"]
    assert s["buffered_ms"] == 0 and s["underruns"] == 2               # 10 frames were buffered
    pcm, _ = read_all(prefix, "mix-b-audio")
    # what b heard is the newest 200 ms of the flood, in order
    tail = np.round(6000 * np.sin(2 * np.pi * 440 * (np.arange(38400, 48000)) / RATE)).astype(np.int16)
    assert (pcm[:9600] == tail).all() and not pcm[9600:].any()


def test_a_stream_that_appears_later_is_attached_and_leaving_lets_go(prefix, made):
    registry = CollectorRegistry()
    mixer = made(Mixer("lobby", prefix=prefix, registry=registry))
    b = made(Source(prefix, "b-audio", 16000, freq=660))
    mixer.set_participants({"a": "a-audio", "b": "b-audio"}, {"a": "mix-a", "b": "mix-b"})
    t = 7_000 * 1_000_000_000
    mixer.tick(now_ns=t)
    st = mixer.status()["sources"]
    assert st["a"]["state"] == "waiting" and st["b"]["state"] == "attached"
    assert consumers_of(prefix, "b-audio") == 1 and consumers_of(prefix, "mix-a-audio") == 0
    a = made(Source(prefix, "a-audio", 8000, freq=440))     # its transport starts
    for i in range(1, 6):
        a.send(20)
        b.send(20)
        mixer.tick(now_ns=t + i * FRAME_NS)                  # the tick pumps: the retry needs no wake-up
    st = mixer.status()["sources"]
    assert st["a"]["state"] == "live" and st["a"]["chunks"] >= 4 and st["a"]["rate_in"] == 8000
    assert mixer.levels()["a"] > -40

    mixer.set_participants({"b": "b-audio"}, {"b": "mix-b"})     # a leaves
    assert consumers_of(prefix, "a-audio") == 0 and consumers_of(prefix, "mix-a-audio") is None
    assert set(mixer.levels()) == {"b"} and set(mixer.status()["targets"]) == {"b"}
    assert value(registry, "edgeroom_bridge_audio_chunks_in_total", room="lobby", source="a") is None
    assert value(registry, "edgeroom_bridge_audio_chunks_in_total", room="lobby", source="b") is not None
    with pytest.raises(KeyError):
        mixer.output_of("a")
    mixer.set_participants({"b": "b2-audio"}, {"b": "mix-b"})    # b's stream changes: re-attached
    assert consumers_of(prefix, "b-audio") == 0 and mixer.status()["sources"]["b"]["stream"] == "b2-audio"
    with pytest.raises(ValueError):
        mixer.set_participants({"b": "no/slash"}, {})
    assert mixer.status()["sources"]["b"]["stream"] == "b2-audio"     # a bad name changes nothing

    other = made(Mixer("hall", prefix=prefix, registry=registry))      # a second room on the same registry
    other.set_participants({"b": "b-audio"}, {"x": "mix-x"})
    mixer.close()
    assert value(registry, "edgeroom_bridge_audio_chunks_in_total", room="lobby", source="b") is None
    assert value(registry, "edgeroom_bridge_audio_chunks_in_total", room="hall", source="b") is not None


def test_bad_input_is_dropped_and_counted_never_raised(prefix, made):
    registry = CollectorRegistry()
    video = made(framebus.Producer.create("v-audio", "encoded", payload=4096, slots=8, prefix=prefix))
    odd = made(framebus.Producer.create("o-audio", "audio", payload=4096, slots=8, prefix=prefix))
    good = made(Source(prefix, "g-audio", 44100, freq=660, channels=2))
    junk = Path(f"/dev/shm/{prefix}.j-audio")                         # not a ring at all
    junk.write_bytes(b"not a ring" * 100)
    mixer = made(Mixer("lobby", prefix=prefix, registry=registry))
    try:
        mixer.set_participants({"v": "v-audio", "o": "o-audio", "g": "g-audio", "j": "j-audio"}, {"x": "mix-x"})
        assert mixer.status()["sources"]["j"]["state"] == "waiting"
        assert "cannot be read" in mixer.status()["sources"]["j"]["problem"]
        mixer.pump()
    finally:
        junk.unlink()
    t = 3_000 * 1_000_000_000
    for i in range(5):
        video.publish_encoded(b"\x00\x00\x00\x01\x65" + bytes(50), "h264", keyframe=True)
        odd.publish_audio(np.zeros((10, 1), np.int16), 100)          # 100 Hz: not audio anyone sends
        good.send(20)
        mixer.pump()
        mixer.tick(now_ns=t + i * FRAME_NS)
    st = mixer.status()
    assert st["sources"]["v"]["dropped"] == {"wrong_kind": 5} and "encoded" in st["sources"]["v"]["problem"]
    assert st["sources"]["o"]["dropped"] == {"bad_format": 5} and st["sources"]["o"]["chunks"] == 0
    assert st["sources"]["g"]["dropped"] == {} and st["sources"]["g"]["chunks"] == 5
    assert value(registry, "edgeroom_bridge_audio_dropped_chunks_total", room="lobby", source="v",
                 reason="wrong_kind") == 5
    pcm, _ = read_all(prefix, "mix-x-audio")
    assert len(pcm) == 5 * 960 and magnitude(pcm[960:], 660) > 20 * magnitude(pcm[960:], 440)


# ------------------------------------------------------------------------------------ SpeakerPicker
def run(picker: SpeakerPicker, levels: dict[str, float], start: float, seconds: float, step: float = 0.02) -> \
        list[str | None]:
    out = []
    for i in range(round(seconds / step)):
        out.append(picker.update(levels, start + i * step))
    return out


def test_the_first_voice_speaks_at_once_and_silence_keeps_the_speaker():
    p = SpeakerPicker()
    assert p.update({"a": -90.0, "b": -100.0}, 0.0) is None          # nobody above the threshold
    assert p.update({"a": -20.0, "b": -30.0}, 0.02) == "a"           # nobody spoke yet: at once
    assert set(run(p, {"a": -100.0, "b": -100.0}, 0.04, 5.0)) == {"a"}   # everyone silent: a stays
    assert p.previous is None


def test_a_short_burst_does_not_flap_and_a_lasting_lead_switches_after_hold():
    p = SpeakerPicker(threshold_db=-45.0, margin_db=6.0, hold_s=1.0)
    p.update({"a": -20.0, "b": -100.0}, 0.0)
    assert set(run(p, {"a": -20.0, "b": -10.0}, 0.02, 0.6)) == {"a"}        # a 0.6 s burst (a cough)
    assert set(run(p, {"a": -20.0, "b": -100.0}, 0.62, 0.2)) == {"a"}
    assert set(run(p, {"a": -20.0, "b": -10.0}, 0.82, 0.6)) == {"a"}        # again: its run starts anew
    assert set(run(p, {"a": -20.0, "b": -17.0}, 1.42, 3.0)) == {"a"}        # louder, not by the margin
    got = run(p, {"a": -20.0, "b": -10.0}, 4.42, 1.5)                       # a lasting lead
    first_b = got.index("b")
    assert set(got[:first_b]) == {"a"} and set(got[first_b:]) == {"b"}
    assert abs(first_b * 0.02 - 1.0) <= 0.02 + 1e-9                         # after hold_s
    assert p.previous == "a"
    assert set(run(p, {"a": -100.0, "b": -100.0}, 6.0, 3.0)) == {"b"}      # silence keeps b


def test_when_two_lead_the_loudest_whose_run_is_long_enough_wins():
    p = SpeakerPicker(hold_s=1.0)
    p.update({"a": -30.0, "b": -100.0, "c": -100.0}, 0.0)
    run(p, {"a": -30.0, "b": -15.0, "c": -100.0}, 0.0, 0.5)                 # b leads from 0.0
    got = run(p, {"a": -30.0, "b": -15.0, "c": -10.0}, 0.5, 0.6)            # c louder, but from 0.5 only
    assert got[-1] == "b" and p.previous == "a"


def test_one_who_leaves_stops_being_the_speaker():
    p = SpeakerPicker(hold_s=1.0)
    p.update({"a": -20.0, "b": -100.0, "c": -100.0}, 0.0)
    run(p, {"a": -100.0, "b": -20.0, "c": -100.0}, 0.02, 1.2)
    assert (p.current, p.previous) == ("b", "a")
    assert p.update({"a": -100.0, "c": -30.0}, 2.0) == "c"                  # b left: the loudest above threshold
    assert p.previous == "a"
    assert p.update({"a": -100.0, "b": -100.0}, 2.1) == "a"                 # c left, all silent: the previous one
    assert p.previous is None
    assert p.update({"d": -100.0}, 2.2) is None                             # nobody left to show
    assert p.update({"d": -100.0}, 2.3) is None
    assert p.update({"d": -40.0}, 2.4) == "d"
    assert math.isclose(p.changed_at or 0.0, 2.4)
