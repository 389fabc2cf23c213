"""Calls: what every call transport (RTP; SIP, WebRTC, WebSocket to come) shares to send.

A session's outbound tracks are routes: the stream it sends as video and as audio, set by
the transport's config (`send_video`, `send_audio`: `RouteKeys`) or by the `route`
command, switched on a keyframe. No service of its own: a transport uses

    config.py   Route, RouteKeys (the config keys a transport's table declares), ROUTE_OFFER
    book.py     RouteBook: a transport's sessions' routes, the `session.route` offer behind
                `edgeroom ctl route`, the overlay routes.json that keeps commanded routes
    route.py    RouteReader: reads a session's routes off the bus, hands the transport access
                units and audio chunks, switches on the new stream's keyframe

docs/calls.md has the rules and the stream names a call uses.
"""
