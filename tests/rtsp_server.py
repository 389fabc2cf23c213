#!/usr/bin/python3
"""A real RTSP server on loopback for tests: GStreamer's gst-rtsp-server serving a live test
pattern encoded with x264 (zero latency, a keyframe every --key-int frames).

Run it with the SYSTEM python (the venv has no gi): Debian's python3-gi,
gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-{good,bad,ugly} (x264enc is in ugly).

    /usr/bin/python3 tests/rtsp_server.py [--port 0] [--mount /test] [--user U --password P]

Listens on 127.0.0.1 only. --port 0 (the default) lets the kernel pick; the bound port is
printed on stdout, alone on the first line, once the server accepts connections. Clients
may ask for RTP over TCP (interleaved) or over UDP; --protocols narrows that. With --user
and --password the mount needs HTTP-style Basic authentication. SIGTERM or SIGINT stops it
(exit 0); the listening socket is bound with SO_REUSEADDR so a new server can take the
same port at once. --exit-after N stops it by itself after N seconds (a crude "camera
reboots" for manual runs).
"""
from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def pipeline(args) -> str:
    offset = f" timestamp-offset={args.rtp_offset}" if args.rtp_offset >= 0 else ""
    audio = ("audiotestsrc is-live=true wave=sine freq=1000 volume=0.5 ! audio/x-raw,rate=8000,channels=1 "
             "! alawenc ! rtppcmapay name=pay1 pt=8 ") if args.audio else ""
    return (f"( videotestsrc is-live=true pattern={args.pattern} "
            f"! video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1 "
            f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.key_int} "
            f"threads={args.threads} bitrate={args.bitrate} "
            f"! video/x-h264,profile=constrained-baseline "
            f"! rtph264pay name=pay0 pt=96 config-interval=-1{offset} {audio})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mount", default="/test")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--key-int", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1,
                    help="x264 threads. More than one makes several slices per picture, and rtph264pay's "
                         "config-interval=-1 then puts SPS/PPS before each IDR slice, between slices of one "
                         "picture, which splits the access unit there (H.264 7.4.1.2.3; FFmpeg's parser does)")
    ap.add_argument("--bitrate", type=int, default=500, help="kbit/s")
    ap.add_argument("--pattern", default="ball")
    ap.add_argument("--rtp-offset", type=int, default=-1,
                    help="the first RTP timestamp (default random); 4294967296 - 90000 wraps the 32-bit "
                         "clock 1 s in")
    ap.add_argument("--audio", action="store_true", help="a second stream: a 1 kHz tone, G.711 A-law at 8 kHz")
    ap.add_argument("--protocols", default="tcp,udp", help="lower transports allowed: tcp, udp or tcp,udp")
    ap.add_argument("--user", default="")
    ap.add_argument("--password", default="")
    ap.add_argument("--exit-after", type=float, default=0.0)
    args = ap.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))

    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(pipeline(args))
    factory.set_shared(True)  # one pipeline for every client, as a camera has one encoder
    protocols = GstRtsp.RTSPLowerTrans(0)
    for name in args.protocols.split(","):
        protocols |= {"tcp": GstRtsp.RTSPLowerTrans.TCP, "udp": GstRtsp.RTSPLowerTrans.UDP}[name.strip()]
    factory.set_protocols(protocols)

    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password), token)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions()
        permissions.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
        permissions.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
        factory.set_permissions(permissions)

    server.get_mount_points().add_factory(args.mount, factory)
    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        print(f"rtsp_server: cannot listen on {args.host}:{args.port}", file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, lambda: (loop.quit(), False)[1])
    if args.exit_after > 0:
        GLib.timeout_add(int(args.exit_after * 1000), lambda: (loop.quit(), False)[1])
    print(server.get_bound_port(), flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
