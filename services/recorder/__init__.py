"""The recorder: crash-safe fragmented MP4 per stream (and per room). Its parts: spec.py (catalog
entry, [recorder]), service.py, stream.py and room.py (targets), mp4.py (the writer), segments.py."""
