"""Decode: encoded access units (or single NAL units) -> raw pictures, with a keyframe gate.
Its parts: spec.py (catalog entry), service.py (decode@NAME), decoder.py (PyAV, hardware probe)."""
