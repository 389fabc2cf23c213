"""The reference image an avatar is made from: the file's bytes (sent to the provider as they are) and the picture.

    face, picture = load_face("/etc/edgeroom/face.jpg", 512, 512, 25.0)

The picture, scaled to the avatar's size, is the face shown while the provider is down or
has not answered yet: a caller sees the person, never a black or frozen screen. RoomKit
started its WebSocket avatar with an empty image.
"""
from __future__ import annotations

import io
from pathlib import Path

from services.avatar.providers import Face
from services.avatar.providers.base import Rgb

__all__ = ["MAX_IMAGE_BYTES", "load_face"]

MAX_IMAGE_BYTES = 16 * 1024 * 1024


def load_face(path: str, width: int, height: int, fps: float) -> tuple[Face, Rgb]:
    """The face and its picture at width x height; ValueError naming the file and what is wrong with it."""
    import av
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"the reference image {path}: {exc.strerror or exc}") from None
    if not data:
        raise ValueError(f"the reference image {path} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"the reference image {path} is {len(data)} bytes (at most {MAX_IMAGE_BYTES})")
    try:
        with av.open(io.BytesIO(data)) as container:
            frame = next(container.decode(video=0))
            picture = frame.to_ndarray(format="rgb24", width=width, height=height)
    except (av.FFmpegError, StopIteration, ValueError, IndexError) as exc:
        raise ValueError(f"the reference image {path} is not a picture FFmpeg reads: {exc}") from None
    return Face(image=data, width=width, height=height, fps=fps), picture
