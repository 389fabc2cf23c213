"""edgeroom-avatar: talking faces driven by an audio stream of the bus, as sessions of rooms (docs/avatar.md)."""
