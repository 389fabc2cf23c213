"""`snapshot`: a JPEG of the newest picture of a stream, read straight off the bus.

The hub attaches to the ring as a plain (live) reader, takes the newest item, converts and
encodes it with OpenCV (the media extra), and checks that the slot was not reused while
it read (the seqlock: `item.valid()`); a torn read is tried again. An encoded stream is
answered from its decoded twin NAME-raw. The JPEG travels base64 in the reply, so it is
made small enough for the control plane's message limit (lower quality, then smaller).
"""
from __future__ import annotations

import base64
from typing import TYPE_CHECKING, TypedDict

import framebus

if TYPE_CHECKING:
    from cv2.typing import MatLike

__all__ = ["Snapshot", "SnapshotError", "take"]

TRIES = 3


class SnapshotError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Snapshot(TypedDict):
    """What `take` returns (the `snapshot` command's result): the JPEG and where it came from."""

    stream: str
    format: str | None
    seq: int
    pts: int
    capture_ns: int
    source_width: int
    source_height: int
    width: int
    height: int
    quality: int
    jpeg: str  # base64


def _attach(prefix: str, stream: str) -> framebus.Consumer:
    try:
        return framebus.Consumer.attach(stream, prefix=prefix, start="oldest")
    except framebus.BusError as exc:
        raise SnapshotError("not_found", str(exc)) from None


def _newest(prefix: str, stream: str) -> tuple[framebus.Consumer, framebus.Item]:
    """(consumer, item) for the newest picture; an encoded stream is answered from NAME-raw."""
    consumer = _attach(prefix, stream)
    item = consumer.latest()
    if item is not None and item.kind == "encoded":
        consumer.close()
        raw = f"{stream}-raw"
        if raw not in {s.stream for s in framebus.list_streams(prefix)}:
            raise SnapshotError("not_found", f"stream {stream!r} carries encoded {item.codec}; its pictures would "
                                             f"be on {raw!r}, which does not exist (is decode@{stream} running?)")
        return _newest(prefix, raw)
    if item is None:
        consumer.close()
        raise SnapshotError("not_found", f"stream {stream!r} has no picture yet")
    if item.kind != "video":
        consumer.close()
        raise SnapshotError("bad_args", f"stream {stream!r} carries {item.kind}, not pictures")
    return consumer, item


def _bgr(item: framebus.Item) -> MatLike:
    import cv2  # take() has checked that the media extra is there
    import numpy as np

    fmt, w, h = item.format, item.width, item.height
    if fmt == "bgr24":
        return item.array.copy()
    if fmt == "rgb24":
        return cv2.cvtColor(item.array, cv2.COLOR_RGB2BGR)
    if fmt == "gray":
        return item.array.copy()
    # yuv420p / nv12: the planes into one tight buffer, then OpenCV's converter
    planes = item.planes()
    if fmt == "yuv420p":
        tight = np.concatenate([planes[0].reshape(-1), planes[1].reshape(-1), planes[2].reshape(-1)])
        return cv2.cvtColor(tight.reshape(h * 3 // 2, w), cv2.COLOR_YUV2BGR_I420)
    tight = np.concatenate([planes[0].reshape(-1), planes[1].reshape(-1)])
    return cv2.cvtColor(tight.reshape(h * 3 // 2, w), cv2.COLOR_YUV2BGR_NV12)


def take(prefix: str, stream: str, *, max_width: int = 1920, quality: int = 85, limit: int = 196608) -> Snapshot:
    """The newest picture of `stream` as {"jpeg": base64, width, height, ...}; raises SnapshotError."""
    try:
        import cv2
    except ImportError:
        raise SnapshotError("unavailable", "snapshots need OpenCV: install edgeroom with the media extra") from None
    if not 16 <= max_width <= 7680 or not 10 <= quality <= 100:
        raise SnapshotError("bad_args", "max_width must be 16..7680 and quality 10..100")
    consumer, item = _newest(prefix, stream)
    try:
        for _ in range(TRIES):
            picture = _bgr(item)
            if item.valid():
                break
            item = consumer.latest() or item  # overwritten while we read it: take a newer one
        else:
            raise SnapshotError("unavailable", f"stream {consumer.stream!r} overwrote every picture before it "
                                               "could be read")
    finally:
        consumer.close()
    width = min(max_width, picture.shape[1])
    while True:
        if width < picture.shape[1]:
            height = max(2, round(picture.shape[0] * width / picture.shape[1]))
            shown = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA)
        else:
            shown = picture
        ok, jpeg = cv2.imencode(".jpg", shown, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise SnapshotError("internal", "OpenCV could not encode the JPEG")
        body = base64.b64encode(jpeg.tobytes()).decode()
        if len(body) <= limit or width <= 160:
            break
        if quality > 50:
            quality -= 15
        else:
            width = width * 3 // 4
    return Snapshot(stream=consumer.stream, format=item.format, seq=item.seq, pts=item.pts, capture_ns=item.capture_ns,
                    source_width=item.width, source_height=item.height, width=shown.shape[1], height=shown.shape[0],
                    quality=quality, jpeg=body)
