"""services.decode against real encoded streams (PyAV's libx264/libx265/libvpx, the ffmpeg CLI).

Every picture carries its frame number as 32 black/white blocks (services.capture.sources.synthetic),
so the tests check which pictures came out, in which order, not just how many.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from fractions import Fraction

import av
import numpy as np
import pytest

import framebus
from services.capture.sources.synthetic import Pattern, frame_number
from services.decode.decoder import Decoder, DecoderUnavailable, copy_into, nal_spans, probe_hw, publish_frame

W, H, N, GOP = 320, 240, 60, 30


def encode(codec: str, n: int = N, options: dict | None = None, w: int = W, h: int = H) -> list[tuple[bytes, bool]]:
    """Encode n pattern frames numbered 0..n-1; (access unit, keyframe) per frame."""
    enc = av.CodecContext.create(codec, "w")
    enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
    enc.time_base = Fraction(1, 30)
    enc.framerate = Fraction(30, 1)
    enc.gop_size = GOP
    enc.max_b_frames = 0
    enc.options = options or {}
    pattern = Pattern(w, h)
    img = np.empty((h, w, 3), np.uint8)
    out = []
    for i in range(n):
        pattern.draw(img, i)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        out += [(bytes(p), p.is_keyframe) for p in enc.encode(frame)]
    out += [(bytes(p), p.is_keyframe) for p in enc.encode(None)]
    assert len(out) == n
    return out


X264 = {"preset": "ultrafast", "tune": "zerolatency", "keyint": str(GOP), "min-keyint": str(GOP),
        "scenecut": "0", "bframes": "0", "threads": "2"}  # zerolatency: sliced threads, 2 slices a picture


@pytest.fixture(scope="module")
def h264() -> list[tuple[bytes, bool]]:
    return encode("libx264", options=X264)


def numbers(decoded) -> list[int]:
    return [frame_number(d.frame.to_ndarray(format="rgb24")) for d in decoded]


def run(dec: Decoder, units, **kw) -> list:
    out = []
    for i, (au, _key) in enumerate(units):
        out += dec.decode(au, pts=i, **kw)
    return out + dec.flush()


def test_whole_access_units_in_order(h264):
    assert [k for _, k in h264].count(True) == N // GOP
    dec = Decoder("h264", hw="off", threads=4)
    out = run(dec, h264)
    assert numbers(out) == list(range(N))
    assert [d.pts for d in out] == list(range(N))
    assert (dec.frames_in, dec.frames_out, dec.errors, sum(dec.dropped.values())) == (N, N, 0, 0)
    assert dec.backend == "h264" and not dec.hardware


def nal_units(units, start_codes: bool):
    """Every AU split into its NAL units, one per call; SPS and PPS come alone."""
    for i, (au, _) in enumerate(units):
        spans = nal_spans(au)
        for j, (s, e) in enumerate(spans):
            nal = au[s:e]
            yield (b"\x00\x00\x00\x01" + nal if start_codes else nal), i, j == len(spans) - 1


@pytest.mark.parametrize("start_codes", [True, False])
def test_one_nal_per_call_auto(h264, start_codes):
    dec = Decoder("h264", hw="off", threads=4)
    out, calls, lone_params = [], 0, 0
    for nal, i, _ in nal_units(h264, start_codes):
        t = nal[4 if start_codes else 0] & 0x1F
        got = dec.decode(nal, pts=i)
        if t in (7, 8):
            lone_params += 1
            assert dec.errors == 0
        calls += 1
        out += got
    out += dec.flush()
    assert lone_params >= 4  # SPS and PPS, before both IDRs
    assert numbers(out) == list(range(N))
    assert [d.pts for d in out] == list(range(N))
    assert dec.nals_in == calls and dec.frames_in == N and dec.errors == 0
    assert dec.stats()["nal_mode"]


def test_one_nal_per_call_marker_bit_and_slices():
    """Four slices per picture, NAL by NAL; end_of_au (the RTP marker) hands each AU on at once."""
    units = encode("libx264", n=40, options={**X264, "slices": "4", "threads": "1"})
    assert sum(1 for s, e in nal_spans(units[1][0])) == 4
    dec = Decoder("h264", hw="off", threads=1, thread_type="SLICE", framing="nal")
    out = []
    for nal, i, last in nal_units(units, start_codes=False):
        got = dec.decode(nal, pts=i, end_of_au=last)
        if last:
            assert [d.pts for d in got] == [i]  # no delay: one thread, marker given
        else:
            assert got == []
        out += got
    assert numbers(out) == list(range(40)) and dec.errors == 0
    # the same NALs, without the marker and framing="auto": boundaries from first_mb_in_slice
    dec = Decoder("h264", hw="off", threads=3)
    out = [d for nal, i, _ in nal_units(units, start_codes=True) for d in dec.decode(nal, pts=i)]
    assert numbers(out + dec.flush()) == list(range(40)) and dec.errors == 0


def test_mid_stream_start_waits_for_idr(h264):
    dec = Decoder("h264", hw="off", threads=4)
    out = run(dec, h264[5:])
    assert numbers(out) == list(range(GOP, N))
    assert dec.dropped["waiting_keyframe"] == GOP - 5
    assert dec.errors == 0 and dec.frames_out == N - GOP


@pytest.mark.parametrize("framing", ["nal", "auto"])
def test_mid_stream_start_one_nal_per_call(h264, framing):
    assert len(nal_spans(h264[7][0])) == 2  # two slices per picture
    dec = Decoder("h264", hw="off", threads=2, framing=framing)
    out = []
    for nal, i, _ in nal_units(h264[7:], start_codes=True):
        out += dec.decode(nal, pts=i)
    assert numbers(out + dec.flush()) == list(range(GOP, N))
    # "auto" takes the very first call (a first slice, alone) for a whole AU and learns
    # from the second slice that the input is NAL-by-NAL: one extra (partial) AU dropped
    assert dec.dropped["waiting_keyframe"] == GOP - 7 + (framing == "auto")
    assert dec.errors == 0


def corrupt(au: bytes) -> bytes:
    b = bytearray(au)
    third = len(b) // 3
    for j in range(third, third + 20):
        b[j] ^= 0x5A
    return bytes(b)


@pytest.mark.parametrize("threads", [1, 4])
def test_corrupt_p_frame_gates_until_next_idr(h264, threads):
    units = list(h264)
    units[10] = (corrupt(units[10][0]), False)
    dec = Decoder("h264", hw="off", threads=threads)
    out = run(dec, units)
    # pictures before the damage all come out, even those still in flight in other threads
    assert numbers(out) == list(range(10)) + list(range(GOP, N))
    assert dec.errors >= 1 and dec.dropped["corrupt"] >= 1
    assert dec.dropped["corrupt"] + dec.dropped["waiting_keyframe"] == GOP - 10
    assert not any(d.frame.is_corrupt for d in out)


@pytest.mark.parametrize("seed", range(8))
def test_garbage_never_raises(h264, seed):
    """Random bytes (a bogus IDR, a random NAL) mid-stream: no exception, and every
    picture that comes out is the right one (its number matches its pts: no smear)."""
    rnd = random.Random(seed)
    dec = Decoder("h264", hw="off", threads=2)
    out = []
    for i, (au, _) in enumerate(h264):
        out += dec.decode(au, pts=i)
        if i == 12:
            out += dec.decode(b"\x00\x00\x00\x01\x65" + rnd.randbytes(300), pts=1000)
            out += dec.decode(rnd.randbytes(50), pts=1001)
    out += dec.flush()
    got = numbers(out)
    assert got == [d.pts for d in out]  # pts 1000/1001 never come out: they are not numbers
    assert got[:13] == list(range(13)) and got[-(N - GOP):] == list(range(GOP, N))
    assert got == sorted(got)


def test_extradata_version_change_reopens(h264):
    idr = h264[0][0]
    spans = nal_spans(idr)
    params = b"".join(b"\x00\x00\x00\x01" + idr[s:e] for s, e in spans if idr[s] & 0x1F in (7, 8))
    dec = Decoder("h264", hw="off", threads=2, extradata=params, extradata_version=1)
    out = []
    for i, (au, _) in enumerate(h264[:20]):
        out += dec.decode(au, pts=i)
    assert dec.set_extradata(params, version=1) == [] and dec.reopens == 0  # same version: nothing
    out += dec.set_extradata(params, version=2)  # pictures still inside come back
    assert dec.reopens == 1 and dec.extradata_version == 2
    assert numbers(out) == list(range(20))
    # the next IDR without its SPS/PPS: the extradata (and the kept parameter sets) suffice
    units = list(h264)
    au = units[GOP][0]
    units[GOP] = (b"".join(b"\x00\x00\x00\x01" + au[s:e] for s, e in nal_spans(au) if au[s] & 0x1F not in (7, 8)), True)
    later = []
    for i in range(20, N):
        later += dec.decode(units[i][0], pts=i)
    later += dec.flush()
    assert numbers(later) == list(range(GOP, N))
    assert dec.dropped["waiting_keyframe"] == GOP - 20 and dec.errors == 0


def test_copy_into_bus_slot(h264, prefix):
    dec = Decoder("h264", hw="off", threads=2)
    frames = [d.frame for d in run(dec, h264[:8])]
    size = W * H * 3 // 2
    with framebus.Producer.create("dec", "video", payload=(W + 64) * H * 2, slots=4, prefix=prefix) as p, \
            framebus.Consumer.attach("dec", prefix=prefix) as c:
        for n, f in enumerate(frames):
            assert f.format.name == "yuv420p" and f.planes[0].line_size >= W
            seq = publish_frame(p, f, "yuv420p", pts=n, time_base=(1, 30))
            item = c.receive(timeout=2)
            assert item.seq == seq and item.format == "yuv420p" and item.pts == n
            assert item.array.shape == (H * 3 // 2, W)
            assert np.array_equal(item.array, f.to_ndarray())  # the same bytes as PyAV's own copy
            assert item.valid()
            assert frame_number(f.to_ndarray(format="rgb24")) == n
        # a strided slot, written through Loan.planes, read back through Item.planes()
        f = frames[3]
        loan = p.loan_picture(W, H, "yuv420p", stride=W + 64)
        copy_into(f, loan)
        loan.send(pts=3)
        item = c.receive(timeout=2)
        ref = f.to_ndarray()
        y, u, v = item.planes()
        assert np.array_equal(y, ref[:H]) and item.stride == W + 64
        assert np.array_equal(np.concatenate([u.ravel(), v.ravel()]), ref[H:].ravel())
        # nv12 and gray slots: nv12 goes through reformat (a conversion), gray is the Y plane
        loan = p.loan_picture(W, H, "nv12")
        copy_into(f, loan)
        loan.send(pts=4)
        assert np.array_equal(c.receive(timeout=2).array, f.reformat(format="nv12").to_ndarray())
        loan = p.loan_picture(W, H, "gray")
        copy_into(f, loan.array)
        loan.send(pts=5)
        assert np.array_equal(c.receive(timeout=2).array, ref[:H])
        assert size == W * H * 3 // 2
    with pytest.raises(ValueError):
        copy_into(f, (np.empty((H, W + 2), np.uint8),))


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="this machine has an NVIDIA device")
def test_probe_hw_finds_none_fast():
    t0 = time.monotonic()
    assert probe_hw("h264", refresh=True) is None
    assert probe_hw("h265", refresh=True) is None
    assert time.monotonic() - t0 < 1.0
    dec = Decoder("h264", hw="auto")
    assert dec.backend == "h264" and not dec.hardware
    with pytest.raises(DecoderUnavailable):
        Decoder("h264", hw="h264_cuvid")


@pytest.mark.gpu
@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs an NVIDIA GPU (no /dev/nvidiactl here)")
def test_hardware_decode_on_a_gpu_box(h264):
    """Where NVDEC exists, the probe finds it, `auto` takes it, and it decodes every picture."""
    name = probe_hw("h264", refresh=True)
    assert name == "h264_cuvid", "an NVIDIA box whose FFmpeg has cuvid must decode in hardware"
    dec = Decoder("h264", hw="auto")
    assert dec.hardware and dec.backend == "h264_cuvid"
    assert numbers(run(dec, h264)) == list(range(N))


@pytest.mark.parametrize("codec,encoder", [("vp8", "libvpx"), ("vp9", "libvpx-vp9")])
def test_vpx(codec, encoder):
    units = encode(encoder, options={"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                                     "auto-alt-ref": "0", "kf-max-dist": str(GOP), "kf-min-dist": str(GOP)})
    keys = [i for i, (_, k) in enumerate(units) if k]
    assert keys[0] == 0 and GOP in keys
    dec = Decoder(codec, hw="off", threads=2)
    assert numbers(run(dec, units)) == list(range(N)) and dec.errors == 0
    dec = Decoder(codec, hw="off", threads=2)  # mid-stream: bitstream keyframe detection
    assert numbers(run(dec, units[3:])) == list(range(GOP, N))
    assert dec.dropped["waiting_keyframe"] == GOP - 3


def test_h265_whole_and_nal_by_nal():
    units = encode("libx265", n=40, options={"preset": "ultrafast", "x265-params":
                                             f"keyint={GOP}:min-keyint={GOP}:bframes=0:scenecut=0:log-level=error"})
    dec = Decoder("h265", hw="off", threads=2)
    assert numbers(run(dec, units)) == list(range(40))
    dec = Decoder("h265", hw="off", threads=2)
    out = []
    for au, _ in units[4:]:
        for s, e in nal_spans(au):
            out += dec.decode(au[s:e])
    assert numbers(out + dec.flush()) == list(range(GOP, 40))
    assert dec.stats()["nal_mode"] and dec.errors == 0


@pytest.mark.skipif(not shutil.which("ffmpeg"), reason="no ffmpeg CLI")
def test_ffmpeg_cli_file_nal_by_nal(tmp_path):
    path = tmp_path / "clip.h264"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30",
                    "-frames:v", "45", "-c:v", "libx264", "-preset", "ultrafast", "-g", "15", "-bf", "2",
                    "-x264-params", "aud=1", "-f", "h264", str(path)], check=True, timeout=30)
    data = path.read_bytes()
    dec = Decoder("h264", hw="off", threads=4)
    out = []
    for s, e in nal_spans(data):
        out += dec.decode(data[s:e])
    out += dec.flush()
    assert len(out) == 45 and dec.errors == 0 and dec.frames_in == 45
