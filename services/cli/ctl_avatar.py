"""`edgeroom ctl avatar`: the box's avatars (services/avatar/).

    edgeroom ctl avatar list                                     # state, provider, frames, latency, errors
    edgeroom ctl avatar start meet --audio agent-audio --provider websocket --image face.jpg \\
        --url http://127.0.0.1:8765 [--size 512x512] [--name host]
    edgeroom ctl avatar say host voice.wav                       # push an agent's voice (PCM16 WAV)
    edgeroom ctl avatar stop host
"""
from __future__ import annotations

import argparse
import base64
import os
import wave
from typing import Any

from services.cli import hubcall
from services.cli.tables import table

__all__ = ["add_parsers"]

SAY_CHUNK_S = 2.0          # seconds of voice per avatar.say message: well inside control.max_message_bytes
OPTIONS = {k: k for k in ("audio", "provider", "size", "fps", "url", "api_key_env", "avatar_id", "model_dir",
                          "sample_rate", "name")} | {"provider_timeout": "timeout"}


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:g}"


def list_text(r: dict[str, Any]) -> str:
    rows = [[a["name"], a["room"], a["provider"], a["state"], a["audio"] or "(pushed)", a["size"], _ms(a["fps"]),
             a["frames"]["provider"], a["frames"]["idle"], a["frames"]["held"], a["turns"], _ms(a["latency_p50_ms"]),
             _ms(a["latency_p99_ms"]), a["errors"], a["problem"][:60] or "-"] for a in r["avatars"]]
    out = [table(rows, ["NAME", "ROOM", "PROVIDER", "STATE", "VOICE", "SIZE", "FPS", "FRAMES", "IDLE", "HELD",
                        "TURNS", "P50 MS", "P99 MS", "ERRORS", "PROBLEM"]) if rows else "no avatar runs "
           "(`edgeroom ctl avatar start ROOM --image FACE.jpg ...`)"]
    out += [f"failed: {f['name']}: {f['problem']}" for f in r.get("failed", [])]
    out.append("providers: " + ", ".join(f"{k} ({v})" for k, v in r.get("providers", {}).items()))
    return "\n".join(out)


def started_text(a: dict[str, Any]) -> str:
    return f"avatar {a['name']} in room {a['room']}: {a['provider']}, {a['state']}, face {a['size']} on " \
           f"{a['name']}, voice on {a['name']}-audio, driven by {a['audio'] or 'pushed voice (avatar.say)'}"


def read_wav(path: str) -> tuple[bytes, int, int]:
    """(PCM16 LE bytes, rate, channels) of a WAV file; ValueError saying what it is not."""
    try:
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"{path}: {8 * w.getsampwidth()}-bit samples; PCM16 WAV expected")
            return w.readframes(w.getnframes()), w.getframerate(), w.getnchannels()
    except (OSError, EOFError, wave.Error) as exc:
        raise ValueError(f"{path}: not a PCM16 WAV file: {exc}") from None


def cmd_avatar(args: argparse.Namespace) -> int:
    verb, rest = args.verb, args.rest
    want = {"list": 0, "start": 1, "stop": 1, "say": 2}[verb]
    if len(rest) != want:
        raise ValueError({"list": "ctl avatar list takes no argument", "start": "ctl avatar start takes ROOM",
                          "stop": "ctl avatar stop takes NAME", "say": "ctl avatar say takes NAME FILE.wav"}[verb])
    with hubcall.client(args) as client:
        if verb == "list":
            return hubcall.show(args, client.call("avatar.list", {}), list_text)
        if verb == "stop":
            return hubcall.show(args, client.call("avatar.stop", {"name": rest[0]}),
                                lambda r: f"avatar {r['name']} stopped")
        if verb == "start":
            if not args.image:
                raise ValueError("ctl avatar start needs --image FACE.jpg (the reference image)")
            request: dict[str, Any] = {"room": rest[0], "image": os.path.abspath(args.image)}
            request.update({key: getattr(args, o) for o, key in OPTIONS.items() if getattr(args, o) is not None})
            return hubcall.show(args, client.call("avatar.start", request), started_text)
        pcm, rate, channels = read_wav(rest[1])
        step = int(SAY_CHUNK_S * rate) * 2 * channels
        result: dict[str, Any] = {}
        for i in range(0, len(pcm), step):
            result = client.call("avatar.say", {"name": rest[0], "pcm": base64.b64encode(pcm[i:i + step]).decode(),
                                                "rate": rate, "channels": channels})
        return hubcall.show(args, result, lambda r: f"avatar {rest[0]}: {len(pcm) / 2 / channels / rate:.2f} s of "
                                                    f"voice pushed, {r.get('waiting_s', 0):.2f} s waiting")


def add_parsers(ctl_sub: Any) -> None:
    p = ctl_sub.add_parser("avatar", help="avatars: list, start ROOM --image FACE.jpg ..., stop NAME, "
                                          "say NAME FILE.wav")
    verbs = p.add_subparsers(dest="verb", required=True)
    helps = {"list": "the avatars: state, provider, frames, lip-sync latency, errors",
             "start": "start an avatar in ROOM (kept across restarts)", "stop": "stop an avatar",
             "say": "push voice (a PCM16 WAV file) into an avatar, played in real time"}
    for verb, help_ in helps.items():
        v = verbs.add_parser(verb, help=help_)
        hubcall.add_common(v)
        v.add_argument("rest", nargs="*", metavar={"list": "", "start": "ROOM", "stop": "NAME",
                                                  "say": "NAME FILE"}[verb] or "ARGS")
        v.set_defaults(ctl_func=cmd_avatar)
        if verb != "start":
            continue
        v.add_argument("--image", help="the reference image (JPEG or PNG) the face is made from")
        v.add_argument("--audio", help="the audio stream of the bus that drives the face ('' : pushed voice only)")
        v.add_argument("--provider", help="websocket (default), anam, musetalk")
        v.add_argument("--size", help="WIDTHxHEIGHT of the face on the bus (default 512x512)")
        v.add_argument("--fps", type=float, help="frames a second (default 25)")
        v.add_argument("--url", help="websocket: the server's base URL; anam: the API's")
        v.add_argument("--api-key-env", dest="api_key_env", help="anam: the variable that holds the key")
        v.add_argument("--avatar-id", dest="avatar_id", help="anam: the avatar to show")
        v.add_argument("--model-dir", dest="model_dir", help="musetalk: the MuseTalk v1.5 checkout")
        v.add_argument("--provider-timeout", dest="provider_timeout", type=float,
                       help="seconds a provider's request may take (default 5)")
        v.add_argument("--sample-rate", dest="sample_rate", type=int, help="the rate sent to the provider")
        v.add_argument("--name", help="the avatar's name (default avatar-ROOM): its session and stream")
