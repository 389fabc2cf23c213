"""File and URL sources: anything PyAV (FFmpeg) demuxes, put on the bus without decoding.

    kind = "file"   path, loop              paced in real time by the file's timestamps
    kind = "url"    url, transport, timeouts  RTSP (tcp or udp), HTTP(S), RTMP, SRT, UDP/TCP

Video packets go onto the bus as they are — H.264/H.265/VP8/VP9/AV1 access units, the
bytes the camera or the file holds (H.264/H.265 from MP4/MKV are turned from
length-prefixed into Annex B by FFmpeg's mp4toannexb filter, which also puts the
parameter sets in front of every keyframe: one convention on the bus, so any consumer
can start at any keyframe). Capture decodes only what the bus cannot carry encoded
(MJPEG, MPEG-4 part 2, ...): those become yuv420p pictures.

With `audio = true` the first audio track is decoded to s16 PCM (the bus carries audio
as PCM) on NAME-audio.

Timing: a file is paced by its timestamps against CLOCK_MONOTONIC, each packet's
capture_ns being the instant it is due; a looped file carries on from where the last pass
ended. A file whose pictures decode@NAME publishes starts playing when decode reads NAME
(the ring is made at open, decode attaches, then the clock starts; at most
DECODER_WAIT_S): a file that started before its decoder was there would be decoded in one
burst from the ring's history, faster than any reader of NAME-raw, and those readers
would lose its first pictures. A URL's packets are stamped when they arrive. Either way pts go through a
`Timeline`, so a camera's clock that wraps or restarts never reaches the bus as a step
backwards.

Failures raise SourceError naming the cause (not_found, connect, timeout, http, corrupt,
read, unsupported); the capture service reconnects with backoff. A file with garbage in
the middle is not a failure: FFmpeg resynchronises and the decoder's keyframe gate does
the rest.

A URL, precisely (checked against a real RTSP server, tests/test_capture_url.py):

* opening is bounded by connect_timeout: a refused connection fails at once (connect);
  a server that accepts but never answers fails after connect_timeout (timeout, however
  FFmpeg words it). Opening has two steps that each get connect_timeout (the protocol's
  handshake, then reading until the streams are known), so a server that answers but
  never sends media takes up to twice that;
* reading is bounded by read_timeout: no packet for that long is a timeout. FFmpeg's
  interrupt fires after read_timeout and, for parsed streams (RTSP H.264), first hands
  over the access unit its parser held, then needs another read_timeout to fail; the
  source does not wait for that second one: a packet that comes read_timeout after the
  one before it is the stall itself (it is dropped: its arrival time says nothing of when
  it was captured), and so is read_timeout without video while audio still flows;
* the stream ending (the server closed it, or went away) is a failure (read);
* `stop` takes effect at the next packet, so within read_timeout even when the server
  is stalled; an error that comes after `stop` is not a failure (run returns False);
* a packet without any timestamp (FFmpeg's parser leaves the first access unit of an
  RTSP session so) waits for the next one that has one and takes that one's time less a
  frame (or the arrival time between them, if longer), so a session does not start
  with a spurious rebase;
* no message carries the URL's password: FFmpeg's own error text names the URL too, so
  the message uses only its reason, with the URL masked and the text scrubbed.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.capture.sink import Sink
from services.capture.sources.base import Emit, EncodedSourceConfig, SourceError, source_kind
from services.capture.timeline import Timeline
from services.runtime.schema import RESTART, Problem, setting
from services.runtime.scrub import scrub

__all__ = ["FileConfig", "MediaSource", "UrlConfig", "bus_codec", "classify"]

log = logging.getLogger("edgeroom.capture")

NS = 1_000_000_000
DECODER_WAIT_S = 10.0  # a file waits at most this long for decode@NAME before it plays anyway
URL_SCHEMES = ("rtsp", "rtsps", "http", "https", "rtmp", "rtmps", "srt", "udp", "tcp")


@dataclass(frozen=True)
class FileConfig(EncodedSourceConfig):
    kind: str = setting("file", "file: a media file played in real time.", RESTART)
    path: str = setting("", "The media file (any container PyAV reads).", RESTART)
    loop: bool = setting(False, "Start again from the beginning at the end.", RESTART)
    audio: bool = setting(False, "Publish the first audio track on NAME-audio (s16 PCM).", RESTART)

    session_kind = "file"

    def has_audio(self) -> bool:
        return self.audio

    def target(self) -> str:
        return self.path

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        if not self.path:
            return "path", f"required when {key('kind')} is 'file'", ("kind",)
        return super().cross_check(key)


@dataclass(frozen=True)
class UrlConfig(EncodedSourceConfig):
    kind: str = setting("url", "url: a camera or stream server.", RESTART)
    url: str = setting("", "rtsp://, rtsps://, http(s)://, rtmp://, srt://, udp:// or tcp:// address.", RESTART)
    transport: str = setting("tcp", "RTSP only: RTP over tcp (interleaved) or udp.", RESTART, choices=("tcp", "udp"))
    connect_timeout: float = setting(5.0, "Seconds to connect and read the stream's header.", RESTART,
                                     min=0.1, max=300)
    read_timeout: float = setting(5.0, "Seconds without data before the source counts as lost.", RESTART,
                                  min=0.1, max=300)
    audio: bool = setting(False, "Publish the first audio track on NAME-audio (s16 PCM).", RESTART)

    def has_audio(self) -> bool:
        return self.audio

    def target(self) -> str:
        return scrub(self.url)

    def shown(self) -> dict:
        return {**super().shown(), "url": scrub(self.url)}

    def stop_bound(self) -> float:
        # a read blocked in FFmpeg ends within read_timeout, an open within 2 x connect_timeout
        return max(self.read_timeout, 2 * self.connect_timeout) + 0.5

    def cross_check(self, key: Callable[[str], str]) -> Problem | None:
        scheme = self.url.partition("://")[0].lower() if "://" in self.url else ""
        if scheme not in URL_SCHEMES:
            return "url", (f"expected an address starting with one of {', '.join(s + '://' for s in URL_SCHEMES)}"
                           f"; got {self.url!r}"), ("kind",)
        return super().cross_check(key)


_BUS_CODECS = {"h264": "h264", "hevc": "h265", "h265": "h265", "vp8": "vp8", "vp9": "vp9", "av1": "av1",
               "libdav1d": "av1", "libaom-av1": "av1", "libvpx": "vp8", "libvpx-vp9": "vp9"}
_ANNEXB_FILTERS = {"h264": "h264_mp4toannexb", "h265": "hevc_mp4toannexb"}


def bus_codec(stream) -> str | None:
    """The bus's name for a video stream's codec, or None when the bus cannot carry it encoded."""
    return _BUS_CODECS.get(stream.codec_context.name)


def classify(exc: BaseException, opening: bool) -> str:
    """The metric reason for an FFmpeg/OS error."""
    import av.error
    if isinstance(exc, FileNotFoundError) or isinstance(exc, av.error.HTTPNotFoundError):
        return "not_found"
    if isinstance(exc, (av.error.HTTPError, av.error.HTTPClientError)):  # 4xx/5xx, RTSP's too (401, 403, 454)
        return "http"
    if isinstance(exc, (TimeoutError, av.error.ExitError)):
        return "timeout"
    if isinstance(exc, (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError)):
        return "connect"
    if isinstance(exc, av.error.InvalidDataError):
        return "corrupt"
    return "connect" if opening else "read"


def _clock() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@source_kind(FileConfig, "a media file, paced by its timestamps, optionally looped")
@source_kind(UrlConfig, "RTSP (tcp or udp), HTTP(S), RTMP, SRT, UDP or TCP: whatever FFmpeg opens")
class MediaSource:
    def __init__(self, cfg: FileConfig | UrlConfig) -> None:
        import av  # the media extra: here, at setup, so a missing extra is a clear exit 78 and the config loads
        self.av = av
        self.cfg = cfg
        self.live = cfg.kind == "url"
        self.target = cfg.url if self.live else cfg.path
        self.codec: str | None = None
        self.info = ""           # "h264 1920x1080" once open
        self._next_origin = 0    # file: where the next pass's first packet is due (capture clock)
        self._timelines: dict[int, Timeline] = {}
        self._audio_samples = 0
        self._held: list = []      # url: video packets without timestamps, waiting for the next one's
        self._frame_ticks = 1      # one frame period in the video stream's time base

    # ------------------------------------------------------------ opening
    def _open(self):
        cfg = self.cfg
        options = {}
        if self.live and cfg.url.lower().startswith(("rtsp://", "rtsps://")):
            options["rtsp_transport"] = cfg.transport
            # SETUP only what is used: a camera's audio we do not publish is not sent at all
            options["allowed_media_types"] = "video+audio" if cfg.audio else "video"
        timeout = (cfg.connect_timeout, cfg.read_timeout) if self.live else None
        started = time.monotonic()
        try:
            return self.av.open(self.target, options=options, timeout=timeout)
        except (self.av.error.FFmpegError, OSError) as exc:
            took = time.monotonic() - started
            if self.live and (isinstance(exc, self.av.error.ExitError) or took >= 0.95 * cfg.connect_timeout):
                # FFmpeg's interrupt ended the wait; what it reports then varies (an RTSP handshake
                # cut short is "Invalid data found"), the cause does not: no answer in time
                raise SourceError("timeout", f"cannot open {self._shown()}: no answer within {took:.1f} s "
                                  f"({self._why(exc)})") from None
            raise SourceError(classify(exc, True), f"cannot open {self._shown()}: {self._why(exc)}") from None

    def _shown(self) -> str:
        """The target without a password (user:pass@ in a URL; password=, token= and the like anywhere)."""
        target = self.target
        if "://" in target:
            scheme, _, rest = target.partition("://")
            end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
            authority, tail = rest[:end], rest[end:]
            creds, at, host = authority.rpartition("@")  # as FFmpeg splits it: the last @ before the path
            if at and ":" in creds:
                target = f"{scheme}://{creds.split(':', 1)[0]}:***@{host}{tail}"
        return scrub(target)

    def _why(self, exc: BaseException) -> str:
        """An FFmpeg/OS error's reason without the URL it names (PyAV puts the whole URL, password
        included, into the exception's text)."""
        text = getattr(exc, "strerror", None) or str(exc)
        if self.target:
            text = text.replace(self.target, self._shown())
        return scrub(text)

    # ------------------------------------------------------------ running
    def run(self, sink: Sink, stop: threading.Event, emit: Emit) -> bool:
        while not stop.is_set():
            try:
                container = self._open()
                try:
                    ended = self._play(container, sink, stop)
                finally:
                    container.close()
            except SourceError:
                if stop.is_set():  # stopped while blocked: whatever FFmpeg said then is no failure
                    return False
                raise
            if not ended:
                return False
            if self.live:
                raise SourceError("read", f"{self._shown()} ended the stream")
            if not self.cfg.loop:
                log.info("%s: end of file", self._shown())
                return True
        return False

    def _play(self, container, sink: Sink, stop: threading.Event) -> bool:
        """Demux until the end (True) or stop (False)."""
        if not container.streams.video:
            raise SourceError("unsupported", f"{self._shown()} has no video stream")
        video = container.streams.video[0]
        streams = [video]
        audio = container.streams.audio[0] if self.cfg.audio and container.streams.audio else None
        if audio is not None:
            streams.append(audio)
            resampler = self.av.AudioResampler(format="s16", layout=audio.layout.name, rate=audio.rate)
        self.codec = bus_codec(video)
        cc = video.codec_context
        self.info = f"{cc.name} {cc.width}x{cc.height}"
        bsf = None
        if self.codec in _ANNEXB_FILTERS and cc.extradata and cc.extradata[0] == 1:  # avcC/hvcC: length-prefixed
            bsf = self.av.BitStreamFilterContext(_ANNEXB_FILTERS[self.codec], video)
        elif self.codec is not None and cc.extradata:
            sink.set_extradata(cc.extradata, self.codec)
        if self.codec is None:
            log.info("%s: %s cannot travel encoded on the bus; capture decodes it to yuv420p", self._shown(),
                     cc.name)
        if video.average_rate and not sink.rate_hint:
            sink.rate_hint = float(video.average_rate)  # the history ring's length, in frames
        if not self.live and not self._next_origin and self.codec is not None and self.cfg.wants_decode():
            if not self._wait_for_decoder(sink, cc, stop):
                return False
            self.info = f"{cc.name} {cc.width}x{cc.height}"
        origin = self._next_origin or _clock()  # capture-clock instant of the pass's first timestamp
        first: dict[int, int] = {}
        frame_ns = int(NS / float(video.average_rate)) if video.average_rate else NS // 30
        self._held = []
        self._frame_ticks = max(1, round(1 / (video.average_rate * video.time_base))) \
            if video.average_rate and video.time_base else 1
        # A live source reads every stream, so that a stop or a stall is seen even while only
        # packets of other streams (audio we do not want, data) arrive; a file only its own.
        demux = container.demux() if self.live else container.demux(streams)
        limit = self.cfg.read_timeout if isinstance(self.cfg, UrlConfig) else 0.0
        last_any = last_video = time.monotonic()
        shown_end = lead = None  # file: when the pass's last picture is shown; how long its first waits after decode
        try:
            for packet in demux:
                if stop.is_set():
                    return False
                if self.live:
                    now = time.monotonic()
                    if now - last_any >= limit:
                        raise SourceError("timeout", f"reading {self._shown()}: no data for {now - last_any:.1f} s")
                    last_any = now
                    if packet.stream is video and packet.size:
                        last_video = now
                    elif now - last_video >= limit:
                        raise SourceError("timeout", f"reading {self._shown()}: no video for "
                                          f"{now - last_video:.1f} s")
                if packet.size == 0 or packet.stream not in streams:
                    continue
                ts = packet.dts if packet.dts is not None else packet.pts
                if self.live or ts is None:
                    capture_ns = _clock()
                else:
                    base = first.setdefault(packet.stream.index, ts)
                    capture_ns = origin + int((ts - base) * packet.time_base * NS)
                    wait = capture_ns - _clock()
                    if wait > 0 and stop.wait(wait / NS):
                        return False
                    self._next_origin = capture_ns + frame_ns
                    if packet.stream is video and packet.pts is not None:
                        shown = capture_ns + int((packet.pts - ts) * packet.time_base * NS)
                        shown_end = shown if shown_end is None else max(shown_end, shown)
                        lead = shown - capture_ns if lead is None else lead
                if packet.stream is video:
                    self._video(packet, video, bsf, sink, capture_ns)
                else:
                    self._audio(packet, audio, resampler, sink, capture_ns)
        except (self.av.error.FFmpegError, OSError) as exc:
            raise SourceError(classify(exc, False), f"reading {self._shown()}: {self._why(exc)}") from None
        finally:
            demux.close()  # PyAV's read loop ends (and frees its packet) before the container closes
        if shown_end is not None:  # the next pass's first picture is shown one frame after this pass's last
            self._next_origin = max(self._next_origin, shown_end + frame_ns - lead)
        return True

    def _wait_for_decoder(self, sink: Sink, cc, stop: threading.Event) -> bool:
        """Make NAME now and wait until it has a reader (decode@NAME, woken by its creation), at
        most DECODER_WAIT_S; False if stopped meanwhile. Then the file plays at its pace from its
        first packet: decode turns each access unit into a picture as it comes, instead of
        catching up on a backlog in one burst that overruns NAME-raw before its readers read."""
        ring = sink.open_encoded(self.codec, cc.width, cc.height)
        if ring.readers:
            return True
        decoder = f"decode@{sink.stream}"
        self.info = f"{cc.name} {cc.width}x{cc.height}, waiting for {decoder}"
        log.info("%s: waiting for %s to read %s before playing (at most %.0f s)", self._shown(), decoder,
                 sink.stream, DECODER_WAIT_S)
        started = time.monotonic()
        while not ring.readers:
            if stop.wait(0.005):
                return False
            ring.heartbeat()
            if time.monotonic() - started >= DECODER_WAIT_S:
                log.warning("%s: %s did not read %s within %.0f s; playing without it (its first pictures may "
                            "be decoded late or lost)", self._shown(), decoder, sink.stream, DECODER_WAIT_S)
                return True
        log.info("%s: %s reads %s after %.0f ms: playing", self._shown(), decoder, sink.stream,
                 (time.monotonic() - started) * 1000)
        return True

    def _timeline(self, stream) -> Timeline:
        tl = self._timelines.get(stream.index)
        if tl is None:
            tl = self._timelines[stream.index] = Timeline(stream.time_base)
        return tl

    def _video(self, packet, stream, bsf, sink: Sink, capture_ns: int) -> None:
        tl = self._timeline(stream)
        if self.codec is None:
            self._decode_video(packet, stream, sink, capture_ns, tl)
            return
        for p in bsf.filter(packet) if bsf is not None else (packet,):
            if self.live and p.pts is None and p.dts is None:
                self._held.append((p, capture_ns))  # its time comes with the next packet that has one
                continue
            clock = p.dts if p.dts is not None else p.pts
            for k, (held, held_ns) in enumerate(self._held):
                back = max((len(self._held) - k) * self._frame_ticks, int((capture_ns - held_ns) * tl.ticks_per_ns))
                self._send(held, stream, sink, held_ns, tl, clock - back)
            self._held.clear()
            self._send(p, stream, sink, capture_ns, tl)

    def _send(self, p, stream, sink: Sink, capture_ns: int, tl: Timeline, clock: int | None = None) -> None:
        cc = stream.codec_context
        pts, rebased = tl.map(p.pts, capture_ns, p.dts) if clock is None else tl.map(clock, capture_ns, clock)
        sink.encoded(p, self.codec, keyframe=p.is_keyframe, pts=pts, time_base=stream.time_base,
                     capture_ns=capture_ns, width=cc.width, height=cc.height, discontinuity=rebased,
                     corrupt=p.is_corrupt)

    def _decode_video(self, packet, stream, sink: Sink, capture_ns: int, tl: Timeline) -> None:
        from services.decode.decoder import copy_into
        try:
            frames = stream.codec_context.decode(packet)
        except self.av.error.FFmpegError:
            sink.m.dropped.labels("corrupt").inc()
            return
        for frame in frames:
            pts, rebased = tl.map(frame.pts, capture_ns)
            w, h = frame.width & ~1, frame.height & ~1  # the bus's pictures have even sizes
            if (w, h) != (frame.width, frame.height):
                frame = frame.reformat(width=w, height=h, format="yuv420p")
            loan = sink.loan_picture(w, h, "yuv420p")
            try:
                copy_into(frame, loan, "yuv420p")
            except BaseException:
                loan.abort()
                raise
            sink.send_picture(loan, pts=pts, time_base=stream.time_base, capture_ns=capture_ns, discontinuity=rebased)

    def _audio(self, packet, stream, resampler, sink: Sink, capture_ns: int) -> None:
        try:
            frames = stream.codec_context.decode(packet)
        except self.av.error.FFmpegError:
            sink.m.dropped.labels("corrupt_audio").inc()
            return
        for frame in frames:
            for out in resampler.resample(frame):
                pcm = out.to_ndarray().reshape(-1, len(out.layout.channels))
                sink.audio(pcm, out.sample_rate, pts=self._audio_samples, capture_ns=capture_ns)
                self._audio_samples += pcm.shape[0]

    def force_keyframe(self) -> str | None:
        return None  # it passes on what the file or camera holds

    def describe(self) -> str:
        return self.info
