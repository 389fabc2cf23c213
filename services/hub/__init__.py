"""The hub: registry, rooms and sessions, control endpoint, event fan-out, sync hooks."""
