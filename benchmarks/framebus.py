"""Frame-bus benchmark: framebus against the copy limit, multiprocessing, ZeroMQ and iceoryx2.

Run from the repository root:

    .venv/bin/python benchmarks/framebus.py [--quick] [--json PATH]
                                            [--sizes 640x480,...] [--transports zmq,...]
                                            [--consumers 1,4] [--slots 8]

Method (one row = one transport x one frame size x one consumer count)
----------------------------------------------------------------------
* Frames: K=3 distinct random RGB frames (uint8, shape (h, w, 3)) per size, made once in the
  parent before any child is forked, with a precomputed checksum each. The producer sends
  frames[seq % K]; seq travels with the frame (framebus: item.seq; zmq and iceoryx2: a
  16-byte header; mp-queue: a tuple).
* Every consumer reads every byte of every frame with the ONE function `checksum` below
  (a wrapping uint64 sum over the frame viewed as 64-bit words, the fastest honest full read
  measured here) and compares it with the checksum of frames[seq % K]. Mismatches (and, for
  framebus, items that `valid()` reports overwritten while held) are counted as `errors`.
* Processes: the parent only orchestrates. For each row it forks one producer process and
  N consumer processes (start method 'fork'); consumers connect/attach and signal readiness
  on a multiprocessing Event; the producer starts only when all are ready (this also settles
  ZeroMQ's slow-joiner problem: the producer additionally waits for every subscription to
  reach its socket). Every child is joined, or terminated, in a finally block.
* Throughput phase: the producer sends as fast as the transport lets it for a fixed time
  (2.5 s, --quick 0.6 s). All transports are run as blocking queues, so every consumer sees
  every frame: framebus consumers attach with reliable=True and the producer has
  hold_back=None; mp-queue queues are bounded (maxsize 4, one per consumer); ZeroMQ uses an
  XPUB socket (a PUB that also reports subscriptions) with XPUB_NODROP and a small
  high-water mark, so the producer blocks instead of silently dropping frames; iceoryx2 uses
  a non-overflowing service with the RetryUntilDelivered backpressure strategy.
  fps = frames received and verified per second by the SLOWEST consumer, each consumer's
  elapsed time running from its first to its last frame of the phase.
* Latency phase: after a short pause the producer sends paced frames (200 frames/s, slower
  for transports that cannot sustain twice that pace; ~400 samples, --quick ~100, capped in
  time), so consumers are waiting when each frame is sent. The producer takes
  t_send = time.monotonic_ns() right before the send call and sends it with the frame
  (framebus: send(pts=t_send)); the consumer takes t_hold = time.monotonic_ns() right after
  the receive call returns, before checksumming. latency = t_hold - t_send (CLOCK_MONOTONIC
  is shared by all processes). For framebus the producer copies the frame into the loaned
  slot BEFORE taking t_send: that copy is the producer's work (a decoder writes straight into
  the slot), not transport latency. ZeroMQ and mp-queue take t_send before their send call,
  so their copies (pickling, socket writes) are inside the latency. With 4 consumers the
  latency percentiles pool the samples of all consumers.
* idle_cpu_pct: one consumer blocked in its transport's waiting receive (1 s timeouts in a
  loop, as a service would) with no traffic for ~1.5 s; its CPU time is taken with
  resource.getrusage(RUSAGE_SELF) inside the child (all its threads, e.g. ZeroMQ's I/O
  thread). Measured once per transport and shown on each of its rows.
* `limit`: one process copies the frame into a preallocated array (np.copyto) and then reads
  it with `checksum`, as a consumer would (with 4 consumers: one copy, four reads). It is
  the single-core memory bound; it has no latency or idle figures.
* `missed`: frames the producer sent that a consumer never saw, summed over consumers (for
  framebus the consumers' own `missed` counters are also checked against it).
* The notes give the OS's own wake-up latency on this machine (a byte through a pipe to a
  process asleep in poll(2)): no transport that blocks its consumers can beat it.
* framebus rings have 8 slots (--slots to experiment). At 1080p that is 50 MB of slots,
  cycled in order, so on a machine whose last-level cache is smaller the producer's copy
  and the consumer's read go to DRAM, where a pool that reuses its most recent buffers
  (iceoryx2) stays in cache.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import queue
import resource
import select
import shutil
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

# Run as a script, this file's directory is sys.path[0] and `import framebus` would find
# this very file. Drop that directory; fall back to the repository root only after the
# installed packages, so an installed framebus (with its compiled helper) wins.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.append(os.path.dirname(_HERE))

SIZES = {"640x480": (640, 480), "1280x720": (1280, 720), "1920x1080": (1920, 1080)}
TRANSPORTS = ("limit", "framebus", "mp-queue", "zmq", "iceoryx2")
CONSUMER_COUNTS = (1, 4)
K_FRAMES = 3  # distinct frames per size; the producer sends frames[seq % K]
STOP = -1  # t_send value of the end-of-stream message
QUEUE_DEPTH = 4  # bound of every queue-like buffer (mp-queue maxsize, iceoryx2 buffer)
LAT_RATE = 200.0  # frames/s in the latency phase (slower for slow transports)
RECV_TIMEOUT = 1.0  # seconds a consumer blocks in one receive call
READY_TIMEOUT = 20.0  # seconds to wait for children to attach/connect

HDR = struct.Struct("<qq")  # (seq, t_send) header for zmq


@dataclass
class Plan:
    """Durations of one benchmark run (full or --quick)."""

    tp_s: float  # throughput phase per row
    lat_n: int  # latency samples per row (at LAT_RATE)
    lat_max_s: float  # cap on the latency phase when the pace has to be slower
    lat_min_n: int  # but at least this many samples
    idle_s: float  # idle-CPU window
    limit_s: float  # `limit` measurement per row


FULL = Plan(tp_s=2.5, lat_n=400, lat_max_s=2.5, lat_min_n=30, idle_s=1.5, limit_s=1.5)
QUICK = Plan(tp_s=0.6, lat_n=100, lat_max_s=0.6, lat_min_n=10, idle_s=1.5, limit_s=0.4)


# --------------------------------------------------------------------------------------
# Frames and the one checksum every consumer uses


def checksum(arr: np.ndarray) -> int:
    """Read every byte of a frame: wrapping uint64 sum of its 64-bit words.

    Chosen by measurement: as fast as np.bitwise_xor.reduce and about as fast as a copy's
    read side; frame sizes are multiples of 8 bytes. `arr` must be C-contiguous.
    """
    return int(np.add.reduce(arr.reshape(-1).view(np.uint64), dtype=np.uint64))


@dataclass
class FrameSet:
    width: int
    height: int
    frames: list  # K arrays of shape (h, w, 3) uint8
    sums: list  # checksum of each

    @property
    def nbytes(self) -> int:
        return self.width * self.height * 3


_FRAMESETS: dict[str, FrameSet] = {}  # made in the parent, inherited by forked children


def frameset(size: str) -> FrameSet:
    if size not in _FRAMESETS:
        w, h = SIZES[size]
        rng = np.random.default_rng(list(SIZES).index(size) + 1)
        frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(K_FRAMES)]
        sums = [checksum(f) for f in frames]
        assert len(set(sums)) == K_FRAMES, "frames must be distinguishable by checksum"
        _FRAMESETS[size] = FrameSet(w, h, frames, sums)
    return _FRAMESETS[size]


# --------------------------------------------------------------------------------------
# Row description shared by the parent and its children


@dataclass
class Row:
    transport: str
    size: str
    consumers: int
    mode: str  # "bench" (throughput + latency) or "idle"
    plan: Plan
    prefix: str  # unique per run (framebus prefix, iceoryx2 service prefix)
    stream: str  # unique per row
    tmpdir: str  # for zmq's ipc:// endpoint
    slots: int = 8  # framebus ring length
    queues: list = field(default_factory=list)  # mp-queue: one bounded Queue per consumer

    @property
    def fs(self) -> FrameSet:
        return frameset(self.size)


class Stop:
    """Returned by a receiver for the end-of-stream message."""


STOPPED = Stop()


# --------------------------------------------------------------------------------------
# framebus


class FramebusSender:
    def __init__(self, row: Row) -> None:
        from framebus import Producer

        fs = row.fs
        self.w, self.h = fs.width, fs.height
        self.p = Producer.create(
            row.stream, kind="video", slots=row.slots, payload=fs.nbytes, prefix=row.prefix,
            hold_back=None,
        )

    def connected(self, n: int) -> None:
        pass  # consumers attached before signalling ready

    def send(self, seq: int, frame: np.ndarray) -> None:
        loan = self.p.loan_picture(self.w, self.h, "rgb24")
        np.copyto(loan.array, frame)  # the producer's work (a decoder writes into the slot)
        t = time.monotonic_ns()
        loan.send(pts=t)

    def stop(self) -> None:
        loan = self.p.loan_picture(self.w, self.h, "rgb24")
        loan.send(pts=STOP)

    def close(self) -> None:
        self.p.close()


class FramebusReceiver:
    def __init__(self, row: Row, idx: int) -> None:
        import framebus

        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                self.c = framebus.Consumer.attach(row.stream, prefix=row.prefix, reliable=True)
                break
            except framebus.StreamNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def recv(self, timeout: float):
        item = self.c.receive(timeout=timeout)
        t_hold = time.monotonic_ns()
        if item is None:
            return None
        if item.pts == STOP:
            return STOPPED
        return item.seq, item.pts, item.array, t_hold, item

    def release(self, item) -> bool:
        return item.valid()

    def transport_missed(self) -> int:
        return int(self.c.missed)

    def close(self) -> None:
        self.c.close()


# --------------------------------------------------------------------------------------
# multiprocessing.Queue (pickled numpy arrays; one bounded queue per consumer)


class MpQueueSender:
    def __init__(self, row: Row) -> None:
        self.queues = row.queues

    def connected(self, n: int) -> None:
        pass

    def send(self, seq: int, frame: np.ndarray) -> None:
        t = time.monotonic_ns()
        for q in self.queues:
            q.put((seq, t, frame))

    def stop(self) -> None:
        for q in self.queues:
            q.put((0, STOP, None))

    def close(self) -> None:
        for q in self.queues:
            q.close()
            q.join_thread()  # flush the feeder thread (consumers drain up to the stop)


class MpQueueReceiver:
    def __init__(self, row: Row, idx: int) -> None:
        self.q = row.queues[idx]

    def recv(self, timeout: float):
        try:
            seq, t_send, arr = self.q.get(timeout=timeout)
        except queue.Empty:
            return None
        t_hold = time.monotonic_ns()
        if t_send == STOP:
            return STOPPED
        return seq, t_send, arr, t_hold, None

    def release(self, handle) -> bool:
        return True

    def transport_missed(self) -> int | None:
        return None

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# ZeroMQ PUB/SUB over ipc://


def _zmq_endpoint(row: Row) -> str:
    return f"ipc://{row.tmpdir}/{row.stream}.sock"


class ZmqSender:
    def __init__(self, row: Row) -> None:
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        # XPUB = PUB that also hands us the subscriptions (slow-joiner handshake); NODROP makes
        # send() block at the high-water mark instead of dropping, like the other transports.
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)
        self.sock.setsockopt(zmq.SNDHWM, 2 * QUEUE_DEPTH)  # counts message parts
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.bind(_zmq_endpoint(row))

    def connected(self, n: int) -> None:
        seen = 0
        deadline = time.monotonic() + READY_TIMEOUT
        while seen < n:
            if not self.sock.poll(100):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {seen} of {n} zmq subscriptions arrived")
                continue
            if self.sock.recv()[:1] == b"\x01":  # subscribe message
                seen += 1

    def send(self, seq: int, frame: np.ndarray) -> None:
        t = time.monotonic_ns()
        self.sock.send(HDR.pack(seq, t), self.zmq.SNDMORE)
        self.sock.send(frame, copy=False)

    def stop(self) -> None:
        self.sock.send(HDR.pack(0, STOP), self.zmq.SNDMORE)
        self.sock.send(b"")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


class ZmqReceiver:
    def __init__(self, row: Row, idx: int) -> None:
        import zmq

        fs = row.fs
        self.shape = (fs.height, fs.width, 3)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 2 * QUEUE_DEPTH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(_zmq_endpoint(row))

    def recv(self, timeout: float):
        if not self.sock.poll(int(timeout * 1000)):
            return None
        hdr, body = self.sock.recv_multipart(copy=False)
        t_hold = time.monotonic_ns()
        seq, t_send = HDR.unpack(hdr.buffer)
        if t_send == STOP:
            return STOPPED
        arr = np.frombuffer(body.buffer, dtype=np.uint8).reshape(self.shape)
        return seq, t_send, arr, t_hold, body

    def release(self, handle) -> bool:
        return True

    def transport_missed(self) -> int | None:
        return None

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


# --------------------------------------------------------------------------------------
# iceoryx2 (Python binding): publish/subscribe of a u8 slice + an event service for waking


class _IoxHeader(ctypes.Structure):
    _fields_ = [("seq", ctypes.c_int64), ("t_send", ctypes.c_int64)]


def _iox_node():
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    return iox2, (
        iox2.NodeBuilder.new()
        .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
        .create(iox2.ServiceType.Ipc)
    )


def _iox_pubsub(iox2, node, row: Row):
    return (
        node.service_builder(iox2.ServiceName.new(f"{row.prefix}/{row.stream}"))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .user_header(_IoxHeader)
        .payload_alignment(iox2.Alignment.new(64))
        .enable_safe_overflow(False)  # never overwrite: a blocking queue like the others
        .subscriber_max_buffer_size(QUEUE_DEPTH)
        .subscriber_max_borrowed_samples(2)
        .history_size(0)
        .max_publishers(1)
        .max_subscribers(max(row.consumers, 1))
    )


def _iox_event(iox2, node, row: Row):
    return node.service_builder(iox2.ServiceName.new(f"{row.prefix}/{row.stream}")).event()


def _iox_delete(owner, ports) -> None:
    """Drop the ports, then the node, in that order (iceoryx2 wants ports gone first)."""
    for name in ports:
        getattr(owner, name).delete()
    for name in ("event", "service", "node"):
        setattr(owner, name, None)


class Iceoryx2Sender:
    def __init__(self, row: Row) -> None:
        self.iox2, self.node = _iox_node()
        iox2 = self.iox2
        self.nbytes = row.fs.nbytes
        self.slot = ctypes.c_uint8 * self.nbytes
        self.service = _iox_pubsub(iox2, self.node, row).create()
        self.pub = (
            self.service.publisher_builder()
            .initial_max_slice_len(self.nbytes)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        self.event = _iox_event(iox2, self.node, row).create()
        self.notifier = self.event.notifier_builder().create()

    def connected(self, n: int) -> None:
        self.pub.update_connections()

    def send(self, seq: int, frame: np.ndarray) -> None:
        sample = self.pub.loan_slice_uninit(self.nbytes)
        dst = np.frombuffer(self.slot.from_address(sample.payload_ptr), dtype=np.uint8)
        np.copyto(dst, frame.reshape(-1))  # the producer's work, as for framebus
        sample = sample.assume_init()
        hdr = sample.user_header().contents
        hdr.seq = seq
        hdr.t_send = time.monotonic_ns()
        sample.send()
        self.notifier.notify()

    def stop(self) -> None:
        sample = self.pub.loan_slice_uninit(8).assume_init()
        hdr = sample.user_header().contents
        hdr.seq, hdr.t_send = 0, STOP
        sample.send()
        self.notifier.notify()

    def close(self) -> None:
        _iox_delete(self, ("notifier", "pub"))


class Iceoryx2Receiver:
    def __init__(self, row: Row, idx: int) -> None:
        self.iox2, self.node = _iox_node()
        iox2 = self.iox2
        fs = row.fs
        self.shape = (fs.height, fs.width, 3)
        self.slot = ctypes.c_uint8 * fs.nbytes
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                self.service = _iox_pubsub(iox2, self.node, row).open()
                self.event = _iox_event(iox2, self.node, row).open()
                break
            except (iox2.PublishSubscribeOpenError, iox2.EventOpenError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self.sub = self.service.subscriber_builder().buffer_size(QUEUE_DEPTH).create()
        self.listener = self.event.listener_builder().create()

    def recv(self, timeout: float):
        sample = self.sub.receive()
        if sample is None:
            # Events accumulate in the listener, so a notify between receive() and here
            # is not lost: the wait returns at once.
            self.listener.timed_wait(self.iox2.Duration.from_secs_f64(timeout))
            sample = self.sub.receive()
            if sample is None:
                return None
        t_hold = time.monotonic_ns()
        hdr = sample.user_header().contents
        if hdr.t_send == STOP:
            sample.delete()
            return STOPPED
        arr = np.frombuffer(self.slot.from_address(sample.payload_ptr), dtype=np.uint8)
        return hdr.seq, hdr.t_send, arr.reshape(self.shape), t_hold, sample

    def release(self, sample) -> bool:
        sample.delete()  # hand the slot back to the publisher
        return True

    def transport_missed(self) -> int | None:
        return None

    def close(self) -> None:
        _iox_delete(self, ("listener", "sub"))


SENDERS = {
    "framebus": FramebusSender,
    "mp-queue": MpQueueSender,
    "zmq": ZmqSender,
    "iceoryx2": Iceoryx2Sender,
}
RECEIVERS = {
    "framebus": FramebusReceiver,
    "mp-queue": MpQueueReceiver,
    "zmq": ZmqReceiver,
    "iceoryx2": Iceoryx2Receiver,
}


# --------------------------------------------------------------------------------------
# The producer and consumer processes (transport-independent drivers)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def producer_main(row: Row, created, readies, results) -> None:
    tx = None
    try:
        tx = SENDERS[row.transport](row)
        created.set()
        for i, ev in enumerate(readies):
            if not ev.wait(READY_TIMEOUT):
                raise TimeoutError(f"consumer {i} did not get ready")
        tx.connected(len(readies))
        if row.mode == "idle":
            time.sleep(row.plan.idle_s)
            tx.stop()
            results.put(("producer", {"sent": 0}))
            return
        frames = row.fs.frames
        plan = row.plan

        # Throughput phase: as fast as the transport lets us.
        seq = 0
        t0 = time.monotonic_ns()
        end = t0 + int(plan.tp_s * 1e9)
        while True:
            tx.send(seq, frames[seq % K_FRAMES])
            seq += 1
            if time.monotonic_ns() >= end:
                break
        tp_rate = seq / ((time.monotonic_ns() - t0) / 1e9)
        lat_start = seq
        time.sleep(0.05 + 3 * QUEUE_DEPTH / tp_rate)  # let the consumers drain

        # Latency phase: paced so the consumers are waiting for each frame.
        interval = max(1.0 / LAT_RATE, 2.0 / tp_rate)
        n_lat = max(plan.lat_min_n, min(plan.lat_n, int(plan.lat_max_s / interval)))
        next_t = time.monotonic() + interval
        for _ in range(n_lat):
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            tx.send(seq, frames[seq % K_FRAMES])
            seq += 1
            next_t += interval
        tx.stop()
        results.put(
            ("producer", {"sent": seq, "lat_start": lat_start, "tp_rate": tp_rate,
                          "lat_interval_ms": interval * 1e3})
        )
    except BaseException:
        results.put(("producer", {"error": traceback.format_exc()}))
    finally:
        if tx is not None:
            try:
                tx.close()
            except Exception:
                results.put(("producer-close", {"error": traceback.format_exc()}))


def consumer_main(row: Row, idx: int, created, ready, results) -> None:
    rx = None
    try:
        if not created.wait(READY_TIMEOUT):
            raise TimeoutError("producer was not created")
        rx = RECEIVERS[row.transport](row, idx)
        sums = row.fs.sums
        seqs, sends, holds, oks = [], [], [], []
        ready.set()
        cpu0, wall0 = _cpu_s(), time.monotonic()
        while True:
            msg = rx.recv(RECV_TIMEOUT)
            if msg is None:
                continue
            if msg is STOPPED:
                break
            seq, t_send, arr, t_hold, handle = msg
            ok = checksum(arr) == sums[seq % K_FRAMES]
            ok = rx.release(handle) and ok
            seqs.append(seq)
            sends.append(t_send)
            holds.append(t_hold)
            oks.append(ok)
        cpu, wall = _cpu_s() - cpu0, time.monotonic() - wall0
        results.put(
            ("consumer", {
                "idx": idx,
                "seq": np.array(seqs, dtype=np.int64),
                "t_send": np.array(sends, dtype=np.int64),
                "t_hold": np.array(holds, dtype=np.int64),
                "ok": np.array(oks, dtype=bool),
                "cpu_s": cpu,
                "wall_s": wall,
                "transport_missed": rx.transport_missed(),
            })
        )
    except BaseException:
        results.put(("consumer", {"idx": idx, "error": traceback.format_exc()}))
    finally:
        if rx is not None:
            try:
                rx.close()
            except Exception:
                pass


# --------------------------------------------------------------------------------------
# Running a row in child processes, and reducing what they report


class RowFailed(Exception):
    pass


def run_children(row: Row) -> tuple[dict, list[dict]]:
    """Fork the producer and the consumers of one row; return their reports."""
    ctx = mp.get_context("fork")
    if row.transport == "mp-queue":
        row.queues = [ctx.Queue(maxsize=QUEUE_DEPTH) for _ in range(row.consumers)]
    created = ctx.Event()
    readies = [ctx.Event() for _ in range(row.consumers)]
    results = ctx.Queue()
    procs = [ctx.Process(target=producer_main, args=(row, created, readies, results),
                         name=f"{row.transport}-producer")]
    procs += [
        ctx.Process(target=consumer_main, args=(row, i, created, readies[i], results),
                    name=f"{row.transport}-consumer{i}")
        for i in range(row.consumers)
    ]
    budget = READY_TIMEOUT + row.plan.tp_s + row.plan.lat_max_s * 4 + row.plan.idle_s + 30
    producer, consumers, errors = None, [], []
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + budget
        while producer is None or len(consumers) < row.consumers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RowFailed(f"timed out after {budget:.0f} s")
            try:
                who, rep = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    raise RowFailed("all children exited without reporting") from None
                continue
            if "error" in rep:
                errors.append(f"{who}: {rep['error']}")
                raise RowFailed("\n".join(errors))
            if who == "producer":
                producer = rep
            elif who == "consumer":
                consumers.append(rep)
        return producer, consumers
    finally:
        for p in procs:
            p.join(timeout=3)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
        for q in row.queues:
            q.cancel_join_thread()
            q.close()
        results.cancel_join_thread()
        results.close()


def reduce_bench(producer: dict, consumers: list[dict]) -> dict:
    lat_start, sent = producer["lat_start"], producer["sent"]
    fps_each, lats, errors, missed, tmissed = [], [], 0, 0, []
    for c in consumers:
        seq, ok = c["seq"], c["ok"]
        errors += int((~ok).sum())
        if len(seq) > 1:
            errors += int((np.diff(seq) <= 0).sum())  # out of order or duplicated
        missed += sent - len(np.unique(seq))
        if c["transport_missed"] is not None:
            tmissed.append(c["transport_missed"])
        tp = seq < lat_start
        holds = c["t_hold"][tp]
        n, n_ok = int(tp.sum()), int(ok[tp].sum())
        if n >= 2 and holds[-1] > holds[0]:
            fps_each.append((n - 1) / ((holds[-1] - holds[0]) / 1e9) * (n_ok / n))
        else:
            fps_each.append(0.0)
        lat = ~tp
        lats.append((c["t_hold"][lat] - c["t_send"][lat]) / 1e3)
    lat_us = np.concatenate(lats) if lats else np.array([])
    out = {
        "fps": round(min(fps_each), 1) if fps_each else 0.0,
        "fps_each": [round(f, 1) for f in fps_each],
        "p50_us": None, "p99_us": None, "p999_us": None,
        "lat_samples": int(lat_us.size),
        "lat_interval_ms": round(producer["lat_interval_ms"], 2),
        "errors": errors,
        "missed": missed,
        "sent": sent,
    }
    if lat_us.size:
        p50, p99, p999 = np.percentile(lat_us, [50, 99, 99.9])
        out.update(p50_us=round(float(p50), 1), p99_us=round(float(p99), 1),
                   p999_us=round(float(p999), 1))
    if tmissed:
        out["transport_missed"] = int(sum(tmissed))
    return out


def run_limit(size: str, consumers: int, plan: Plan) -> dict:
    fs = frameset(size)
    dst = np.empty_like(fs.frames[0])
    n, errors = 0, 0
    t0 = time.monotonic_ns()
    end = t0 + int(plan.limit_s * 1e9)
    while True:
        k = n % K_FRAMES
        np.copyto(dst, fs.frames[k])
        for _ in range(consumers):
            errors += checksum(dst) != fs.sums[k]
        n += 1
        if time.monotonic_ns() >= end:
            break
    fps = n / ((time.monotonic_ns() - t0) / 1e9)
    return {"fps": round(fps, 1), "p50_us": None, "p99_us": None, "p999_us": None,
            "errors": int(errors), "missed": 0}


# --------------------------------------------------------------------------------------
# Orchestration


def transport_available(name: str) -> str | None:
    """None if `name` can run here, else the reason it cannot."""
    mods = {"framebus": "framebus", "zmq": "zmq", "iceoryx2": "iceoryx2"}
    if name not in mods:
        return None
    try:
        __import__(mods[name])
    except Exception as e:  # ImportError, or a broken native module
        return f"import {mods[name]} failed: {type(e).__name__}: {e}"
    return None


def measure_wake_floor(n: int) -> tuple[float, float, float]:
    """The OS's own wake-up latency: a byte through a pipe to a process asleep in poll(2).

    No transport can beat it; it puts the latency figures in perspective on this machine.
    """
    ctx = mp.get_context("fork")
    r, w = os.pipe()
    parent_end, child_end = ctx.Pipe(duplex=False)

    def child() -> None:
        poller = select.poll()
        poller.register(r, select.POLLIN)
        lats = []
        while True:
            poller.poll(-1)
            t_hold = time.monotonic_ns()
            t_send = int.from_bytes(os.read(r, 8), "little", signed=True)
            if t_send == STOP:
                break
            lats.append(t_hold - t_send)
        child_end.send(lats)

    proc = ctx.Process(target=child, name="wake-floor")
    try:
        proc.start()
        time.sleep(0.05)
        for _ in range(n):
            time.sleep(1.0 / LAT_RATE)
            os.write(w, time.monotonic_ns().to_bytes(8, "little", signed=True))
        os.write(w, STOP.to_bytes(8, "little", signed=True))
        lat_us = np.array(parent_end.recv(), dtype=np.float64) / 1e3
        p50, p99, p999 = np.percentile(lat_us, [50, 99, 99.9])
        return float(p50), float(p99), float(p999)
    finally:
        proc.join(timeout=3)
        if proc.is_alive():
            proc.kill()
            proc.join()
        os.close(r)
        os.close(w)


def measure_idle(transport: str, ctx_args: dict, plan: Plan) -> float | None:
    row = Row(transport, "640x480", 1, "idle", plan, **ctx_args)
    _, consumers = run_children(row)
    c = consumers[0]
    return round(100.0 * c["cpu_s"] / c["wall_s"], 2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> tuple[list[dict], list[str]]:
    plan = QUICK if args.quick else FULL
    sizes = args.sizes
    transports = args.transports
    prefix = f"bench{os.getpid()}"
    tmpdir = tempfile.mkdtemp(prefix="framebus-bench-")
    rows: list[dict] = []
    notes: list[str] = []
    row_no = 0
    try:
        for size in sizes:
            frameset(size)  # before any fork
        if any(t != "limit" for t in transports):
            p50, p99, p999 = measure_wake_floor(plan.lat_n)
            notes.append(f"OS wake-up floor (pipe byte to a process asleep in poll, "
                         f"{plan.lat_n} samples): p50 {p50:.1f} us, p99 {p99:.1f} us, "
                         f"p999 {p999:.1f} us")
            log(f"-- {notes[-1]}")
        for transport in transports:
            why = transport_available(transport)
            if why:
                notes.append(f"{transport}: skipped ({why})")
                log(f"-- {transport}: SKIPPED: {why}")
                continue
            idle = None
            if transport != "limit":
                row_no += 1
                try:
                    idle = measure_idle(transport, dict(prefix=prefix, stream=f"s{row_no}",
                                                        tmpdir=tmpdir, slots=args.slots), plan)
                    log(f"-- {transport}: idle consumer {idle:.2f} % of a core")
                except Exception as e:
                    notes.append(f"{transport}: idle measurement failed: {e}")
                    log(f"-- {transport}: idle measurement FAILED: {e}")
            for size in sizes:
                for n in args.consumers:
                    row_no += 1
                    rec = {"transport": transport, "size": size, "consumers": n}
                    t = time.monotonic()
                    try:
                        if transport == "limit":
                            rec.update(run_limit(size, n, plan))
                        else:
                            row = Row(transport, size, n, "bench", plan, prefix,
                                      f"s{row_no}", tmpdir, args.slots)
                            rec.update(reduce_bench(*run_children(row)))
                    except Exception as e:
                        rec.update(fps=None, p50_us=None, p99_us=None, p999_us=None,
                                   errors=None, missed=None, failure=str(e).strip())
                        notes.append(f"{transport} {size} x{n}: FAILED: {str(e).strip()}")
                    rec["idle_cpu_pct"] = idle
                    rows.append(rec)
                    log(f"   {transport:9s} {size:>9s} x{n}  fps={rec.get('fps')}  "
                        f"p50={rec.get('p50_us')}us  p99={rec.get('p99_us')}us  "
                        f"errors={rec.get('errors')}  missed={rec.get('missed')}  "
                        f"({time.monotonic() - t:.1f} s)")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        leftovers = sweep_segments(prefix)
        if leftovers:
            notes.append(f"removed {len(leftovers)} leftover shared-memory files: "
                         + ", ".join(leftovers))
    return rows, notes


def sweep_segments(prefix: str) -> list[str]:
    """Remove framebus objects a crashed child left under this run's prefix."""
    gone = []
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return gone
    for name in names:
        if name.startswith(prefix + "."):
            try:
                os.unlink(os.path.join("/dev/shm", name))
                gone.append(name)
            except OSError:
                pass
    return gone


# --------------------------------------------------------------------------------------
# Report


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def table(rows: list[dict]) -> str:
    head = ["transport", "size", "consumers", "fps", "p50_us", "p99_us", "p999_us",
            "idle_cpu_pct", "errors/missed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        if r.get("failure"):
            em = "FAILED"
        else:
            em = f"{r['errors']}/{r['missed']}"
            if r["errors"] or r["missed"]:
                em = f"**{em} !!**"
        lines.append("| " + " | ".join([
            r["transport"], r["size"], str(r["consumers"]), _fmt(r.get("fps")),
            _fmt(r.get("p50_us")), _fmt(r.get("p99_us")), _fmt(r.get("p999_us")),
            _fmt(r.get("idle_cpu_pct"), 2), em,
        ]) + " |")
    return "\n".join(lines)


def _get(rows, transport, size, consumers, key):
    for r in rows:
        if (r["transport"], r["size"], r["consumers"]) == (transport, size, consumers):
            return r.get(key)
    return None


def targets(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(verdict, target, detail) for each target; SKIP where a figure is missing."""
    out = []
    big = "1920x1080"

    def ratio(name, a, b, factor):
        if a is None or b is None or not b:
            out.append(("SKIP", name, "no data"))
            return
        verdict = "PASS" if a >= factor * b else "FAIL"
        out.append((verdict, name, f"{a:,.0f} vs {b:,.0f} fps = {a / b:.2f}x (need {factor}x)"))

    def below(name, v, limit, unit):
        if v is None:
            out.append(("SKIP", name, "no data"))
            return
        verdict = "PASS" if v <= limit else "FAIL"
        out.append((verdict, name, f"{v:.2f} {unit} (need <= {limit} {unit})"))

    fb1 = _get(rows, "framebus", big, 1, "fps")
    fb4 = _get(rows, "framebus", big, 4, "fps")
    ratio("1080p x1: framebus >= 90% of limit", fb1, _get(rows, "limit", big, 1, "fps"), 0.9)
    ratio("1080p x1: framebus >= 4x zmq", fb1, _get(rows, "zmq", big, 1, "fps"), 4)
    ratio("1080p x1: framebus >= 30x mp-queue", fb1, _get(rows, "mp-queue", big, 1, "fps"), 30)
    ratio("1080p x1: framebus >= iceoryx2", fb1, _get(rows, "iceoryx2", big, 1, "fps"), 1)
    below("640x480 x1: framebus latency p50 <= 30 us",
          _get(rows, "framebus", "640x480", 1, "p50_us"), 30, "us")
    below("640x480 x1: framebus latency p99 <= 100 us",
          _get(rows, "framebus", "640x480", 1, "p99_us"), 100, "us")
    ratio("1080p x4: framebus slowest >= 60% of framebus x1", fb4, fb1, 0.6)
    ratio("1080p x4: framebus >= 6x zmq x4", fb4, _get(rows, "zmq", big, 4, "fps"), 6)
    idle = next((r["idle_cpu_pct"] for r in rows if r["transport"] == "framebus"), None)
    if idle is None:
        out.append(("SKIP", "framebus idle consumer < 1% of a core", "no data"))
    else:
        out.append(("PASS" if idle < 1.0 else "FAIL", "framebus idle consumer < 1% of a core",
                     f"{idle:.2f} %"))
    bad = [r for r in rows if r["transport"] == "framebus" and (r.get("errors") or r.get("missed")
                                                              or r.get("failure"))]
    ran = any(r["transport"] == "framebus" for r in rows)
    out.append(("FAIL" if bad else ("PASS" if ran else "SKIP"),
                "framebus: no errors, no missed frames, no failed rows",
                "; ".join(f"{r['size']} x{r['consumers']}: errors={r.get('errors')} "
                          f"missed={r.get('missed')}" for r in bad) or "all clean"))
    return out


def report(rows, notes, plan_name: str, elapsed: float) -> str:
    parts = [f"## framebus benchmark ({plan_name}, {elapsed:.0f} s, {os.cpu_count()} cores, "
             f"Python {sys.version.split()[0]}, numpy {np.__version__})", "", table(rows), ""]
    errs = [r for r in rows if r.get("errors")]
    if errs:
        parts += ["**!! CHECKSUM/ORDER ERRORS: "
                  + ", ".join(f"{r['transport']} {r['size']} x{r['consumers']}: {r['errors']}"
                              for r in errs) + " !!**", ""]
    parts += ["## targets", ""]
    for verdict, name, detail in targets(rows):
        parts.append(f"- {verdict}  {name}: {detail}")
    parts += ["", "## notes", ""]
    parts += [
        "- fps: frames/s received and checksum-verified by the slowest consumer; "
        "every transport runs as a blocking queue (no frame dropped by design).",
        "- latency: t_hold - t_send, pooled over consumers; framebus and iceoryx2 copy the "
        "frame into the loaned slot before t_send (producer's work, as a decoder writing into "
        "the slot); mp-queue (pickling) and zmq (socket copy) copy after t_send.",
        "- limit: np.copyto + checksum in one process (x4: one copy, four reads).",
        "- zmq uses XPUB with XPUB_NODROP (blocks at the high-water mark instead of dropping).",
    ]
    try:
        import framebus.atomics as fa

        kind = "C extension" if fa.NATIVE else "pure-Python fallback (x86 TSO)"
        parts.append(f"- framebus from {os.path.dirname(fa.__file__)}, memory ordering: {kind}")
    except Exception:
        pass
    for r in rows:
        if r.get("transport_missed") not in (None, r.get("missed")):
            parts.append(f"- {r['transport']} {r['size']} x{r['consumers']}: consumers' own "
                         f"missed counters sum to {r['transport_missed']} (bench counted "
                         f"{r['missed']})")
        if r.get("lat_samples") is not None and r["lat_samples"] < 100:
            parts.append(f"- {r['transport']} {r['size']} x{r['consumers']}: only "
                         f"{r['lat_samples']} latency samples (paced every "
                         f"{r['lat_interval_ms']} ms); p99/p999 are near the maximum")
    parts += [f"- {n}" for n in notes]
    return "\n".join(parts)


JSON_KEYS = ("transport", "size", "consumers", "fps", "p50_us", "p99_us", "p999_us",
             "idle_cpu_pct", "errors", "missed")
JSON_EXTRA = ("transport_missed", "fps_each", "lat_samples", "lat_interval_ms", "sent", "failure")


def json_row(r: dict) -> dict:
    """Every row has JSON_KEYS (null where not applicable), then what else it measured."""
    out = {k: r.get(k) for k in JSON_KEYS}
    out.update({k: r[k] for k in JSON_EXTRA if k in r})
    return out


def _csv(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if str(t) not in [str(c) for c in choices]]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(map(str, choices))}")
        return [type(choices[0])(t) for t in items]

    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short phases (ends within ~1 min)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    ap.add_argument("--sizes", type=_csv(list(SIZES)), default=list(SIZES),
                    help="comma-separated subset of " + ",".join(SIZES))
    ap.add_argument("--transports", type=_csv(list(TRANSPORTS)), default=list(TRANSPORTS),
                    help="comma-separated subset of " + ",".join(TRANSPORTS))
    ap.add_argument("--consumers", type=_csv(list(CONSUMER_COUNTS)),
                    default=list(CONSUMER_COUNTS), help="comma-separated subset of 1,4")
    ap.add_argument("--slots", type=int, default=8,
                    help="framebus ring length (default 8, the appliance's setting)")
    args = ap.parse_args(argv)
    # keep the requested order canonical
    args.transports = [t for t in TRANSPORTS if t in args.transports]
    args.sizes = [s for s in SIZES if s in args.sizes]
    args.consumers = [c for c in CONSUMER_COUNTS if c in args.consumers]

    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    rows, notes = run(args)
    notes.append(f"machine load average (1 min) {load0:.2f} at start, {os.getloadavg()[0]:.2f} "
                 f"at end: with {os.cpu_count()} cores, anything else running skews the figures")
    name = "quick" if args.quick else "full"
    if args.slots != 8:
        name += f", framebus slots={args.slots}"
    text = report(rows, notes, name, time.monotonic() - t0)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([json_row(r) for r in rows], f, indent=2)
            f.write("\n")
    # Targets are informational; a failed row or a corrupt frame is an error.
    return 1 if any(r.get("failure") or r.get("errors") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
