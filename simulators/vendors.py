"""Vendor personalities: how a Hikvision or Dahua device shapes its SIP and MANSCDP (PROTOCOL.md §9).

A ``Personality`` decides the details a platform must tolerate, nothing about behaviour:

=========  ==========================================================================
generic    what the rest of the project writes: ``sip:<id>@<domain>`` URIs, CRLF bodies
           from ``manscdp.build`` with ``FleetConfig.encoding``, catalog parts of
           ``catalog_items_per_message`` items, User-Agent ``gb28181-sim``; a live-video
           answer echoes the offered ``y=`` as written; RecordInfo answers of 4 files a part.
hikvision  SRS-CAP: User-Agent ``IP Camera`` (IPC) / ``Embedded Net DVR/NVR/DVS`` (NVR);
           ``<domain>.spvmn.cn`` hosts; LF-only bodies declared ``GB2312`` (NVR:
           ``gb2312``), keepalive declared ``UTF-8`` with an empty ``<Info>\\n</Info>``;
           2 catalog items per part; an NVR's Catalog Response goes From = To = the NVR
           ID; space-padded Content-Length (``Content-Length:   175``); a live-video answer
           echoes ``y=`` zero-padded to 10 digits (``630886`` → ``0000630886``);
           RecordInfo answers of 2 files a part.
dahua      DH-CAP: User-Agent ``SIP UAS V3.0.0.<build>``; From/To hosts are the device's
           and the server's ``IP:port``; REGISTER carries ``Route: <sip:<own ID>@<server
           IP:port>;lr>``; bodies ``<?xml version="1.0" encoding="GB2312" ?>`` indented by
           four spaces per level, LF line ends (the captured keepalive's Content-Length 180
           is exactly that); keepalive without ``<Info>``; the whole catalog in one
           message (split only where a UDP datagram would overflow) with Owner 0 and
           ``<StreamNum>``; ``Alarmstatus Num=``; padded
           Content-Length; an INVITE first gets ``101 Dialog Establishement`` with the
           To tag of the dialog to come, then the 200; a RecordInfo answer in one
           message, and no files for a query without ``<Type>``. Headers are written in
           alphabetical order with Via last: this
           is a parser stress requested for the simulator, not something DH-CAP shows.
=========  ==========================================================================

``malformed`` (any vendor) sends the bare ``&`` and raw ``<`` of ``catalog.py`` names and
addresses unescaped, as broken firmware does. Content-Length padding cannot be expressed
with ``SipMessage.serialize`` (it recomputes the header), so it is done on the bytes by
:meth:`Personality.outgoing`, which the fleet installs as its ``SipEndpoint`` outgoing hook.
"""

from __future__ import annotations

import os
import re
from typing import Any

from gb28181 import manscdp
from gb28181.sip.message import SipMessage

__all__ = ["VENDORS", "Personality", "pad_content_length", "personality"]

VENDORS = ("generic", "hikvision", "dahua")

_CL = b"\r\nContent-Length: "
# FleetConfig's identity defaults: while a config keeps them, a brand shows its own.
_DEFAULTS = {"manufacturer": "Simulator", "model": "SIM-IPC"}


def pad_content_length(data: bytes) -> bytes:
    """Write a non-zero Content-Length right-aligned in 5 columns, as eXosip-based firmware does.

    ``Content-Length: 175`` becomes ``Content-Length:   175``. Content-Length is the last
    header of everything ``SipMessage.serialize`` writes, so its value runs to the blank line.
    """
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return data
    pos = data.rfind(_CL, 0, head_end)
    if pos < 0:
        return data
    start = pos + len(_CL)
    value = data[start:head_end]
    if not value.isdigit() or value == b"0":
        return data
    return data[:start] + value.rjust(5) + data[head_end:]


def _unescape_malformed(body: bytes) -> bytes:
    # Only names and addresses can hold & or < (catalog.py), and only when malformed; every
    # other value is digits or plain text. ASCII is never a GB18030 trail byte, so this is
    # safe on encoded bytes.
    return body.replace(b"&amp;", b"&").replace(b"&lt;", b"<")


def _indent(body: bytes, unit: bytes = b"    ") -> bytes:
    """Re-indent a ``manscdp.build`` body (one element a line) by nesting depth, LF line ends."""
    out: list[bytes] = []
    depth = 0
    for line in body.split(b"\r\n"):
        if not line:
            continue
        if line.startswith(b"</"):
            depth -= 1
            out.append(unit * depth + line)
        elif line.startswith(b"<?"):
            out.append(line)
        else:
            out.append(unit * depth + line)
            # An element opened on this line and not closed on it holds children.
            if b"</" not in line and not line.endswith(b"/>"):
                depth += 1
    return b"\n".join(out) + b"\n"


class Personality:
    """The generic device; subclasses override what their firmware does differently."""

    name = "generic"
    #: Catalog items per Response MESSAGE; None: the config's value, 0: all in one message.
    catalog_items: int | None = None
    register_route = False
    owner = "Owner"
    channel_port = 5060
    stream_num: int | None = None
    #: RecordInfo items per Response MESSAGE (Annex N); 0: all that fit one datagram.
    record_items = 4
    #: Answer a RecordInfo query without ``<Type>`` with no files (Dahua NVRs need Type).
    record_type_required = False
    #: Attribute name of DeviceStatus's alarm list count (A.2.6 writes ``num``; Dahua ``Num``).
    alarm_num_attr = "num"
    #: Identity as (IPC, NVR) pairs; a brand's defaults apply while the config keeps its own.
    user_agents = ("gb28181-sim", "gb28181-sim")
    brand: str | None = None
    models: tuple[str, str] | None = None
    camera_model: str | None = None
    pads_content_length = False
    #: A provisional (status, reason) sent with the dialog's To tag before the 200 to an INVITE.
    invite_provisional: tuple[int, str] | None = None
    #: Answer a DeviceConfig addressed to a channel ID with Result ERROR (WVP: Dahua needs the
    #: device ID there).
    config_needs_device_id = False
    #: Report a camera's PTZ position (``<PTZPosition>``) in a DeviceStatus about it: a
    #: simulator extension, the 2016 schema has none.
    ptz_position = True
    #: Voice broadcast (simulators/broadcast.py, §9.12.1): the audio INVITE's transport in the
    #: device's terms (udp, tcp-active: it connects, tcp-passive: it listens) and format (pcma:
    #: PT 8 as §9.12.3.2's example, ps: PT 96), unless the config says; and whether it opens its
    #: TCP connection on the 200, before its ACK.
    broadcast_transport = "udp"
    broadcast_format = "pcma"
    broadcast_connect_before_ack = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.nvr: bool = cfg.nvr

    # -- identity -----------------------------------------------------------------------------
    @property
    def user_agent(self) -> str:
        return self.user_agents[self.nvr]

    @property
    def manufacturer(self) -> str:
        if self.brand and self.cfg.manufacturer == _DEFAULTS["manufacturer"]:
            return self.brand
        return self.cfg.manufacturer

    @property
    def model(self) -> str:
        if self.models and self.cfg.model == _DEFAULTS["model"]:
            return self.models[self.nvr]
        return self.cfg.model

    def channel_model(self) -> str:
        return self.camera_model or self.cfg.model

    def items_per_message(self) -> int:
        per = self.cfg.catalog_items_per_message if self.catalog_items is None else self.catalog_items
        return max(0, per)

    # -- URIs -----------------------------------------------------------------------------------
    def server_uri(self) -> str:
        """Request-URI and To of the device's requests to the platform."""
        return f"sip:{self.cfg.server_id}@{self.cfg.domain}"

    def own_uri(self, device_id: str, local: tuple[str, int]) -> str:
        """From (and REGISTER To) of the device's requests."""
        return f"sip:{device_id}@{self.cfg.domain}"

    def dialog_uri(self, device_id: str, local: tuple[str, int], addressed: str) -> str:
        """From URI of our NOTIFYs: a branded device writes its own form, generic devices keep
        the URI the SUBSCRIBE was addressed to."""
        return self.own_uri(device_id, local) if self.brand else addressed

    def catalog_to_uri(self, device_id: str) -> str | None:
        """Request-URI/To of a Catalog Response when it differs from ``server_uri``."""
        return None

    def call_id(self, local_host: str) -> str:
        return os.urandom(12).hex()

    def answer_ssrc(self, offered: str) -> str:
        """The ``y=`` of a live-video answer to an offer with ``y=<offered>`` (Annex F: echo it)."""
        return offered

    # -- bodies ---------------------------------------------------------------------------------
    def body(self, root: str, cmd_type: str, sn: int, device_id: str,
             fields: list[tuple[str, Any]]) -> bytes:
        body = manscdp.build(root, cmd_type, sn, device_id, fields, encoding=self.cfg.encoding)
        return self._finish_body(body)

    def _finish_body(self, body: bytes) -> bytes:
        return _unescape_malformed(body) if self.cfg.malformed else body

    def keepalive_fields(self) -> list[tuple[str, Any]]:
        return [("Status", "OK")]

    def keepalive_body(self, sn: int, device_id: str) -> bytes:
        return self.body("Notify", "Keepalive", sn, device_id, self.keepalive_fields())

    # -- headers --------------------------------------------------------------------------------
    def shape(self, msg: SipMessage) -> SipMessage:
        """Add the User-Agent and put the headers in this vendor's order."""
        msg.set("User-Agent", self.user_agent)
        return msg

    def outgoing(self, data: bytes) -> bytes:
        """Byte-level quirks of the whole datagram; eXosip-based firmware pads Content-Length."""
        return pad_content_length(data) if self.pads_content_length else data


def _reorder(msg: SipMessage, order: tuple[str, ...]) -> None:
    h = msg.headers
    first = {k: h[k] for k in order if k in h}
    rest = {k: v for k, v in h.items() if k not in first}
    msg.headers = first | rest


class Hikvision(Personality):
    name = "hikvision"
    catalog_items = 2  # SRS-CAP: "SumNum 8, DeviceList Num=2"
    record_items = 2  # as its catalogs; an assumption, no RecordInfo capture at hand
    channel_port = 8000
    _ORDER = ("via", "from", "to", "call-id", "cseq", "contact", "content-type", "max-forwards",
              "user-agent", "expires", "event", "subscription-state")

    user_agents = ("IP Camera", "Embedded Net DVR/NVR/DVS")
    brand = "Hikvision"
    models = ("DS-2CD3T46WDV3-I3", "DS-7932N-R4")
    camera_model = "IP Camera"
    pads_content_length = True
    broadcast_format = "ps"  # the simulator's choice, so that the PS path has a vendor

    def _host(self) -> str:
        return f"{self.cfg.domain}.spvmn.cn"

    def server_uri(self) -> str:
        return f"sip:{self.cfg.server_id}@{self._host()}"

    def own_uri(self, device_id: str, local: tuple[str, int]) -> str:
        return f"sip:{device_id}@{self._host()}"

    def catalog_to_uri(self, device_id: str) -> str | None:
        # SRS-CAP: a Hik NVR addresses its Catalog Response to itself (From = To = NVR ID).
        return f"sip:{device_id}@{self._host()}" if self.nvr else None

    def call_id(self, local_host: str) -> str:
        return str(int.from_bytes(os.urandom(4), "big"))

    def answer_ssrc(self, offered: str) -> str:
        # SRS-CAP: a Hik IPC answered y=0000630886 to an offered 630886.
        return offered.zfill(10)

    def body(self, root: str, cmd_type: str, sn: int, device_id: str,
             fields: list[tuple[str, Any]], *, encoding: str | None = None) -> bytes:
        enc = encoding or ("gb2312" if self.nvr else "GB2312")
        body = manscdp.build(root, cmd_type, sn, device_id, fields, encoding=enc)
        return self._finish_body(body.replace(b"\r\n", b"\n"))

    def keepalive_body(self, sn: int, device_id: str) -> bytes:
        # SRS-CAP: the IPC keepalive says UTF-8 and carries an empty <Info>, LF-only.
        return self.body("Notify", "Keepalive", sn, device_id,
                         [("Status", "OK"), ("Info", [])], encoding="UTF-8")

    def shape(self, msg: SipMessage) -> SipMessage:
        super().shape(msg)
        _reorder(msg, self._ORDER)
        return msg


class Dahua(Personality):
    name = "dahua"
    catalog_items = 0  # DH-CAP: everything in one message
    record_items = 0  # as its catalogs: everything that fits one message
    record_type_required = True  # WVP: Dahua NVRs answer RecordInfo only with <Type>all</Type>
    register_route = True
    owner = "0"
    channel_port = 37777
    stream_num = 2
    alarm_num_attr = "Num"
    _DECL = re.compile(rb'^<\?xml version="1.0" encoding="([^"]*)"\?>')

    user_agents = ("SIP UAS V3.0.0.675168", "SIP UAS V3.0.0.675168")
    brand = "Dahua"
    models = ("DH-IPC-HFW2433M", "DH-NVR5432-4KS2")
    camera_model = "DH-IPC-HFW2433M"
    pads_content_length = True
    invite_provisional = (101, "Dialog Establishement")  # DH-CAP, spelling included
    config_needs_device_id = True  # WVP: Dahua requires the device ID in DeviceConfig
    ptz_position = False  # the simulator's choice: one brand keeps its position to itself
    broadcast_transport = "tcp-active"
    broadcast_connect_before_ack = True  # AKStream #58, WVP: Dahua talk connects on the 200

    def server_uri(self) -> str:
        return f"sip:{self.cfg.server_id}@{self.cfg.server_host}:{self.cfg.server_port}"

    def own_uri(self, device_id: str, local: tuple[str, int]) -> str:
        return f"sip:{device_id}@{local[0]}:{local[1]}"

    def call_id(self, local_host: str) -> str:
        return f"{int.from_bytes(os.urandom(4), 'big')}@{local_host}"

    def body(self, root: str, cmd_type: str, sn: int, device_id: str,
             fields: list[tuple[str, Any]]) -> bytes:
        body = manscdp.build(root, cmd_type, sn, device_id, fields, encoding="GB2312")
        body = self._DECL.sub(rb'<?xml version="1.0" encoding="\1" ?>', body, count=1)
        return self._finish_body(_indent(body))

    def shape(self, msg: SipMessage) -> SipMessage:
        super().shape(msg)
        msg.headers = dict(sorted(msg.headers.items(), key=lambda kv: (kv[0] == "via", kv[0])))
        return msg


_BY_NAME = {"generic": Personality, "hikvision": Hikvision, "dahua": Dahua}


def personality(cfg: Any) -> Personality:
    """The personality ``cfg.vendor`` names; ValueError for an unknown vendor."""
    cls = _BY_NAME.get(cfg.vendor)
    if cls is None:
        raise ValueError(f"unknown vendor {cfg.vendor!r}; expected one of {', '.join(VENDORS)}")
    return cls(cfg)
