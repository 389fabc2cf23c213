"""`edgeroom demo`: the embedded default under `edgeroom run`, with the demo's additions, shown live.

The demo's config is the embedded default plus:

* the synthetic camera with its test tone (a 1 kHz beep on each whole second, in step
  with a white flash), drawn over a photograph with a person in it (`--scene`), so the
  detector has something to find;
* the vision service: the bundled person detector (when installed) and the offline mock
  provider describing the camera every few seconds, with a watermark on `synthetic-vision`;
* the recorder: the camera's own H.264 remuxed, and the room (video and audio in sync).

It is written to a temporary file and run with `edgeroom run --config`; `EDGEROOM_*`
variables still apply on top. Every 3 s the demo prints the services and streams; all
hook, service, vision and recorder events as they come; at the end, the recordings and
how to play them.
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.runtime import config as configuration

__all__ = ["cmd_demo", "demo_config"]

TOPICS = ["hook.*", "service.*", "vision.*", "record.*"]


def demo_config(scene: str, recordings: Path) -> str:
    """The demo's config file: what it adds to the embedded default."""
    model = importlib.util.find_spec("fall_detection") is not None and importlib.util.find_spec("onnxruntime")
    image = f'image = "{scene}"\n' if scene and os.path.isfile(scene) else ""
    detect = ('detect = true\nevery_n_frames = 2\n' if model else "")
    return (f"# edgeroom demo: the embedded default plus these (services/cli/demo.py)\n"
            f"[sources.synthetic]\naudio = true\n{image}\n"
            f"[vision]\nprovider = \"mock\"\n"
            + ('model = "bundled:person"\nconfidence = 0.3\n' if model else "")
            + f"\n[pipelines.synthetic]\nresize = \"640x360\"\n{detect}watermark = \"edgeroom demo {{timestamp}}\"\n"
              f"watermark_background = \"#000000\"\npublish = true\ndescribe_interval = 4.0\n\n"
              f"[recorder]\ndir = \"{recordings}\"\nrecord = \"synthetic, room:default\"\nsegment_seconds = 60.0\n")


def cmd_demo(args: argparse.Namespace) -> int:
    from services.control.endpoints import endpoints_for, runtime_dir

    work = Path(tempfile.gettempdir()) / "edgeroom-demo"
    recordings = work / "recordings"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "demo.toml"
    config.write_text(demo_config(args.scene or "", recordings))
    cfg = configuration.load(config)  # the same checks `edgeroom run` makes, before anything starts
    ep = endpoints_for(runtime_dir(cfg.box.runtime_dir))
    print(f"demo config: {config}", flush=True)
    run = subprocess.Popen([sys.executable, "-m", "services.cli", "run", "--config", str(config)],
                           start_new_session=True)
    try:
        return _watch(run, ep, args.seconds)
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=30)
        _recordings(recordings)


def _watch(run: subprocess.Popen, ep, seconds: float) -> int:
    """Wait for the hub, then print its status every 3 s and every event; the sessions that
    started before the subscription took hold are listed once."""
    from services.cli.tables import event_line as _event_line
    from services.cli.tables import sessions_table as _sessions_table
    from services.cli.tables import status_table as _status_table
    from services.cli.tables import streams_table as _streams_table
    from services.control.client import Client, HubUnreachable, Subscriber

    end = time.monotonic() + seconds
    client = Client(ep.control, timeout=1.0)
    while time.monotonic() < end and run.poll() is None:
        try:
            client.call("ping")
            break
        except HubUnreachable:
            time.sleep(0.2)
    with client, Subscriber(ep.events, TOPICS) as sub:
        sub.wait_ready(client)
        until = min(end, time.monotonic() + 3.0)  # the cameras register within a heartbeat or two
        sessions = client.call("sessions")
        while not sessions and time.monotonic() < until:
            time.sleep(0.1)
            sessions = client.call("sessions")
        print(_sessions_table(sessions), flush=True)
        next_status, shot = 0.0, None
        while time.monotonic() < end and run.poll() is None:
            if time.monotonic() >= next_status:
                print(_status_table(client.call("status")), flush=True)
                streams = client.call("streams")
                print(_streams_table(streams), flush=True)
                if not shot and any(s["stream"] == "synthetic-raw" and s["items"] for s in streams):
                    shot = _snapshot(client)  # not before: asking for a stream that is not there yet is an error
                next_status = time.monotonic() + 3.0
            event = sub.recv(timeout=0.25)
            if event is not None:
                print(_event_line(event)[:400], flush=True)
        _view(client)
    print(f"demo over after {seconds:g} s: `edgeroom run` starts the same box and keeps it running", flush=True)
    return 0


def _snapshot(client) -> str | None:
    """A JPEG of the decoded camera, once it exists: proof that capture -> decode -> bus works."""
    from services.control.client import CommandFailed
    try:
        shot = client.call("snapshot", {"stream": "synthetic", "max_width": 640})
    except CommandFailed as exc:
        print(f"no snapshot: {exc}", flush=True)
        return None
    path = Path(tempfile.gettempdir()) / "edgeroom-demo-snapshot.jpg"
    path.write_bytes(base64.b64decode(shot["jpeg"]))
    print(f"snapshot of {shot['stream']} (item {shot['seq']}, {shot['source_width']}x{shot['source_height']} "
          f"{shot['format']}) written to {path}: `edgeroom ctl snapshot synthetic FILE.jpg` does the same",
          flush=True)
    return str(path)


def _view(client) -> None:
    from services.control.client import CommandFailed
    try:
        note = client.call("vision.view", {"room": "default"})["note"]
    except CommandFailed as exc:
        print(f"vision view: {exc}", flush=True)
        return
    print(f"what vision knows about room 'default' (`edgeroom ctl view default`):\n{note}", flush=True)


def _recordings(recordings: Path) -> None:
    files = sorted(p for p in recordings.rglob("*.mp4")) if recordings.is_dir() else []
    if not files:
        print(f"no recordings in {recordings}", flush=True)
        return
    print(f"recordings in {recordings}:", flush=True)
    for path in files:
        print(f"  {path} ({path.stat().st_size} bytes)", flush=True)
    print(f"play one with: ffplay {files[-1]}   (or mpv, or VLC; ffprobe shows its tracks)", flush=True)


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="the embedded default under `edgeroom run`, status and events shown live")
    demo.add_argument("--seconds", type=float, default=20.0, help="how long to run (default 20)")
    demo.add_argument("--scene", help="a photograph the synthetic camera draws (default: its gradient)")
    demo.set_defaults(func=cmd_demo)
