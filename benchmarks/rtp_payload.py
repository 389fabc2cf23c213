"""RTP (de)payloading: the library the RTP endpoint uses (aiortc's packet and payload classes) against the
alternatives, in packets per second through one CPU core.

Run from the repository root:

    .venv/bin/python benchmarks/rtp_payload.py [--quick]

Each row takes the packets of the same access units: a 720p-sized H.264 keyframe (30 000
bytes: 26 FU-A packets) and a P-frame (4 000 bytes: 4 FU-A packets), cut at a 1200-byte MTU,
and a 3 000-byte VP8 frame; RTP headers with the usual 12 bytes. Time is the best of 5 runs
of `time.perf_counter` around N passes (N = 2000, --quick 200); packets/s = packets / time.

Rows:
* rtp parse: aiortc `RtpPacket.parse` (what inbound.py uses) vs a hand-written `struct.unpack_from` of the
  12-byte header and a memoryview of the payload (the alternative: no version, CSRC, extension or padding
  checks);
* rtp serialize: aiortc `RtpPacket(...).serialize()` (outbound.py) vs `struct.pack` + join;
* h264 depayload: services/rtp/h264.py `H264Depacketizer` (aiortc's `H264PayloadDescriptor.parse` plus the
  FU-A order and mode checks, and the join into one access unit) vs aiortc's parser alone (no checks) vs a
  hand-written FU-A reassembly on memoryviews;
* h264 payload: services/rtp/h264.py `H264Packetizer` (mode 1, any MTU) vs aiortc `H264Encoder._packetize`
  (mode 1 only, its MTU fixed at 1300 by a module constant);
* vp8 depayload / payload: aiortc `VpxPayloadDescriptor` inside vp8.py vs aiortc's `vp8_depayload` / the
  `Vp8Encoder._packetize` (MTU fixed at 1300).
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiortc.codecs.h264 import H264Encoder, H264PayloadDescriptor  # noqa: E402
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload  # noqa: E402
from aiortc.rtp import RtpPacket  # noqa: E402

from services.rtp.h264 import H264Depacketizer, H264Packetizer  # noqa: E402
from services.rtp.vp8 import Vp8Depacketizer, Vp8Packetizer  # noqa: E402

MTU = 1200
HEADER = struct.Struct("!BBHII")


def _bytes(n: int) -> bytes:
    return os.urandom(n).replace(b"\x00\x00", b"\x00\x01")   # no start code inside a NAL unit


def best(fn, passes: int) -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(passes):
            fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    passes = 200 if ap.parse_args().quick else 2000
    sc = b"\x00\x00\x00\x01"
    units = [sc + bytes([0x65]) + _bytes(30000), sc + bytes([0x41]) + _bytes(4000)]
    pay = H264Packetizer(1, MTU - 12)
    payloads = [pay.packetize(u) for u in units]
    npackets = sum(len(p) for p in payloads)
    packets = [RtpPacket(payload_type=96, sequence_number=i, timestamp=9000, ssrc=1, payload=p).serialize()
               for i, p in enumerate(q for ps in payloads for q in ps)]
    vp8 = bytes([0x10]) + _bytes(3000)
    vp8_payloads = Vp8Packetizer(MTU - 12).packetize(vp8)

    def parse_aiortc():
        for d in packets:
            RtpPacket.parse(d)

    def parse_struct():
        for d in packets:
            HEADER.unpack_from(d, 0)
            memoryview(d)[12:]

    def serialize_aiortc():
        for i, ps in enumerate(payloads):
            for p in ps:
                RtpPacket(payload_type=96, marker=0, sequence_number=i, timestamp=1, ssrc=1, payload=p).serialize()

    def serialize_struct():
        for i, ps in enumerate(payloads):
            for p in ps:
                b"".join((HEADER.pack(0x80, 96, i, 1, 1), p))

    def depay_ours():
        d = H264Depacketizer(1)
        for ps in payloads:
            for i, p in enumerate(ps):
                d.add(p, i == len(ps) - 1)

    def depay_aiortc_alone():
        for ps in payloads:
            b"".join(H264PayloadDescriptor.parse(p)[1] for p in ps)

    def depay_hand():
        for ps in payloads:
            parts = []
            for p in ps:
                v = memoryview(p)
                if p[1] & 0x80:
                    parts += [sc, bytes(((p[0] & 0xE0) | (p[1] & 0x1F),))]
                parts.append(v[2:])
            b"".join(parts)

    def pay_ours():
        for u in units:
            pay.packetize(u)

    def pay_aiortc():
        for u in units:
            H264Encoder._packetize(H264Encoder._split_bitstream(u))

    def vp8_depay_ours():
        d = Vp8Depacketizer()
        for i, p in enumerate(vp8_payloads):
            d.add(p, i == len(vp8_payloads) - 1)

    def vp8_depay_aiortc():
        b"".join(vp8_depayload(p) for p in vp8_payloads)

    vp8pay = Vp8Packetizer(MTU - 12)

    rows = [
        ("rtp parse", "aiortc RtpPacket.parse (used)", parse_aiortc, npackets),
        ("rtp parse", "struct.unpack_from by hand", parse_struct, npackets),
        ("rtp serialize", "aiortc RtpPacket.serialize (used)", serialize_aiortc, npackets),
        ("rtp serialize", "struct.pack + join by hand", serialize_struct, npackets),
        ("h264 depayload", "H264Depacketizer: aiortc parser + checks (used)", depay_ours, npackets),
        ("h264 depayload", "aiortc H264PayloadDescriptor.parse alone", depay_aiortc_alone, npackets),
        ("h264 depayload", "FU-A on memoryviews by hand", depay_hand, npackets),
        ("h264 payload", "H264Packetizer (used)", pay_ours, npackets),
        ("h264 payload", "aiortc H264Encoder._packetize (MTU 1300)", pay_aiortc, npackets),
        ("vp8 depayload", "Vp8Depacketizer: aiortc descriptor (used)", vp8_depay_ours, len(vp8_payloads)),
        ("vp8 depayload", "aiortc vp8_depayload alone", vp8_depay_aiortc, len(vp8_payloads)),
        ("vp8 payload", "Vp8Packetizer: aiortc descriptor (used)", lambda: vp8pay.packetize(vp8),
         len(vp8_payloads)),
        ("vp8 payload", "aiortc Vp8Encoder._packetize (MTU 1300)", lambda: Vp8Encoder._packetize(vp8, 1),
         len(vp8_payloads)),
    ]
    print(f"{'step':<15} {'implementation':<50} {'packets/s':>12}")
    for step, name, fn, n in rows:
        seconds = best(fn, passes)
        print(f"{step:<15} {name:<50} {n * passes / seconds:>12,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
