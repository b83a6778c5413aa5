"""MANSCDP codec: the XML bodies carried by GB/T 28181 MESSAGE and NOTIFY requests.

This is the project's single XML codec (STYLE §3). ``parse`` turns the bytes of a body into a
:class:`Manscdp` (root, CmdType, SN, DeviceID and the trimmed element tree); ``build`` writes
bodies the way devices expect them (GB2312 declaration, CRLF, one element a line). Parsing
is lenient about what real devices send (PROTOCOL.md §3.1, §9: undeclared or mislabelled
charsets, bare ``&``, ``<`` inside ``<Address>``, padding and garbage around the document)
but strict about what could hurt us: DTDs and entities are refused by defusedxml, bodies are
capped at 1 MiB and nesting at 32 levels. Anything unusable raises :class:`ManscdpError`
and nothing else, so the SIP layer can answer 400 without guarding against surprises.
Repair only runs after a first parse fails, keeping the keepalive path cheap. The message
handlers (keepalive, catalog, device info...) sit on top and read fields with
:meth:`Manscdp.text` and :meth:`Manscdp.items`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException

#: Times on the wire are Beijing local time without a zone (§9.10, WVP ``DateUtil``).
from media.beijing import BEIJING

__all__ = [
    "BEIJING",
    "MAX_BODY",
    "MAX_DEPTH",
    "ROOTS",
    "BodyRefused",
    "Manscdp",
    "ManscdpError",
    "parse_request",
    "Node",
    "build",
    "decode_body",
    "format_time",
    "parse",
    "parse_parental",
    "parse_status",
    "parse_time",
]

#: Root elements of a MANSCDP body (§9.3–9.7, Annex A): requests and the data reply.
ROOTS = frozenset({"Notify", "Query", "Control", "Response"})
#: Largest body we parse. A catalog part holds at most 10 000 records (Annex N), but real
#: parts are a few KiB; 1 MiB bounds memory per message without refusing real traffic.
MAX_BODY = 1 << 20
#: Deepest element nesting accepted. Annex A needs about 5 (Response/DeviceList/Item/Info/x);
#: the cap keeps the recursive dict conversion in ``items`` far from Python's stack limit.
MAX_DEPTH = 32


class ManscdpError(ValueError):
    """Body is not usable MANSCDP; message names the cause."""


class BodyRefused(ValueError):
    """The body of a request cannot be taken: ``status`` (415, 400) and ``reason`` answer it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Manscdp:
    """A parsed MANSCDP body; ``element`` holds the whole tree with trimmed text."""

    root: str
    cmd_type: str
    sn: int | None
    device_id: str
    element: ET.Element
    encoding: str

    def text(self, path: str, default: str = "") -> str:
        """Trimmed text of a child path such as ``"Status"`` or ``"Info/PTZType"``.

        ``default`` is returned when the element is missing or empty: devices leave out and
        blank optional fields interchangeably (Hik sends ``<Info></Info>``).
        """
        el = self.element.find(path)
        if el is None:
            return default
        return el.text or default

    def items(self, list_tag: str = "DeviceList") -> list[dict[str, Any]]:
        """The ``<Item>`` children of ``list_tag`` (a tag or path) as dicts, in order.

        A leaf becomes its trimmed text (``""`` when empty, so an empty ``<Info/>`` is
        ``""``, not ``{}``); an element with children becomes a nested dict; a tag repeated
        among siblings becomes a list of those values. Unknown vendor elements are kept
        (Dahua's ``<StreamNum>``); attributes of inner elements are dropped, read them from
        :attr:`element` if needed. A missing list gives ``[]`` (SumNum 0 has no list).
        """
        parent = self.element.find(list_tag)
        if parent is None:
            return []
        return [_to_dict(item) for item in parent if item.tag == "Item"]


def element_to_dict(el: ET.Element) -> dict[str, Any]:
    """An element's children as a dict, by the rules of :meth:`Manscdp.items` (for JSON)."""
    return _to_dict(el)


def _to_dict(el: ET.Element) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for child in el:
        value: Any = _to_dict(child) if len(child) else (child.text or "")
        tag = child.tag
        if tag in out:
            # Values are only str or dict, so a list here always means "repeated tag".
            prev = out[tag]
            if type(prev) is list:
                prev.append(value)
            else:
                out[tag] = [prev, value]
        else:
            out[tag] = value
    return out


# --------------------------------------------------------------------------- decoding


# The encoding named by an XML declaration near the start of the body (XML 1.0 §4.3.3), in
# any quoting and spacing devices use: `encoding="gb2312"`, `encoding = 'GB2312' ?>`.
_DECLARED_ENCODING = re.compile(rb"<\?xml\b[^>]*?\bencoding\s*=\s*[\"']?\s*([A-Za-z0-9._-]{1,40})")
# How far into the body the declaration is looked for: it comes first, after at most a BOM,
# some whitespace or a little garbage (see _repair_and_parse).
_DECLARATION_WINDOW = 256
# GB18030 is a superset of GB2312 and GBK, so it reads all three (and rare name characters
# need it: #1344, #1934).
_GB_FAMILY = frozenset({"GB2312", "GBK", "GB18030"})
_UTF8_BOM = b"\xef\xbb\xbf"


def _declares_gb(body: bytes) -> bool:
    """Whether the XML declaration names GB2312, GBK or GB18030 (any case)."""
    m = _DECLARED_ENCODING.search(body, 0, _DECLARATION_WINDOW)
    return m is not None and m.group(1).decode("ascii").upper() in _GB_FAMILY


def _decode(body: bytes) -> tuple[str, str]:
    # NUL padding shows up after bodies copied out of fixed-size C buffers.
    body = body.rstrip(b"\x00")
    # Declarations can lie (a UTF-8 body declared GB2312), so a GB declaration only decides
    # which strict decoding is tried first. It has to: some GB2312 text is valid UTF-8 by
    # accident ("学院路" is D1A7 D4BA C2B7, which UTF-8 reads as "ѧԺ·"). GB/T 28181-2016
    # §6.10 has signalling in GB2312, so a GB-declared body gets GB18030 first. A UTF-8 BOM
    # outranks any declaration (XML 1.0 Appendix F).
    order = ("utf-8", "gb18030")
    if not body.startswith(_UTF8_BOM) and _declares_gb(body):
        order = ("gb18030", "utf-8")
    for encoding in order:
        try:
            return _without_bom(body.decode(encoding)), encoding
        except UnicodeDecodeError:
            continue
    return _without_bom(body.decode("gb18030", errors="replace")), "gb18030"


def _without_bom(text: str) -> str:
    # A UTF-8 or GB18030 byte order mark decodes to U+FEFF.
    return text[1:] if text[:1] == "\ufeff" else text


def decode_body(body: bytes) -> str:
    """Body bytes as text, by the same rule as :func:`parse`.

    With a GB2312/GBK/GB18030 declaration: strict GB18030, else strict UTF-8; otherwise
    (UTF-8 declared, or nothing): strict UTF-8, else strict GB18030. When neither fits, GB18030
    with undecodable bytes as U+FFFD. A leading BOM and trailing NULs are removed.
    """
    return _decode(bytes(body))[0]


# --------------------------------------------------------------------------- parsing

# A `&` that does not start one of XML's five entities or a character reference (Hik).
_BARE_AMP = re.compile(r"&(?!(?:amp|lt|gt|quot|apos|#[0-9]+|#x[0-9A-Fa-f]+);)")
# A `<` that cannot start markup, e.g. "1<2" in a name.
_STRAY_LT = re.compile(r"<(?![A-Za-z_:/!?])")
_XML_DECL = re.compile(r"<\?xml[^>]*>")
# One-line `<Address>…</Address>`: Hik writes raw `<`/`>` inside (WVP SIPRequestProcessorParent).
# The content may not run into another <Address>, which keeps the scan linear on hostile input.
_ADDRESS_LINE = re.compile(r"(<Address>)((?:(?!</?Address>)[^\n])*)(</Address>)")


def _fromstring(text: str) -> ET.Element:
    # Feeding str makes expat ignore the declared encoding, which is what we want: the
    # charset was already chosen (_decode). forbid_dtd refuses every DOCTYPE, so no
    # entity (billion laughs, external/parameter entities) can ever be declared.
    return DET.fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)


def _escape_address(m: re.Match[str]) -> str:
    inner = m.group(2).replace("<", "&lt;").replace(">", "&gt;")
    return m.group(1) + inner + m.group(3)


def _drop_addresses(text: str) -> str:
    """Remove each ``<Address…>`` up to its ``</Address>``, or to the end of its line if unclosed."""
    out: list[str] = []
    pos = 0
    closes_left = True  # once a search for </Address> fails, later ones would too
    while (start := text.find("<Address", pos)) >= 0:
        if text[start + 8 : start + 9] not in (">", " ", "/", "\t", "\r", "\n", ""):
            out.append(text[pos : start + 8])  # <AddressFoo>: another element
            pos = start + 8
            continue
        out.append(text[pos:start])
        if text.startswith("<Address/>", start):
            pos = start + 10
            continue
        end = text.find("</Address>", start) if closes_left else -1
        if end >= 0:
            pos = end + 10
        else:
            closes_left = False
            eol = text.find("\n", start)
            pos = len(text) if eol < 0 else eol
    out.append(text[pos:])
    return "".join(out)


def _repair_and_parse(original: str, first: ET.ParseError) -> ET.Element:
    """Retry after the first parse failed, applying fixes from cheapest to most lossy."""
    # Leading garbage or whitespace before the declaration is fatal to expat.
    start = original.find("<?xml")
    if start < 0:
        start = original.find("<")
        if start < 0:
            raise ManscdpError("body is not XML (no '<' found)")
    text = original[start:]
    # The declaration only matters for its charset, which _decode has used; dropping it
    # also disposes of malformed ones.
    m = _XML_DECL.match(text)
    if m:
        text = text[m.end() :]
    # Junk after the root element ("junk after document element").
    text = text[: text.rfind(">") + 1]
    text = _BARE_AMP.sub("&amp;", text)
    text = _STRAY_LT.sub("&lt;", text)

    def attempts() -> Iterator[str]:
        yield text
        yield _ADDRESS_LINE.sub(_escape_address, text)  # keep the address if possible
        yield _drop_addresses(text)  # last resort: lose the address, as WVP does

    failed = [original]
    for attempt in attempts():
        if attempt in failed:  # a fix that changed nothing would fail the same (costly) way
            continue
        try:
            return _fromstring(attempt)
        except ET.ParseError:
            failed.append(attempt)
    raise ManscdpError(f"not well-formed XML, even after repair: {first}")


def _trim(root: ET.Element) -> None:
    # Strip text once here so every reader sees "Catalog", not "Catalog " (STD examples
    # themselves contain `Catalog </CmdType>`); tails are only layout whitespace.
    stack = [(root, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        el, depth = pop()
        t = el.text
        if t is not None:
            el.text = t.strip() or None
        el.tail = None
        if len(el):
            if depth >= MAX_DEPTH:
                raise ManscdpError(f"elements nested deeper than {MAX_DEPTH} levels")
            for child in el:
                push((child, depth + 1))


def parse(body: bytes) -> Manscdp:
    """Parse a MANSCDP body, repairing known device breakage; raise ManscdpError if unusable."""
    if len(body) > MAX_BODY:
        raise ManscdpError(f"body is {len(body)} bytes; the limit is {MAX_BODY}")
    text, encoding = _decode(bytes(body))
    if not text or text.isspace():
        raise ManscdpError("empty body")
    try:
        try:
            root = _fromstring(text)
        except ET.ParseError as exc:
            root = _repair_and_parse(text, exc)
    except DefusedXmlException as exc:
        raise ManscdpError(
            f"DTD/entity declarations are not allowed in MANSCDP ({type(exc).__name__})"
        ) from None
    _trim(root)
    tag = root.tag
    if tag not in ROOTS:
        shown = tag if isinstance(tag, str) and len(tag) <= 64 else f"{str(tag)[:64]}..."
        raise ManscdpError(
            f"unknown root element <{shown}>; expected Notify, Query, Control or Response"
        )
    cmd = root.find("CmdType")
    cmd_type = cmd.text if cmd is not None else None
    if not cmd_type:
        raise ManscdpError(f"<{tag}> has no CmdType")
    sn: int | None = None
    sn_el = root.find("SN")
    if sn_el is not None and sn_el.text and sn_el.text.isascii() and sn_el.text.isdigit():
        try:
            sn = int(sn_el.text)
        except ValueError:  # more digits than int() will convert
            sn = None
    dev = root.find("DeviceID")
    device_id = (dev.text or "") if dev is not None else ""
    return Manscdp(tag, cmd_type, sn, device_id, root, encoding)


def parse_request(content_type: str, body: bytes) -> Manscdp:
    """The MANSCDP body of a MESSAGE, SUBSCRIBE or NOTIFY (A.1: ``Application/MANSCDP+xml``, any
    case, as ``SipMessage.content_type`` gives it); BodyRefused with the SIP answer if not."""
    if content_type != "application/manscdp+xml":
        raise BodyRefused(415, "Unsupported Media Type: expected Application/MANSCDP+xml")
    try:
        return parse(body)
    except ManscdpError as exc:
        text = f"Bad Request: {str(exc)[:100]}".replace("\r", " ").replace("\n", " ")
        raise BodyRefused(400, text) from None


# --------------------------------------------------------------------------- building


@dataclass(slots=True, frozen=True)
class Node:
    """A field value that carries attributes, e.g. ``<DeviceList Num="2">``.

    ``children`` is what any other field value may be: a scalar (the element's text), a
    sequence of ``(tag, value)`` pairs or a mapping (nested elements)::

        ("DeviceList", Node({"Num": 2}, [("Item", item1), ("Item", item2)]))
    """

    attrs: Mapping[str, Any]
    children: Any = ()


_CODECS = {"GB2312": "gb18030", "GBK": "gb18030", "GB18030": "gb18030", "UTF-8": "utf-8"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_INVALID_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_valid_names: set[str] = set()


def _check_name(name: str) -> str:
    if name not in _valid_names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"invalid XML element or attribute name {name!r}")
        _valid_names.add(name)
    return name


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        s = value
    elif isinstance(value, bool):
        # Standard flags are spelled differently per field (1/0, ON/OFF, OK/ERROR).
        raise TypeError("write booleans explicitly, e.g. 1/0 or ON/OFF")
    elif isinstance(value, (int, float)):
        return str(value)
    elif isinstance(value, datetime):
        return format_time(value)
    else:
        raise TypeError(f"cannot write a {type(value).__name__} as MANSCDP text")
    if _INVALID_CHARS.search(s):
        # Characters XML 1.0 cannot carry (garbled names relayed from devices) are dropped
        # rather than failing a whole catalog.
        s = _INVALID_CHARS.sub("", s)
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _emit(out: list[str], tag: str, value: Any) -> None:
    if value is None:
        return  # absent optional field
    _check_name(tag)
    attrs = ""
    if isinstance(value, Node):
        attrs = "".join(
            f' {_check_name(k)}="{_scalar(v).replace(chr(34), "&quot;")}"'
            for k, v in value.attrs.items()
        )
        value = value.children
    if isinstance(value, Mapping):
        value = value.items()
    elif not isinstance(value, (list, tuple)):
        out.append(f"<{tag}{attrs}>{_scalar(value)}</{tag}>\r\n")
        return
    out.append(f"<{tag}{attrs}>\r\n")
    for pair in value:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"children of <{tag}> must be (tag, value) pairs, got {pair!r}")
        _emit(out, pair[0], pair[1])
    out.append(f"</{tag}>\r\n")


def build(
    root: str,
    cmd_type: str,
    sn: int,
    device_id: str,
    fields: Sequence[tuple[str, Any]] = (),
    *,
    encoding: str = "GB2312",
) -> bytes:
    """Write a MANSCDP body: declaration, root, CmdType, SN, DeviceID, then ``fields``.

    ``fields`` is an ordered sequence of ``(tag, value)`` pairs so tags may repeat. A value
    is str/int/float/datetime (text, escaped; datetimes via :func:`format_time`), None
    (element left out), a sequence of pairs or a mapping (nested elements), or a
    :class:`Node` (attributes plus any of those). ``encoding`` is declared as given;
    GB2312/GBK/GB18030 bodies are encoded with GB18030 so rare characters survive (#1344).
    Lines end in CRLF, one element a line, no indentation, as WVP writes them.
    """
    if root not in ROOTS:
        raise ValueError(f"unknown root {root!r}; expected one of {sorted(ROOTS)}")
    codec = _CODECS.get(encoding.upper())
    if codec is None:
        raise ValueError(f"unsupported encoding {encoding!r}; use GB2312, GBK, GB18030 or UTF-8")
    if isinstance(sn, bool) or not isinstance(sn, int):
        raise TypeError("SN must be an int")
    out = [
        f'<?xml version="1.0" encoding="{encoding}"?>\r\n<{root}>\r\n',
        f"<CmdType>{_scalar(cmd_type)}</CmdType>\r\n<SN>{sn}</SN>\r\n",
        f"<DeviceID>{_scalar(device_id)}</DeviceID>\r\n",
    ]
    for pair in fields:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"fields must be (tag, value) pairs, got {pair!r}")
        _emit(out, pair[0], pair[1])
    out.append(f"</{root}>\r\n")
    return "".join(out).encode(codec)


# --------------------------------------------------------------------------- field values

# WVP DateUtil accepts unpadded parts, a space for T, milliseconds and a zone.
_TIME = re.compile(
    r"\s*(\d{4})-(\d{1,2})-(\d{1,2})(?:[Tt]|\s+)(\d{1,2}):(\d{1,2}):(\d{1,2})"
    r"(?:[.,](\d{1,9}))?\s*(?:([Zz])|([+-])(\d{2}):?(\d{2})?)?\s*",
    re.ASCII,
)


def parse_time(s: str) -> datetime | None:
    """A MANSCDP time as an aware datetime; zoneless times are Beijing (UTC+8). None if bad."""
    if not isinstance(s, str):
        return None
    m = _TIME.fullmatch(s)
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, z, sign, zh, zm = m.groups()
    if z:
        tz = UTC
    elif sign:
        offset = timedelta(hours=int(zh), minutes=int(zm or 0))
        if offset >= timedelta(hours=24):
            return None
        tz = timezone(-offset if sign == "-" else offset)
    else:
        tz = BEIJING
    micro = int(frac[:6].ljust(6, "0")) if frac else 0
    try:
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tz
        )
    except ValueError:  # month 13, hour 25, Feb 30...
        return None


def format_time(dt: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` in Beijing time; a naive ``dt`` is taken as Beijing already."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(BEIJING)
    return dt.strftime("%Y-%m-%dT%H:%M:%S")


_ON = frozenset({"ON", "ONLINE", "OK", "1"})
_OFF = frozenset({"OFF", "OFFLINE", "0"})


def parse_status(s: str | None) -> bool | None:
    """ON/ONLINE/OK/1 → True, OFF/OFFLINE/0 → False (any case, trimmed), else None.

    Older Hik firmware writes ONLINE/OFFLINE where the standard says ON/OFF (§9 quirks).
    ERROR is deliberately None: in a keepalive it reports faulty parts, not an offline device.
    """
    if not isinstance(s, str):
        return None
    v = s.strip().upper()
    if v in _ON:
        return True
    if v in _OFF:
        return False
    return None


def parse_parental(s: str | int | None) -> int:
    """Catalog ``Parental`` as 0/1: any non-zero number (old Hik firmware sends 65535) is 1."""
    if isinstance(s, int):
        return 1 if s else 0
    if not isinstance(s, str):
        return 0
    v = s.strip().lstrip("+-")
    if not (v.isascii() and v.isdigit()):
        return 0
    return 1 if v.strip("0") else 0
