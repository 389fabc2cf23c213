"""H.264 over RTP (RFC 6184): access units from packets, packets from access units.

In: `H264Depacketizer.add(payload, marker)` takes the payloads of one RTP stream in
sequence order (the jitter buffer's output) and gathers an access unit's NAL units, as
Annex B with 4-byte start codes, until the marker bit (or a new timestamp) ends it. The
payload is read by aiortc's `H264PayloadDescriptor.parse` (single NAL, STAP-A, FU-A);
what that parser does not check is checked here, on the one or two header bytes of each
packet, never by a loop over the payload: the packetization-mode (mode 0 allows single
NAL units only), and the order of FU-A fragments (a start inside an unfinished unit, a
middle or end without its start, or of another NAL type, is bogus). A packet that breaks
a unit marks that access unit broken: it is dropped whole when it ends (`Au.broken`)
and the caller marks the next one damaged, so decode waits for a keyframe.

SPS and PPS (from STAP-A, single NALs, or the SDP's sprop-parameter-sets) are kept and put
before an IDR that comes without them, so every keyframe on the bus decodes on its own.

Out: `H264Packetizer.packetize(au)` splits Annex B into NAL units (bytes.find, in C) and
makes payloads of at most `max_payload` bytes: in mode 1 small NAL units travel together
in STAP-A and large ones in FU-A fragments; in mode 0 each NAL unit is one packet, and a
NAL unit larger than the packet is refused (`TooLarge`: the access unit is not sent; an
encoder for such a peer must cut slices to the MTU). SPS and PPS are cached and sent
before every IDR that lacks them. The last payload of the unit is the one with the marker.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from struct import pack, unpack_from

from aiortc.codecs.h264 import H264PayloadDescriptor

__all__ = ["Au", "H264Depacketizer", "H264Packetizer", "TooLarge", "nal_units"]

START = b"\x00\x00\x00\x01"
SPS, PPS, IDR, AUD = 7, 8, 5, 9
STAP_A, FU_A = 24, 28


class TooLarge(ValueError):
    """A NAL unit does not fit one packet where fragmenting is not allowed (packetization-mode 0)."""


@dataclass
class Au:
    """An access unit gathered from packets."""
    data: bytes
    keyframe: bool
    broken: str           # why it cannot be used ('' when whole)


class H264Depacketizer:
    def __init__(self, mode: int, parameter_sets: list[bytes] | None = None) -> None:
        self.mode = mode
        self.sps: bytes | None = None
        self.pps: bytes | None = None
        for nal in parameter_sets or []:
            self._keep(nal)
        self._parts: list[bytes] = []
        self._types: set[int] = set()
        self._broken = ""
        self._fu: int | None = None       # NAL type of the FU-A unit in progress
        self.started = False              # a packet of the unit in progress was seen
        self.new_parameters = False       # SPS/PPS changed since the caller last looked

    def _keep(self, nal: bytes) -> None:
        kind = nal[0] & 0x1F if nal else 0
        if kind == SPS and nal != self.sps:
            self.sps, self.new_parameters = bytes(nal), True
        elif kind == PPS and nal != self.pps:
            self.pps, self.new_parameters = bytes(nal), True

    def extradata(self) -> bytes | None:
        """SPS and PPS as Annex B, for the ring (readers that join late)."""
        if self.sps is None or self.pps is None:
            return None
        return START + self.sps + START + self.pps

    def lost(self) -> None:
        """Packets of the unit in progress were lost: it is broken."""
        if self.started or self._fu is not None:
            self._break("loss")
        self._fu = None

    def _break(self, why: str) -> None:
        if not self._broken:
            self._broken = why

    def add(self, payload: bytes, marker: bool) -> tuple[str, Au | None]:
        """One packet's payload: (why it was refused or '', the access unit it ended or None)."""
        refused = self._add(payload)
        if refused:
            self._break(refused)
        self.started = True
        return refused, self.end() if marker else None

    def _add(self, payload: bytes) -> str:
        if len(payload) < 2:
            return "truncated"
        kind = payload[0] & 0x1F
        if kind in (STAP_A, FU_A) and self.mode == 0:
            return "packetization_mode"     # mode 0 is single NAL units only
        if kind == FU_A:
            fu = payload[1]
            start, end, inner = fu & 0x80, fu & 0x40, fu & 0x1F
            if start and end:
                return "bad_fua"            # a fragment that is the whole unit: not allowed (RFC 6184 5.8)
            if start:
                if self._fu is not None:
                    self._fu = None
                    return "bad_fua"        # a new unit began before the last one ended
                self._fu = inner
            elif self._fu != inner:
                self._fu = None
                return "bad_fua"            # a middle or end without its start, or of another NAL type
            elif end:
                self._fu = None
        elif self._fu is not None:
            self._fu = None
            return "bad_fua"                # the unit in progress never ended
        try:
            _, data = H264PayloadDescriptor.parse(payload)
        except ValueError:
            return "bad_payload"
        if kind == FU_A:
            if payload[1] & 0x80:
                self._types.add(payload[1] & 0x1F)
        elif kind == STAP_A:
            pos = 1
            while pos + 2 < len(payload):          # one step per NAL unit (a handful), not per byte
                size = unpack_from("!H", payload, pos)[0]
                nal = payload[pos + 2:pos + 2 + size]
                if not nal:
                    return "bad_payload"
                self._types.add(nal[0] & 0x1F)
                if nal[0] & 0x1F in (SPS, PPS):
                    self._keep(nal)
                pos += 2 + size
        else:
            self._types.add(kind)
            if kind in (SPS, PPS):
                self._keep(payload)
        self._parts.append(data)
        return ""

    def end(self) -> Au | None:
        """The unit in progress is over (its marker, or a packet of the next one came): it, or None if empty."""
        if not self.started:
            return None
        parts, types, broken = self._parts, self._types, self._broken
        if self._fu is not None:          # the last FU-A unit never ended
            broken = broken or "bad_fua"
        self._parts, self._types, self._broken, self._fu, self.started = [], set(), "", None, False
        if not parts and not broken:
            return None
        keyframe = IDR in types
        if keyframe and not broken and (SPS not in types or PPS not in types) and self.extradata():
            parts.insert(0, self.extradata() or b"")
        return Au(b"".join(parts), keyframe, broken)


def nal_units(au: bytes) -> Iterator[memoryview]:
    """The NAL units of an Annex B access unit (start codes of 3 or 4 bytes), as views into it."""
    view = memoryview(au)
    i = au.find(b"\x00\x00\x01")
    while i != -1:
        start = i + 3
        i = au.find(b"\x00\x00\x01", start)
        if i == -1:
            end = len(au)
        else:
            end = i - 1 if au[i - 1] == 0 else i
        while end > start and au[end - 1] == 0:   # trailing zero bytes belong to no NAL unit
            end -= 1
        if end > start:
            yield view[start:end]


class H264Packetizer:
    def __init__(self, mode: int, max_payload: int) -> None:
        if mode not in (0, 1):
            raise ValueError(f"packetization-mode {mode} is not spoken (0 and 1 are)")
        self.mode, self.max = mode, max_payload
        self.sps: bytes | None = None
        self.pps: bytes | None = None

    def parameter_sets(self, extradata: bytes | None) -> None:
        """SPS/PPS from the stream's extradata (Annex B), for the first IDR if the stream carries none in-band."""
        for nal in nal_units(extradata or b""):
            self._keep(nal)

    def _keep(self, nal: memoryview) -> None:
        kind = nal[0] & 0x1F
        if kind == SPS:
            self.sps = bytes(nal)
        elif kind == PPS:
            self.pps = bytes(nal)

    def packetize(self, au: bytes) -> list[bytes]:
        """The payloads of one access unit (the last one is marked); TooLarge in mode 0 when a NAL unit does
        not fit (nothing of the unit is sent)."""
        nals: list[memoryview | bytes] = []
        have_sps = have_pps = False
        for nal in nal_units(au):
            kind = nal[0] & 0x1F
            if kind == AUD:
                continue                          # carries nothing RTP needs
            if kind in (SPS, PPS):
                self._keep(nal)
                have_sps, have_pps = have_sps or kind == SPS, have_pps or kind == PPS
            elif kind == IDR and not (have_sps and have_pps) and self.sps and self.pps:
                nals += [self.sps, self.pps]      # every IDR goes out with its parameter sets
                have_sps = have_pps = True
            nals.append(nal)
        if self.mode == 0:
            big = max((len(n) for n in nals), default=0)
            if big > self.max:
                raise TooLarge(f"a NAL unit of {big} bytes does not fit a {self.max}-byte payload, and "
                               "packetization-mode 0 cannot fragment it")
            return [bytes(n) for n in nals]
        return self._mode1(nals)

    def _mode1(self, nals: list[memoryview | bytes]) -> list[bytes]:
        out: list[bytes] = []
        group: list[memoryview | bytes] = []
        size = 1                                   # the STAP-A header byte
        for nal in nals:
            n = len(nal)
            if n > self.max:
                out += self._flush(group)
                group, size = [], 1
                out += self._fu_a(nal)
                continue
            if group and size + 2 + n > self.max:
                out += self._flush(group)
                group, size = [], 1
            group.append(nal)
            size += 2 + n
        out += self._flush(group)
        return out

    @staticmethod
    def _flush(group: list[memoryview | bytes]) -> list[bytes]:
        if not group:
            return []
        if len(group) == 1:
            return [bytes(group[0])]
        nri = max(n[0] & 0x60 for n in group)
        forbidden = max(n[0] & 0x80 for n in group)
        parts: list[bytes | memoryview] = [bytes([forbidden | nri | STAP_A])]
        for nal in group:
            parts += [pack("!H", len(nal)), nal]
        return [b"".join(parts)]

    def _fu_a(self, nal: memoryview | bytes) -> list[bytes]:
        head = nal[0]
        indicator = (head & 0xE0) | FU_A
        kind = head & 0x1F
        room = self.max - 2
        body = memoryview(nal)[1:]
        count = -(-len(body) // room)
        step = -(-len(body) // count)              # fragments of even size: no runt at the end
        out = []
        for i in range(count):
            fu = kind | (0x80 if i == 0 else 0) | (0x40 if i == count - 1 else 0)
            out.append(b"".join((bytes((indicator, fu)), body[i * step:(i + 1) * step])))
        return out
