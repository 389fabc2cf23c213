"""RFC 4733 DTMF received (services/sip/dtmf.py): baresip's real packets, each digit reported once, lost end
packets, late copies, long events, garbage."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from services.sip.dtmf import Digit, DtmfReceiver, Event, name, parse

GOLDEN = Path(__file__).parent / "golden" / "sip" / "baresip-dtmf.txt"


def event(code: int, duration: int, *, end: bool = False, volume: int = 10) -> bytes:
    return struct.pack("!BBH", code, (0x80 if end else 0) | volume, duration)


def keyed(code: int, ts: int, *, steps: int = 5, step: int = 160, ends: int = 3) -> list[tuple[int, bytes]]:
    """One event as RFC 4733 senders key it: progress packets each `step` ticks, then `ends` end packets."""
    progress = [(ts, event(code, step * (i + 1))) for i in range(steps)]
    return progress + [(ts, event(code, step * steps, end=True))] * ends


def feed(receiver: DtmfReceiver, packets: list[tuple[int, bytes]]) -> list[tuple[int, str]]:
    """(index of the packet, digit) for each digit reported."""
    return [(i, d) for i, (ts, payload) in enumerate(packets) if (d := receiver.packet(ts, payload)) is not None]


def test_parse_and_names():
    assert parse(bytes.fromhex("018a21c0")) == Event(1, True, 10, 8640)
    assert parse(bytes.fromhex("0b0a03c0") + b"\x00\x00") == Event(11, False, 10, 960)   # bytes past 4 unread
    assert parse(bytes.fromhex("10bf0000")).name == "flash"                           # R bit ignored, volume 63
    assert [name(c) for c in range(17)] == [*"0123456789*#ABCD", "flash"]
    assert name(70) == "70"


@pytest.mark.parametrize("payload", [b"", b"\x01", b"\x01\x8a\x21"])
def test_a_short_payload_is_a_value_error_that_says_why(payload):
    with pytest.raises(ValueError) as err:
        parse(payload)
    assert str(err.value) == ("a telephone-event payload is 4 bytes (event, E/R/volume, duration); this one has "
                              f"{len(payload)}")


def test_baresips_digits_once_each_at_the_first_end_packet():
    packets = []
    for line in GOLDEN.read_text().splitlines():
        if not line.startswith("#"):
            seq, ts, _, payload = line.split()
            packets.append((int(seq), int(ts), bytes.fromhex(payload)))
    receiver = DtmfReceiver(48000)                 # baresip keys on the Opus clock though its rtpmap says 8000
    got = []
    for seq, ts, payload in packets:
        if (digit := receiver.packet(ts, payload)) is not None:
            got.append((seq, digit, receiver.last))
    assert [(seq, d) for seq, d, _ in got] == [(14930, "1"), (14992, "#"), (15054, "5"), (15078, "9")]
    assert {last.duration_ms for *_, last in got} == {180} and all(last.ended for *_, last in got)
    assert receiver.flush() is None


def test_a_sipp_like_event_at_8khz():
    receiver = DtmfReceiver(8000)
    assert feed(receiver, keyed(5, 1000, steps=10)) == [(10, "5")]      # the first end, not its two copies
    assert receiver.last == Digit("5", 5, 200, True)


def test_two_consecutive_digits_even_the_same_one_twice():
    receiver = DtmfReceiver()
    packets = keyed(1, 1000) + keyed(1, 3000) + keyed(11, 5000)
    assert feed(receiver, packets) == [(5, "1"), (13, "1"), (21, "#")]


def test_a_lost_end_is_reported_when_the_next_event_starts():
    receiver = DtmfReceiver()
    packets = keyed(2, 1000, ends=0) + keyed(3, 3000)
    assert feed(receiver, packets) == [(5, "2"), (10, "3")]
    assert receiver.last == Digit("3", 3, 100, True)
    receiver = DtmfReceiver()
    assert feed(receiver, keyed(2, 1000, ends=0)) == []
    assert receiver.flush() == "2" and receiver.last == Digit("2", 2, 100, False)
    assert receiver.flush() is None


def test_a_lost_end_then_an_event_seen_first_at_its_end():
    receiver = DtmfReceiver()
    packets = keyed(7, 1000, ends=0) + keyed(8, 3000, steps=0)           # 8's progress packets all lost
    assert feed(receiver, packets) == [(5, "7"), (6, "8")]                # 8 on its second end copy


def test_a_late_copy_of_an_old_end_is_ignored():
    receiver = DtmfReceiver()
    packets = keyed(1, 1000) + [(3000, event(2, 160))] + [(1000, event(1, 800, end=True))] + keyed(2, 3000)[1:]
    assert feed(receiver, packets) == [(5, "1"), (14, "2")]


def test_timestamps_wrap():
    receiver = DtmfReceiver()
    packets = keyed(4, 0xFFFFFF00) + keyed(6, 0x100)
    assert feed(receiver, packets) == [(5, "4"), (13, "6")]


def test_an_event_longer_than_one_timestamp_is_one_digit():
    receiver = DtmfReceiver()
    first = [(1000, event(0, 0x8000)), (1000, event(0, 0xFFFF))]          # the first segment, full
    second = [(1000 + 0xFFFF, event(0, 8000)), (1000 + 0xFFFF, event(0, 16000, end=True))]
    assert feed(receiver, first + second) == [(3, "0")]
    assert receiver.last.duration_ms == (0xFFFF + 16000) // 8


def test_garbage_is_a_value_error_and_changes_nothing():
    receiver = DtmfReceiver()
    packets = keyed(9, 1000)
    for ts, payload in packets[:3]:
        receiver.packet(ts, payload)
    with pytest.raises(ValueError):
        receiver.packet(2000, b"\x09")
    assert feed(receiver, packets[3:]) == [(2, "9")]
    with pytest.raises(ValueError):
        DtmfReceiver(0)
