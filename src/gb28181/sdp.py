"""SDP for GB/T 28181 media sessions (Annex F): the one parser and the one builder.

Offers and answers carry the usual RFC 4566 lines plus two of the standard's own: ``y=`` (the
10-digit SSRC: first digit 0 live / 1 history, then digits 4-8 of the SIP domain, then a
sequence) and ``f=`` (media format hints). Parsing is lenient, as it must be with real
devices (PROTOCOL.md §5.3): unknown lines are kept, ``y=`` may be 9 digits, zero-padded,
different from the offer or missing, ``a=setup`` may appear on UDP, ``i=``/``a=username`` and
friends are ignored. Building writes lines in the order of Annex F, which some devices need.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

__all__ = ["MediaDescription", "SdpError", "SessionDescription", "SsrcAllocator", "build_sdp", "sending_plan",
           "parse_sdp"]


class SdpError(ValueError):
    """The SDP cannot be used; the message names what is missing or wrong."""


@dataclass(slots=True)
class MediaDescription:
    media: str = "video"
    port: int = 0
    proto: str = "RTP/AVP"                 # TCP: "TCP/RTP/AVP"
    formats: list[int] = field(default_factory=lambda: [96])
    rtpmap: dict[int, str] = field(default_factory=lambda: {96: "PS/90000"})
    direction: str | None = None           # recvonly | sendonly | sendrecv | inactive
    setup: str | None = None               # active | passive | actpass (TCP, RFC 4145)
    connection: str | None = None          # new | existing
    attributes: list[tuple[str, str | None]] = field(default_factory=list)   # the rest, in order

    @property
    def transport(self) -> str:
        return "tcp" if "TCP" in self.proto.upper() else "udp"


@dataclass(slots=True)
class SessionDescription:
    origin_user: str = ""
    origin_addr: str = "0.0.0.0"
    session_name: str = "Play"             # Play | Playback | Download | Talk
    uri: str | None = None                 # u=<channelID>:<n> (Playback/Download)
    connection_addr: str = "0.0.0.0"
    start: int = 0
    stop: int = 0
    media: list[MediaDescription] = field(default_factory=list)
    ssrc: str | None = None                # y= as written
    format: str | None = None              # f= as written
    extra: list[str] = field(default_factory=list)   # unknown session-level lines, kept

    @property
    def video(self) -> MediaDescription | None:
        return next((m for m in self.media if m.media == "video"), None)

    @property
    def ssrc_value(self) -> int | None:
        """The RTP SSRC the ``y=`` line stands for (its decimal value), or None."""
        if self.ssrc is None:
            return None
        digits = self.ssrc.strip()
        if not digits.isdigit() or len(digits) > 10 or int(digits) >= 2**32:
            return None
        return int(digits)


def parse_sdp(data: bytes | str) -> SessionDescription:
    """Read an offer or answer; raises SdpError when there is no usable media line."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    sd = SessionDescription()
    current: MediaDescription | None = None
    seen_v = False
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        key, value = line[0], line[2:].strip()
        if key == "v":
            seen_v = True
        elif key == "o":
            parts = value.split()
            if parts:
                sd.origin_user = parts[0]
            if len(parts) >= 6:
                sd.origin_addr = parts[5]
        elif key == "s":
            sd.session_name = value
        elif key == "u":
            sd.uri = value
        elif key == "c":
            parts = value.split()
            if len(parts) >= 3:
                sd.connection_addr = parts[2].split("/")[0]
        elif key == "t":
            parts = value.split()
            try:
                sd.start, sd.stop = int(parts[0]), int(parts[1])
            except (IndexError, ValueError):
                pass
        elif key == "m":
            parts = value.split()
            if len(parts) < 3:
                raise SdpError(f"invalid media line m={value[:60]!r}")
            try:
                port = int(parts[1].split("/")[0])
            except ValueError:
                raise SdpError(f"invalid port in m={value[:60]!r}") from None
            if not 0 <= port < 65536:
                raise SdpError(f"port {port} out of range in m= line")
            formats = [int(f) for f in parts[3:] if f.isdigit()]
            current = MediaDescription(parts[0].lower(), port, parts[2], formats, {})
            sd.media.append(current)
        elif key == "y":
            sd.ssrc = value
        elif key == "f":
            sd.format = value
        elif key == "a":
            name, _, val = value.partition(":")
            name = name.strip().lower()
            target = current
            if target is None:
                sd.extra.append(line)
                continue
            if name == "rtpmap":
                pt, _, enc = val.strip().partition(" ")
                if pt.isdigit():
                    target.rtpmap[int(pt)] = enc.strip()
            elif name in ("recvonly", "sendonly", "sendrecv", "inactive"):
                target.direction = name
            elif name == "setup":
                target.setup = val.strip().lower()
            elif name == "connection":
                target.connection = val.strip().lower()
            else:
                target.attributes.append((name, val.strip() if _ else None))
        else:
            sd.extra.append(line)
    if not seen_v and not sd.media:
        raise SdpError("not an SDP body: no v= line and no m= line")
    if not sd.media:
        raise SdpError("SDP has no m= line: nothing to receive or send")
    return sd


def sending_plan(offer: SessionDescription, media: MediaDescription) -> tuple[str, tuple[str, int], str | None]:
    """How we send the media an offer asks of us (we answer ``a=sendonly``): (transport in our
    terms, the offer's address, its ``y=`` or None). ``udp``; ``tcp-active``: we connect (the
    offerer said ``a=setup:passive``); ``tcp-passive``: we listen (``setup:active``, or no
    ``a=setup``: RFC 4145's default for the offerer, as Annex L has the receiver connect).
    SdpError when there is no address to send to."""
    if media.transport == "tcp":
        transport = "tcp-active" if (media.setup or "active").lower() == "passive" else "tcp-passive"
    else:
        transport = "udp"
    host = offer.connection_addr
    if transport != "tcp-passive" and (host in ("", "0.0.0.0") or not media.port):
        raise SdpError(f"no address to send to (c={host}, m= port {media.port})")
    ssrc = offer.ssrc.strip() if offer.ssrc and offer.ssrc_value is not None else None
    return transport, (host, media.port), ssrc


def build_sdp(sd: SessionDescription) -> bytes:
    """Write ``sd`` in Annex F order (v o s u c t m a… y f), CRLF line ends."""
    lines = ["v=0", f"o={sd.origin_user or '-'} 0 0 IN IP4 {sd.origin_addr}", f"s={sd.session_name}"]
    if sd.uri:
        lines.append(f"u={sd.uri}")
    lines.append(f"c=IN IP4 {sd.connection_addr}")
    lines.append(f"t={sd.start} {sd.stop}")
    for m in sd.media:
        formats = " ".join(str(f) for f in m.formats)
        lines.append(f"m={m.media} {m.port} {m.proto} {formats}")
        if m.direction:
            lines.append(f"a={m.direction}")
        for pt, enc in m.rtpmap.items():
            lines.append(f"a=rtpmap:{pt} {enc}")
        if m.setup:
            lines.append(f"a=setup:{m.setup}")
        if m.connection:
            lines.append(f"a=connection:{m.connection}")
        for name, value in m.attributes:
            lines.append(f"a={name}" if value is None else f"a={name}:{value}")
    if sd.ssrc is not None:
        lines.append(f"y={sd.ssrc}")
    if sd.format is not None:
        lines.append(f"f={sd.format}")
    return ("\r\n".join(lines) + "\r\n").encode()


class SsrcAllocator:
    """``y=`` values per Annex F: ``<0 live|1 history><domain digits 4-8><4-digit sequence>``.

    Sequences are handed out round-robin and never to two live sessions at once.
    """

    def __init__(self, domain: str) -> None:
        digits = "".join(c for c in domain if c.isdigit()).ljust(8, "0")
        self.middle = digits[3:8]
        self._seq = itertools.count(1)
        self._used: set[str] = set()

    def allocate(self, history: bool = False) -> str:
        for _ in range(10000):
            n = next(self._seq) % 10000
            if n == 0:
                continue
            value = f"{1 if history else 0}{self.middle}{n:04d}"
            if value not in self._used:
                self._used.add(value)
                return value
        raise RuntimeError("all 9999 SSRC sequences of the domain are in use")

    def release(self, value: str | None) -> None:
        if value is not None:
            self._used.discard(value)
