"""encode@NAME's parts without processes: a bus picture into the encoder's frame (every input format,
odd sizes, scaling, no reallocation), the encoder's output (constrained baseline, no B-frames, an IDR
where asked, SPS/PPS in front), and the probe that chooses the encoder on this box."""
from __future__ import annotations

import json
import os
import subprocess

import av
import cv2
import numpy as np
import pytest

from services.capture.sources.synthetic import Pattern, frame_number
from services.decode.decoder import nal_spans
from services.encode.encoder import TIME_BASE, Encoder, ParameterSets
from services.encode.pictures import Filler, FramePool, output_size
from services.recorder import encoder as encoders

GPU = os.path.exists("/dev/nvidiactl")


def test_output_size_follows_the_input_unless_told():
    assert output_size(1280, 720, 0, 0) == (1280, 720)
    assert output_size(321, 241, 0, 0) == (320, 240)          # 4:2:0 needs even sizes: one pixel cropped
    assert output_size(1280, 720, 640, 0) == (640, 360)       # the input's aspect ratio
    assert output_size(1280, 720, 0, 360) == (640, 360)
    assert output_size(1280, 720, 640, 480) == (640, 480)     # both given: as given


def _planes(rgb: np.ndarray, fmt: str) -> list[np.ndarray]:
    """`rgb` as a picture of `fmt`, planes laid out with padded strides as a bus slot may have them."""
    h, w = rgb.shape[:2]
    if fmt == "rgb24":
        return [rgb]
    if fmt == "bgr24":
        return [np.ascontiguousarray(rgb[..., ::-1])]
    f = av.VideoFrame.from_ndarray(rgb, "rgb24").reformat(format=fmt)
    out = []
    for i, p in enumerate(f.planes):
        rows = np.frombuffer(p, np.uint8).reshape(-1, p.line_size)
        if fmt == "nv12" and i == 1:
            out.append(rows[:, : 2 * ((w + 1) // 2)].reshape(rows.shape[0], -1, 2))
        else:
            out.append(rows[:, : w if i == 0 else (w + 1) // 2])
    return out


# the encoder takes yuv420p, or nv12 from an nv12 input; rgb24 / bgr24 are converted to yuv420p
PAIRS = [(f, "yuv420p") for f in ("yuv420p", "nv12", "gray", "rgb24", "bgr24")] + [(f, "nv12") for f in
                                                                                   ("yuv420p", "nv12", "gray")]


@pytest.mark.parametrize("size", [(320, 240), (322, 242), (321, 241)])  # 4n+2 height: not a numpy-backed frame
@pytest.mark.parametrize(("fmt", "out"), PAIRS)
def test_every_input_format_fills_the_frame_at_its_size_and_scaled(fmt, out, size):
    w, h = size
    rng = np.random.default_rng(7)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3)).astype(np.uint8), (0, 0), 4)
    src = _planes(rgb, fmt)
    for target in ((w & ~1, h & ~1), (160, 120), (640, 482)):
        pool = FramePool(out, *target, TIME_BASE)
        fill = Filler(fmt, w, h, pool)
        frame = pool.next()
        fill(src, frame)
        # the views filled are the frame's own memory: FFmpeg reads what was written, no copy between
        ffmpeg = [np.frombuffer(p, np.uint8).__array_interface__["data"][0] for p in frame.av.planes]
        assert ffmpeg == [p.__array_interface__["data"][0] for p in frame.planes]
        assert fill.scaled == (target != (w & ~1, h & ~1))
        got = frame.av.to_ndarray(format="rgb24").astype(int)  # what FFmpeg's encoder will read
        want = rgb[: target[1], : target[0]] if not fill.scaled else \
            cv2.resize(rgb, target, interpolation=cv2.INTER_AREA)
        if fmt == "gray":  # grey pictures: luma only, neutral chroma
            err = np.abs(got.mean(axis=2) - want.astype(int).mean(axis=2)).mean()
            assert np.abs(got[..., 0] - got[..., 2]).max() <= 2
        else:
            err = np.abs(got - want.astype(int)).mean()
        assert err < 3.0, f"{fmt} {w}x{h} -> {out} {target}: off by {err:.2f} on average"


def _encode(name: str, codec: str, n: int, keys: set[int], w: int = 320, h: int = 240, kbps: int = 800,
            slice_bytes: int = 0) -> list[tuple[bytes, bool]]:
    pattern, rgb = Pattern(w, h), np.empty((h, w, 3), np.uint8)
    pool = FramePool("yuv420p", w, h, TIME_BASE)
    fill = Filler("rgb24", w, h, pool)
    enc = Encoder(name, codec, w, h, "yuv420p", kbps=kbps, fps=30.0, gop=2.0,
                  hardware=name not in ("libx264", "libvpx"), slice_bytes=slice_bytes)
    out = []
    for i in range(n):
        pattern.draw(rgb, i)
        frame = pool.next()
        fill([rgb], frame)
        packets = enc.encode(frame.av, i * 3000, keyframe=i in keys)
        assert len(packets) == 1, f"picture {i}: {len(packets)} packets (zero latency: one access unit per picture)"
        out += [(bytes(p), bool(p.is_keyframe)) for p in packets]
    assert enc.flush() == []
    return out


def _numbers(codec: str, units: list[tuple[bytes, bool]]) -> list[int]:
    dec = av.CodecContext.create(codec, "r")
    frames = []
    for data, _ in units:
        frames += dec.decode(av.Packet(data))
    frames += dec.decode(None)
    return [frame_number(f.to_ndarray(format="gray")) for f in frames]


def _ffprobe(path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name,profile,has_b_frames,"
                          "width,height", "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["streams"][0]


def test_h264_is_constrained_baseline_without_b_frames_and_an_idr_comes_where_asked(tmp_path):
    units = _encode("libx264", "h264", 40, keys={0, 7, 23})
    assert [i for i, (_, key) in enumerate(units) if key] == [0, 7, 23]  # no keyframe of its own (scenecut off)
    for data, key in units:
        types = [data[s] & 0x1F for s, _ in nal_spans(data)]
        if key:  # SPS and PPS in front of every IDR, then IDR slices only
            assert types[:2] == [7, 8] and 5 in types and 1 not in types, types
        else:
            assert 5 not in types and 7 not in types
    assert _numbers("h264", units) == list(range(40))
    path = tmp_path / "call.h264"
    path.write_bytes(b"".join(d for d, _ in units))
    info = _ffprobe(path)
    assert info["profile"] == "Constrained Baseline" and info["has_b_frames"] == 0
    assert (info["width"], info["height"]) == (320, 240)


def test_slice_bytes_keeps_every_nal_unit_within_a_packet_for_mode_0_peers():
    """slice_bytes (x264 slice-max-size): every slice NAL unit of every picture, keyframes included, fits
    one RTP packet of the default mtu (1200 - 12 bytes of header) — what H.264 packetization-mode 0 needs; the
    same pictures without it have IDR slices far larger. The pictures still decode, in order."""
    sliced = _encode("libx264", "h264", 30, keys={0, 15}, w=640, h=480, kbps=3000, slice_bytes=1188)
    whole = _encode("libx264", "h264", 30, keys={0, 15}, w=640, h=480, kbps=3000)
    def largest(units: list[tuple[bytes, bool]]) -> int:
        return max(e - s for data, _ in units for s, e in nal_spans(data))
    assert largest(sliced) <= 1188 < 4 * 1188 < largest(whole)
    assert _numbers("h264", sliced) == list(range(30))


def test_vp8_realtime_key_frames_where_asked():
    units = _encode("libvpx", "vp8", 30, keys={0, 11})
    assert [i for i, (_, key) in enumerate(units) if key] == [0, 11]
    assert all((d[0] & 1) == (0 if key else 1) for d, key in units)  # the bitstream's own key-frame bit
    assert _numbers("vp8", units) == list(range(30))


def test_parameter_sets_go_in_front_of_an_idr_that_came_without():
    units = _encode("libx264", "h264", 3, keys={0})
    idr = units[0][0]
    spans = nal_spans(idr)
    bare = b"".join(b"\x00\x00\x00\x01" + idr[s:e] for s, e in spans if idr[s] & 0x1F not in (7, 8))
    ps = ParameterSets()
    assert ps.check(av.Packet(bare)) is None and ps.added == 0  # none seen yet: nothing to add
    assert ps.check(av.Packet(idr)) is None                     # has them: left as it is, and they are kept
    assert ps.annexb.startswith(b"\x00\x00\x00\x01") and [ps.annexb[s] & 0x1F for s, _ in nal_spans(ps.annexb)] == \
        [7, 8]
    fixed = ps.check(av.Packet(bare))
    assert fixed is not None and ps.added == 1
    assert [fixed[s] & 0x1F for s, _ in nal_spans(fixed)][:2] == [7, 8]
    assert _numbers("h264", [(fixed, True)]) == [0]


def test_the_probe_falls_back_to_software_where_no_hardware_encoder_encodes():
    """This box lists NVENC and V4L2 M2M encoders in FFmpeg but has neither device: a real probe encode
    fails, and auto takes libx264 / libvpx, saying why; off is software without a probe; a named encoder
    of another codec is refused."""
    for codec, software in (("h264", "libx264"), ("vp8", "libvpx")):
        choice = encoders.choose("auto", 320, 240, codec=codec)
        if choice.hardware:  # a box whose engine really encodes: the probe found it
            assert encoders.probe(choice.name, 320, 240) is None
            continue
        assert choice.name == software
        for name in encoders.HARDWARE_FOR[codec]:
            assert name in choice.note
        assert encoders.choose("off", 320, 240, codec=codec) == encoders.Choice(software, False, "")
    other = encoders.choose("h264_nvenc", 320, 240, codec="vp8")
    assert other.name == "libvpx" or other.hardware
    assert "h264_nvenc makes h264, not vp8; fell back to auto" in other.note
    assert encoders.choose("libvpx", 320, 240, codec="vp8") == encoders.Choice("libvpx", False, "")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU (no /dev/nvidiactl here); the CPU-side probe is tested above")
def test_nvenc_encodes_constrained_baseline_with_an_idr_where_asked(tmp_path):
    why = encoders.probe("h264_nvenc", 320, 240)
    if why is not None:
        pytest.skip(f"this GPU has no NVENC that encodes here (H100 and A100 have none): {why}")
    assert encoders.choose("auto", 320, 240, codec="h264") == encoders.Choice("h264_nvenc", True, "")
    units = _encode("h264_nvenc", "h264", 40, keys={0, 9})
    assert [i for i, (_, key) in enumerate(units) if key][:2] == [0, 9]
    assert all([d[s] & 0x1F for s, _ in nal_spans(d)][:2] == [7, 8] for d, key in units if key)
    assert _numbers("h264", units) == list(range(40))
    path = tmp_path / "nv.h264"
    path.write_bytes(b"".join(d for d, _ in units))
    info = _ffprobe(path)
    assert info["profile"] in ("Constrained Baseline", "Baseline") and info["has_b_frames"] == 0

