"""Encode: a stream of raw pictures -> H.264 (constrained baseline) or VP8 access units, for calls.
The mirror of decode. Its parts: spec.py (catalog entry, [encoders.NAME]), service.py (encode@NAME),
encoder.py (the PyAV encoder and its options per backend), pictures.py (a bus picture into the
encoder's input frame: one copy or conversion pass, no allocation)."""
