"""A moving test pattern with a frame counter, drawn straight into a loaned bus slot.

No per-frame allocation: the background is built once, each frame is one copy of it into
the slot plus a bar and the frame number as 32 black/white blocks (readable back with
`frame_number`, which tests use to prove frames arrive in order and intact).
"""
from __future__ import annotations

import numpy as np

__all__ = ["Pattern", "frame_number"]


class Pattern:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        y, x = np.mgrid[0:height, 0:width]
        self.background = np.empty((height, width, 3), np.uint8)
        self.background[..., 0] = (x * 255 // max(1, width - 1)).astype(np.uint8)
        self.background[..., 1] = (y * 255 // max(1, height - 1)).astype(np.uint8)
        self.background[..., 2] = 96
        self.block = max(1, min(16, width // 32))

    def draw(self, frame: np.ndarray, n: int) -> None:
        np.copyto(frame, self.background)
        bar = (n * 8) % self.width
        frame[:, bar: bar + 16] = 255
        bits = np.unpackbits(np.array([n & 0xFFFFFFFF], ">u4").view(np.uint8))
        b = self.block
        frame[:b, : 32 * b] = np.repeat(bits * 255, b)[None, :, None]


def frame_number(frame: np.ndarray) -> int:
    b = max(1, min(16, frame.shape[1] // 32))
    bits = frame[b // 2, b // 2: 32 * b: b, 0] > 127
    return int(np.packbits(bits).view(">u4")[0])
