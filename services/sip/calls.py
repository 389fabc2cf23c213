"""A SIP call as the service holds it, and what of it is kept in the state directory for a restart.

`Call` is one call, in or out: its dialog, its media (an RtpCall), its state and what `ctl call
list` shows. `keep(path, calls)` writes the calls that are up to `sip-calls.json` (atomically:
a temporary file renamed over it); `kept(path)` reads them back and `taken_back(row)` makes a
Call and its media plans of one, the RTP sequence numbers moved SEQ_AHEAD on (the last ones
kept are up to a second old; RFC 3550 receivers take a forward jump as loss).
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from services.rtp.call import Identity, Plan, RtpCall
from services.sip.dialog import Dialog, plan_from_dict, plan_to_dict
from services.sip.message import Message
from services.sip.transport import Peer

__all__ = ["FILE", "SEQ_AHEAD", "Call", "keep", "kept", "taken_back"]

FILE = "sip-calls.json"
SEQ_AHEAD = 1000


@dataclass
class Call:
    id: str                               # the session id, and the name of its streams
    direction: str                        # in | out
    room: str
    peer: Peer                            # where its signalling goes
    state: str = "new"                    # new, ringing, dialing, up, ended
    dialog: Dialog | None = None
    media: RtpCall | None = None
    local_sdp: str = ""
    version: int = 1
    video: bool = True                    # asked for video (the config's, or --no-video)
    notes: tuple[str, ...] = ()
    started: float = field(default_factory=time.time)
    began: float = field(default_factory=time.monotonic)
    answered: float = 0.0                 # monotonic time of the 200
    invite: Message | None = None         # the INVITE being answered (in) or sent (out)
    ack: Message | None = None            # the ACK of our INVITE's 2xx (sent again if the 2xx comes again)
    done: Callable[..., None] | None = None  # the dial command's answer
    auth_tries: int = 0
    user: str = ""                        # the called user (in) or the dialled URI (out)
    remote: str = ""                      # the peer's URI, for the list
    timer: Any = None
    restored: bool = False
    ports: dict[str, int] = field(default_factory=dict)   # the RTP port of each kind (in the SDP)
    checked: bool = True                  # a restored call: False until the peer answered the OPTIONS

    def plans(self) -> list[Plan]:
        return [m.plan for m in self.media.media.values()] if self.media is not None else []


def _row(call: Call) -> dict[str, Any]:
    assert call.dialog is not None and call.media is not None
    plans = [plan_to_dict(m.plan, m.current_identity(), m.port) for m in call.media.media.values()]
    return {"id": call.id, "direction": call.direction, "room": call.room, "user": call.user, "remote": call.remote,
            "peer": [call.peer.transport, *call.peer.addr], "dialog": call.dialog.to_dict(),
            "local_sdp": call.local_sdp, "version": call.version, "video": call.video, "notes": list(call.notes),
            "started": call.started, "plans": plans}


def keep(path: Path, calls: list[Call]) -> None:
    """Write `calls` (up, with their media) to `path`, replacing what was there; OSError when it cannot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"calls": [_row(c) for c in calls]}))
    os.replace(tmp, path)


def kept(path: Path) -> list[dict[str, Any]]:
    """The calls kept at `path` ([] when there is no file); ValueError when it cannot be read."""
    try:
        rows = json.loads(path.read_text())["calls"]
    except FileNotFoundError:
        return []
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a file of kept calls: {exc}") from None
    if not isinstance(rows, list):
        raise ValueError("not a file of kept calls: 'calls' is not a list")
    return rows


def taken_back(row: dict[str, Any]) -> tuple[Call, list[Plan]]:
    """A kept call, up, and its media plans with the same ports and SSRCs (sequence numbers moved on)."""
    transport, host, port = row["peer"]
    call = Call(row["id"], row["direction"], row["room"], Peer(transport, (host, port)), state="up",
                dialog=Dialog.from_dict(row["dialog"]), local_sdp=row["local_sdp"], version=row["version"],
                video=row["video"], notes=tuple(row["notes"]), started=row["started"], user=row["user"],
                remote=row["remote"], restored=True, checked=False, answered=time.monotonic())
    plans = []
    for d in row["plans"]:
        plan = plan_from_dict(d)
        if plan.identity is not None:
            i = plan.identity
            plan = replace(plan, identity=Identity(i.ssrc, (i.seq + SEQ_AHEAD) & 0xFFFF, i.ts_base))
        plans.append(plan)
    return call, plans
