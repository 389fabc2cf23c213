"""Capture: brings one source's frames onto the bus (one process per source: capture@NAME)."""
