"""edgeroom's services (hub, capture, decode, vision, recorder, bridge, avatar) and its CLI."""
