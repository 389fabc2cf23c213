"""Bad attaches and bad items get errors that name the cause; nothing is left behind."""
from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest

import framebus
from framebus import layout as L


def test_wrong_name_says_where_it_looked_and_what_exists(prefix):
    with framebus.Producer.create("cam1", payload=1024, prefix=prefix):
        with pytest.raises(framebus.StreamNotFound) as err:
            framebus.Consumer.attach("cam9", prefix=prefix)
    msg = str(err.value)
    assert f"no stream 'cam9' under prefix '{prefix}'" in msg
    assert f"/dev/shm/{prefix}.cam9" in msg
    assert "streams present: cam1" in msg


def test_wrong_layout_version_is_refused_by_name(prefix):
    with framebus.Producer.create("cam", payload=1024, prefix=prefix):
        path = f"/dev/shm/{prefix}.cam"
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, struct.pack("<I", 99), 8)
        finally:
            os.close(fd)
        with pytest.raises(framebus.LayoutMismatch, match="layout version 99, this framebus reads version 1"):
            framebus.Consumer.attach("cam", prefix=prefix)
        # The producer's pid is still readable at its fixed place: nobody may take over.
        with pytest.raises(framebus.StreamBusy, match="layout version 99"):
            framebus.Producer.create("cam", payload=1024, prefix=prefix)
        (info,) = framebus.list_streams(prefix)
        assert info.status == "alive" and "layout version 99" in info.error


def test_slots_too_small_for_the_consumer(prefix):
    with framebus.Producer.create("cam", payload=640 * 480 * 3, prefix=prefix) as p:
        with pytest.raises(framebus.LayoutMismatch, match="slots of 921600 bytes, this consumer needs 6220800"):
            framebus.Consumer.attach("cam", prefix=prefix, expect_payload=1920 * 1080 * 3)
        with pytest.raises(framebus.PayloadTooLarge,
                           match="a 1920x1080 rgb24 picture needs 6220800 bytes, slots hold 921600"):
            p.loan_picture(1920, 1080, "rgb24")
        with pytest.raises(framebus.PayloadTooLarge):
            p.publish_picture(np.zeros((1080, 1920, 3), np.uint8))
        assert p.seq == 0  # nothing half-sent
        p.publish_picture(np.zeros((480, 640, 3), np.uint8))  # and the ring still works
        assert p.seq == 1


def test_garbage_and_truncated_segments(prefix):
    junk = f"/dev/shm/{prefix}.junk"
    with open(junk, "wb") as f:
        f.write(b"not a ring" * 1000)
    with pytest.raises(framebus.NotAStream, match="not a framebus segment"):
        framebus.Consumer.attach("junk", prefix=prefix)
    with framebus.Producer.create("cam", payload=1 << 20, prefix=prefix):
        short = f"/dev/shm/{prefix}.short"
        with open(f"/dev/shm/{prefix}.cam", "rb") as src, open(short, "wb") as dst:
            dst.write(src.read(L.PAGE * 2))
        with pytest.raises(framebus.NotAStream,
                           match=r"segment is 8192 bytes but its header describes \d+ \(truncated\)"):
            framebus.Consumer.attach("short", prefix=prefix)
    statuses = {s.stream: s.status for s in framebus.list_streams(prefix)}
    assert statuses == {"junk": "invalid", "short": "alive"}  # short's header names our live pid
    os.unlink(short)
    assert junk in framebus.gc(prefix)  # no live owner: collected


def test_full_shm_is_a_clear_error_not_a_bus_error(prefix):
    # more than the whole tmpfs, not just more than is free now: what other processes (a test worker beside
    # this one) free meanwhile cannot make it fit (and fallocate gigabytes of memory)
    total = shutil.disk_usage("/dev/shm").total
    with pytest.raises(framebus.BusFull, match=r"/dev/shm has \d+ bytes free but the ring") as err:
        framebus.Producer.create("huge", payload=total // 2 + (1 << 20), slots=2, prefix=prefix)
    assert "enlarge the tmpfs or use fewer or smaller slots" in str(err.value)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="bad stream name 'a.b'"):
        framebus.Producer.create("a.b", payload=10, prefix="x")
    with pytest.raises(ValueError, match="bad prefix name ''"):
        framebus.Consumer.attach("cam", prefix="")
    with pytest.raises(ValueError, match="slots must be 2..65536, got 1"):
        framebus.Producer.create("cam", payload=10, slots=1, prefix="x")
    with pytest.raises(ValueError, match="unknown stream kind 'pictures'"):
        framebus.Producer.create("cam", "pictures", payload=10, prefix="x")


def test_consumer_table_full(prefix):
    with framebus.Producer.create("cam", payload=1024, prefix=prefix, max_consumers=2):
        a = framebus.Consumer.attach("cam", prefix=prefix)
        b = framebus.Consumer.attach("cam", prefix=prefix)
        with pytest.raises(framebus.BusError, match="already has its maximum of 2 consumers"):
            framebus.Consumer.attach("cam", prefix=prefix)
        b.close()
        framebus.Consumer.attach("cam", prefix=prefix).close()  # a freed entry is reused
        a.close()


def test_wrong_item_kind_and_double_loan(prefix):
    with framebus.Producer.create("cam", payload=1024, prefix=prefix) as p:
        with pytest.raises(framebus.BusError, match="carries video items, not encoded"):
            p.publish_encoded(b"x", "h264")
        loan = p.loan_picture(8, 8, "gray")
        with pytest.raises(framebus.BusError, match="one loan at a time"):
            p.loan_picture(8, 8, "gray")
        loan.abort()
        with pytest.raises(framebus.BusError, match="already sent or aborted"):
            loan.send()
        with pytest.raises(ValueError, match="unknown pixel format 'rgba'"):
            p.loan_picture(8, 8, "rgba")
        assert p.seq == 0


def test_corrupt_descriptor_is_dropped_counted_and_logged(prefix, caplog):
    """A descriptor that a (buggy) producer filled with nonsense never becomes a view past
    its slot: the consumer drops the item, counts it, logs why, and goes on."""
    with framebus.Producer.create("cam", payload=64 * 48 * 3, slots=4, prefix=prefix) as p:
        c = framebus.Consumer.attach("cam", prefix=prefix)
        loan = p.loan_picture(64, 48)
        loan.array[:] = 1
        slot = loan.slot
        loan.send()
        size_off = p.geometry.stamp_off(slot) + L.META_OFF + 8  # kind, format, flags, then size
        fd = os.open(f"/dev/shm/{prefix}.cam", os.O_RDWR)
        try:
            os.pwrite(fd, struct.pack("<Q", 1 << 40), size_off)
        finally:
            os.close(fd)
        with caplog.at_level("WARNING", logger="framebus"):
            assert c.poll() is None
        assert (c.corrupt, c.missed, c.received) == (1, 1, 0)
        assert ("item 0 has a bad descriptor, dropped (1 so far): size 1099511627776 exceeds the slot's 9216 bytes"
                in caplog.text)
        p.publish_picture(np.full((48, 64, 3), 2, np.uint8))
        item = c.poll()
        assert item is not None and item.seq == 1 and (item.array == 2).all()
        c.close()


def test_a_ring_reserved_as_written_costs_the_pages_its_items_take(prefix):
    """A history ring of roomy slots (compressed video: items far smaller than the slot) takes
    /dev/shm pages as its items reach them, not slots x payload at creation; every item still
    reads back whole."""
    slots, payload = 128, 256 * 1024
    with framebus.Producer.create("hist", "encoded", payload=payload, slots=slots, prefix=prefix, history=True,
                                  reserve="written") as p:
        path = f"/dev/shm/{prefix}.hist"
        control = p.geometry.payloads_off
        assert os.stat(path).st_size == control + slots * p.geometry.slot_stride
        assert os.stat(path).st_blocks * 512 <= control + L.PAGE  # the payloads: nothing yet
        sizes = [30000 if i % 30 == 0 else 3000 for i in range(2 * slots)]
        for i, n in enumerate(sizes):
            p.publish_encoded(bytes([i % 251]) * n, "h264", keyframe=n > 3000, capture_ns=i)
        taken = os.stat(path).st_blocks * 512 - control
        largest = {}  # per slot: the most bytes it held, in whole pages
        for i, n in enumerate(sizes):
            largest[i % slots] = max(largest.get(i % slots, 0), -(-n // L.PAGE) * L.PAGE)
        assert taken <= sum(largest.values()) + L.PAGE, (taken, sum(largest.values()))
        assert taken < slots * payload // 20
        with framebus.Consumer.attach("hist", prefix=prefix, start="oldest") as c:
            got = []
            while (item := c.poll()) is not None:
                got.append((item.seq, bytes(item.array[:1]), item.array.nbytes))
        assert [g[0] for g in got] == list(range(slots, 2 * slots))
        assert all(g[1] == bytes([g[0] % 251]) and g[2] == sizes[g[0]] for g in got)
    with pytest.raises(ValueError, match="reserve must be 'all' or 'written'"):
        framebus.Producer.create("x", payload=10, prefix=prefix, reserve="lazy")
