"""The recorder: crash-safe fragmented MP4 per stream (and per room)."""
from services.recorder.mp4 import DiskFull, Mp4Error, Mp4Writer, Track, repair

__all__ = ["DiskFull", "Mp4Error", "Mp4Writer", "Track", "repair"]
