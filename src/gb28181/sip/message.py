"""SIP message codec: bytes in, ``SipRequest``/``SipResponse`` out, and back (RFC 3261 §7, §20).

This is the bottom of the SIP stack. The transaction layer (``transaction.py``) and the TCP
framer (``framing.py``) sit above it; nothing here does I/O. It is written for what GB/T 28181
devices really send (PROTOCOL.md §9): any header order, compact header names, names in any case,
folded lines, space-padded Content-Length, LF-only line ends, ``Route`` from devices,
``.spvmn.cn`` and ``IP:port`` hosts. Garbage raises ``SipParseError``; nothing else escapes.

Headers are kept in a dict from lower-case long name to a list of values, in arrival order, and
written back with their canonical spelling. Header bytes are decoded as UTF-8 with
``surrogateescape`` so that a device's odd bytes (a GB2312 display name) survive a round trip.
"""

from __future__ import annotations

import importlib
import os
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ACCELERATOR",
    "accelerated",
    "MAX_MESSAGE_SIZE",
    "NameAddr",
    "SipMessage",
    "SipParseError",
    "SipRequest",
    "SipResponse",
    "SipUri",
    "Via",
    "make_response",
    "new_branch",
    "new_call_id",
    "new_request",
    "new_tag",
    "parse_delta_seconds",
    "parse_head",
    "parse_message",
    "parse_name_addr",
    "parse_uri",
    "parse_via",
    "response_bytes",
    "REASONS",
]

#: A message larger than this is refused (UDP cannot carry more than 64 KiB anyway; over TCP
#: the framer enforces the same bound so one peer cannot make us buffer without limit).
MAX_MESSAGE_SIZE = 256 * 1024

_COMPACT = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
    "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to",
    "v": "via", "o": "event", "u": "allow-events", "r": "refer-to", "b": "referred-by",
    "x": "session-expires",
}

_CANONICAL = {
    "call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version", "sip-etag": "SIP-ETag", "sip-if-match": "SIP-If-Match",
    "x-gb-ver": "X-GB-Ver",
}

#: Headers whose comma-separated values are separate header fields (RFC 3261 §7.3.1). Only the
#: ones we read are split; others are kept verbatim.
_SPLIT_ON_COMMA = frozenset(("via", "route", "record-route"))

REASONS = {
    100: "Trying", 101: "Dialog Establishment", 180: "Ringing", 183: "Session Progress",
    200: "OK", 202: "Accepted",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 415: "Unsupported Media Type",
    423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    489: "Bad Event", 500: "Server Internal Error", 501: "Not Implemented",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large",
}


class SipParseError(ValueError):
    """The bytes are not a usable SIP message; the text names what is wrong.

    ``message`` holds what could be parsed (start line and headers) when the failure came
    later, so a server can still answer a broken request with a 400.
    """

    def __init__(self, text: str, message: SipMessage | None = None) -> None:
        super().__init__(text)
        self.message = message


def canonical_name(lower: str) -> str:
    """The conventional spelling of a lower-case header name (``call-id`` → ``Call-ID``)."""
    name = _CANONICAL.get(lower)
    if name is None:
        name = "-".join(part[:1].upper() + part[1:] for part in lower.split("-"))
        _CANONICAL[lower] = name
    return name


class SipMessage:
    """Headers and body shared by requests and responses."""

    __slots__ = ("headers", "body")

    def __init__(self, headers: dict[str, list[str]] | None = None, body: bytes = b"") -> None:
        self.headers: dict[str, list[str]] = headers if headers is not None else {}
        self.body = body

    # -- header access -------------------------------------------------------------------
    def get(self, name: str, default: str | None = None) -> str | None:
        """First value of a header (name in any case), or ``default``."""
        values = self.headers.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self.headers.get(name.lower(), ()))

    def set(self, name: str, value: str | int) -> None:
        self.headers[name.lower()] = [str(value)]

    def add(self, name: str, value: str | int) -> None:
        self.headers.setdefault(name.lower(), []).append(str(value))

    def remove(self, name: str) -> None:
        self.headers.pop(name.lower(), None)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self.headers

    # -- common fields -------------------------------------------------------------------
    @property
    def call_id(self) -> str:
        return self.headers["call-id"][0]

    @property
    def cseq(self) -> tuple[int, str]:
        """(number, METHOD) of the CSeq header."""
        num, _, method = self.headers["cseq"][0].partition(" ")
        return int(num), method.strip().upper()

    @property
    def from_tag(self) -> str | None:
        return _tag_of(self.headers["from"][0])

    @property
    def to_tag(self) -> str | None:
        return _tag_of(self.headers["to"][0])

    @property
    def top_via(self) -> Via:
        return parse_via(self.headers["via"][0])

    @property
    def content_type(self) -> str:
        """Content-Type media type in lower case without parameters ('' if absent)."""
        values = self.headers.get("content-type")
        if not values:
            return ""
        return values[0].partition(";")[0].strip().lower()

    def _head_lines(self) -> list[str]:
        lines = [self.start_line()]
        append = lines.append
        names = _CANONICAL
        for lower, values in self.headers.items():
            if lower == "content-length":
                continue
            name = names.get(lower) or canonical_name(lower)
            if len(values) == 1:
                append(f"{name}: {values[0]}")
            else:
                lines.extend(f"{name}: {value}" for value in values)
        append(f"Content-Length: {len(self.body)}\r\n\r\n")
        return lines

    def start_line(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def serialize(self) -> bytes:
        """Wire form; Content-Length is always recomputed from the body."""
        head = "\r\n".join(self._head_lines()).encode("utf-8", "surrogateescape")
        return head + self.body if self.body else head

    def __bytes__(self) -> bytes:
        return self.serialize()


class SipRequest(SipMessage):
    """A SIP request: method, Request-URI, headers, body."""

    __slots__ = ("method", "uri")

    def __init__(self, method: str, uri: str, headers: dict[str, list[str]] | None = None,
                 body: bytes = b"") -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = uri

    def start_line(self) -> str:
        return f"{self.method} {self.uri} SIP/2.0"

    def __repr__(self) -> str:
        return f"<SipRequest {self.method} {self.uri}>"


class SipResponse(SipMessage):
    """A SIP response: status code, reason phrase, headers, body."""

    __slots__ = ("status", "reason")

    def __init__(self, status: int, reason: str = "", headers: dict[str, list[str]] | None = None,
                 body: bytes = b"") -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason or REASONS.get(status, "")

    def start_line(self) -> str:
        return f"SIP/2.0 {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<SipResponse {self.status} {self.reason}>"


# -- parsing -----------------------------------------------------------------------------

_REQUIRED = ("via", "from", "to", "call-id", "cseq")
_METHOD_RE = re.compile(r"[A-Za-z][A-Za-z0-9._!%*+`'~-]*\Z")
_KNOWN_METHODS = frozenset(("REGISTER", "MESSAGE", "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS",
                            "SUBSCRIBE", "NOTIFY", "INFO", "UPDATE", "PRACK", "REFER", "PUBLISH"))
#: Header names as written on the wire -> their lower-case long form. Devices use a handful of
#: spellings, so a REGISTER's dozen header names are looked up here rather than worked out.
_NAMES: dict[str, str] = {}
_NAMES_MAX = 512
#: CSeq = 1*DIGIT LWS Method, the method a token (RFC 3261 §20.16, §25.1). Once folded lines
#: are joined, linear whitespace is spaces and tabs only; ``str.split``/``strip`` would also
#: take \x1c–\x1f, \x85 or U+3000 for whitespace, and ``int`` then fails on what was let in.
_CSEQ_RE = re.compile(r"([0-9]+)[ \t]+([A-Za-z0-9.!%*_+`'~-]+)")
#: Header values are trimmed of linear whitespace only (RFC 3261 §7.3.1, §25.1).
_LWS = " \t"
#: Largest CSeq number (RFC 3261 §8.1.1.5: "MUST be less than 2**31").
_MAX_CSEQ = 2**31 - 1
#: Largest Expires (RFC 3261 §20.19: "between 0 and (2**32)-1").
_MAX_EXPIRES = 2**32 - 1


def find_head_end(data: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """Index where the header block ends and where the body starts, or (-1, -1).

    Accepts CRLF CRLF and, for devices that write bare LFs, LF LF, and the mixtures
    (LF CRLF, CRLF LF) that hand-assembled messages end up with.
    """
    crlf = data.find(b"\r\n\r\n", start)
    if crlf != -1 and data.find(b"\n\n", start, crlf) == -1 and data.find(b"\n\r\n", start, crlf) == -1:
        return crlf, crlf + 4  # the usual case: one search, two short checks before it
    best = (-1, -1)
    for sep in (b"\r\n\r\n", b"\n\n", b"\n\r\n"):
        idx = data.find(sep, start)
        if idx != -1 and (best[0] == -1 or idx < best[0]):
            best = (idx, idx + len(sep))
    return best


def parse_content_length(values: list[str] | None) -> int | None:
    """Content-Length as an int (space padding allowed), None if absent; raises if invalid."""
    if not values:
        return None
    text = values[0]
    if text == "0":
        return 0
    value = _ascii_uint(text.strip())
    if value is None:
        raise SipParseError(f"invalid Content-Length {values[0][:40]!r}: expected a decimal byte count")
    return value


def parse_delta_seconds(text: str) -> int | None:
    """An Expires value as an int: 1*DIGIT from 0 to 2**32−1 (RFC 3261 §20.19), else None.

    Spaces and tabs around the digits are allowed. Unlike ``text.isdigit()`` followed by
    ``int()``, this cannot raise (``"²"`` is a digit to ``isdigit``, 5000 digits too many for
    ``int``).
    """
    value = _ascii_uint(text.strip(_LWS))
    return value if value is not None and value <= _MAX_EXPIRES else None


def _ascii_uint(text: str) -> int | None:
    """``text`` as a non-negative int if it is ASCII decimal digits only, else None.

    ``str.isdigit`` alone also accepts characters such as ``²`` that ``int`` refuses, and
    ``int`` refuses strings of more than 4300 digits; both would escape as a bare ValueError.
    Absurdly long numbers are capped at 10**18, which every caller rejects as too large.
    """
    if not text or not text.isascii() or not text.isdigit():
        return None
    significant = text.lstrip("0")
    if len(significant) > 18:
        return 10**18
    return int(significant or "0")


#: Bytes a head of the plain shape may hold besides CR LF: printable ASCII and HT.
_TEXT_BYTES = bytes(range(0x20, 0x7F)) + b"\t"
#: A header name as a token (RFC 3261 §25.1).
_TOKEN_RE = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+\Z")


def parse_head(data: bytes, compact: dict[str, str],
               split: frozenset[str]) -> tuple[str, dict[str, list[str]], int] | None:
    """The head of a message of the plain shape, or None for any other.

    Plain: lines end in CRLF and the head at the first CRLF CRLF (RFC 3261 §7), no folded
    line (§7.3.1), printable ASCII and tabs only, header names that are tokens (§25.1), and no
    comma in a value of the ``split`` names (several values in one field). That is what
    devices and sipp send, and the result is what ``parse_message``'s general loop makes of
    it: (start line, {lower-case long name: [values]}, index of the body). Anything else,
    garbage included, gives None (never an error), and the general loop reads it and names
    the fault. ``_fast.parse_head`` (``_fast.c``) is the C twin; tests hold the two equal.
    """
    if not data or data[0] in (10, 13):
        return None
    end = data.find(b"\r\n\r\n")
    if end == -1:
        return None
    head = data[:end]
    crlf = head.count(b"\r\n")
    if (head.count(b"\r") != crlf or head.count(b"\n") != crlf
            or head.translate(None, b"\r\n" + _TEXT_BYTES)):
        return None
    lines = head.decode("ascii").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if line[0] in " \t":
            return None
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_RE.match(name) or len(name) >= 128:
            return None
        lower = name.lower()
        lower = compact.get(lower, lower)
        value = value.strip(_LWS)
        if "," in value and lower in split:
            return None
        values = headers.get(lower)
        if values is None:
            headers[lower] = [value]
        else:
            values.append(value)
    return lines[0], headers, end + 4


def accelerated(name: str) -> Callable[..., Any] | None:
    """The C twin ``_fast.<name>`` (``_fast.c``) when it is built and not turned off with the
    environment variable SIP_ACCEL=0 (read at import: tests and benchmarks compare both)."""
    if os.environ.get("SIP_ACCEL", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        return getattr(importlib.import_module(f"{__package__}._fast"), name)
    except (ImportError, AttributeError):
        return None


#: The C head reader, or None: without it every message takes the general loop, which reads
#: the plain ones exactly as ``parse_head`` does (so the pure-Python twin is only for tests).
_fast_parse_head: Callable[[bytes, dict[str, str], frozenset[str]],
                           tuple[str, dict[str, list[str]], int] | None] | None = accelerated("parse_head")
#: Which parser runs, for logs and benchmark output.
ACCELERATOR = "C (gb28181.sip._fast)" if _fast_parse_head is not None else "pure Python"


def _start_line(first: str, headers: dict[str, list[str]] | None = None) -> SipRequest | SipResponse:
    """A message of the kind the start line says (RFC 3261 §7.1, §7.2), with ``headers``."""
    if first.startswith("SIP/"):
        version, _, rest = first.partition(" ")
        if version != "SIP/2.0":
            raise SipParseError(f"unsupported SIP version {version!r}")
        code, _, reason = rest.partition(" ")
        if len(code) != 3 or not code.isascii() or not code.isdigit() or code[0] == "0":
            raise SipParseError(f"invalid status line {first!r}")
        return SipResponse(int(code), reason.strip(), headers)
    parts = first.split(" ")
    if len(parts) != 3 or not parts[1]:
        raise SipParseError(f"invalid request line {first[:80]!r}")
    method, uri, version = parts
    if version != "SIP/2.0":
        raise SipParseError(f"unsupported SIP version {version[:16]!r} in request line")
    if method not in _KNOWN_METHODS and not _METHOD_RE.match(method):
        raise SipParseError(f"invalid method {method[:32]!r}")
    return SipRequest(method.upper(), uri, headers)


def parse_message(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE,
                  stream: bool = False) -> SipRequest | SipResponse:
    """Parse one complete SIP message.

    With ``stream=False`` (a UDP datagram) the body is whatever follows the headers, cut to
    Content-Length when that is shorter; a Content-Length larger than what arrived is an
    error. With ``stream=True`` the caller (the TCP framer) has already cut the message.
    """
    if len(data) > max_size:
        raise SipParseError(f"message of {len(data)} bytes exceeds the {max_size}-byte limit")
    plain = _fast_parse_head(data, _COMPACT, _SPLIT_ON_COMMA) if _fast_parse_head else None
    msg: SipRequest | SipResponse
    if plain is not None:
        first, headers, body_start = plain
        msg = _start_line(first, headers)
    else:
        msg, body_start = _parse_head_general(data)
        headers = msg.headers

    get = headers.get
    if not (get("via") and get("from") and get("to") and get("call-id") and get("cseq")):
        for required in _REQUIRED:
            if not get(required):
                raise SipParseError(f"missing mandatory header {canonical_name(required)}", msg)
    _normalise_numbers(msg)

    lengths = headers.get("content-length")
    length = 0 if lengths and lengths[0] == "0" else parse_content_length_safe(headers, msg)
    tail = data[body_start:]
    if length is None:
        msg.body = tail if not stream else b""
    elif length > len(tail):
        raise SipParseError(
            f"body is {len(tail)} bytes but Content-Length says {length}: truncated message", msg)
    else:
        msg.body = tail[:length]
    return msg


def _parse_head_general(data: bytes) -> tuple[SipRequest | SipResponse, int]:
    """Start line and headers of any message, and the index where its body starts: leading
    CRLFs, LF-only or mixed line ends, folded lines (RFC 3261 §7.3.1), compact names (§7.3.3),
    comma-separated Vias (§7.3.1) and odd bytes included."""
    # Leading CRLFs are keep-alive pings or padding (RFC 5626 §3.5.1); skip them.
    start = 0
    while start < len(data) and data[start] in (13, 10):
        start += 1
    head_end, body_start = find_head_end(data, start)
    if head_end == -1:
        # A message with no body may also end after a single line break at end of data.
        if not data[start:]:
            raise SipParseError("empty message")
        head_end = body_start = len(data)
    head = data[start:head_end].decode("utf-8", "surrogateescape")
    if head.count("\n") == head.count("\r\n"):
        lines = head.split("\r\n")  # CRLF throughout: no per-line stripping needed
    else:
        lines = [line.rstrip("\r") for line in head.split("\n")]
    msg = _start_line(lines[0])
    headers = msg.headers
    last: list[str] | None = None
    names = _NAMES
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            # Folded continuation of the previous header (RFC 3261 §7.3.1).
            if last is None:
                raise SipParseError("header block starts with a continuation line", msg)
            # strip(): an empty value or a blank continuation must not leave stray spaces.
            last[-1] = f"{last[-1]} {line.strip(_LWS)}".strip(_LWS)
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise SipParseError(f"header line without a colon: {line[:80]!r}", msg)
        lower = names.get(name)
        if lower is None:
            lower = name.strip().lower()
            if not lower or " " in lower:
                raise SipParseError(f"invalid header name {name[:40]!r}", msg)
            lower = _COMPACT.get(lower, lower)
            if len(names) < _NAMES_MAX:  # bounded: header names are the sender's choice
                names[name] = lower
        value = value.strip(_LWS)
        values = headers.get(lower)
        if values is None:
            values = headers[lower] = []
        if lower in _SPLIT_ON_COMMA and "," in value:
            values.extend(v.strip() for v in _split_commas(value) if v.strip())
        else:
            values.append(value)
        last = values
    return msg, body_start


def _normalise_numbers(msg: SipRequest | SipResponse) -> None:
    """Check the header values later read with ``int()`` and store them in canonical form.

    CSeq becomes ``"<number> <method>"`` (one space, no leading zeros) and Expires plain
    decimal, so ``SipMessage.cseq`` and every ``int(msg.get("expires"))`` cannot raise.
    Content-Length is checked by ``parse_content_length``; Max-Forwards is never read.
    """
    headers = msg.headers
    cseq = headers["cseq"][0]
    num, _, method = cseq.partition(" ")
    if (_canonical_uint(num) and len(num) < 10 and method.isalpha() and method.isascii()
            and (method == msg.method if isinstance(msg, SipRequest) else method.isupper())):
        pass  # already "<number> <METHOD>": nothing to check further or rewrite
    else:
        _normalise_cseq(msg, cseq)
    expires = headers.get("expires")
    if expires:
        for i, value in enumerate(expires):
            if _canonical_uint(value) and len(value) < 10:
                continue
            seconds = parse_delta_seconds(value)
            if seconds is None:
                raise SipParseError(
                    f"invalid Expires {value[:40]!r}: expected 0 to 4294967295 seconds "
                    "(RFC 3261 §20.19)", msg)
            expires[i] = str(seconds)


def _canonical_uint(text: str) -> bool:
    """ASCII digits without a leading zero (or "0" itself): already in canonical form."""
    return text.isdigit() and text.isascii() and (text[0] != "0" or text == "0")


def _normalise_cseq(msg: SipRequest | SipResponse, cseq: str) -> None:
    headers = msg.headers
    m = _CSEQ_RE.fullmatch(cseq)
    number = _ascii_uint(m.group(1)) if m else None
    if m is None or number is None:
        raise SipParseError(
            f"invalid CSeq {cseq[:40]!r}: expected a decimal number, spaces, and a method "
            "(RFC 3261 §20.16)", msg)
    if number > _MAX_CSEQ:
        raise SipParseError(f"invalid CSeq {cseq[:40]!r}: the number must be below 2**31", msg)
    method = m.group(2)
    if isinstance(msg, SipRequest) and method.upper() != msg.method:
        raise SipParseError(f"CSeq method {method!r} does not match {msg.method}", msg)
    headers["cseq"][0] = f"{number} {method}"


def parse_content_length_safe(headers: dict[str, list[str]], msg: SipMessage) -> int | None:
    try:
        return parse_content_length(headers.get("content-length"))
    except SipParseError as exc:
        raise SipParseError(str(exc), msg) from None


def _split_commas(value: str) -> list[str]:
    """Split a header value on commas that are not inside quotes or angle brackets."""
    if '"' not in value and "<" not in value:
        return value.split(",")
    out: list[str] = []
    buf: list[str] = []
    quoted = angled = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif ch == "<" and not quoted:
            angled = True
        elif ch == ">" and not quoted:
            angled = False
        elif ch == "," and not quoted and not angled:
            out.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    out.append("".join(buf))
    return out


# -- Via ---------------------------------------------------------------------------------

@dataclass(slots=True)
class Via:
    """One Via header value: ``SIP/2.0/UDP host:port;branch=…;rport``."""

    transport: str
    host: str
    port: int | None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        sent_by = f"{host}:{self.port}" if self.port else host
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params.items())
        return f"SIP/2.0/{self.transport} {sent_by}{params}"


def parse_via(value: str) -> Via:
    """Parse one Via value; raises SipParseError when it is not ``SIP/2.0/<T> host[:port]``."""
    proto, _, rest = value.strip().partition(" ")
    parts = proto.split("/")
    if len(parts) != 3 or parts[0].upper() != "SIP":
        raise SipParseError(f"invalid Via {value[:80]!r}")
    rest = rest.strip()
    sent_by, _, params_text = rest.partition(";")
    host, port = _split_host_port(sent_by.strip())
    if not host:
        raise SipParseError(f"Via without a host: {value[:80]!r}")
    return Via(parts[2].strip().upper(), host, port, _parse_params(params_text))


def _split_host_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise SipParseError(f"unterminated IPv6 reference {text[:60]!r}")
        host, tail = text[1:end], text[end + 1:]
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = text.partition(":")
    port_text = port_text.strip()
    if not port_text:
        return host.strip(), None
    port = _ascii_uint(port_text)
    if port is None or not 0 < port < 65536:
        raise SipParseError(f"invalid port in {text[:60]!r}")
    return host.strip(), port


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if not text:
        return params
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        key, eq, val = item.partition("=")
        params[key.strip().lower()] = val.strip() if eq else None
    return params


# -- URIs and name-addr --------------------------------------------------------------------

@dataclass(slots=True)
class SipUri:
    """``sip:user@host:port;params``; GB/T 28181 puts the 20-digit ID in ``user``."""

    scheme: str
    user: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        userinfo = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params.items())
        return f"{self.scheme}:{userinfo}{host}{port}{params}"


def parse_uri(text: str) -> SipUri:
    """Parse a sip:/sips: URI. Headers (``?…``) are dropped; a password in userinfo too."""
    text = text.strip()
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or scheme not in ("sip", "sips"):
        raise SipParseError(f"not a SIP URI: {text[:80]!r}")
    rest = rest.partition("?")[0]
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        userinfo, hostpart = "", rest
    user = userinfo.partition(":")[0]
    hostport, _, params_text = hostpart.partition(";")
    host, port = _split_host_port(hostport)
    if not host:
        raise SipParseError(f"SIP URI without a host: {text[:80]!r}")
    return SipUri(scheme, user, host, port, _parse_params(params_text))


@dataclass(slots=True)
class NameAddr:
    """From/To/Contact value: optional display name, URI text, header parameters."""

    display: str
    uri: str
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        display = f'"{self.display}" ' if self.display else ""
        params = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params.items())
        return f"{display}<{self.uri}>{params}"


def parse_name_addr(value: str) -> NameAddr:
    """Parse ``"Name" <sip:…>;tag=x`` or the bare ``sip:…;tag=x`` form."""
    value = value.strip()
    lt = value.find("<")
    if lt != -1:
        gt = value.find(">", lt)
        if gt == -1:
            raise SipParseError(f"unterminated <URI> in {value[:80]!r}")
        display = value[:lt].strip().strip('"').strip()
        return NameAddr(display, value[lt + 1:gt].strip(), _parse_params(value[gt + 1:].lstrip(";")))
    # Without brackets every ;param belongs to the header, not the URI (RFC 3261 §20.10).
    uri, _, params = value.partition(";")
    return NameAddr("", uri.strip(), _parse_params(params))


def _tag_of(value: str) -> str | None:
    # Fast path for the hot loop: avoid building a NameAddr just to read the tag.
    pos = value.rfind(">")
    idx = value.find(";tag=", pos + 1 if pos != -1 else 0)
    if idx == -1:
        idx = value.lower().find(";tag=", pos + 1 if pos != -1 else 0)
        if idx == -1:
            return None
    end = value.find(";", idx + 5)
    tag = value[idx + 5:end if end != -1 else None].strip()
    return tag or None


def user_of(value: str) -> str:
    """The user part of the URI in a From/To/Contact value ('' if none or unparsable)."""
    try:
        return parse_uri(parse_name_addr(value).uri).user
    except SipParseError:
        return ""


# -- building ------------------------------------------------------------------------------

# Tags, branches and Call-IDs must be unique and unguessable (an off-path peer that could
# predict them could forge a BYE into someone else's dialog; RFC 3261 §19.3 asks for at least
# 32 random bits), and a registrar makes several per REGISTER. They are cut from kernel
# randomness drawn 4 KiB at a time: no getrandom() system call each (costly under sandboxing
# kernels such as gVisor), and half the cost of a keyed hash per identifier. The chunks sit in
# a deque, whose popleft() no two threads can get the same chunk from; a forked child draws
# its own, or parent and child would hand out the same identifiers.
_CHUNK = 16  # bytes: the longest identifier takes 12
_chunks: deque[bytes] = deque()


def _refill() -> None:
    pool = os.urandom(4096)
    _chunks.extend([pool[i:i + _CHUNK] for i in range(0, len(pool), _CHUNK)])


os.register_at_fork(after_in_child=_chunks.clear)


def _unique_hex(nbytes: int) -> str:
    try:
        chunk = _chunks.popleft()
    except IndexError:
        _refill()
        chunk = _chunks.popleft()
    return chunk[:nbytes].hex()


def new_branch() -> str:
    """A fresh RFC 3261 branch (magic cookie + 64 unguessable bits)."""
    return "z9hG4bK" + _unique_hex(8)


def new_tag() -> str:
    return _unique_hex(6)


def new_call_id(host: str = "") -> str:
    return f"{_unique_hex(10)}@{host}" if host else _unique_hex(12)


def make_response(request: SipRequest, status: int, reason: str = "", *,
                  to_tag: str | None = None, body: bytes = b"",
                  content_type: str | None = None,
                  extra: dict[str, str] | None = None) -> SipResponse:
    """A response to ``request`` per RFC 3261 §8.2.6: Via, From, Call-ID, CSeq copied, To tagged.

    Every response above 100 to a request without a To tag gets one (§8.2.6.2): ``to_tag``
    when given (the tag of the dialog being set up), else a fresh one. ``extra`` adds headers
    by lower-case name (a registrar's Expires, Date, Contact, WWW-Authenticate).
    """
    rh = request.headers
    to = rh["to"][0]
    if status > 100 and _tag_of(to) is None:
        to = f"{to};tag={to_tag or new_tag()}"
    # The request's lists are copied: the response is built once and never changed in place,
    # but the request may still be read (a retransmission check, a 487 after a 100).
    headers: dict[str, list[str]] = {"via": rh["via"][:], "from": rh["from"][:], "to": [to],
                                     "call-id": rh["call-id"][:], "cseq": rh["cseq"][:]}
    if content_type:
        headers["content-type"] = [content_type]
    if extra:
        for name, value in extra.items():
            headers[name] = [value]
    return SipResponse(status, reason, headers, body)


def response_bytes(request: SipRequest, status: int, reason: str = "", *,
                   to_tag: str | None = None, extra: dict[str, str] | None = None) -> bytes:
    """The wire form of ``make_response(request, status, reason, to_tag=…, extra=…)`` without a
    body, built in one go: what ``make_response(…).serialize()`` gives, byte for byte, at a
    fraction of the cost. For a registrar, whose every answer is one of these (§8.2.6).
    ``extra`` names must not be one of the headers copied from the request."""
    rh = request.headers
    to = rh["to"][0]
    if status > 100 and _tag_of(to) is None:
        to = f"{to};tag={to_tag or new_tag()}"
    vias, froms, call_ids, cseqs = rh["via"], rh["from"], rh["call-id"], rh["cseq"]
    text = (f"SIP/2.0 {status} {reason or REASONS.get(status, '')}\r\n"
            f"Via: {vias[0] if len(vias) == 1 else _JOIN_VIA.join(vias)}\r\n"
            f"From: {froms[0] if len(froms) == 1 else _JOIN_FROM.join(froms)}\r\n"
            f"To: {to}\r\n"
            f"Call-ID: {call_ids[0] if len(call_ids) == 1 else _JOIN_CALL_ID.join(call_ids)}\r\n"
            f"CSeq: {cseqs[0] if len(cseqs) == 1 else _JOIN_CSEQ.join(cseqs)}\r\n")
    if extra:
        names = _CANONICAL
        text += "".join([f"{names.get(lower) or canonical_name(lower)}: {value}\r\n"
                         for lower, value in extra.items()])
    return f"{text}Content-Length: 0\r\n\r\n".encode("utf-8", "surrogateescape")


_JOIN_VIA = "\r\nVia: "
_JOIN_FROM = "\r\nFrom: "
_JOIN_CALL_ID = "\r\nCall-ID: "
_JOIN_CSEQ = "\r\nCSeq: "


def new_request(method: str, uri: str, *, via: str, from_uri: str, to_uri: str,
                from_tag: str | None = None, to_tag: str | None = None,
                call_id: str | None = None, cseq: int = 1, contact: str | None = None,
                headers: dict[str, str] | None = None, body: bytes = b"",
                content_type: str | None = None, user_agent: str | None = None) -> SipRequest:
    """An out-of-dialog (or, given ``to_tag``, in-dialog) request with the mandatory headers."""
    h: dict[str, list[str]] = {
        "via": [via],
        "from": [f"<{from_uri}>;tag={from_tag or new_tag()}"],
        "to": [f"<{to_uri}>;tag={to_tag}" if to_tag else f"<{to_uri}>"],
        "call-id": [call_id or new_call_id()],
        "cseq": [f"{cseq} {method}"],
        "max-forwards": ["70"],
    }
    if contact:
        h["contact"] = [f"<{contact}>"]
    if user_agent:
        h["user-agent"] = [user_agent]
    if headers:
        for name, value in headers.items():
            h[name.lower()] = [value]
    if content_type:
        h["content-type"] = [content_type]
    return SipRequest(method, uri, h, body)
