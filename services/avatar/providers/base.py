"""The contract every avatar provider keeps, and the registry that finds them.

An avatar provider turns a voice into a talking face. The avatar service (services/avatar/)
owns the bus, the timing and the retries; a provider only speaks its server's protocol:

    p = open_provider("websocket", Settings(url="http://127.0.0.1:8765"), Outputs(on_frame, on_audio, on_error))
    fps = await p.start(Face(image=jpeg_bytes, width=512, height=512, fps=25.0))   # may raise AvatarError
    idle = await p.idle_frame()                  # (H, W, 3) uint8 RGB: the face at rest
    p.feed(pcm)                                  # int16 mono at p.sample_rate: never blocks
    p.end_turn()                                 # the voice stopped: flush what is buffered
    await p.stop()                               # always safe, also after a failed start

Two shapes of provider:

* **paired** (`paired = True`: the WebSocket avatar, MuseTalk): frames come back through
  `outputs.on_frame(rgb)` in order, `fps` frames per second of the audio fed. The service
  pairs frame i of a turn with the audio samples [i * rate / fps, (i + 1) * rate / fps) of
  that turn and publishes both together, with the audio's capture times.
* **streamed** (`paired = False`: Anam): the provider has its own media clock and sends its
  own audio back, in sync with its video (`outputs.on_audio(pcm, rate)`: int16, shape
  (samples, channels)); the service publishes both as they come. Frames keep coming while
  nobody speaks (its idle face).

Errors. Everything a provider raises is an `AvatarError(reason, message)`; the message names
the provider, the URL and the cause (never a key). `reason` is the metric label: one of
REASONS. A failure after `start()` (the connection dropped, garbage on the stream) is reported
through `outputs.on_error(AvatarError)`, once; the service then calls `stop()` and `start()`
again with backoff. `Unavailable` (no GPU, no model files, no API key) is not retried until
the avatar is started again by hand: asking again gets the same answer.

Every method runs on the service's asyncio loop and must never block it: network I/O is
asynchronous, heavy work (MuseTalk's inference) goes to a thread (`asyncio.to_thread`).
`feed()` and `end_turn()` queue and return; a provider's own task drains the queue, so audio
keeps flowing while frames come back (RoomKit's WebSocket provider did one blocking round
trip per chunk).

A provider is one module of this package with `@avatar_provider(NAME, summary)` on its
class; `names()` and `open_provider()` find them all. A module imports its client libraries
(aiohttp, aiortc, torch) when it starts, not at import, so the box's config loads on the core.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

__all__ = ["PROVIDERS", "REASONS", "AvatarError", "AvatarProvider", "Face", "Outputs", "ProviderKind", "Settings",
           "Unavailable", "avatar_provider", "fit"]

Rgb = npt.NDArray[np.uint8]          # (H, W, 3) RGB24
Pcm = npt.NDArray[np.int16]          # mono: (samples,); with channels: (samples, channels)

# why a provider failed: the metric label edgeroom_avatar_provider_errors_total{reason}
REASONS = ("down", "timeout", "garbage", "refused", "auth", "unavailable", "closed")


class AvatarError(Exception):
    """A provider failed. `reason` is one of REASONS; the message names the provider, URL and cause."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown avatar error reason {reason!r}: expected one of {', '.join(REASONS)}")
        super().__init__(message)
        self.reason = reason


class Unavailable(AvatarError):
    """The provider cannot run on this box (no GPU, no model files, no key): not retried."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


@dataclass(frozen=True)
class Face:
    image: bytes                     # the reference image file as it is (JPEG or PNG), sent to the provider
    width: int
    height: int
    fps: float


@dataclass(frozen=True)
class Settings:
    """An avatar's provider settings (its [avatars.NAME] table or `ctl avatar start`)."""
    url: str = ""                    # websocket: the server's base URL; anam: the API's base URL
    api_key_env: str = ""            # anam: the environment variable that holds the key
    avatar_id: str = ""              # anam: which avatar (persona) to show
    model_dir: str = ""              # musetalk: a MuseTalk v1.5 checkout with its weights
    timeout: float = 5.0             # seconds: a request, a connection, a frame overdue
    sample_rate: int = 0             # the rate to send the provider (0: the provider's own default)


@dataclass(frozen=True)
class Outputs:
    """Where a provider delivers; all three are called on the service's loop."""
    on_frame: Callable[[Rgb], None]
    on_audio: Callable[[Pcm, int], None]
    on_error: Callable[[AvatarError], None]


class AvatarProvider:
    """The base of every provider (see the module's docstring for the contract)."""
    name: ClassVar[str] = ""
    paired: ClassVar[bool] = True
    default_rate: ClassVar[int] = 24000

    def __init__(self, settings: Settings, outputs: Outputs) -> None:
        self.settings, self.outputs = settings, outputs
        self.sample_rate = settings.sample_rate or self.default_rate

    async def start(self, face: Face) -> float:
        """Open a session with the face; the frame rate the provider will send (face.fps unless it says)."""
        raise NotImplementedError

    async def idle_frame(self) -> Rgb:
        """The face at rest, at the started size."""
        raise NotImplementedError

    def feed(self, pcm: Pcm) -> None:
        """Queue int16 mono audio at `sample_rate` to be sent; never blocks."""
        raise NotImplementedError

    def end_turn(self) -> None:
        """The voice stopped: flush, so the last frames of the turn come back."""
        raise NotImplementedError

    async def stop(self) -> None:
        """End the session and release everything; safe to call twice and after a failed start."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        """A few facts for `ctl avatar list` (the URL, the session, bytes sent...)."""
        return {}


def fit(rgb: Rgb, width: int, height: int) -> Rgb:
    """The picture at width x height, RGB24 (FFmpeg's swscale); the same array when it already is."""
    if rgb.shape[1] == width and rgb.shape[0] == height and rgb.ndim == 3 and rgb.shape[2] == 3:
        return rgb
    import av
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return frame.to_ndarray(format="rgb24", width=width, height=height)


@dataclass(frozen=True)
class ProviderKind:
    name: str
    factory: Callable[[Settings, Outputs], AvatarProvider]
    summary: str


PROVIDERS: dict[str, ProviderKind] = {}


def avatar_provider(name: str, summary: str) -> Callable[[type[AvatarProvider]], type[AvatarProvider]]:
    """Register the decorated class as the avatar provider `name` (`--provider NAME`)."""
    def register(cls: type[AvatarProvider]) -> type[AvatarProvider]:
        if name in PROVIDERS and PROVIDERS[name].factory is not cls:
            raise ValueError(f"avatar provider {name!r} is registered twice")
        cls.name = name
        PROVIDERS[name] = ProviderKind(name, cls, summary)
        return cls
    return register
