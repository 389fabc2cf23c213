"""The bridge: video and audio forwarded between the sessions of a room (docs/bridge.md)."""
