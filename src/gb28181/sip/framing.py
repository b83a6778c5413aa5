"""Cut a SIP-over-TCP byte stream into whole messages (RFC 3261 §18.3).

A TCP segment may carry many messages, or a fraction of one; Content-Length says where each
ends. The buffer is bounded: a peer that sends a header block or a body larger than
``max_size`` gets ``FramingError`` and the transport closes the connection, because there is
no way to find the next message boundary after that.
"""

from __future__ import annotations

from .message import MAX_MESSAGE_SIZE, SipParseError, find_head_end

__all__ = ["FramingError", "SipStreamFramer"]


class FramingError(SipParseError):
    """The stream cannot be cut into messages any more; close the connection."""


class SipStreamFramer:
    """Feed bytes, get complete messages (each a ``bytes`` ready for ``parse_message``)."""

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        while buf:
            # CRLF keep-alives between messages (RFC 5626 §3.5.1) carry nothing.
            start = 0
            while start < len(buf) and buf[start] in (13, 10):
                start += 1
            if start:
                del buf[:start]
                if not buf:
                    break
            head_end, body_start = find_head_end(buf)
            if head_end == -1:
                if len(buf) > self.max_size:
                    raise FramingError(f"header block exceeds {self.max_size} bytes")
                break
            length = _content_length(bytes(buf[:head_end]))
            total = body_start + length
            if total > self.max_size:
                raise FramingError(f"message of {total} bytes exceeds the {self.max_size}-byte limit")
            if len(buf) < total:
                break
            out.append(bytes(buf[:total]))
            del buf[:total]
        return out


def _content_length(head: bytes) -> int:
    """Content-Length from a raw header block; 0 if absent (RFC 3261 requires it on TCP)."""
    for line in head.split(b"\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name in (b"content-length", b"l"):
            text = value.strip()
            if not text.isdigit():
                raise FramingError(f"invalid Content-Length {value.strip()[:20]!r} on a stream")
            # int() refuses more than 4300 digits; anything this long is over any limit anyway.
            significant = text.lstrip(b"0")
            return int(significant or b"0") if len(significant) <= 18 else 10**18
    return 0
