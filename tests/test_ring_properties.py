"""Property-based tests of the framebus ring: its state machine against a plain model.

Everything runs in one process: one Producer, a few Consumers, nothing races. The model
is the documented contract (docs/framebus.md, "Which slot an item goes to"), not the
slot-choice code: it does not predict which slot a loan takes, only what a loan may
overwrite, and checks every observation against that.

For a ring of n slots with W items committed, a loan for item t may overwrite an item
that is out of the index (older than t - n + 1), or one older than the position of every
in-order and reliable consumer the producer knows (registered before its last send), not
held by a latest() reader, and not the newest item while a latest() reader is attached
or no consumer at all. The state machines then check:

* every item received has exactly the content and metadata sent under its sequence;
* per consumer, sequences strictly increase and received + missed + skipped equals the
  items its position passed (nothing silently lost); poll() returns the oldest item still
  there at or after its position, never one older than W - n, and an item it passes over
  (or a held view that stops being valid()) must have been free to overwrite; an item
  seen overwritten never comes back; latest() returns item W - 1 (nothing only if that
  one was free to overwrite);
* an aborted loan makes nothing appear and does not use up its sequence number; a second
  loan while one is open, and an oversized one, are refused without side effects;
* list_streams(): alive, items == producer.seq, its consumers with their counters and
  positions, overruns (with hold_back=0, at most one per loan and only with a reliable
  consumer registered); a consumer's fileno() is readable from a send until a poll that
  returns None drains it; Consumer.extradata() and each item's extradata_version.

Besides the state machines: picture geometry of every pixel format, audio and extradata
round trips, start='oldest', a reliable consumer with hold_back=0 (it reads like a live
one; it loses no item without an overrun), and a consumer that follows its stream to a
restarted producer.

Every test uses its own segment prefix and checks, at the end, that closing everything
and framebus.gc(prefix) leaves nothing with that prefix in /dev/shm.
"""
from __future__ import annotations

import itertools
import os
import select
import time
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import framebus
from framebus import BusError, Overwritten, PayloadTooLarge
from framebus.formats import FLAG_CORRUPT, FLAG_DISCONTINUITY, FLAG_KEYFRAME, picture_geometry
from framebus.layout import EXTRADATA_MAX

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    byte_bounds = np.byte_bounds

SHM = "/dev/shm"
STREAM = "s"
CAP = 64 * 48 * 3  # payload bytes per slot in the state machines
PACKED_BPP = {"rgb24": 3, "bgr24": 3, "gray": 1}
CODEC_NAMES = sorted(framebus.CODECS)
_counter = itertools.count()


# ------------------------------------------------------------------ segments, cleanup
def fresh_prefix() -> str:
    return f"prop{os.getpid()}x{next(_counter)}"


def leftovers(prefix: str) -> list[str]:
    return sorted(f for f in os.listdir(SHM) if f.startswith(prefix + "."))


class Bus:
    """Everything one test creates under its own prefix; close() must leave nothing."""

    def __init__(self) -> None:
        self.prefix = fresh_prefix()
        assert leftovers(self.prefix) == []
        self.producers: list[framebus.Producer] = []
        self.consumers: list[framebus.Consumer] = []

    def producer(self, kind: str, **kw) -> framebus.Producer:
        p = framebus.Producer.create(STREAM, kind, prefix=self.prefix, **kw)
        self.producers.append(p)
        return p

    def consumer(self, **kw) -> framebus.Consumer:
        c = framebus.Consumer.attach(STREAM, prefix=self.prefix, **kw)
        self.consumers.append(c)
        return c

    def info(self) -> framebus.StreamInfo:
        infos = [i for i in framebus.list_streams(self.prefix) if i.stream == STREAM]
        assert len(infos) == 1, infos
        return infos[0]

    def close(self, check: bool = True) -> None:
        """Close everything, gc the prefix; with `check`, fail if anything was left (and
        if a close failed). Leftovers are removed either way, so failures do not pile up."""
        errors = []
        for obj in [*self.consumers, *self.producers]:
            try:
                obj.close()
            except Exception as exc:  # keep closing the rest
                errors.append(exc)
        framebus.gc(self.prefix)
        left = leftovers(self.prefix)
        for name in left:
            try:
                os.unlink(f"{SHM}/{name}")
            except FileNotFoundError:
                pass
        if check:
            if errors:
                raise errors[0]
            assert left == [], f"left in {SHM} after close + gc: {left}"

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(check=exc_type is None)


# ------------------------------------------------------------------ content and metadata
def rand_bytes(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def meta_for(seq: int) -> tuple[dict, dict]:
    """(keyword arguments for send/publish, what the item must then report) for item `seq`."""
    capture = 1_000_000_000 + seq * 33_333_333
    keyframe = seq % 2 == 0
    flags = (((seq * 2654435761) & 0xFFFF) << 16) | (FLAG_DISCONTINUITY if seq % 3 == 1 else 0)
    flags |= FLAG_CORRUPT if seq % 5 == 2 else 0
    if seq % 4 == 3:  # default pts: the capture time in ns
        send = dict(capture_ns=capture, flags=flags, keyframe=keyframe)
        pts, tb = capture, Fraction(1, 1_000_000_000)
    else:
        pts = (seq - 2) * 1_234_567_891_011  # negative for seq 0 and 1, past 2**32 later
        num, den = 1 + seq % 7, 90_000 + seq
        tb = Fraction(num, den)
        send = dict(pts=pts, time_base=tb if seq % 4 == 1 else (num, den), capture_ns=capture,
                    flags=flags, keyframe=keyframe)
    expect = dict(pts=pts, time_base=tb, capture_ns=capture,
                  flags=flags | (FLAG_KEYFRAME if keyframe else 0), keyframe=keyframe)
    return send, expect


def check_meta(item, seq: int) -> None:
    _, exp = meta_for(seq)
    got = dict(pts=item.pts, time_base=item.time_base, capture_ns=item.capture_ns,
               flags=item.flags, keyframe=item.keyframe)
    assert got == exp, f"item {seq}: metadata {got} != sent {exp}"


class Video(NamedTuple):
    fmt: str
    w: int
    h: int
    pad: int | None  # None: default (tight) stride; else stride = tight row + pad
    via: str  # 'planes' | 'array' (fill the loan) | 'publish' (publish_picture)

    @property
    def stride(self) -> int | None:
        if self.pad is None:
            return None
        return self.w * PACKED_BPP.get(self.fmt, 1) + self.pad

    @property
    def tight(self) -> bool:
        return self.pad in (None, 0)

    @property
    def tight_even_yuv(self) -> bool:
        return self.fmt in ("yuv420p", "nv12") and self.tight and self.w % 2 == 0 and self.h % 2 == 0


class Encoded(NamedTuple):
    codec: str
    size: int
    via: str  # 'loan' | 'publish'
    loan_extra: int | None  # loan_encoded(size + loan_extra), None: the whole slot


class Audio(NamedTuple):
    samples: int
    channels: int
    rate: int
    via: str  # 'loan' | 'publish'


@st.composite
def video_specs(draw, max_w: int = 40, max_h: int = 40) -> Video:
    fmt = draw(st.sampled_from(sorted(framebus.PIXEL_FORMATS)))
    w = draw(st.integers(1, max_w))
    h = draw(st.integers(1, max_h))
    pad = draw(st.none() | st.integers(0, 7))
    vias = ["planes"]
    if pad in (None, 0):
        vias.append("array")
    if pad is None:
        if fmt in PACKED_BPP or (w % 2 == 0 and h % 2 == 0):
            vias.append("publish")
    return Video(fmt, w, h, pad, draw(st.sampled_from(vias)))


def encoded_specs(cap: int = CAP):
    return st.builds(Encoded, st.sampled_from(CODEC_NAMES),
                     st.one_of(st.integers(0, 64), st.integers(0, cap)),
                     st.sampled_from(["loan", "publish"]), st.none() | st.integers(0, 64))


def audio_specs():
    return st.builds(Audio, st.integers(1, 256), st.integers(1, 8),
                     st.sampled_from([8000, 44100, 48000]) | st.integers(1, 2**32 - 1),
                     st.sampled_from(["loan", "publish"]))


def chroma(n: int) -> int:
    return (n + 1) // 2


def plane_shapes(spec: Video) -> list[tuple[int, ...]]:
    w, h, fmt = spec.w, spec.h, spec.fmt
    if fmt in PACKED_BPP:
        return [(h, w, 3) if PACKED_BPP[fmt] == 3 else (h, w)]
    if fmt == "yuv420p":
        return [(h, w), (chroma(h), chroma(w)), (chroma(h), chroma(w))]
    return [(h, w), (chroma(h), chroma(w), 2)]


def expected_content(spec, seq: int) -> tuple[np.ndarray, ...]:
    """What item `seq` holds: its planes (video), its bytes (encoded), its PCM (audio)."""
    if isinstance(spec, Video):
        return tuple(rand_bytes(seq * 8 + k, int(np.prod(s))).reshape(s)
                     for k, s in enumerate(plane_shapes(spec)))
    if isinstance(spec, Encoded):
        return (rand_bytes(seq * 8, spec.size),)
    pcm = rand_bytes(seq * 8, spec.samples * spec.channels * 2).view(np.int16)
    return (pcm.reshape(spec.samples, spec.channels),)


def flat(planes) -> np.ndarray:
    return np.concatenate([p.reshape(-1) for p in planes])


def begin_loan(p: framebus.Producer, spec, seq: int) -> framebus.Loan:
    """Loan the next slot for `spec` and fill it with item `seq`'s content (not sent)."""
    content = expected_content(spec, seq)
    if isinstance(spec, Video):
        loan = p.loan_picture(spec.w, spec.h, spec.fmt, spec.stride)
        if spec.via == "array" and spec.tight:
            if spec.fmt in PACKED_BPP:
                loan.array[...] = content[0]
            else:
                assert loan.array.flags.c_contiguous
                loan.array.reshape(-1)[...] = flat(content)
        else:
            planes = loan.planes
            assert [pl.shape for pl in planes] == plane_shapes(spec)
            for pl, c in zip(planes, content):
                pl[...] = c
    elif isinstance(spec, Encoded):
        size = None if spec.loan_extra is None else min(CAP, spec.size + spec.loan_extra)
        loan = p.loan_encoded(spec.codec, size)
        assert loan.array.shape == (CAP if size is None else size,)
        loan.array[...] = 0xA5  # bytes past the sent size must not show
        loan.array[: spec.size] = content[0]
    else:
        loan = p.loan_audio(spec.samples, spec.channels, spec.rate)
        assert loan.array.shape == (spec.samples, spec.channels) and loan.array.dtype == np.int16
        loan.array[...] = content[0]
    return loan


def send_loan(loan: framebus.Loan, spec, seq: int) -> int:
    send, _ = meta_for(seq)
    if isinstance(spec, Encoded):
        return loan.send(size=spec.size, **send)
    return loan.send(**send)


def publish(p: framebus.Producer, spec, seq: int) -> int:
    """Send item `seq` for `spec` in one call (publish_*) or through a loan."""
    send, _ = meta_for(seq)
    content = expected_content(spec, seq)
    if isinstance(spec, Video) and spec.via == "publish":
        pic = content[0] if spec.fmt in PACKED_BPP else flat(content).reshape(spec.h * 3 // 2, spec.w)
        return p.publish_picture(pic, spec.fmt, **send)
    if isinstance(spec, Encoded) and spec.via == "publish":
        return p.publish_encoded(content[0].tobytes(), spec.codec, **send)
    if isinstance(spec, Audio) and spec.via == "publish":
        return p.publish_audio(content[0], spec.rate, **send)
    return send_loan(begin_loan(p, spec, seq), spec, seq)


def check_content(item, spec, seq: int) -> None:
    """item's kind, geometry and bytes are those of item `seq` as committed."""
    content = expected_content(spec, seq)
    assert item.seq == seq
    assert not item.array.flags.writeable, "consumer views must be read-only"
    if isinstance(spec, Video):
        geo = picture_geometry(spec.fmt, spec.w, spec.h, spec.stride)
        assert (item.kind, item.format, item.codec) == ("video", spec.fmt, None)
        assert (item.width, item.height, item.stride, item.size) == (spec.w, spec.h, geo.stride0, geo.size)
        planes = item.planes()
        assert [pl.shape for pl in planes] == plane_shapes(spec)
        for k, (got, exp) in enumerate(zip(planes, content)):
            assert np.array_equal(got, exp), f"item {seq}: plane {k} differs from what was sent"
        if spec.fmt in PACKED_BPP:
            assert np.array_equal(item.array, content[0])
        elif spec.tight_even_yuv:
            assert item.array.shape == (spec.h * 3 // 2, spec.w)
            assert np.array_equal(item.array.reshape(-1), flat(content))
        else:
            assert item.array.shape == (geo.size,)
            if spec.tight:
                assert np.array_equal(item.array, flat(content))
    elif isinstance(spec, Encoded):
        assert (item.kind, item.codec, item.format, item.width, item.height) == ("encoded", spec.codec, None, 0, 0)
        assert item.size == spec.size and item.array.shape == (spec.size,)
        assert np.array_equal(item.array, content[0]), f"item {seq}: bytes differ from what was sent"
    else:
        assert (item.kind, item.format, item.codec) == ("audio", None, None)
        assert (item.rate, item.channels, item.samples) == (spec.rate, spec.channels, spec.samples)
        assert item.size == spec.samples * spec.channels * 2
        assert item.array.dtype == np.int16 and item.array.shape == (spec.samples, spec.channels)
        assert np.array_equal(item.array, content[0]), f"item {seq}: samples differ from what was sent"


# ------------------------------------------------------------------ the state machine
class Committed(NamedTuple):
    spec: object
    t0: int  # CLOCK_MONOTONIC before / after the send call: publish_ns lies between
    t1: int
    extra_sets: int  # set_extradata() calls before the send


class ModelConsumer:
    def __init__(self, c: framebus.Consumer, reliable: bool, start: int) -> None:
        self.c = c
        self.reliable = reliable
        self.start = start
        self.pos = start  # the next sequence it will read
        self.missed = self.skipped = self.received = 0
        # What it tells the producer it still needs: 'inorder' = every item from hold on,
        # 'latest' = only the item hold (latest()). (lo, hi): the range hold_seq may be in.
        self.mode = "inorder"
        self.hold = (start, start)
        self.known = False  # registered before the producer's last send (it rescans there)
        self.last = -1
        self.news = False  # an item was committed since its fd was last drained

    def __repr__(self) -> str:
        return (f"<consumer reliable={self.reliable} start={self.start} pos={self.pos} "
                f"missed={self.missed} skipped={self.skipped} received={self.received} "
                f"{self.mode} hold={self.hold} known={self.known}>")


class RingMachine(RuleBasedStateMachine):
    KIND = "?"
    MAX_CONSUMERS = 4
    MAX_HELD = 8

    def __init__(self) -> None:
        super().__init__()
        self.bus = Bus()
        self.p: framebus.Producer | None = None

    @initialize(slots=st.integers(2, 6), first=st.sampled_from(["next", "oldest"]), reliable=st.booleans())
    def create(self, slots: int, first: str, reliable: bool) -> None:
        self.n = slots
        self.p = self.bus.producer(self.KIND, payload=CAP, slots=slots, hold_back=0.0)
        self.committed: dict[int, Committed] = {}
        self.loan: tuple[framebus.Loan, object, int] | None = None
        self.stale: framebus.Loan | None = None  # the last loan sent or aborted
        self.consumers: list[ModelConsumer] = []
        self.reliable_known = False  # a reliable consumer was registered at the last send
        self.registered = 0  # consumers registered at the last send
        self.held: list[tuple[framebus.Item, int]] = []
        self.overruns = 0
        self.extra: tuple[str, bytes] | None = None
        self.extra_sets = 0
        self.versions: dict[int, int] = {0: 0}  # set_extradata calls -> extradata_version seen
        self.free_below = 0  # every item below this was out of the index at some loan
        self.may_die: set[int] = set()  # items some loan was free to overwrite
        self.dead: set[int] = set()  # items seen overwritten (a poll skipped, valid() False)
        self.attach(first, reliable)

    def teardown(self) -> None:
        self.bus.close()

    # -- model helpers
    @property
    def W(self) -> int:
        return len(self.committed)

    def may_have_died(self, s: int) -> bool:
        return s < self.free_below or s in self.may_die

    def _gone(self, s: int, why: str) -> None:
        """Item s was observed overwritten: some loan must have been free to take its slot."""
        assert self.may_have_died(s), (
            f"item {s} is gone ({why}), but every loan since it was sent had to keep it: "
            f"a consumer that knew it still needed it held it, it was the newest item, or "
            f"a latest() reader held it (W={self.W}, consumers={self.consumers})")
        self.dead.add(s)

    def _loan_begins(self) -> None:
        """What the next loan may overwrite (docs/framebus.md, 'Which slot an item goes
        to'): anything out of the index; else an item older than every in-order and
        reliable consumer's position, not held by a latest() reader, and not the newest
        one while a latest() reader is attached or no consumer at all. A consumer protects
        items only once the producer has surely seen it: registered before its last send
        (it re-reads the consumer table when it sends; it may also do so before choosing
        a slot, so the model accepts both views). Uncertainty about a position counts
        against keeping."""
        t, n = self.W, self.n
        known = [m for m in self.consumers if m.known]
        # 'or none at all': in the table as of its last send, and in the table now.
        keep_newest = ((not self.registered or any(m.mode == "latest" for m in known))
                       and (not self.consumers or any(m.mode == "latest" for m in self.consumers)))
        self.free_below = max(self.free_below, t - n + 1)
        for s in range(max(0, t - n + 1), t):
            kept = (any(m.mode == "inorder" and m.hold[1] <= s for m in known)
                    or any(m.mode == "latest" and m.hold == (s, s) for m in known)
                    or (keep_newest and s == t - 1))
            if not kept:
                self.may_die.add(s)
        self._overruns_before = self.p.overruns

    def _began(self) -> None:
        d = self.p.overruns - self._overruns_before
        assert d in (0, 1), f"one loan counted {d} overruns"
        if d:
            event("overrun counted")
            assert self.reliable_known or any(m.reliable for m in self.consumers), (
                "an overrun was counted, but no reliable consumer was registered")
        self.overruns += d

    def _committed(self, got: int, spec, t0: int) -> None:
        t1 = time.monotonic_ns()
        assert got == self.W, f"send returned sequence {got}, expected {self.W}"
        self.committed[got] = Committed(spec, t0, t1, self.extra_sets)
        assert self.p.seq == self.W
        for m in self.consumers:
            m.news = True
            m.known = True
        self.reliable_known = any(m.reliable for m in self.consumers)
        self.registered = len(self.consumers)

    def _check_item(self, item) -> None:
        rec = self.committed.get(item.seq)
        assert rec is not None, f"got item {item.seq}, only {self.W} were committed"
        assert item.seq not in self.dead, f"item {item.seq} was seen overwritten, now it is back"
        check_content(item, rec.spec, item.seq)
        check_meta(item, item.seq)
        assert item.generation == self.p.generation
        assert rec.t0 <= item.publish_ns <= rec.t1
        # extradata_version: 0 before any set_extradata, the same between two sets,
        # strictly bigger after each one.
        k, v = rec.extra_sets, item.extradata_version
        if k in self.versions:
            assert v == self.versions[k], (k, v, self.versions)
        else:
            assert all(v > old for j, old in self.versions.items() if j < k), (k, v, self.versions)
            assert all(v < new for j, new in self.versions.items() if j > k), (k, v, self.versions)
            self.versions[k] = v

    def _keep(self, item) -> None:
        self.held.append((item, item.seq))
        del self.held[: -self.MAX_HELD]

    def _pick(self, i: int) -> ModelConsumer:
        return self.consumers[i % len(self.consumers)]

    # -- producer rules (the kind-specific subclasses add those that take a spec)
    def _publish(self, spec) -> None:
        self._loan_begins()
        t0 = time.monotonic_ns()
        got = publish(self.p, spec, self.W)
        self._began()
        self._committed(got, spec, t0)

    def _begin_loan(self, spec) -> None:
        self._loan_begins()
        seq = self.W
        loan = begin_loan(self.p, spec, seq)
        self._began()
        assert self.p.seq == seq, "a loan must not advance the sequence"
        self.loan = (loan, spec, seq)

    def _second_loan_refused(self, spec) -> None:
        if self.stale is not None:  # an old loan's abort() must not release the open one
            self.stale.abort()
            with pytest.raises(BusError):
                self.stale.send()
        with pytest.raises(BusError) as exc:
            begin_loan(self.p, spec, self.W)
        assert exc.type is BusError, exc.value

    @precondition(lambda self: self.loan is not None)
    @rule()
    def send(self) -> None:
        loan, spec, seq = self.loan
        self.loan = None
        t0 = time.monotonic_ns()
        self._committed(send_loan(loan, spec, seq), spec, t0)
        with pytest.raises(BusError):
            loan.send()
        loan.abort()  # no-op after send
        assert self.p.seq == self.W
        self.stale = loan

    @precondition(lambda self: self.loan is not None)
    @rule()
    def abort(self) -> None:
        loan, spec, seq = self.loan
        self.loan = None
        loan.abort()
        assert self.p.seq == seq == self.W, "an aborted loan must not use up its sequence"
        with pytest.raises(BusError):
            loan.send()
        loan.abort()
        self.stale = loan

    @precondition(lambda self: self.loan is None)
    @rule()
    def oversized_refused(self) -> None:
        overruns = self.p.overruns
        with pytest.raises(PayloadTooLarge):
            if self.KIND == "video":
                self.p.loan_picture(64, 49, "rgb24")
            elif self.KIND == "encoded":
                self.p.publish_encoded(bytes(CAP + 1), "h264")
            else:
                self.p.loan_audio(CAP // 2 + 1, 1, 48000)
        assert self.p.seq == self.W and self.p.overruns == overruns

    @rule(data=st.binary(max_size=48), codec=st.sampled_from(CODEC_NAMES))
    def set_extradata(self, data: bytes, codec: str) -> None:
        self.p.set_extradata(data, codec)
        self.extra = (codec, data)
        self.extra_sets += 1

    # -- consumer rules
    @precondition(lambda self: len(self.consumers) < self.MAX_CONSUMERS)
    @rule(start=st.sampled_from(["next", "oldest"]), reliable=st.booleans())
    def attach(self, start: str, reliable: bool) -> None:
        c = self.bus.consumer(start=start, reliable=reliable)
        pos = self.W - c.lag
        if start == "next":
            assert pos == self.W, f"start='next' attached at {pos}, {self.W} items were sent"
        else:
            # 'Everything still in the ring': W - n at the earliest. The code starts at
            # W - n + 1 even when item W - n is still there, which is accepted here and
            # pinned down by test_start_oldest_delivers_everything_still_in_the_ring;
            # beyond that it may only pass over items that may be gone.
            assert max(0, self.W - self.n) <= pos <= self.W, (pos, self.W)
            for s in range(max(0, self.W - self.n + 1), pos):
                assert self.may_have_died(s), f"start='oldest' at {pos} passes over item {s}, which is still there"
        assert c.attached and c.reliable == reliable
        self.consumers.append(ModelConsumer(c, reliable, pos))

    @precondition(lambda self: self.consumers)
    @rule(i=st.integers(0, 3), keep=st.booleans(), wait=st.booleans())
    def poll(self, i: int, keep: bool, wait: bool) -> None:
        """poll(), or receive() with a short timeout: the oldest item still there at or
        after its position; whatever it passes over must have been free to overwrite."""
        m = self._pick(i)
        p, W = m.pos, self.W
        item = m.c.receive(timeout=0.001) if wait else m.c.poll()
        m.mode = "inorder"
        if p >= W:
            assert item is None, f"poll() at {p} of {W} returned item {item.seq}"
            m.hold = (p, p)
            m.news = False
            return
        got = W if item is None else item.seq
        assert max(p, W - self.n) <= got <= W, f"poll() at {p} of {W} returned {got} (ring of {self.n})"
        for s in range(max(p, W - self.n), got):
            self._gone(s, f"poll() from {p} passed over it to {got}")
        if got > p:
            event("poll jumped over items")
        m.missed += got - p
        m.pos = got + (item is not None)
        m.hold = (p, got)
        self._took(m, item, keep)

    @precondition(lambda self: self.consumers)
    @rule(i=st.integers(0, 3), keep=st.booleans(), wait=st.booleans())
    def latest(self, i: int, keep: bool, wait: bool) -> None:
        """latest(), or receive(newest=True) with a short timeout: the newest item."""
        m = self._pick(i)
        p, W = m.pos, self.W
        item = m.c.receive(timeout=0.001, newest=True) if wait else m.c.latest()
        m.mode = "latest"
        if p >= W:
            assert item is None, f"latest() at {p} of {W} returned item {item.seq}"
            m.hold = (p, p)
            m.news = False
            return
        if item is None:
            self._gone(W - 1, f"latest() from {p} found nothing")
        else:
            assert item.seq == W - 1, f"latest() at {p} of {W} returned {item.seq}"
        gap = W - p - (item is not None)
        dm, ds = m.c.missed - m.missed, m.c.skipped - m.skipped
        assert dm >= 0 and ds >= 0 and dm + ds == gap, (
            f"latest() from {p} of {W}: missed +{dm}, skipped +{ds}; gap {gap}")
        if gap:
            event("latest skipped items")
        m.missed += dm
        m.skipped += ds
        m.pos = W
        m.hold = (W - 1, W - 1) if item is not None else (W - 1, W)
        self._took(m, item, keep)

    def _took(self, m, item, keep: bool) -> None:
        """Book an item a consumer got (or that it got none), check it, maybe hold it."""
        if item is None:
            m.news = False
            return
        assert item.seq > m.last
        m.received += 1
        m.last = item.seq
        self._check_item(item)
        if keep:
            self._keep(item)

    @precondition(lambda self: self.consumers)
    @rule(i=st.integers(0, 3))
    def release(self, i: int) -> None:
        m = self._pick(i)
        m.c.release()
        m.mode = "inorder"
        m.hold = (m.pos, m.pos)

    @precondition(lambda self: self.consumers)
    @rule(i=st.integers(0, 3))
    def close_consumer(self, i: int) -> None:
        m = self._pick(i)
        self.consumers.remove(m)
        m.c.close()
        assert not m.c.attached
        m.c.close()  # idempotent

    # -- invariants
    @invariant()
    def producer_sequence(self) -> None:
        if self.p is not None:
            assert self.p.seq == self.W

    @invariant()
    def consumers_agree_with_model(self) -> None:
        if self.p is None:
            return
        for m in self.consumers:
            got = (m.c.missed, m.c.skipped, m.c.received)
            assert got == (m.missed, m.skipped, m.received), f"{m}: counters (missed, skipped, received) = {got}"
            assert m.received + m.missed + m.skipped == m.pos - m.start, m  # nothing silently lost
            assert m.c.lag == self.W - m.pos, (m, m.c.lag)
            assert m.c.attached
            assert m.c.extradata() == self.extra
            if m.news:  # level-triggered: readable from a send until a poll drains it
                readable, _, _ = select.select([m.c.fileno()], [], [], 0)
                assert readable, f"{m}: an item was sent since the last drain, fileno() is not readable"

    @invariant()
    def held_items(self) -> None:
        """A held view stays valid (and intact) while no loan was free to take its slot;
        once invalid it stays so; copy() agrees with valid()."""
        if self.p is None:
            return
        for item, seq in self.held:
            assert item.seq == seq
            if item.valid():
                assert seq not in self.dead, f"held item {seq} was seen overwritten, now valid() again"
                check_content(item, self.committed[seq].spec, seq)
                assert np.array_equal(item.copy(), item.array)
            else:
                event("held item overwritten")
                self._gone(seq, "a held view of it is no longer valid()")
                with pytest.raises(Overwritten):
                    item.copy()

    @invariant()
    def registry(self) -> None:
        if self.p is None:
            return
        info = self.bus.info()
        assert (info.status, info.state, info.kind) == ("alive", "open", self.KIND), info
        assert (info.items, info.slots, info.generation) == (self.W, self.n, self.p.generation), info
        assert info.payload_bytes == CAP
        assert info.overruns == self.p.overruns == self.overruns
        assert len(info.consumers) == len(self.consumers), (info.consumers, self.consumers)

        def fits(ci, m) -> bool:
            return (ci.reliable == m.reliable and (ci.missed, ci.skipped, ci.received)
                    == (m.missed, m.skipped, m.received) and m.hold[0] <= ci.position <= m.hold[1]
                    and ci.alive and ci.lag == max(0, self.W - ci.position))

        assert any(all(fits(ci, m) for ci, m in zip(info.consumers, perm))
                   for perm in itertools.permutations(self.consumers)), (
            f"list_streams consumers {info.consumers} do not match the model {self.consumers}")


def _machine(kind: str, specs) -> type[RingMachine]:
    class Machine(RingMachine):
        KIND = kind

        @precondition(lambda self: self.loan is None)
        @rule(spec=specs)
        def publish(self, spec) -> None:
            self._publish(spec)

        @precondition(lambda self: self.loan is None)
        @rule(spec=specs)
        def begin_loan(self, spec) -> None:
            self._begin_loan(spec)

        @precondition(lambda self: self.loan is not None)
        @rule(spec=specs)
        def second_loan_refused(self, spec) -> None:
            self._second_loan_refused(spec)

    Machine.__name__ = Machine.__qualname__ = f"{kind.title()}Ring"
    return Machine


_STATEFUL = settings(max_examples=150, stateful_step_count=50, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

VideoRing = _machine("video", video_specs())
EncodedRing = _machine("encoded", encoded_specs())
AudioRing = _machine("audio", audio_specs())

TestVideoRing = VideoRing.TestCase
TestVideoRing.settings = _STATEFUL
TestEncodedRing = EncodedRing.TestCase
TestEncodedRing.settings = _STATEFUL
TestAudioRing = AudioRing.TestCase
TestAudioRing.settings = settings(_STATEFUL, max_examples=80)


# ------------------------------------------------------------------ single properties
def _pictures_in_slot(item, spec: Video) -> None:
    """Every plane lies inside the item's `size` bytes of its slot, and no two overlap."""
    geo = picture_geometry(spec.fmt, spec.w, spec.h, spec.stride)
    planes = item.planes()
    start = byte_bounds(planes[0])[0]
    for k, pl in enumerate(planes):
        a, b = byte_bounds(pl)
        assert start <= a and b <= start + geo.size, f"plane {k} spans {a - start}..{b - start} of {geo.size}"
    for x, y in itertools.combinations(planes, 2):
        assert not np.shares_memory(x, y)


@settings(max_examples=120, deadline=None)
@given(specs=st.lists(video_specs(max_w=33, max_h=33), min_size=1, max_size=4), slots=st.integers(2, 3))
def test_picture_geometry_roundtrip(specs: list[Video], slots: int) -> None:
    """loan_picture(...).planes / .array and publish_picture for every format and odd sizes
    and strides: the consumer's planes and array are what was written, inside the slot."""
    sizes = [picture_geometry(s.fmt, s.w, s.h, s.stride).size for s in specs]
    with Bus() as bus:
        p = bus.producer("video", payload=max(sizes), slots=slots)  # the biggest fills a slot exactly
        c = bus.consumer()
        for seq, spec in enumerate(specs):
            if spec.tight:  # a tight picture: its planes fill exactly `size` bytes
                assert sum(int(np.prod(s)) for s in plane_shapes(spec)) == sizes[seq]
            assert publish(p, spec, seq) == seq
            item = c.poll()
            assert item is not None
            check_content(item, spec, seq)
            check_meta(item, seq)
            _pictures_in_slot(item, spec)
            assert c.poll() is None
        assert (c.received, c.missed, c.skipped) == (len(specs), 0, 0)


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(audio_specs(), min_size=1, max_size=4))
def test_audio_roundtrip(chunks: list[Audio]) -> None:
    """loan_audio / publish_audio: the consumer gets the (samples, channels) int16 chunk."""
    with Bus() as bus:
        p = bus.producer("audio", payload=max(a.samples * a.channels * 2 for a in chunks), slots=2)
        c = bus.consumer()
        for seq, spec in enumerate(chunks):
            pcm = expected_content(spec, seq)[0]
            with pytest.raises(ValueError):
                p.publish_audio(pcm.astype(np.int32), spec.rate)
            with pytest.raises(ValueError):
                p.publish_audio(pcm.reshape(-1), spec.rate)
            assert p.seq == seq
            assert publish(p, spec, seq) == seq
            item = c.poll()
            check_content(item, spec, seq)
            check_meta(item, seq)
            assert c.poll() is None
        assert (c.received, c.missed) == (len(chunks), 0)


_extradata = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda n, seed: rand_bytes(seed, n).tobytes(),
              st.integers(EXTRADATA_MAX - 3, EXTRADATA_MAX), st.integers(0, 2**16)),
)
_extra_ops = st.lists(st.one_of(st.tuples(st.just("extra"), _extradata, st.sampled_from(CODEC_NAMES)),
                                st.tuples(st.just("item")), st.tuples(st.just("too-big"))), max_size=10)


@settings(max_examples=60, deadline=None)
@given(ops=_extra_ops, late_at=st.integers(0, 10))
def test_extradata_roundtrip_and_versions(ops, late_at: int) -> None:
    """set_extradata() then Consumer.extradata() returns it (to early and late consumers);
    items sent after each set carry a strictly bigger extradata_version (0 before any)."""
    with Bus() as bus:
        p = bus.producer("encoded", payload=256, slots=3)
        early = bus.consumer()
        assert early.extradata() is None
        consumers = [early]
        current = None
        version = 0  # the version items sent now must carry, once known
        sets_since_item = 0
        for step, op in enumerate(ops):
            if step == late_at:
                consumers.append(bus.consumer())
            if op[0] == "extra":
                p.set_extradata(op[1], op[2])
                current = (op[2], op[1])
                sets_since_item += 1
            elif op[0] == "too-big":
                with pytest.raises(PayloadTooLarge):
                    p.set_extradata(bytes(EXTRADATA_MAX + 1), "h265")
            else:
                seq = p.publish_encoded(b"au%d" % step, "h264")
                item = early.poll()
                assert item is not None and item.seq == seq
                v = item.extradata_version
                if sets_since_item:
                    assert v > version, f"extradata_version {v} after set_extradata, was {version}"
                else:
                    assert v == version
                version, sets_since_item = v, 0
            for c in consumers:
                assert c.extradata() == current


@settings(max_examples=30, deadline=None)
@given(slots=st.integers(2, 6), sent=st.integers(0, 14), aborted=st.booleans())
def test_start_oldest_delivers_everything_still_in_the_ring(slots: int, sent: int, aborted: bool) -> None:
    """Consumer.attach(start='oldest') is documented as 'everything still in the ring'.

    A witness consumer, attached before anything was sent and read only afterwards, shows
    which items were still there; the 'oldest' consumer must get exactly the same ones.
    """
    with Bus() as bus:
        p = bus.producer("encoded", payload=64, slots=slots)
        witness = bus.consumer()
        for seq in range(sent):
            assert p.publish_encoded(bytes([seq]) * 4, "vp9") == seq
        if aborted and sent:
            p.loan_encoded("vp9").abort()  # destroys item sent - slots, if any
        maxbegun = sent if aborted and sent else sent - 1
        in_ring = list(range(max(0, maxbegun - slots + 1), sent))
        oldest = bus.consumer(start="oldest")
        got = []
        while (item := oldest.poll()) is not None:
            assert bytes(item.array) == bytes([item.seq]) * 4 and item.valid()
            got.append(item.seq)
        seen = []
        while (item := witness.poll()) is not None:
            seen.append(item.seq)
        assert seen == in_ring
        assert got == in_ring, f"start='oldest' delivered {got}; still in the ring: {in_ring}"
        assert oldest.missed <= (1 if aborted else 0)  # (the item the aborted loan destroyed)


@settings(max_examples=30, deadline=None)
@given(slots=st.integers(2, 6), sent=st.integers(0, 14), waiting=st.booleans())
def test_a_ring_nobody_reads_keeps_its_last_items_for_its_first_reader(slots: int, sent: int,
                                                                         waiting: bool) -> None:
    """A reader that waits for a stream (missing_ok) is woken when the ring appears, but the
    producer may send several items before that reader runs and registers. With no reader the
    ring (made without history) is a plain ring: the first reader, start='oldest', gets the
    last `slots` items, the stream's first ones when no more were sent; one that was waiting
    counts the items before those as missed (it wanted them), one that just came does not."""
    with Bus() as bus:
        waiter = bus.consumer(missing_ok=True, start="oldest") if waiting else None
        p = bus.producer("encoded", payload=64, slots=slots)
        for seq in range(sent):
            assert p.publish_encoded(bytes([seq]) * 4, "h264") == seq
        first = waiter or bus.consumer(start="oldest")
        got = [item.seq for item in _drain(first)]
        assert got == list(range(max(0, sent - slots), sent)), got
        assert (first.missed, first.resyncs) == (max(0, sent - slots) if waiting else 0, 0)
        assert p.readers == 1


@settings(max_examples=30, deadline=None)
@given(slots=st.integers(2, 6), sent=st.integers(0, 20))
def test_reliable_consumer_without_hold_back_is_live(slots: int, sent: int) -> None:
    """reliable=True on a producer with hold_back=0: the producer never waits, counts one
    overrun per item that overwrites one the reliable consumer still needed, and the
    consumer reads like a live one (missed counts the gap)."""
    with Bus() as bus:
        p = bus.producer("encoded", payload=64, slots=slots, hold_back=0)
        r = bus.consumer(reliable=True)
        live = bus.consumer()
        t0 = time.monotonic()
        for seq in range(sent):
            assert p.publish_encoded(bytes([seq]), "av1") == seq
        assert time.monotonic() - t0 < 2.0
        lost = max(0, sent - slots)
        assert p.overruns == lost
        info = bus.info()
        assert info.overruns == lost
        assert sorted(ci.reliable for ci in info.consumers) == [False, True]
        for c in (r, live):
            got = []
            while (item := c.poll()) is not None:
                assert bytes(item.array) == bytes([item.seq])
                got.append(item.seq)
            assert got == list(range(lost, sent))
            assert (c.missed, c.received, c.skipped) == (lost, sent - lost, 0)


def _drain(c: framebus.Consumer) -> list:
    out = []
    while (item := c.poll()) is not None:
        out.append(item)
    return out


def _gen1_then_restart(bus: Bus, slots1: int, sent1: int, read1: int, detached_poll: bool):
    """Producer 1 sends `sent1` items, the consumer reads `read1`, producer 1 exits cleanly.

    Returns (consumer, items it got from generation 1, generation 1). With detached_poll
    the consumer also reads the rest of the old ring and polls once more while no producer
    exists (it is then detached)."""
    p1 = bus.producer("encoded", payload=64, slots=slots1)
    c = bus.consumer()
    for seq in range(sent1):
        assert p1.publish_encoded(b"one%d" % seq, "h264") == seq
    got = []
    while len(got) < read1 and (item := c.poll()) is not None:
        got.append(item)
    gen1 = p1.generation
    p1.close()
    if detached_poll:
        got += _drain(c)
        assert c.poll() is None and not c.attached
    for item in got:  # a held view of the old ring stays readable and valid
        assert item.generation == gen1 and item.valid() and bytes(item.array) == b"one%d" % item.seq
    return c, got, gen1


@settings(max_examples=40, deadline=None)
@given(slots1=st.integers(2, 4), sent1=st.integers(0, 8), read1=st.integers(0, 8),
       slots2=st.integers(2, 4), sent2=st.integers(0, 8), detached_poll=st.booleans())
def test_restarted_producer_every_item_delivered_or_counted(slots1, sent1, read1, slots2, sent2,
                                                            detached_poll) -> None:
    """A consumer follows its stream to a new producer (clean exit, then a new one): it
    reads what is left of the old ring, then the new generation from its oldest item on,
    and every item of both generations is either received or counted in `missed`."""
    with Bus() as bus:
        c, got, gen1 = _gen1_then_restart(bus, slots1, sent1, read1, detached_poll)
        p2 = bus.producer("encoded", payload=64, slots=slots2)
        assert p2.generation > gen1
        for seq in range(sent2):
            assert p2.publish_encoded(b"two%d" % seq, "h264") == seq
        got += _drain(c)
        old = [i.seq for i in got if i.generation == gen1]
        new = [i.seq for i in got if i.generation != gen1]
        assert all(i.generation == p2.generation for i in got if i.generation != gen1)
        assert [i.generation for i in got] == sorted(i.generation for i in got)  # old ring first
        assert old == sorted(old) and new == sorted(new)
        for i in got:
            assert bytes(i.array) == (b"one%d" if i.generation == gen1 else b"two%d") % i.seq
        # The old ring: what was not read before the exit is still delivered, oldest first.
        assert old[-1:] == ([sent1 - 1] if sent1 else [])
        # The new one: nobody was registered while it sent, so it kept its newest item.
        assert new[-1:] == ([sent2 - 1] if sent2 else [])
        assert c.received == len(got)
        assert c.received + c.missed == sent1 + sent2, (
            f"received {c.received} + missed {c.missed} != {sent1} + {sent2} sent: got "
            f"{old} of the old generation, {new} of the new one, whose items before "
            f"{new[0] if new else sent2} are neither received nor counted missed")


@settings(max_examples=20, deadline=None)
@given(sent1=st.integers(0, 4), sent2=st.integers(1, 4))
def test_resync_counted_when_the_consumer_was_detached(sent1, sent2) -> None:
    """`resyncs` counts every move to a new producer generation, also when the consumer
    noticed the old producer's exit (and was detached) before the new one appeared."""
    with Bus() as bus:
        c, got, gen1 = _gen1_then_restart(bus, 4, sent1, 0, detached_poll=True)
        assert c.generation is None and c.resyncs == 0
        p2 = bus.producer("encoded", payload=64, slots=4)
        got2 = _drain(c)
        assert got2 == []  # start 'oldest' of an empty ring
        for seq in range(sent2):
            p2.publish_encoded(b"two%d" % seq, "h264")
        got2 = _drain(c)
        assert [i.seq for i in got2] == list(range(sent2))
        assert c.generation == p2.generation != gen1
        assert c.resyncs == 1, f"moved from generation {gen1} to {c.generation}, resyncs = {c.resyncs}"


@settings(max_examples=40, deadline=None)
@given(slots=st.integers(2, 5), before=st.integers(0, 8), start=st.sampled_from(["next", "oldest"]),
       reads=st.lists(st.integers(0, 2), min_size=1, max_size=6), with_live=st.booleans())
def test_reliable_consumer_loses_nothing_without_an_overrun(slots, before, start, reads, with_live) -> None:
    """'Before reusing a slot, the producer waits until every reliable consumer's hold_seq
    has passed it', within hold_back (0 here: it gives up at once and counts an overrun).
    So every item that was still there when a reliable consumer registered, and that it
    does not get, is an overrun, also when it attached after the producer's last send."""
    with Bus() as bus:
        p = bus.producer("encoded", payload=64, slots=slots, hold_back=0)
        live = bus.consumer() if with_live else None
        for seq in range(before):
            p.publish_encoded(bytes([seq]), "vp8")
        r = bus.consumer(reliable=True, start=start)
        first = p.seq - r.lag
        probe = bus.consumer(start="oldest")  # what is still there (reading changes nothing)
        there = {item.seq for item in _drain(probe)}
        probe.close()
        gone_before = len(set(range(first, p.seq)) - there)
        got = []
        for k in reads:  # send one item, then let the reliable consumer read k items
            p.publish_encoded(bytes([p.seq]), "vp8")
            for _ in range(k):
                if (item := r.poll()) is None:
                    break
                assert bytes(item.array) == bytes([item.seq])
                got.append(item.seq)
        got += [item.seq for item in _drain(r)]
        assert got == sorted(set(got))
        assert r.received + r.missed == p.seq - first
        assert r.missed <= gone_before + p.overruns, (
            f"the reliable consumer attached at {first} after {before} items (ring of {slots}; "
            f"still there then: {sorted(there)}) got {got}, lost {r.missed} items; "
            f"{gone_before} were gone before it attached, the producer counted {p.overruns} overruns")
        if live is not None:
            assert len(_drain(live)) + live.missed == p.seq
