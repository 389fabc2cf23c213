"""framebus across real processes, with real signals.

Each producer and consumer here is its own OS process (tests/busproc.py) and every item's
payload is checked byte for byte against its sequence number.
"""
from __future__ import annotations

import os
import platform
import signal
import struct
import time

import numpy as np
import pytest

import framebus
from framebus import atomics
from framebus import layout as L
from tests.busproc import check, fill

# Every cross-process test runs twice: with the compiled fences and with the pure-Python
# fallback, so neither path can rot. The fallback exists only on TSO machines (x86): on
# aarch64 asking for it is an ImportError by design, so there those cases are skipped.
MODES = [
    pytest.param({}, id="native"),
    pytest.param({"EDGEROOM_FRAMEBUS_PURE": "1"}, id="pure", marks=pytest.mark.skipif(
        not atomics.TSO, reason=f"no pure-Python atomics on {platform.machine()} (weak memory ordering)")),
]


def stream_info(prefix: str, stream: str) -> framebus.StreamInfo:
    (info,) = [s for s in framebus.list_streams(prefix) if s.stream == stream]
    return info


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("env", MODES)
def test_four_reliable_consumers_get_every_item_intact(prefix, spawn, env):
    """Producer and four consumer processes: with hold-back, each sees all 300 items, intact."""
    consumers = [spawn("consumer", prefix, "cam", "--reliable", "--until-end", env=env) for _ in range(4)]
    for c in consumers:
        c.expect("ready")
    producer = spawn("producer", prefix, "cam", "--size", "320x240", "--slots", "4", "--count", "300",
                     "--hold-back", "-1", "--wait-consumers", "4", "--end", env=env)
    producer.expect("ready")
    done = producer.expect("done", timeout=30)
    assert done["sent"] == 301 and done["overruns"] == 0
    for c in consumers:
        s = c.expect("summary", timeout=30)
        assert (s["received"], s["missed"], s["errors"], s["torn"], s["order_errors"]) == (300, 0, 0, 0, 0), s
    producer.wait()
    for c in consumers:
        assert c.wait() == 0


@pytest.mark.parametrize("env", MODES)
def test_slow_consumer_never_stalls_a_live_producer(prefix, spawn, env):
    """A live (hold_back=0) producer runs at full speed past a consumer that sleeps per item;
    the slow one counts what it missed, a fast one still gets everything."""
    slow = spawn("consumer", prefix, "cam", "--sleep", "0.05", "--until-end", "--timeout", "20", env=env)
    fast = spawn("consumer", prefix, "cam", "--until-end", "--timeout", "20", env=env)
    slow.expect("ready")
    fast.expect("ready")
    producer = spawn("producer", prefix, "cam", "--slots", "16", "--count", "400", "--rate", "400",
                     "--wait-consumers", "2", "--end", "--linger", "1", env=env)
    done = producer.expect("done", timeout=30)
    # 400 items at 400/s: one second. Had the slow consumer (20 items/s) held it back,
    # the producer would have needed 20 s.
    assert done["seconds"] < 5, done
    s = slow.expect("summary", timeout=30)
    f = fast.expect("summary", timeout=30)
    assert f["received"] == 400 and f["missed"] == 0 and f["errors"] == 0
    assert s["errors"] == 0 and s["order_errors"] == 0
    assert s["missed"] > 100, s  # it could not keep up, and it knows by how much
    # Every item either reached the slow consumer, was torn under it (and discarded), or was counted missed.
    assert s["received"] + s["torn"] + s["missed"] == 400, s


@pytest.mark.parametrize("env", MODES)
def test_producer_sigkill_mid_write_then_restart(prefix, spawn, env):
    """SIGKILL while a slot is half written: consumers never read the half frame; a new
    producer takes the stream over, consumers resync to its generation and carry on."""
    consumer = spawn("consumer", prefix, "cam", "--until-end", "--timeout", "30", env=env)
    consumer.expect("ready")
    first = spawn("producer", prefix, "cam", "--slots", "4", "--count", "50", "--rate", "500",
                  "--wait-consumers", "1", "--midwrite", env=env)
    gen1 = first.expect("ready")["generation"]
    mid = first.expect("midwrite")
    # The slot being written carries an odd stamp: "item `seq` in progress".
    info = stream_info(prefix, "cam")
    assert info.status == "alive"
    first.kill(signal.SIGKILL)
    info = stream_info(prefix, "cam")
    assert info.status == "stale" and info.items == 50
    fd = os.open(f"/dev/shm/{prefix}.cam", os.O_RDONLY)
    try:
        geo = L.Geometry(4, 64 * 48 * 3, 16)
        stamp = struct.unpack("<Q", os.pread(fd, 8, geo.stamp_off(mid["slot"])))[0]
    finally:
        os.close(fd)
    assert stamp == 2 * mid["seq"] + 1  # odd: busy, never valid for a reader

    second = spawn("producer", prefix, "cam", "--slots", "4", "--count", "50", "--rate", "500",
                   "--end", env=env)
    gen2 = second.expect("ready")["generation"]
    assert gen2 > gen1
    second.expect("done", timeout=20)
    s = consumer.expect("summary", timeout=20)
    assert s["errors"] == 0 and s["order_errors"] == 0 and s["corrupt"] == 0, s
    assert s["resyncs"] == 1 and s["generations"] == [gen1, gen2], s
    assert s["received"] + s["missed"] + s["torn"] == 100, s
    assert consumer.wait() == 0


@pytest.mark.parametrize("env", MODES)
def test_consumer_sigkill_leaks_nothing_and_unlinks_nothing(prefix, spawn, env):
    producer = spawn("producer", prefix, "cam", "--count", "100000", "--rate", "200", env=env)
    producer.expect("ready")
    victim = spawn("consumer", prefix, "cam", "--timeout", "60", env=env)
    survivor = spawn("consumer", prefix, "cam", "--count", "400", "--timeout", "20", env=env)
    victim.expect("ready")
    survivor.expect("ready")
    wait_for(lambda: len(stream_info(prefix, "cam").consumers) == 2, what="two consumers")
    fifos = lambda pid: [f for f in os.listdir("/dev/shm") if f.startswith(f"{prefix}.cam.{pid}-")]  # noqa: E731
    assert fifos(victim.pid)
    victim.kill(signal.SIGKILL)
    # The producer notices within about a second: frees the entry and removes the FIFO.
    wait_for(lambda: len(stream_info(prefix, "cam").consumers) == 1, what="dead consumer reaped")
    wait_for(lambda: not fifos(victim.pid), what="dead consumer's FIFO removed")
    s = survivor.expect("summary", timeout=20)
    assert s["received"] == 400 and s["errors"] == 0
    info = stream_info(prefix, "cam")
    assert info.status == "alive" and os.path.exists(info.path)
    producer.kill(signal.SIGTERM)


def test_consumer_exit_unlinks_nothing(prefix, spawn):
    """Python 3.11's resource tracker would unlink a segment when an attaching process
    exits; ours never registers, so the ring outlives any number of consumers."""
    with framebus.Producer.create("cam", payload=1024, prefix=prefix) as p:
        for _ in range(3):
            c = spawn("consumer", prefix, "cam", "--timeout", "0.3")
            c.expect("summary")
            assert c.wait() == 0
        assert os.path.exists(f"/dev/shm/{prefix}.cam")
        assert [s.status for s in framebus.list_streams(prefix)] == ["alive"]
        assert stream_info(prefix, "cam").consumers == []
        assert p.seq == 0


@pytest.mark.parametrize("env", MODES)
def test_held_view_reports_overwritten_after_slot_reuse(prefix, spawn, env):
    """A consumer holds item 0 while another process reuses its slot (items 4 and 8)."""
    producer = spawn("producer", prefix, "cam", "--slots", "4", "--count", "10", "--rate", "20",
                     "--wait-consumers", "1", "--linger", "30", env=env)
    producer.expect("ready")
    with framebus.Consumer.attach("cam", prefix=prefix) as c:
        item = c.receive(timeout=5)
        assert item is not None and item.seq == 0
        assert item.valid() and check(item.array, 0)  # item 4 comes 200 ms later
        assert np.array_equal(item.copy(), item.array)
        producer.expect("done")
        assert not item.valid()
        assert check(item.array, 8)  # the view shows item 8's bytes, and says so
        with pytest.raises(framebus.Overwritten, match="item 0 was overwritten"):
            item.copy()


def test_held_view_of_a_replaced_ring_stays_readable(prefix):
    """After a producer restart the consumer moves on, and an item it still holds from the
    old generation keeps its (unlinked) mapping: readable, and valid."""
    c = framebus.Consumer.attach("cam", prefix=prefix, missing_ok=True)
    try:
        p1 = framebus.Producer.create("cam", payload=64 * 48 * 3, slots=4, prefix=prefix)
        loan = p1.loan_picture(64, 48)
        fill(loan.array, 0)
        loan.send()
        old = c.receive(timeout=2)
        assert old is not None and old.generation == p1.generation
        p1.close()
        with framebus.Producer.create("cam", payload=64 * 48 * 3, slots=4, prefix=prefix) as p2:
            for _ in range(5):
                loan = p2.loan_picture(64, 48)
                fill(loan.array, p2.seq)
                loan.send()
            new = c.receive(timeout=2)
            assert new is not None and new.generation == p2.generation > p1.generation
            assert c.resyncs == 1
            assert check(new.array, new.seq)
            assert old.valid() and check(old.array, 0)
    finally:
        c.close()


def test_idle_waiting_consumer_sleeps(prefix):
    """A consumer blocked in receive() uses (almost) no CPU: it sleeps in poll(2)."""
    import subprocess
    import sys

    with framebus.Producer.create("cam", payload=1024, prefix=prefix):
        code = (
            "import framebus, time, os, sys\n"
            f"c = framebus.Consumer.attach('cam', prefix={prefix!r})\n"
            "c.receive(timeout=0.05)\n"  # first-call costs are not idling
            "t0 = time.process_time(); w0 = time.monotonic()\n"
            "assert c.receive(timeout=1.5) is None\n"
            "print((time.process_time() - t0) / (time.monotonic() - w0))\n"
            "c.close()\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert float(out.stdout) < 0.01  # under 1% of a core


def test_detached_consumer_attaches_when_the_producer_appears(prefix):
    c = framebus.Consumer.attach("cam", prefix=prefix, missing_ok=True)
    try:
        assert not c.attached
        assert c.receive(timeout=0.05) is None
        with framebus.Producer.create("cam", payload=1024, prefix=prefix, kind="encoded") as p:
            p.publish_encoded(b"\x00\x00\x00\x01\x65abc", "h264", keyframe=True)
            item = c.receive(timeout=2)
            assert item is not None and c.attached
            assert item.codec == "h264" and item.keyframe and item.array.tobytes() == b"\x00\x00\x00\x01\x65abc"
    finally:
        c.close()


def test_stale_ring_is_listed_then_collected(prefix, spawn):
    producer = spawn("producer", prefix, "cam", "--count", "5", "--linger", "30")
    producer.expect("done")
    assert stream_info(prefix, "cam").status == "alive"
    with pytest.raises(framebus.StreamBusy, match=f"live producer, pid {producer.pid}"):
        framebus.Producer.create("cam", payload=1024, prefix=prefix)
    producer.kill(signal.SIGKILL)
    info = stream_info(prefix, "cam")
    assert (info.status, info.producer_pid, info.items) == ("stale", producer.pid, 5)
    # The dead producer's wake FIFO is stale too; gc takes both.
    removed = framebus.gc(prefix)
    assert f"/dev/shm/{prefix}.cam" in removed
    assert any(r.endswith(".wake") for r in removed)
    assert framebus.list_streams(prefix) == []


def test_identity_holds_when_a_process_sees_its_own_start_time_skewed(prefix, spawn):
    """Under qemu-user a process reading its own /proc/self/stat (or /proc/<own pid>/stat)
    gets a start time qemu makes up, while every other process reads the kernel's. Here a
    producer and a reliable consumer each see their own start time 5000 ticks off (only
    those two paths, as qemu does): others must still see both alive, the producer must
    still hold back for the consumer (not reap it), and nobody may take over the ring."""
    skew = ("--skew-own-start", "5000")
    consumer = spawn(*skew, "consumer", prefix, "cam", "--reliable", "--sleep", "0.01",
                     "--until-end", "--timeout", "30", "--linger", "30")
    consumer.expect("ready")
    producer = spawn(*skew, "producer", prefix, "cam", "--slots", "4", "--count", "300",
                     "--hold-back", "-1", "--wait-consumers", "1", "--end", "--linger", "30")
    producer.expect("ready")
    # Mid-run (300 items at >= 10 ms each take > 3 s; the producer checks its readers' pids
    # once a second), from a third process that sees the true start times:
    time.sleep(1.5)
    info = stream_info(prefix, "cam")
    assert (info.status, info.producer_pid) == ("alive", producer.pid), info
    assert [(c.pid, c.reliable, c.alive) for c in info.consumers] == [(consumer.pid, True, True)], info
    with pytest.raises(framebus.StreamBusy, match=f"live producer, pid {producer.pid}"):
        framebus.Producer.create("cam", payload=1024, prefix=prefix)
    # A consumer joining takes a free entry; it must not reclaim the live one.
    with framebus.Consumer.attach("cam", prefix=prefix) as joined:
        assert joined.producer_alive()
        assert [c.pid for c in stream_info(prefix, "cam").consumers if c.alive] == [consumer.pid, os.getpid()]
    done = producer.expect("done", timeout=30)
    s = consumer.expect("summary", timeout=30)
    # Held back for a live reliable reader: nothing it read was overwritten, nothing missed.
    assert done["overruns"] == 0, done
    assert (s["received"], s["missed"], s["torn"], s["errors"], s["order_errors"]) == (300, 0, 0, 0, 0), s
    info = stream_info(prefix, "cam")
    assert info.status == "alive" and [c.alive for c in info.consumers] == [True], info
    producer.kill(signal.SIGTERM)
    consumer.kill(signal.SIGTERM)


def test_a_dead_predecessor_with_our_pid_is_not_taken_for_us(prefix):
    """In a pid namespace a restarted service often gets its predecessor's pid. A ring that
    names our pid with another start time is a dead process's: stale, and ours to take over."""
    import mmap

    old = framebus.Producer.create("cam", payload=1024, prefix=prefix)
    try:
        with open(f"/dev/shm/{prefix}.cam", "r+b") as f, mmap.mmap(f.fileno(), L.HEADER_SIZE) as head:
            pid, ticks = L.read_pid(head, L.HEADER_SIZE)
            assert pid == os.getpid()
            struct.pack_into("<Q", head, L.OFF_TICKS, ticks - 1)  # an earlier process, same pid
        assert stream_info(prefix, "cam").status == "stale"
        with framebus.Producer.create("cam", payload=1024, prefix=prefix) as new:
            assert new.generation > old.generation
            assert stream_info(prefix, "cam").status == "alive"
    finally:
        old.close()


def test_new_producer_replaces_a_stale_ring_and_bumps_the_generation(prefix, spawn):
    producer = spawn("producer", prefix, "cam", "--count", "5", "--linger", "30")
    first = producer.expect("ready")["generation"]
    producer.expect("done")
    producer.kill(signal.SIGKILL)
    assert any(f.startswith(f"{prefix}.cam.{producer.pid}-") for f in os.listdir("/dev/shm"))
    with framebus.Producer.create("cam", payload=64 * 48 * 3, prefix=prefix) as p:
        assert p.generation > first
        assert stream_info(prefix, "cam").status == "alive"
        # Taking the stream over cleared what the dead producer left (its wake FIFO).
        assert not any(f.startswith(f"{prefix}.cam.{producer.pid}-") for f in os.listdir("/dev/shm"))


def test_asyncio_and_zmq_poller_wait_on_the_consumer_fd(prefix):
    import asyncio
    import threading

    zmq = pytest.importorskip("zmq")
    with framebus.Producer.create("cam", payload=1024, prefix=prefix, kind="encoded") as p:
        c = framebus.Consumer.attach("cam", prefix=prefix)
        try:
            poller = zmq.Poller()
            poller.register(c.fileno(), zmq.POLLIN)
            assert poller.poll(50) == []  # idle: not readable
            p.publish_encoded(b"one", "h264")
            assert poller.poll(1000) == [(c.fileno(), zmq.POLLIN)]
            assert c.poll().array.tobytes() == b"one"
            assert c.poll() is None  # drained: the poller goes quiet again
            assert poller.poll(50) == []

            async def main():
                timer = threading.Timer(0.1, lambda: p.publish_encoded(b"two", "h264"))
                timer.start()
                item = await c.receive_async(timeout=5)
                timer.join()
                assert await c.receive_async(timeout=0.05) is None
                return item

            item = asyncio.run(main())
            assert item.array.tobytes() == b"two"
        finally:
            c.close()


@pytest.mark.parametrize("env", MODES)
def test_reliable_consumer_holds_the_producer_back_only_within_the_bound(prefix, spawn, env):
    """hold_back=0.02: a reliable consumer taking 0.1 s per item delays the producer by at
    most ~20 ms per item; past that the producer overwrites, counts an overrun, and the
    consumer counts what it missed."""
    consumer = spawn("consumer", prefix, "cam", "--reliable", "--sleep", "0.1", "--until-end",
                     "--timeout", "30", env=env)
    consumer.expect("ready")
    producer = spawn("producer", prefix, "cam", "--slots", "4", "--count", "40", "--hold-back", "0.02",
                     "--wait-consumers", "1", "--end", "--linger", "2", env=env)
    done = producer.expect("done", timeout=30)
    # Unbounded, 40 items at 0.1 s each would take 4 s; bounded, at most 40 x 20 ms plus overhead.
    assert done["seconds"] < 2.0, done
    assert done["overruns"] > 0
    s = consumer.expect("summary", timeout=30)
    assert s["errors"] == 0 and s["missed"] > 0
    assert s["received"] + s["missed"] + s["torn"] == 40, s
    info = stream_info(prefix, "cam")
    assert info.overruns == done["overruns"] and 0 < info.held_s < 2.0


@pytest.mark.parametrize("env", MODES)
def test_producer_killed_at_random_moments_never_yields_garbage(prefix, spawn, env):
    """Eight producers in a row, each SIGKILLed at a random moment while it writes as fast
    as it can: the consumer follows every takeover and never accepts a damaged item."""
    import random

    rng = random.Random(2)
    consumer = spawn("consumer", prefix, "cam", "--until-end", "--timeout", "60", env=env)
    consumer.expect("ready")
    gens = []
    for _ in range(8):
        p = spawn("producer", prefix, "cam", "--size", "320x240", "--slots", "3", "--count", "10000000", env=env)
        gens.append(p.expect("ready")["generation"])
        time.sleep(rng.uniform(0.05, 0.25))
        p.kill(signal.SIGKILL)
    # The last one waits until the consumer has followed it, so it sees the end marker.
    last = spawn("producer", prefix, "cam", "--size", "320x240", "--slots", "3", "--count", "20", "--end",
                 "--wait-consumers", "1", "--linger", "2", env=env)
    gens.append(last.expect("ready")["generation"])
    last.expect("done")
    s = consumer.expect("summary", timeout=30)
    assert s["errors"] == 0 and s["order_errors"] == 0 and s["corrupt"] == 0, s
    assert s["received"] > 100, s
    assert set(s["generations"]) <= set(gens) and gens[-1] in s["generations"], s
    assert s["resyncs"] == len(s["generations"]) - 1 >= 1, s


def test_a_ring_is_posix_shared_memory_and_why_we_bypass_the_tracker(prefix):
    """multiprocessing.shared_memory opens a ring by its name (it is the same POSIX object);
    and on Python < 3.13 merely attaching that way unlinks it when the attaching process
    exits (CPython issue 82300), which is why framebus never registers its segments."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from multiprocessing import shared_memory\n"
        f"shm = shared_memory.SharedMemory({prefix + '.cam'!r})\n"
        "print(bytes(shm.buf[:8]))\n"
        "shm.close()\n"
    )
    with framebus.Producer.create("cam", payload=1024, prefix=prefix):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == repr(L.MAGIC)
        if sys.version_info < (3, 13):
            # The attaching process's resource tracker unlinked the producer's ring.
            assert not os.path.exists(f"/dev/shm/{prefix}.cam")
            assert "leaked shared_memory" in out.stderr
        # framebus consumers, by contrast, come and go without unlinking anything:
        # test_consumer_exit_unlinks_nothing.
