"""The vision service's picture pipeline, checked on real pixels against real FFmpeg.

Pictures are FFmpeg's testsrc2 (colour bars, gradients, text, moving shapes), made by the
ffmpeg binary in each bus format; the conversions and the planar resizer are compared with
what FFmpeg itself makes of the same picture (BT.601 limited range, `scale=...:flags=area`),
and the colours of the watermark are read back after FFmpeg decodes our yuv420p output.
Pictures travel through a real framebus ring where the layout on the bus matters (row
padding, odd sizes).
"""
from __future__ import annotations

import functools
import subprocess
import time
from datetime import UTC, datetime

import cv2
import numpy as np
import pytest

import framebus
from services.vision.pipeline import (
    TRANSFORMS,
    Censor,
    FromBGR,
    PictureError,
    Pipeline,
    Resizer,
    ToBGR,
    TransformError,
    Watermark,
    make_transform,
    make_transforms,
    parse_colour,
)
from services.vision.types import Detection

FORMATS = ("yuv420p", "nv12", "gray", "rgb24", "bgr24")


# --- helpers: FFmpeg as the reference -------------------------------------------------------
def ffmpeg(args: list[str], data: bytes | None = None) -> bytes:
    r = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", *args], input=data, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    return r.stdout


@functools.lru_cache(maxsize=64)
def ff_testsrc(fmt: str, w: int, h: int) -> bytes:
    """One testsrc2 picture, w x h (odd allowed: cropped in rgb24), as raw `fmt`."""
    pix = {"gray": "gray"}.get(fmt, fmt)
    return ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=1", "-frames:v", "1",
                   "-vf", f"format=rgb24,crop={w}:{h}:0:0,format={pix}", "-f", "rawvideo", "-"])


def convert(raw: bytes, src_fmt: str, w: int, h: int, dst_fmt: str, vf: str | None = None) -> bytes:
    args = ["-f", "rawvideo", "-pix_fmt", src_fmt, "-s", f"{w}x{h}", "-i", "-"]
    if vf:
        args += ["-vf", vf]
    return ffmpeg(args + ["-f", "rawvideo", "-pix_fmt", dst_fmt, "-"], raw)


def split(raw: bytes | np.ndarray, fmt: str, w: int, h: int) -> tuple[np.ndarray, ...]:
    """Tight raw bytes -> plane arrays (what item.planes() returns for a tight picture)."""
    a = np.frombuffer(raw, np.uint8) if isinstance(raw, bytes) else raw.reshape(-1)
    cw, ch = (w + 1) // 2, (h + 1) // 2
    if fmt == "yuv420p":
        return (a[:w * h].reshape(h, w), a[w * h:w * h + cw * ch].reshape(ch, cw),
                a[w * h + cw * ch:w * h + 2 * cw * ch].reshape(ch, cw))
    if fmt == "nv12":
        return (a[:w * h].reshape(h, w), a[w * h:w * h + 2 * cw * ch].reshape(ch, cw, 2))
    if fmt == "gray":
        return (a[:w * h].reshape(h, w),)
    return (a[:w * h * 3].reshape(h, w, 3),)


def tight_bytes(planes) -> bytes:
    return b"".join(np.ascontiguousarray(p).tobytes() for p in planes)


def ff_bgr(raw: bytes, fmt: str, w: int, h: int) -> np.ndarray:
    """FFmpeg's own conversion of a raw picture to bgr24."""
    return np.frombuffer(convert(raw, fmt, w, h, "bgr24"), np.uint8).reshape(h, w, 3)


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def sharpness(a: np.ndarray) -> float:
    """High-frequency energy of a BGR picture: the variance of its Laplacian."""
    return float(cv2.Laplacian(cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_BGR2GRAY), cv2.CV_32F).var())


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """testsrc2 at 1280x720 as a BGR picture (FFmpeg's conversion)."""
    return np.frombuffer(ff_testsrc("bgr24", 1280, 720), np.uint8).reshape(720, 1280, 3).copy()


def bus_item(producer, consumer, raw: bytes, fmt: str, w: int, h: int, stride: int | None):
    """Publish a raw picture through a real ring with the given row stride; the received item."""
    loan = producer.loan_picture(w, h, fmt, stride=stride)
    for dst, src in zip(loan.planes, split(raw, fmt, w, h)):
        dst[...] = src
    loan.send(capture_ns=time.monotonic_ns())
    item = consumer.receive(timeout=5)
    assert item is not None
    return item


# --- picture: bus formats <-> BGR ---------------------------------------------------------
@pytest.mark.parametrize("w,h,stride", [(640, 360, None), (640, 360, 704), (321, 241, None), (321, 241, 400)])
def test_to_bgr_matches_ffmpeg_for_every_format_through_the_bus(prefix, w, h, stride):
    with framebus.Producer.create("pic", "video", payload=1 << 21, slots=4, prefix=prefix) as p, \
            framebus.Consumer.attach("pic", prefix=prefix) as c:
        conv = ToBGR()
        for fmt in FORMATS:
            raw = ff_testsrc(fmt, w, h)
            s = None if stride is None else stride * (3 if fmt in ("rgb24", "bgr24") else 1)
            item = bus_item(p, c, raw, fmt, w, h, s)
            assert item.format == fmt
            bgr = conv(item.planes(), item.format, item.width, item.height)
            ref = ff_bgr(raw, fmt, w, h)
            assert bgr.shape == (h, w, 3)
            d = diff(bgr, ref)
            # OpenCV and swscale agree on BT.601 limited range; they differ only in chroma
            # upsampling (nearest vs bilinear), which shows at sharp colour edges.
            assert d.mean() < 2.0, (fmt, d.mean())
            assert np.percentile(d, 95) <= 6, (fmt, np.percentile(d, 95))
            if fmt in ("gray", "rgb24", "bgr24"):
                assert d.max() <= 1, fmt


def test_to_bgr_takes_the_tight_array_without_a_copy():
    raw = ff_testsrc("yuv420p", 640, 360)
    conv = ToBGR()
    arr = np.frombuffer(raw, np.uint8).reshape(540, 640)
    a = conv(arr, "yuv420p", 640, 360)
    b = conv(split(raw, "yuv420p", 640, 360), "yuv420p", 640, 360)
    assert a is b and conv.copies == 0  # tight planes are converted straight from the slot
    conv(split(ff_testsrc("yuv420p", 321, 241), "yuv420p", 321, 241), "yuv420p", 321, 241)
    assert conv.copies == 1  # odd sizes need the staging copy


@pytest.mark.parametrize("fmt", ["yuv420p", "nv12", "gray", "rgb24", "bgr24"])
@pytest.mark.parametrize("w,h,stride", [(640, 360, None), (321, 241, 352)])
def test_from_bgr_writes_bus_planes_that_ffmpeg_reads_back(prefix, photo, fmt, w, h, stride):
    bgr = np.ascontiguousarray(photo[:h, :w])
    with framebus.Producer.create("out", "video", payload=1 << 21, slots=4, prefix=prefix) as p, \
            framebus.Consumer.attach("out", prefix=prefix) as c:
        s = None if stride is None else stride * (3 if fmt in ("rgb24", "bgr24") else 1)
        loan = p.loan_picture(w, h, fmt, stride=s)
        FromBGR()(bgr, fmt, loan.planes)
        loan.send()
        item = c.receive(timeout=5)
        raw = tight_bytes(item.planes())
    back = ff_bgr(raw, fmt, w, h)
    d = diff(back, bgr)
    if fmt == "gray":
        ref = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        assert diff(np.frombuffer(raw, np.uint8).reshape(h, w), ref).max() == 0
    elif fmt in ("rgb24", "bgr24"):
        assert d.max() == 0
    else:
        assert d.mean() < 3.0 and np.percentile(d, 95) <= 8, (d.mean(), np.percentile(d, 95))


def test_colours_parse_to_bgr_and_bad_ones_name_the_key():
    assert parse_colour("#FF0000") == (0, 0, 255)
    assert parse_colour("#102030") == (0x30, 0x20, 0x10)
    for bad in ("red", "#FF00", "#GG0000", "FF0000", None):
        with pytest.raises(PictureError) as e:
            parse_colour(bad, key="watermark colour")
        assert "watermark colour" in str(e.value) and e.value.reason == "bad_colour"


def test_unknown_format_and_wrong_planes_are_refused():
    with pytest.raises(PictureError, match="unknown|unsupported") as e:
        ToBGR()((np.zeros((4, 4), np.uint8),), "yuv422p", 4, 4)
    assert e.value.reason == "bad_format" and "yuv420p" in str(e.value)
    with pytest.raises(PictureError, match="shapes") as e:
        ToBGR()((np.zeros((4, 4), np.uint8),), "yuv420p", 4, 4)
    assert e.value.reason == "bad_layout"


# --- resize ----------------------------------------------------------------------------
def test_plan_downscales_only_keeps_aspect_and_even_sides():
    r = Resizer(640, 640)
    assert r.plan(1280, 720) == (640, 360)
    assert r.plan(320, 240) == (320, 240)          # never upscaled
    assert r.plan(321, 241) == (320, 240)          # fits, brought to even sides
    assert r.plan(720, 1280) == (360, 640)
    assert Resizer(1000, 0).plan(1920, 1080) == (1000, 562)
    assert Resizer(0, 0).plan(1920, 1080) == (1920, 1080)
    w2, h2 = Resizer(500, 500).plan(1279, 719)
    assert (w2, h2) == (500, 280) and w2 % 2 == 0 and h2 % 2 == 0
    assert abs(w2 / h2 - 1279 / 719) < 0.01
    for bad in (-1, 1, 2.5):
        with pytest.raises(PictureError):
            Resizer(bad, 0)


@pytest.mark.parametrize("fmt", ["yuv420p", "nv12"])
@pytest.mark.parametrize("w,h,limit", [(1280, 720, 640), (1279, 719, 500), (640, 360, 300)])
def test_planar_resize_matches_ffmpeg_area_scale(fmt, w, h, limit):
    raw = ff_testsrc(fmt, w, h)
    r = Resizer(limit, limit)
    w2, h2 = r.plan(w, h)
    ours = tight_bytes(r.resize_planes(split(raw, fmt, w, h), fmt, w, h))
    ref = convert(raw, fmt, w, h, fmt, vf=f"scale={w2}:{h2}:flags=area")
    assert len(ours) == len(ref) == w2 * h2 * 3 // 2
    d = diff(np.frombuffer(ours, np.uint8), np.frombuffer(ref, np.uint8))
    luma, chroma = d[:w2 * h2], d[w2 * h2:]
    assert luma.max() <= 2 and luma.mean() < 0.05, (luma.max(), luma.mean())
    assert chroma.max() <= 2 and chroma.mean() < 0.05, (chroma.max(), chroma.mean())


@pytest.mark.parametrize("fmt", ["rgb24", "bgr24", "gray"])
def test_packed_resize_matches_ffmpeg_area_scale(fmt):
    w, h = 1279, 719
    raw = ff_testsrc(fmt, w, h)
    r = Resizer(640, 640)
    w2, h2 = r.plan(w, h)
    out = r.resize_planes(split(raw, fmt, w, h), fmt, w, h)
    ref = np.frombuffer(convert(raw, fmt, w, h, fmt, vf=f"scale={w2}:{h2}:flags=area"), np.uint8)
    d = diff(out[0].reshape(-1), ref)
    assert out[0].shape[:2] == (h2, w2)
    assert d.max() <= 3 and d.mean() < 0.2, (d.max(), d.mean())


def test_resized_planes_convert_like_a_bgr_space_resize(photo):
    """Resizing yuv420p plane by plane then converting ~= converting then resizing."""
    w, h = 1280, 720
    raw = ff_testsrc("yuv420p", w, h)
    r = Resizer(480, 480)
    planes = r.resize_planes(split(raw, "yuv420p", w, h), "yuv420p", w, h)
    w2, h2 = r.plan(w, h)
    ours = ToBGR()(planes, "yuv420p", w2, h2)
    ref = cv2.resize(ff_bgr(raw, "yuv420p", w, h), (w2, h2), interpolation=cv2.INTER_AREA)
    d = diff(ours, ref)
    assert d.mean() < 3 and np.percentile(d, 95) <= 8, (d.mean(), np.percentile(d, 95))


def test_resizer_reuses_its_buffers_and_passes_fitting_pictures_through(photo):
    r = Resizer(640, 640)
    raw = ff_testsrc("nv12", 1280, 720)
    a = r.resize_planes(split(raw, "nv12", 1280, 720), "nv12", 1280, 720)
    b = r.resize_planes(split(raw, "nv12", 1280, 720), "nv12", 1280, 720)
    assert all(x is y for x, y in zip(a, b))
    assert r.resize_bgr(photo) is r.resize_bgr(photo)
    small = np.ascontiguousarray(photo[:300, :400])
    assert r.resize_bgr(small) is small
    # Straight into destination planes (an output slot) of the planned size.
    dst = split(np.empty(640 * 360 * 3 // 2, np.uint8), "nv12", 640, 360)
    r.resize_into(split(raw, "nv12", 1280, 720), "nv12", 1280, 720, dst)
    assert tight_bytes(dst) == tight_bytes(a)


# --- transforms ------------------------------------------------------------------------
def test_unknown_transform_lists_the_known_ones():
    with pytest.raises(TransformError) as e:
        make_transform("vintage")
    assert e.value.reason == "unknown_transform"
    for name in TRANSFORMS:
        assert name in str(e.value)
    assert set(TRANSFORMS) == {"grayscale", "sepia", "invert", "blur", "cartoon", "edges", "sketch", "pixelate"}
    assert repr(make_transform("pixelate:24")) == "pixelate:24"
    with pytest.raises(TransformError, match="integer"):
        make_transform("blur:big")
    with pytest.raises(TransformError, match="no strength"):
        make_transform("invert:3")


def solid(bgr: tuple[int, int, int], w: int = 64, h: int = 48) -> np.ndarray:
    a = np.empty((h, w, 3), np.uint8)
    a[:] = bgr
    return a


def test_grayscale_and_sepia_read_channels_in_bgr_order():
    g = make_transform("grayscale")
    blue, red = solid((255, 0, 0)), solid((0, 0, 255))
    # BT.601 luma: blue 0.114 * 255 = 29, red 0.299 * 255 = 76 (swapped if RGB/BGR were mixed up)
    assert np.all(g(blue, np.empty_like(blue)) == 29)
    assert np.all(g(red, np.empty_like(red)) == 76)
    grey = solid((128, 128, 128))
    s = make_transform("sepia")(grey, np.empty_like(grey))
    b, gg, r = (int(v) for v in s[0, 0])
    assert r > gg > b, (b, gg, r)  # warm brown, not blue
    assert (r, gg, b) == tuple(round(128 * sum(row)) for row in
                              ((0.393, 0.769, 0.189), (0.349, 0.686, 0.168), (0.272, 0.534, 0.131)))


def test_invert_pixelate_blur_edges_sketch_cartoon_do_what_they_say(photo):
    src = photo
    out = {n: make_transform(n)(src, np.empty_like(src)) for n in TRANSFORMS}
    assert np.array_equal(out["invert"], 255 - src)
    # pixelate: constant 16x16 blocks
    blocks = out["pixelate"][:720 // 16 * 16, :1280 // 16 * 16].reshape(45, 16, 80, 16, 3)
    assert np.all(blocks == blocks[:, :1, :, :1, :])
    # blur: much less high-frequency energy than the original
    assert sharpness(out["blur"]) < sharpness(src) / 5
    # edges: binary, and only a minority of pixels are edges
    e = out["edges"]
    assert set(np.unique(e)) <= {0, 255} and 0.001 < (e[..., 0] == 255).mean() < 0.3
    # sketch: gray, mostly paper-white
    sk = out["sketch"]
    assert np.array_equal(sk[..., 0], sk[..., 1]) and np.median(sk) > 200
    # cartoon: flat colours (8 levels per channel: 16, 48, ..., 240) with black outlines
    ca, levels = out["cartoon"], np.arange(8) * 32 + 16
    assert np.isin(ca, levels).all(axis=2).mean() > 0.8 and np.isin(src, levels).all(axis=2).mean() < 0.01
    assert 0.005 < (ca.sum(axis=2) == 0).mean() < 0.3


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_runs_in_place_into_the_same_buffer(photo, name):
    t = make_transform(name)
    dst = np.empty_like(photo)
    first = t(photo, dst)
    assert first is dst and not np.array_equal(first, photo)
    expected = first.copy()
    work = photo.copy()
    assert t(work, work) is work
    assert np.array_equal(work, expected)
    assert t(photo, dst) is dst  # and again, into the same buffer


# --- watermark -------------------------------------------------------------------------
def test_placeholders_expand_from_the_capture_clock():
    wm = Watermark("{stream} #{frame:06d} {timestamp}", timestamp_format="%Y-%m-%d %H:%M", utc=True)
    hour_ago = time.monotonic_ns() - 3600 * 10**9
    before = datetime.fromtimestamp(time.time() - 3600, tz=UTC).strftime("%Y-%m-%d %H:%M")
    text = wm.text_for(frame=42, stream="door", capture_ns=hour_ago)
    after = datetime.fromtimestamp(time.time() - 3600, tz=UTC).strftime("%Y-%m-%d %H:%M")
    assert text in (f"door #000042 {before}", f"door #000042 {after}")
    with pytest.raises(PictureError, match=r"unknown placeholder \{camera\}.*\{timestamp\}"):
        Watermark("{camera}")
    with pytest.raises(PictureError, match="position"):
        Watermark("x", position="middle")


def test_text_is_laid_out_once_per_distinct_string(photo):
    frame = photo.copy()
    wm = Watermark("edgeroom {stream}")
    for i in range(50):
        wm(frame, frame=i, stream="door")
    assert wm.renders == 1
    ts = Watermark("{timestamp}", timestamp_format="%H:%M:%S")
    now = time.monotonic_ns()
    for i in range(30):
        ts(frame, frame=i, capture_ns=now + i * 33_000_000)  # 30 frames in ~1 s
    assert ts.renders <= 2
    counter = Watermark("{frame}")
    for i in range(10):
        counter(frame, frame=i)
    assert counter.renders == 10 and counter.last_text == "9"


def _text_mask(frame: np.ndarray, colour_bgr) -> np.ndarray:
    return np.all(frame == np.array(colour_bgr, np.uint8), axis=2)


@pytest.mark.parametrize("position,corner", [("top-left", (0, 0)), ("top-right", (0, 1)),
                                             ("bottom-left", (1, 0)), ("bottom-right", (1, 1))])
def test_red_on_black_comes_out_exactly_and_where_asked(position, corner):
    frame = solid((255, 255, 255), 640, 360)  # white picture
    wm = Watermark("EDGEROOM", position=position, colour="#FF0000", background="#000000", scale=1.5, margin=8)
    wm(frame)
    red = _text_mask(frame, (0, 0, 255))
    black = _text_mask(frame, (0, 0, 0))
    assert red.sum() > 300 and black.sum() > 1000
    ys, xs = np.nonzero(black | red)
    cy, cx = corner
    assert (ys.min() == 8) if cy == 0 else (ys.max() == 360 - 8 - 1)
    assert (xs.min() == 8) if cx == 0 else (xs.max() == 640 - 8 - 1)
    # everything else is untouched
    box = np.zeros(red.shape, bool)
    box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    assert np.all(frame[~box] == 255)


def test_xy_position_center_and_clipping():
    frame = solid((0, 0, 0), 320, 240)
    Watermark("X", position="100,50", colour="#00FF00", background="#0000FF")(frame)
    ys, xs = np.nonzero(_text_mask(frame, (255, 0, 0)) | _text_mask(frame, (0, 255, 0)))
    assert (ys.min(), xs.min()) == (50, 100)
    frame[:] = 0
    Watermark("MIDDLE", position="center", colour="#FFFFFF", background="#808080")(frame)
    ys, xs = np.nonzero(frame.any(axis=2))
    assert abs((ys.min() + ys.max()) / 2 - 120) <= 1 and abs((xs.min() + xs.max()) / 2 - 160) <= 1
    frame[:] = 0
    Watermark("far off the edge", position="300,230", background="#FFFFFF")(frame)  # clipped, no error
    assert frame[230:, 300:].any() and not frame[:230].any()


def test_text_without_background_blends_onto_the_picture():
    frame = solid((40, 40, 40), 400, 120)
    Watermark("Hello", position="top-left", colour="#00FF00", scale=2.0, thickness=4)(frame)
    core = _text_mask(frame, (0, 255, 0))
    assert core.sum() > 200                            # glyph cores exactly the colour
    untouched = np.all(frame == 40, axis=2)
    assert untouched.mean() > 0.8                      # no box drawn around the text


def test_red_watermark_is_red_after_yuv420p_and_ffmpeg(photo):
    """The colours survive our BGR -> yuv420p and FFmpeg's decoding of it."""
    frame = photo.copy()
    wm = Watermark("RED", position="center", colour="#FF0000", background="#2050C0", scale=6.0, thickness=24)
    wm(frame)
    red = _text_mask(frame, (0, 0, 255))
    bg = _text_mask(frame, (0xC0, 0x50, 0x20))
    assert red.sum() > 2000 and bg.sum() > 2000
    out = np.empty((720 * 3 // 2, 1280), np.uint8)
    FromBGR()(frame, "yuv420p", out)
    rgb = np.frombuffer(convert(out.tobytes(), "yuv420p", 1280, 720, "rgb24"), np.uint8).reshape(720, 1280, 3)
    k = np.ones((7, 7), np.uint8)  # away from edges, where 4:2:0 chroma blends neighbours
    red_in = cv2.erode(red.astype(np.uint8), k).astype(bool)
    bg_in = cv2.erode(bg.astype(np.uint8), k).astype(bool)
    assert red_in.sum() > 500 and bg_in.sum() > 500
    assert diff(rgb[red_in], np.array([255, 0, 0])).max() <= 4
    assert diff(rgb[bg_in], np.array([0x20, 0x50, 0xC0])).max() <= 4


# --- censor ----------------------------------------------------------------------------
def det(label: str, box=(100, 100, 200, 180), conf: float = 0.9) -> Detection:
    return Detection(label, conf, box)


def test_boxes_scope_hides_only_the_padded_box(photo):
    for mode in ("black", "blur", "pixelate"):
        frame = photo.copy()
        c = Censor(["person"], mode=mode, scope="boxes", padding=0.1)
        # the box lies on testsrc2's noisy checkerboard, so blurring it shows
        assert c.apply(frame, [det("person", (820, 460, 920, 540)), det("dog", (600, 300, 700, 400))])
        assert c.censored
        inside = (slice(452, 548), slice(810, 930))  # 100x80 box padded 10 px / 8 px
        outside = np.ones(frame.shape[:2], bool)
        outside[inside] = False
        assert np.array_equal(frame[outside], photo[outside]), mode  # bit-for-bit elsewhere
        region, orig = frame[inside], photo[inside]
        if mode == "black":
            assert not region.any()
        else:
            assert sharpness(region) < sharpness(orig) / 4, mode


def test_frame_scope_hides_everything_and_labels_are_matched_case_insensitively(photo):
    frame = photo.copy()
    c = Censor(["Person"], scope="frame")
    assert c.apply(frame, [det("person")])
    assert not frame.any()
    frame = photo.copy()
    assert not c.apply(frame, [det("dog")]) and np.array_equal(frame, photo)
    assert c.apply(frame.copy(), [det("dog"), det("person", conf=0.2)])  # min_confidence 0: any
    strict = Censor(["person"], min_confidence=0.5)
    assert not strict.apply(frame, [det("person", conf=0.2)]) and np.array_equal(frame, photo)
    assert Censor(["*"]).apply(frame, [det("anything")])


def test_grace_frames_bridge_a_flickering_detector(photo):
    c = Censor(["person"], scope="boxes", grace_frames=2)
    seen = [1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]
    want = [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0]
    got = []
    for s in seen:
        frame = photo.copy()
        c.apply(frame, [det("person")] if s else [det("cat", (0, 0, 10, 10))])
        got.append(int(c.censored))
        # during grace the last box is still hidden
        assert (not frame[100:180, 100:200].any()) == bool(want[len(got) - 1])
    assert got == want
    assert c.frames_seen == len(seen) and c.frames_censored == sum(want) and c.frames_grace == 5


def test_boxes_from_a_differently_sized_picture_are_scaled(photo):
    frame = cv2.resize(photo, (640, 360), interpolation=cv2.INTER_AREA)
    ref = frame.copy()
    c = Censor(["face"], scope="boxes", padding=0.0)
    c.apply(frame, [det("face", (200, 200, 400, 400))], source_size=(1280, 720))
    assert not frame[100:200, 100:200].any()
    assert np.array_equal(frame[210:], ref[210:]) and np.array_equal(frame[:, 210:], ref[:, 210:])


def test_censor_config_errors_are_clear():
    for kwargs, msg in (({"labels": []}, "at least one"), ({"labels": ["x"], "mode": "smudge"}, "black, blur"),
                        ({"labels": ["x"], "scope": "half"}, "frame, boxes"),
                        ({"labels": ["x"], "grace_frames": -1}, "grace_frames")):
        with pytest.raises(PictureError, match=msg):
            Censor(**kwargs)


# --- the chain -------------------------------------------------------------------------
def test_order_transforms_then_censor_then_watermark(photo):
    p = Pipeline(None, make_transforms(["invert"]), Censor(["person"], scope="frame"),
                 Watermark("LIVE", position="top-left", colour="#FFFFFF", background="#FF0000"))
    out = p.run(photo, [det("person")], frame=1, stream="door")
    # censor after invert: black stays black (invert after it would have made it white)
    assert not out[360:].any()
    # watermark after censor: drawn, in its own colours, on the censored frame
    assert _text_mask(out, (0, 0, 255)).sum() > 100 and _text_mask(out, (255, 255, 255)).sum() > 20
    assert p.censored
    p.run(photo, [], frame=2, stream="door")
    assert not p.censored


def test_run_reuses_buffers_and_never_writes_into_the_bus_picture(prefix, photo):
    raw = photo.tobytes()
    p = Pipeline(Resizer(640, 640), make_transforms(["sepia", "blur"]), Censor(["person"], scope="boxes"),
                 Watermark("{stream} {frame}"))
    with framebus.Producer.create("cam", "video", payload=1 << 22, slots=4, prefix=prefix) as prod, \
            framebus.Consumer.attach("cam", prefix=prefix) as cons:
        outs, loads = [], []
        for i in range(4):
            item = bus_item(prod, cons, raw, "bgr24", 1280, 720, None)
            loaded = p.load(item.planes(), item.format, item.width, item.height)
            loads.append(loaded)
            outs.append(p.run(loaded, [det("person")], frame=i, stream="cam", capture_ns=item.capture_ns))
            assert np.array_equal(item.array, photo)  # the slot is read, never written
        assert all(o is outs[0] for o in outs) and all(x is loads[0] for x in loads)
        assert outs[0].shape == (360, 640, 3)
        # The same with no resizer: the read-only bus view is copied once into a work buffer.
        q = Pipeline(None, [], None, Watermark("x"))
        r1 = q.run(item.array, [], frame=1)
        r2 = q.run(item.array, [], frame=2)
        assert r1 is r2 and r1 is not item.array and np.array_equal(item.array, photo)
        assert set(p.timings) == {"resize", "convert", "transforms", "censor", "watermark"}


def test_end_to_end_yuv420p_in_bus_out_with_detections_from_the_original_size(prefix, photo):
    raw = convert(photo.tobytes(), "bgr24", 1280, 720, "yuv420p")
    seen = []
    p = Pipeline(Resizer(640, 640), [], Censor(["person"], scope="boxes", padding=0.0),
                 Watermark("{stream}", position="bottom-right", colour="#FF0000", background="#000000", scale=2.0),
                 observer=lambda stage, s: seen.append(stage))
    with framebus.Producer.create("in", "video", payload=1 << 22, slots=4, prefix=prefix) as pin, \
            framebus.Consumer.attach("in", prefix=prefix) as cin, \
            framebus.Producer.create("in-out", "video", payload=1 << 22, slots=4, prefix=prefix) as pout, \
            framebus.Consumer.attach("in-out", prefix=prefix) as cout:
        item = bus_item(pin, cin, raw, "yuv420p", 1280, 720, None)
        bgr = p.load(item.planes(), item.format, item.width, item.height)
        out = p.run(bgr, [det("person", (0, 0, 400, 400))], frame=item.seq, stream="in",
                    capture_ns=item.capture_ns, source_size=(1280, 720))
        loan = pout.loan_picture(out.shape[1], out.shape[0], "yuv420p")
        p.write(out, "yuv420p", loan.planes)
        loan.send()
        res = cout.receive(timeout=5)
        rgb = np.frombuffer(convert(tight_bytes(res.planes()), "yuv420p", 640, 360, "rgb24"),
                            np.uint8).reshape(360, 640, 3)
    assert seen == ["resize", "convert", "censor", "watermark", "output"]
    assert rgb[4:196, 4:196].max() <= 20  # the box, scaled from 1280x720, is black
    ref = cv2.resize(photo, (640, 360), interpolation=cv2.INTER_AREA)[..., ::-1]
    assert diff(rgb[200:300, 250:400], ref[200:300, 250:400]).mean() < 4  # the rest is the picture
    wm = rgb[300:, 450:]
    reds = (wm[..., 0] > 200) & (wm[..., 1] < 60) & (wm[..., 2] < 60)
    assert reds.sum() > 50  # the red watermark, read back by FFmpeg


def test_from_settings_builds_only_the_configured_stages(photo):
    p = Pipeline.from_settings(resize_max_width=640, transforms=["grayscale"], censor_labels=["person"],
                               censor_scope="boxes", censor_grace_frames=3, watermark_text="{stream}",
                               watermark_colour="#00FF00")
    assert p.resizer.plan(1280, 720) == (640, 360) and [repr(t) for t in p.transforms] == ["grayscale"]
    assert p.censor.grace_frames == 3 and p.censor.scope == "boxes" and p.watermark.colour == (0, 255, 0)
    bare = Pipeline.from_settings()
    assert (bare.resizer, bare.transforms, bare.censor, bare.watermark) == (None, [], None, None)
    assert not bare.draws
    with pytest.raises(TransformError, match="known: grayscale"):
        Pipeline.from_settings(transforms=["sepia", "oilpaint"])
    with pytest.raises(PictureError, match="watermark colour"):
        Pipeline.from_settings(watermark_text="x", watermark_colour="green")
