"""A fleet of simulated GB/T 28181 devices (IPCs and NVRs) in one asyncio process.

Each ``SimDevice`` behaves like a camera's SIP stack (§9.1, §9.6): it registers with digest
authentication, refreshes before its registration runs out, sends a Keepalive every interval,
treats three unanswered keepalives or a refused one as lost registration and registers again,
and backs off (with jitter) after a refusal or timeout so a fleet never hammers a server in
lock-step. It answers queries with 200 at once and the data in a separate MESSAGE (§9.5):
DeviceInfo, DeviceStatus, Catalog (multi-part, parts sent serially, Annex N), ConfigDownload,
PresetQuery; DeviceControl/DeviceConfig get the Response §9.3.1 asks for. Other CmdTypes get
the 200 and nothing else.

Catalogs come from ``catalog.py`` (hundreds of channels, Annex O groups, channels without
coordinates); how they look on the wire from ``vendors.py`` (generic, Hikvision, Dahua, and
deliberately malformed XML). A platform may SUBSCRIBE to a device's catalog (§9.11, Annex P):
the device keeps the dialog and sends an in-dialog NOTIFY, one at a time, on every channel
change that tests make through ``Fleet.set_channel_status``, ``add_channel``,
``update_channel`` and ``remove_channel``.

Sockets: by default all devices share one ``SipEndpoint`` (one UDP/TCP port) and incoming
requests are dispatched by Request-URI user, which checks that a server keys devices by ID
and not by address. ``per_device_ports`` gives each device its own endpoint instead. Every
byte sent passes through ``Fleet.taps`` (after the vendor's byte-level quirks), which tests
use to see the wire.

Live video (§9.2, Annex F, Annex L): an INVITE whose Request-URI user is one of the fleet's
channel IDs (or an IPC's device ID) gets a ``200`` with an SDP answer and, after the ACK, PS over
RTP by UDP, TCP active or TCP passive, from ``media.py`` (one shared encoded clip, one pacing
task per fleet). ``LiveCall`` is the SIP dialog of such a stream; ``Fleet.streams`` lists their
``SimStream``s with counters, ``Fleet.hangup`` makes a device send BYE. CANCEL before the answer
gets 487, more than ``max_streams`` calls per device 486, an unknown channel 404, an offer the
device cannot serve (or ``media_mode="refuse"``) 488. ``answer_delay`` holds the answer back so
tests can CANCEL; ``media_mode="silent"`` answers and never sends; ``loss``/``reorder`` impair
the packets.

The fleet can be paused (a link outage: nothing sent, nothing answered) and resumed, which the
integration tests use to check offline detection and recovery.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import random
import socket
import statistics
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from gb28181 import manscdp, mansrtsp
from gb28181.ids import parse_id
from gb28181.sdp import MediaDescription, SdpError, SessionDescription, build_sdp, parse_sdp
from gb28181.sip.auth import authorization_header
from gb28181.sip.dialog import Dialog, DialogError
from gb28181.sip.endpoint import SipEndpoint, SipTimeoutError, SipTransportError
from gb28181.sip.message import (
    SipMessage,
    SipParseError,
    SipRequest,
    make_response,
    new_request,
    new_tag,
    parse_uri,
)
from gb28181.sip.transaction import CancelReceived, RequestReceived, ServerTransaction

from .alarms import DeviceAlarms, alarm_summary
from .broadcast import DeviceBroadcasts, broadcast_summary
from .catalog import (
    CHANNEL_STATUSES,
    Channel,
    DeviceCatalog,
    Group,
    IdBlocks,
    catalog_item,
    device_info_fields,
    group_item,
)
from .media import MediaSender, SimStream, check_video_codec, format_line, parse_video_size
from .mobile import DeviceMobility, mobile_summary
from .playback import PlaybackSender
from .ptz import DeviceControls
from .records import RecordIndex, parts_within, record_bodies
from .vendors import Personality, personality

__all__ = ["CatalogSubscription", "Fleet", "FleetConfig", "LiveCall", "MEDIA_MODES", "SimDevice"]

log = logging.getLogger("gb28181.sim")

CONTENT_TYPE = "Application/MANSCDP+xml"
#: Largest Catalog Response body per transport: a UDP datagram carries at most 64 KiB, and
#: the platform refuses messages over 256 KiB (``MAX_MESSAGE_SIZE``) on TCP.
MAX_PART_BYTES = {"udp": 60_000, "tcp": 200_000}
#: Catalog subscription length when the SUBSCRIBE names none (P.2.1.2.1).
DEFAULT_SUBSCRIBE_EXPIRES = 600
SDP_CONTENT_TYPE = "APPLICATION/SDP"
#: ``FleetConfig.media_mode``: "normal" streams; "silent" answers 200 and never sends RTP;
#: "refuse" answers every INVITE 488.
MEDIA_MODES = ("normal", "silent", "refuse")
QUERY_MODES = ("answer", "silent")
#: How long a device waits after its TCP media connection dropped before it sends BYE itself
#: (the platform's own BYE usually comes first).
MEDIA_LOST_GRACE = 1.0


@dataclass(slots=True)
class FleetConfig:
    """Everything a fleet needs; the CLI flags map onto these fields."""

    server_host: str = "127.0.0.1"
    server_port: int = 5060
    server_id: str = "34020000002000000001"
    devices: int = 1
    first_id: str = "34020000001320000001"
    nvr: bool = False
    channels: int = 1
    password: str = "12345678"
    passwords: dict[str, str] = field(default_factory=dict)
    #: Digest usernames of devices whose "SIP user authentication ID" is not their device ID
    #: (Hikvision allows that); the others use their device ID.
    auth_usernames: dict[str, str] = field(default_factory=dict)
    transport: str = "udp"
    bind_host: str = "127.0.0.1"
    bind_port: int = 0
    per_device_ports: bool = False
    expires: int = 3600
    keepalive_interval: float = 60.0
    keepalive_misses: int = 3
    register_rate: float = 500.0
    retry_min: float = 60.0
    retry_max: float = 600.0
    request_timeout: float | None = None
    catalog_items_per_message: int = 2
    manufacturer: str = "Simulator"
    model: str = "SIM-IPC"
    firmware: str = "V1.0.0"
    encoding: str = "GB2312"
    t1: float = 0.5
    #: Wire personality: "generic", "hikvision" or "dahua" (PROTOCOL.md §9, vendors.py).
    vendor: str = "generic"
    #: Send a bare ``&`` in some channel names and a raw ``<`` in some addresses.
    malformed: bool = False
    #: Add a business group (215) and virtual organisations (216) to NVR catalogs (Annex O).
    groups: bool = False
    #: Share of channels without Longitude/Latitude, chosen by a hash of the channel ID.
    missing_location_ratio: float = 0.05
    # -- live video (media.py) -----------------------------------------------------------
    #: "h264" (libx264) or "h265" (libx265, when PyAV's FFmpeg has it).
    video_codec: str = "h264"
    video_size: str = "640x360"
    fps: int = 25
    #: Frames from one keyframe to the next; a new stream starts at the next one.
    gop: int = 50
    bitrate_kbps: int = 1000
    #: Add G.711A audio (a 1 kHz tone, 20 ms frames) in PS packets of its own.
    audio: bool = False
    #: "normal", "silent" (200, then no RTP) or "refuse" (488); see ``MEDIA_MODES``.
    media_mode: str = "normal"
    #: Probability that an RTP packet is dropped / swapped with the next one (seeded per stream).
    loss: float = 0.0
    reorder: float = 0.0
    #: Live calls one device serves at once; one more gets 486 Busy Here (Annex F note 5).
    max_streams: int = 8
    #: Copies of the clip with keyframes spread over the GOP, so a new stream starts within
    #: gop / start_variants frames (like a camera that sends an IDR on INVITE). 1: wait a GOP.
    start_variants: int = 5
    #: Seconds a device takes to answer an INVITE (after Dahua's 101), so tests can CANCEL.
    answer_delay: float = 0.0
    #: Answer INVITEs with an SSRC of the device's own choosing instead of echoing the offered
    #: ``y=`` (Annex F note 4 allows it; NVRs and lower platforms do it).
    own_ssrc: bool = False
    #: "answer" the platform's queries, or accept them with 200 and stay "silent" (a device
    #: overwhelmed after a power cut, or firmware that ignores what it does not know).
    query_mode: str = "answer"
    #: Days of recordings each channel holds (``records.py``; RecordInfo answers); 0: none.
    records_days: int = 0
    #: Mean seconds between a device's alarms (alarms.py; §9.4); 0: none. ``alarm_seed`` makes
    #: what each device raises reproducible.
    alarm_interval: float = 0.0
    alarm_seed: int = 1
    #: Voice broadcast (broadcast.py; §9.12.1): the audio INVITE's transport in the device's terms
    #: (udp, tcp-active: it connects, tcp-passive: it listens) and format (pcma, ps), None: the
    #: vendor's; the Result it answers a notify with; where WAVs of what it heard are written;
    #: seconds of audio after which it hangs up itself (0: never).
    broadcast_transport: str | None = None
    broadcast_format: str | None = None
    broadcast_result: str = "OK"
    broadcast_dir: str | None = None
    broadcast_hangup_after: float = 0.0
    #: Devices that move (mobile.py; §9.11.2): below 1 a share, from 1 a count; 0: none. They
    #: drive a loop drawn from ``mobile_seed``, answer MobilePosition SUBSCRIBEs and, with
    #: ``mobile_interval`` > 0, report by MESSAGE that often while nobody subscribes.
    mobile: float = 0.0
    mobile_seed: int = 1
    mobile_interval: float = 0.0

    @property
    def domain(self) -> str:
        return self.server_id[:10]


def device_ids(first_id: str, count: int, *, nvr: bool = False) -> list[str]:
    """``count`` consecutive IDs from ``first_id``; ``nvr`` sets the type code to 118."""
    gid = parse_id(first_id)
    prefix = gid.value[:10] + ("118" if nvr else gid.value[10:13]) + gid.value[13]
    serial = int(gid.value[14:])
    if serial + count > 1_000_000:
        raise ValueError(f"{count} devices from serial {serial} overflow the 6-digit serial of {first_id}")
    return [f"{prefix}{serial + n:06d}" for n in range(count)]


def id_blocks(cfg: FleetConfig) -> IdBlocks:
    """How ``cfg``'s devices number the IDs they derive (channels, groups, alarm inputs), so
    that no two share one; ValueError naming the limit and the fix if the fleet cannot fit."""
    device_ids(cfg.first_id, cfg.devices, nvr=cfg.nvr)  # the devices' own serials first
    return IdBlocks.plan(int(parse_id(cfg.first_id).value[14:]), cfg.devices,
                         cfg.channels if cfg.nvr else 1, groups=cfg.groups and cfg.nvr)


def device_catalog(cfg: FleetConfig, device_id: str, blocks: IdBlocks) -> DeviceCatalog:
    """The catalog of one of ``cfg``'s devices (``blocks`` from :func:`id_blocks`)."""
    return DeviceCatalog(
        device_id, cfg.channels if cfg.nvr else 1, is_nvr=cfg.nvr, groups=cfg.groups and cfg.nvr,
        missing_location_ratio=cfg.missing_location_ratio, malformed=cfg.malformed, blocks=blocks)


@dataclass(slots=True)
class DeviceStats:
    register_attempts: int = 0
    registrations: int = 0
    register_failures: int = 0
    register_latencies: list[float] = field(default_factory=list)
    keepalives_sent: int = 0
    keepalives_ok: int = 0
    keepalives_failed: int = 0
    queries_answered: int = 0
    #: Live video: new INVITEs received, answered 200, BYEs received and sent.
    invites: int = 0
    invites_accepted: int = 0
    byes_received: int = 0
    byes_sent: int = 0
    #: History: playback/download INVITEs accepted, MANSRTSP controls obeyed, MediaStatus sent.
    playbacks: int = 0
    controls: int = 0
    media_status_sent: int = 0


class DialogIds:
    """Call-ID and tags of a record that holds a ``dialog`` (``sip.dialog.Dialog``)."""

    __slots__ = ()
    dialog: Dialog

    @property
    def call_id(self) -> str:
        return self.dialog.call_id

    @property
    def local_tag(self) -> str:
        return self.dialog.local_tag

    @property
    def remote_tag(self) -> str:
        return self.dialog.remote_tag


@dataclass(slots=True, eq=False)
class CatalogSubscription(DialogIds):
    """A platform's catalog subscription on one device: an RFC 6665 dialog (§9.11, Annex P).

    ``dialog`` is seen from the device: its local tag is the To tag of our 200 and the From tag
    of our NOTIFYs, its remote target the platform's Contact (the Request-URI of our NOTIFYs);
    ``addr`` is where NOTIFYs go.
    """

    dialog: Dialog
    addr: tuple[str, int]
    event: str
    expires: int
    expires_at: float
    query_id: str
    notifies_sent: int = 0
    terminated: bool = False
    #: "Catalog", or "Alarm" for an alarm subscription (alarms.py: §9.11.1).
    kind: str = "Catalog"
    queue: asyncio.Queue = field(default_factory=asyncio.Queue, repr=False)
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def remaining(self) -> int:
        """Seconds left, as ``Subscription-State: active;expires=`` reports them."""
        return max(0, round(self.expires_at - time.monotonic()))


@dataclass(slots=True, eq=False)
class LiveCall(DialogIds):
    """A live-video INVITE dialog on one device (§9.2): the SIP side of a ``SimStream``.

    ``dialog`` is seen from the device (its local tag is the To tag of our answer, its remote
    target the platform's Contact, the Request-URI of our BYE); ``addr`` is where our BYE goes.
    ``state``: "early" (no final answer yet) → "accepted" (200 sent) → "confirmed" (ACKed) →
    "ended".
    """

    device: SimDevice
    channel_id: str
    dialog: Dialog
    addr: tuple[str, int]
    sip_transport: str
    subject: str
    contact: str
    stream: SimStream
    answer: bytes
    invite: RequestReceived | None = None
    state: str = "early"
    ended_by: str = ""
    #: Playback/Download calls (§9.8, §9.9): their own pacing, controls and end of file.
    playback: PlaybackSender | None = None
    kind: str = "Play"


class SimDevice:
    """One simulated device; ``run()`` is its life."""

    def __init__(self, fleet: Fleet, device_id: str, endpoint: SipEndpoint | None) -> None:
        self.fleet = fleet
        self.cfg = fleet.cfg
        self.vendor: Personality = fleet.vendor
        self.device_id = device_id
        self.endpoint = endpoint
        self.password = self.cfg.passwords.get(device_id, self.cfg.password)
        self.auth_username = self.cfg.auth_usernames.get(device_id, device_id)
        self.registered = False
        self.expires = self.cfg.expires
        self.registered_at = 0.0
        self.call_id = self.vendor.call_id(self.ep.advertised_host)
        self.from_tag = new_tag()
        self.cseq = 0
        self.sn = 0
        self.stats = DeviceStats()
        self.last_error = ""
        self.server_date = ""
        self.catalog = device_catalog(self.cfg, device_id, fleet.id_blocks)
        for ch in self.catalog.channels:
            ch.extra["manufacturer"] = self.vendor.manufacturer
        #: Live catalog subscriptions by Call-ID.
        self.subscriptions: dict[str, CatalogSubscription] = {}
        #: Live-video calls by Call-ID.
        self.calls: dict[str, LiveCall] = {}
        #: PTZ heads, record/guard flags and command counts that DeviceControl changes (ptz.py).
        self.controls = DeviceControls(device_id, self.catalog,
                                       config_needs_device_id=self.vendor.config_needs_device_id)
        #: Alarms it raises, their Responses, its alarm subscriptions (alarms.py).
        self.alarms = DeviceAlarms(self)
        #: Voice broadcasts it received, decoded (broadcast.py).
        self.broadcasts = DeviceBroadcasts(self)
        #: Its loop and position reports when it moves (mobile.py), else None.
        self.mobility = DeviceMobility.of(self)

    @property
    def channels(self) -> list[Channel]:
        """The device's cameras (group items excluded), in catalog order."""
        return self.catalog.channels

    @property
    def ep(self) -> SipEndpoint:
        ep = self.endpoint or self.fleet.shared
        assert ep is not None
        return ep

    @property
    def server_addr(self) -> tuple[str, int]:
        return (self.cfg.server_host, self.cfg.server_port)

    @property
    def local(self) -> tuple[str, int]:
        return (self.ep.advertised_host, self.ep.port)

    def _from_uri(self) -> str:
        return self.vendor.own_uri(self.device_id, self.local)

    def _contact(self) -> str:
        return f"sip:{self.device_id}@{self.ep.advertised_host}:{self.ep.port}"

    # -- registration ----------------------------------------------------------------------
    def _register_request(self, authorization: str | None, expires: int | None = None) -> SipRequest:
        cfg = self.cfg
        self.cseq += 1
        headers = {"expires": str(cfg.expires if expires is None else expires)}
        if authorization:
            headers["authorization"] = authorization
        if self.vendor.register_route:
            # DH-CAP: Dahua routes its REGISTER through a Route naming itself at the server.
            headers["route"] = f"<sip:{self.device_id}@{cfg.server_host}:{cfg.server_port};lr>"
        request = new_request(
            "REGISTER", self.vendor.server_uri(), via=self.ep.via(cfg.transport),
            from_uri=self._from_uri(), from_tag=self.from_tag, to_uri=self._from_uri(),
            call_id=self.call_id, cseq=self.cseq, contact=self._contact(), headers=headers)
        self.vendor.shape(request)
        return request

    def _authorization(self, challenge: str) -> str:
        # The digest uri is the Request-URI verbatim, whatever host form the vendor uses.
        return authorization_header(challenge, username=self.auth_username, password=self.password,
                                    method="REGISTER", uri=self.vendor.server_uri())

    async def _send(self, request: SipRequest):
        return await self.ep.request(request, self.server_addr, self.cfg.transport,
                                     timeout=self.cfg.request_timeout)

    async def register(self) -> bool:
        """One REGISTER flow (challenge, answer); True when the server said 200."""
        st = self.stats
        st.register_attempts += 1
        started = time.perf_counter()
        try:
            resp = await self._send(self._register_request(None))
            for _ in range(2):  # a stale nonce earns one more round
                if resp.status != 401:
                    break
                challenge = resp.get("www-authenticate")
                if not challenge:
                    break
                resp = await self._send(self._register_request(self._authorization(challenge)))
        except (SipTimeoutError, SipTransportError) as exc:
            self.last_error = f"REGISTER: {exc}"
            st.register_failures += 1
            return False
        if resp.status != 200:
            self.last_error = f"REGISTER: {resp.status} {resp.reason}"
            st.register_failures += 1
            return False
        st.registrations += 1
        st.register_latencies.append(time.perf_counter() - started)
        granted = resp.get("expires")
        self.expires = int(granted) if granted and granted.strip().isdigit() else self.cfg.expires
        self.server_date = resp.get("date") or ""
        self.registered = True
        self.registered_at = time.monotonic()
        return True

    async def unregister(self) -> None:
        """REGISTER with Expires: 0 (J.3), answering the challenge like a registration."""
        try:
            resp = await self._send(self._register_request(None, expires=0))
            challenge = resp.get("www-authenticate")
            if resp.status == 401 and challenge:
                await self._send(self._register_request(self._authorization(challenge), expires=0))
        except (SipTimeoutError, SipTransportError):
            pass
        finally:
            self.registered = False

    # -- keepalive --------------------------------------------------------------------------
    def _next_sn(self) -> int:
        self.sn += 1
        return self.sn

    def _message(self, body: bytes, to_id: str | None = None, *, to_uri: str | None = None) -> SipRequest:
        """An out-of-dialog MESSAGE to the platform (or ``to_id``/``to_uri``) in the vendor's shape."""
        cfg = self.cfg
        uri = to_uri or (f"sip:{to_id}@{cfg.domain}" if to_id else self.vendor.server_uri())
        request = new_request(
            "MESSAGE", uri, via=self.ep.via(cfg.transport), from_uri=self._from_uri(), to_uri=uri,
            call_id=self.vendor.call_id(self.ep.advertised_host), cseq=20,  # CSeq 20: §8
            body=body, content_type=CONTENT_TYPE)
        self.vendor.shape(request)
        return request

    async def keepalive(self) -> str:
        """Send one keepalive: 'ok', 'refused' (4xx: register again) or 'lost'."""
        st = self.stats
        st.keepalives_sent += 1
        body = self.vendor.keepalive_body(self._next_sn(), self.device_id)
        timeout = self.cfg.request_timeout or min(self.cfg.keepalive_interval, 32.0)
        try:
            resp = await self.ep.request(self._message(body), self.server_addr, self.cfg.transport,
                                         timeout=timeout)
        except (SipTimeoutError, SipTransportError) as exc:
            st.keepalives_failed += 1
            self.last_error = f"keepalive: {exc}"
            return "lost"
        if resp.status == 200:
            st.keepalives_ok += 1
            return "ok"
        st.keepalives_failed += 1
        self.last_error = f"keepalive: {resp.status} {resp.reason}"
        return "refused"

    # -- life ------------------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.cfg
        fleet = self.fleet
        failures = 0
        while not fleet.stopping:
            await fleet.running.wait()
            if not self.registered:
                if not await self.register():
                    failures += 1
                    # §9.1.1: no sooner than 60 s by default; exponential, jittered.
                    delay = min(cfg.retry_max, cfg.retry_min * 2 ** min(failures - 1, 10))
                    await fleet.sleep(delay * random.uniform(0.8, 1.2))
                    continue
                failures = 0
            await self._registered_life()

    async def _registered_life(self) -> None:
        """Keepalives and refreshes until the registration is lost."""
        cfg = self.cfg
        fleet = self.fleet
        misses = 0
        # Spread the first keepalive over the interval so a fleet does not pulse.
        next_keepalive = time.monotonic() + cfg.keepalive_interval * random.uniform(0.1, 1.0)
        while not fleet.stopping and self.registered:
            refresh_at = self.registered_at + self.expires * 0.85
            now = time.monotonic()
            wake = min(next_keepalive, refresh_at)
            if wake > now:
                await fleet.sleep(wake - now)
                continue
            if not fleet.running.is_set():
                await fleet.running.wait()
                # The outage is over: carry on as a device whose link came back.
                next_keepalive = time.monotonic()
                continue
            if now >= refresh_at:
                if not await self.register():
                    self.registered = False
                    return
                continue
            next_keepalive = now + cfg.keepalive_interval
            result = await self.keepalive()
            if result == "ok":
                misses = 0
            elif result == "refused":
                self.registered = False
                return
            else:
                misses += 1
                if misses >= cfg.keepalive_misses:
                    self.registered = False
                    return

    # -- answering the server ---------------------------------------------------------------
    def _reply(self, ev: RequestReceived, status: int, reason: str = "", *,
               to_tag: str | None = None, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        assert ev.transaction is not None
        resp = make_response(ev.request, status, reason, to_tag=to_tag or new_tag(), body=body,
                             content_type=CONTENT_TYPE if body else None)
        for name, value in (headers or {}).items():
            resp.set(name, value)
        self.vendor.shape(resp)
        self.ep.respond(ev.transaction, resp)

    def on_request(self, ev: RequestReceived) -> None:
        req = ev.request
        if req.method == "ACK":
            self._on_ack(ev)
            return
        if ev.transaction is None:
            return
        if self.broadcasts.owns(req.call_id):  # our audio INVITE's dialog (§9.12.1.2)
            self.broadcasts.on_request(ev)
            return
        if req.method == "SUBSCRIBE":
            self._on_subscribe(ev)
            return
        if req.method == "INVITE":
            self._on_invite(ev)
            return
        if req.method == "BYE":
            self._on_bye(ev)
            return
        if req.method == "INFO":
            self._on_info(ev)
            return
        if req.method != "MESSAGE":
            self._reply(ev, 405)
            return
        try:
            msg = manscdp.parse(req.body)
        except manscdp.ManscdpError as exc:
            self._reply(ev, 400, f"Bad Request: {exc}"[:120])
            return
        self._reply(ev, 200)
        if msg.root == "Response" and msg.cmd_type == "Alarm":
            self.alarms.on_response(msg)  # §9.4.2 step 3
            return
        if msg.root == "Notify" and msg.cmd_type == "Broadcast":  # §9.12.1.2 steps 1-5
            self.broadcasts.on_notify(msg)
            return
        if (msg.root, msg.cmd_type) in _ANSWERED and self.cfg.query_mode == "answer":
            self.fleet.spawn(self._answer(msg))

    def _bodies(self, query: manscdp.Manscdp) -> list[tuple[bytes, str | None]]:
        """The Response bodies for ``query``, each with the To URI when not the platform's."""
        cfg = self.cfg
        v = self.vendor
        sn = query.sn or 0
        cmd = query.cmd_type
        target = query.device_id or self.device_id
        out: list[tuple[bytes, str | None]] = []

        def response(cmd_type: str, device_id: str, fields: list[tuple[str, Any]]) -> None:
            out.append((v.body("Response", cmd_type, sn, device_id, fields), None))

        if cmd == "DeviceInfo":
            fields = device_info_fields(
                name=f"{'NVR' if cfg.nvr else 'IPC'} {self.device_id[-6:]}",
                manufacturer=v.manufacturer, model=v.model, firmware=cfg.firmware,
                channels=len(self.channels))
            if v.name == "dahua":  # DH-CAP adds these
                fields[2:2] = [("DeviceType", "NVR" if cfg.nvr else "IPC")]
                fields += [("MaxCamera", len(self.channels)), ("MaxAlarm", 2), ("Port", 80),
                           ("LoginName", "admin"), ("Password", "******")]
            response("DeviceInfo", self.device_id, fields)
        elif cmd == "DeviceStatus":
            ctl = self.controls
            alarms = [("Item", [("DeviceID", a), ("DutyStatus", ctl.guard_status(a))])
                      for a in self.catalog.alarm_inputs]
            fields = [("Result", "OK"), ("Online", "ONLINE"), ("Status", "OK"),
                      ("DeviceTime", manscdp.format_time(datetime.now(manscdp.BEIJING))),
                      ("Encode", "ON"), ("Record", ctl.record_status(target)),
                      ("Alarmstatus", manscdp.Node({v.alarm_num_attr: len(alarms)}, alarms))]
            if v.ptz_position:
                fields += ctl.position_fields(target)
            response("DeviceStatus", self.device_id, fields)
        elif cmd == "Catalog":
            to_uri = v.catalog_to_uri(self.device_id)
            out += [(body, to_uri) for body in self._catalog_bodies(sn)]
        elif cmd == "ConfigDownload":
            # One Response per requested type, all with the query's SN (A.2.4 / §3.3).
            for kind in (t.strip() for t in query.text("ConfigType", "BasicParam").split("/")):
                if kind == "BasicParam":
                    lon, lat = self.catalog.base
                    param: list[tuple[str, Any]] = [
                        ("Name", f"{'NVR' if cfg.nvr else 'IPC'} {self.device_id[-6:]}"),
                        ("Expiration", self.expires),
                        ("HeartBeatInterval", max(1, round(cfg.keepalive_interval))),
                        ("HeartBeatCount", cfg.keepalive_misses), ("PositionCapability", 0),
                        ("Longitude", round(lon, 6)), ("Latitude", round(lat, 6))]
                    param = self.controls.basic_param(param)
                    response("ConfigDownload", target, [("Result", "OK"), ("BasicParam", param)])
                elif kind == "VideoParamOpt":
                    response("ConfigDownload", target, [("Result", "OK"), ("VideoParamOpt", [
                        ("DownloadSpeed", "1/2/4/8"), ("Resolution", "6/4/2")])])
                elif kind:
                    response("ConfigDownload", target, [("Result", "ERROR")])
        elif cmd == "PresetQuery":
            items = [("Item", [("PresetID", pid), ("PresetName", name)]) for pid, name in self.controls.presets(target)]
            response("PresetQuery", target, [("PresetList", manscdp.Node({"Num": len(items)}, items))])
        elif cmd in ("DeviceControl", "DeviceConfig"):
            # §9.3.1: confirmed commands get a Response with their Result; PTZ, TeleBoot,
            # IFameCmd and DragZoom only the 200 (ptz.py obeys them all).
            result = self.controls.apply(query)
            if result is not None:
                response(cmd, target, [("Result", result)])
        elif cmd == "RecordInfo":
            out += [(body, None) for body in self._record_bodies(query, sn)]
        return out

    def _record_bodies(self, query: manscdp.Manscdp, sn: int) -> list[bytes]:
        """A RecordInfo answer (§9.7, Annex A.2.6.6) from the channel's ``RecordIndex``."""
        v = self.vendor
        channel = self.catalog.get(query.device_id)
        start = manscdp.parse_time(query.text("StartTime"))
        end = manscdp.parse_time(query.text("EndTime"))
        kind = query.text("Type").lower()
        segments = []
        if channel is not None and start and end and (kind or not v.record_type_required):
            index = RecordIndex(channel.channel_id, self.cfg.records_days, time.time())
            segments = index.segments(start, end, kind or "all")
        return record_bodies(
            lambda fields: v.body("Response", "RecordInfo", sn, query.device_id, fields),
            query.device_id, channel.name if channel else "", segments, per=v.record_items,
            budget=MAX_PART_BYTES.get(self.cfg.transport, MAX_PART_BYTES["udp"]),
            address=channel.address if channel else "")

    def _catalog_bodies(self, sn: int) -> list[bytes]:
        """The Catalog Response parts: the vendor's items per part, each part within one datagram."""
        v = self.vendor
        items = self.catalog.items()
        total = len(items)

        def render(chunk: Sequence[Channel | Group]) -> bytes:
            part = [("Item", self._item(x)) for x in chunk]
            fields = [("SumNum", total), ("DeviceList", manscdp.Node({"Num": len(part)}, part))]
            return v.body("Response", "Catalog", sn, self.device_id, fields)

        if not items:  # Annex N: SumNum 0 and no list
            return [v.body("Response", "Catalog", sn, self.device_id, [("SumNum", 0)])]
        # "All in one message" (Dahua) still has to fit a UDP datagram: parts shrink until they do.
        return parts_within(render, items, v.items_per_message(),
                            MAX_PART_BYTES.get(self.cfg.transport, MAX_PART_BYTES["udp"]))

    def _item(self, x: Channel | Group, event: str | None = None) -> manscdp.Node:
        if isinstance(x, Group):
            return group_item(x, event=event)
        v = self.vendor
        return catalog_item(x, model=v.channel_model(), manufacturer=v.manufacturer, owner=v.owner,
                            port=v.channel_port, stream_num=v.stream_num, event=event)

    async def _answer(self, query: manscdp.Manscdp) -> None:
        for body, to_uri in self._bodies(query):  # serially: each waits for the previous 200
            try:
                await self._send(self._message(body, to_uri=to_uri))
            except (SipTimeoutError, SipTransportError):
                return
        self.stats.queries_answered += 1

    # -- catalog subscriptions (§9.11, Annex P) ---------------------------------------------
    def _on_subscribe(self, ev: RequestReceived) -> None:
        req = ev.request
        if req.to_tag:
            self._refresh_subscription(ev)
            return
        event = (req.get("event") or "").strip()
        package = event.partition(";")[0].strip().lower()
        if package not in ("catalog", "presence", "alarm", "mobileposition"):  # J.20 shows a catalog under "presence"
            self._reply(ev, 489, "Bad Event: only Catalog subscriptions", headers={"Allow-Events": "Catalog"})
            return
        sn, query_id = 0, self.device_id
        if req.body.strip():
            try:
                msg = manscdp.parse(req.body)
            except manscdp.ManscdpError as exc:
                self._reply(ev, 400, f"Bad Request: {exc}"[:120])
                return
            if msg.cmd_type == "Alarm" and self.cfg.alarm_interval > 0:  # §9.11.1, J.18 (a device
                # that raises no alarms refuses to be subscribed to them, below)
                self.alarms.on_subscribe(ev, msg, event, _expires_of(req))
                return
            if msg.cmd_type == "MobilePosition" and self.mobility is not None:  # §9.11.2
                self.mobility.on_subscribe(ev, msg, event, _expires_of(req))
                return
            if msg.cmd_type != "Catalog":
                self._reply(ev, 489, f"Bad Event: {msg.cmd_type} subscriptions are not supported")
                return
            sn, query_id = msg.sn or 0, msg.device_id or self.device_id
        expires = _expires_of(req)
        try:
            sub = self._new_subscription(ev, event, expires, query_id)
        except SipParseError as exc:
            self._reply(ev, 400, f"Bad Request: {exc}"[:120])
            return
        body = self.vendor.body("Response", "Catalog", sn, query_id, [("Result", "OK")])
        self._reply(ev, 200, to_tag=sub.local_tag, body=body,
                    headers={"Expires": str(expires), "Contact": f"<{self._contact()}>"})
        if expires == 0:  # a fetch: accepted and over at once
            self._end_subscription(sub)

    def _new_subscription(self, ev: RequestReceived, event: str, expires: int,
                          query_id: str) -> CatalogSubscription:
        req = ev.request
        dialog = Dialog.from_request(req, new_tag())
        dialog.local_uri = self.vendor.dialog_uri(self.device_id, self.local, dialog.local_uri)
        sub = CatalogSubscription(
            dialog=dialog, addr=self._addr_of(dialog, ev.addr), event=event, expires=expires,
            expires_at=time.monotonic() + expires, query_id=query_id)
        self.subscriptions[sub.call_id] = sub
        self._arm_expiry(sub)
        self.fleet.spawn(self._notify_worker(sub))
        return sub

    @staticmethod
    def _addr_of(dialog: Dialog, source: tuple[str, int]) -> tuple[str, int]:
        """Where in-dialog requests go: the next hop's host:port, or the packet source when the
        platform gave no usable Contact."""
        hop = dialog.next_hop()
        try:
            ipaddress.ip_address(hop.host if hop is not None else "")
        except ValueError:
            return source
        assert hop is not None
        return (hop.host, hop.port or 5060)

    def _refresh_subscription(self, ev: RequestReceived) -> None:
        req = ev.request
        sub = self.subscriptions.get(req.call_id)
        if sub is None or not sub.dialog.matches(req):
            self._reply(ev, 481, "Subscription Does Not Exist")
            return
        if sub.dialog.receive_request(req) is not None:
            self._reply(ev, 500, "Server Internal Error: CSeq out of order")
            return
        expires = _expires_of(req)
        if req.get("contact"):
            sub.addr = self._addr_of(sub.dialog, ev.addr)
        self._reply(ev, 200, to_tag=sub.local_tag,
                    headers={"Expires": str(expires), "Contact": f"<{self._contact()}>"})
        if expires == 0:
            self._end_subscription(sub)
            return
        sub.expires = expires
        sub.expires_at = time.monotonic() + expires
        self._arm_expiry(sub)

    def _arm_expiry(self, sub: CatalogSubscription) -> None:
        if sub.timer is not None:
            sub.timer.cancel()
        sub.timer = asyncio.get_running_loop().call_later(sub.expires + 0.05, self._expire, sub)

    def _expire(self, sub: CatalogSubscription) -> None:
        # Not refreshed in time: dropped without a word (RFC 6665 §4.2.2 lets it lapse).
        if self.subscriptions.get(sub.call_id) is sub and time.monotonic() >= sub.expires_at:
            self._forget(sub)
            sub.queue.put_nowait(None)  # stop the worker

    def _forget(self, sub: CatalogSubscription) -> None:
        if self.subscriptions.get(sub.call_id) is sub:
            del self.subscriptions[sub.call_id]
        if sub.timer is not None:
            sub.timer.cancel()
            sub.timer = None

    def _end_subscription(self, sub: CatalogSubscription) -> None:
        """Unsubscribed: forget it now, and send the final NOTIFY after any still queued."""
        self._forget(sub)
        sub.terminated = True
        sub.queue.put_nowait(b"")

    def notify_catalog(self, items: list[manscdp.Node]) -> int:
        """Queue a catalog NOTIFY with ``items`` on every live subscription; returns how many."""
        if not self.subscriptions:
            return 0
        fields = [("SumNum", len(items)),
                  ("DeviceList", manscdp.Node({"Num": len(items)}, [("Item", x) for x in items]))]
        body = self.vendor.body("Notify", "Catalog", self._next_sn(), self.device_id, fields)
        subs = [sub for sub in self.subscriptions.values() if sub.kind == "Catalog"]
        for sub in subs:
            sub.queue.put_nowait(body)
        return len(subs)

    def channel_changed(self, ch: Channel, event: str) -> int:
        """Tell subscribers about ``ch``: ON/OFF/VLOST/DEFECT/DEL carry DeviceID and Event,
        ADD/UPDATE the full item (P.4.1)."""
        if event in ("ADD", "UPDATE"):
            item = self._item(ch, event)
        else:
            item = manscdp.Node({}, [("DeviceID", ch.channel_id), ("Event", event)])
        return self.notify_catalog([item])

    async def _notify_worker(self, sub: CatalogSubscription) -> None:
        # One NOTIFY at a time per subscription: the next waits for the 200 to this one.
        while True:
            body = await sub.queue.get()
            if body is None:
                return
            final = body == b""  # _end_subscription's marker, always queued last
            if not sub.terminated and self.subscriptions.get(sub.call_id) is not sub:
                return  # expired meanwhile
            if not self.fleet.running.is_set():
                if final:
                    return
                continue  # link outage: the change is lost, as on a real network
            if final:
                state = "terminated;reason=timeout"
            else:
                state = f"active;expires={sub.remaining}"
            try:
                resp = await self.ep.request(self._notify_request(sub, state, body), sub.addr,
                                             self.cfg.transport, timeout=self.cfg.request_timeout)
            except (SipTimeoutError, SipTransportError):
                resp = None
            if resp is not None and resp.status < 300:
                sub.notifies_sent += 1
            elif resp is not None and resp.status == 481:
                self._forget(sub)  # the platform no longer knows the dialog
                return
            if final:
                return

    def _notify_request(self, sub: CatalogSubscription, state: str, body: bytes) -> SipRequest:
        request = sub.dialog.request(
            "NOTIFY", via=self.ep.via(self.cfg.transport), contact=self._contact(),
            headers={"event": sub.event, "subscription-state": state}, body=body,
            content_type=CONTENT_TYPE if body else None)
        self.vendor.shape(request)
        return request

    # -- live video (§9.2, Annex F, Annex L) -------------------------------------------------
    def _invite_reply(self, ev: RequestReceived, status: int, reason: str = "", *,
                      call: LiveCall | None = None, body: bytes = b"") -> None:
        assert ev.transaction is not None
        resp = make_response(ev.request, status, reason,
                             to_tag=call.local_tag if call is not None else new_tag(), body=body,
                             content_type=SDP_CONTENT_TYPE if body else None)
        if call is not None and status < 300:
            resp.set("Contact", f"<{call.contact}>")
        self.vendor.shape(resp)
        self.ep.respond(ev.transaction, resp)

    def _invite_channel(self, req: SipRequest) -> Channel | None:
        """The channel an INVITE asks for: its Request-URI user, or an IPC's only camera when
        the platform addresses the device itself."""
        try:
            user = parse_uri(req.uri).user
        except SipParseError:
            return None
        ch = self.catalog.get(user)
        if ch is None and user == self.device_id and not self.cfg.nvr and self.channels:
            ch = self.channels[0]
        return ch

    def _on_invite(self, ev: RequestReceived) -> None:
        req = ev.request
        cfg = self.cfg
        if req.to_tag:  # a re-INVITE (session refresh): the same answer again
            call = self.calls.get(req.call_id)
            if call is None or call.local_tag != req.to_tag or call.state == "ended":
                self._invite_reply(ev, 481, "Call/Transaction Does Not Exist")
            else:
                self._invite_reply(ev, 200, call=call, body=call.answer)
            return
        self.stats.invites += 1
        ch = self._invite_channel(req)
        if ch is None:
            self._invite_reply(ev, 404, "Not Found: no such channel here")
            return
        if cfg.media_mode == "refuse":
            self._invite_reply(ev, 488, "Not Acceptable Here: this device refuses media")
            return
        try:
            if not req.body.strip():
                raise SdpError("the INVITE carries no SDP offer")
            plan = _media_plan(parse_sdp(req.body))
        except SdpError as exc:
            self._invite_reply(ev, 488, f"Not Acceptable Here: {exc}"[:120])
            return
        transport, setup, remote = plan[:3]
        history = _history_plan(parse_sdp(req.body))
        subject = (req.get("subject") or "").strip()
        if subject:
            # Annex M: an INVITE repeating a live stream's sender:seq replaces that stream.
            for old in list(self.calls.values()):
                if old.subject == subject and old.channel_id == ch.channel_id:
                    self._end_call(old, "replaced")
        if len(self.calls) >= cfg.max_streams:
            self._invite_reply(ev, 486, f"Busy Here: {len(self.calls)} streams already")
            return
        fleet = self.fleet
        offered = plan[3]
        if offered is not None and not cfg.own_ssrc:
            y = self.vendor.answer_ssrc(offered)
        else:
            # Our own sequence starts half-way round, away from what a platform offers first.
            y = fleet.new_ssrc(5000 if cfg.own_ssrc else 0)
        try:
            dialog = Dialog.from_request(req, new_tag())
        except DialogError as exc:
            self._invite_reply(ev, 400, f"Bad Request: {exc}"[:120])
            return
        try:
            stream = SimStream(
                channel_id=ch.channel_id, call_id=req.call_id, transport=transport, ssrc=int(y),
                remote=remote, setup=setup, bind_host=fleet.media_bind_host, loss=cfg.loss,
                reorder=cfg.reorder, silent=cfg.media_mode == "silent",
                seed=f"{ch.channel_id}:{y}:{next(fleet._stream_serial)}")
        except OSError as exc:
            self._invite_reply(ev, 500, f"Server Internal Error: no media port: {exc}"[:120])
            return
        media_host = self.ep.advertised_host
        media = MediaDescription(
            port=stream.local_port, proto="TCP/RTP/AVP" if transport == "tcp" else "RTP/AVP",
            formats=[96], rtpmap={96: "PS/90000"}, direction="sendonly", setup=setup,
            connection="new" if transport == "tcp" else None)
        if history is not None:
            media.attributes.append(("filesize", str(_FILE_BYTES_PER_S * (history[2] - history[1]))))
        answer = build_sdp(SessionDescription(
            origin_user=ch.channel_id, origin_addr=media_host,
            session_name=history[0] if history else "Play",
            start=history[1] if history else 0, stop=history[2] if history else 0,
            connection_addr=media_host, media=[media], ssrc=y,
            format=format_line(cfg.video_codec, parse_video_size(cfg.video_size), cfg.fps,
                               cfg.bitrate_kbps, cfg.audio)))
        call = LiveCall(
            device=self, channel_id=ch.channel_id, dialog=dialog,
            addr=self._addr_of(dialog, ev.addr), sip_transport=ev.transport, subject=subject,
            contact=f"sip:{ch.channel_id}@{self.ep.advertised_host}:{self.ep.port}",
            stream=stream, answer=answer, invite=ev)
        if history is not None:
            call.kind = history[0]
            spans = None
            if cfg.records_days > 0:  # play what the index says was recorded, gaps skipped
                index = RecordIndex(ch.channel_id, cfg.records_days, time.time())
                spans = [(seg.start.timestamp(), seg.end.timestamp())
                         for seg in index.segments(history[1], history[2])]
            call.playback = PlaybackSender(fleet.media, start=history[1], end=history[2],
                                           scale=history[3], on_end=partial(self._file_end, call),
                                           spans=spans)
            self.stats.playbacks += 1
        assert ev.transaction is not None
        ev.transaction.context = call  # CANCEL and Timer L find the call through it
        self.calls[call.call_id] = call
        fleet._calls[call.call_id] = call
        stream.on_lost = lambda s: self._media_lost(call)
        if self.vendor.invite_provisional is not None:
            # DH-CAP: Dahua opens the dialog with a tagged 101 before its 200.
            status, reason = self.vendor.invite_provisional
            self._invite_reply(ev, status, reason, call=call)
        if cfg.answer_delay > 0:
            asyncio.get_running_loop().call_later(cfg.answer_delay, self._accept, call)
        else:
            self._accept(call)

    def _accept(self, call: LiveCall) -> None:
        ev = call.invite
        if call.state != "early" or ev is None:
            return  # cancelled or hung up meanwhile
        self._invite_reply(ev, 200, call=call, body=call.answer)
        self.stats.invites_accepted += 1
        call.state = "accepted"
        call.invite = None
        stream = call.stream
        if stream.transport == "tcp" and stream.setup == "passive":
            # We listen: media starts when the platform connects, ACK or not (Annex L).
            self.fleet.spawn(self._media_up(call, listen=True))

    def _on_ack(self, ev: RequestReceived) -> None:
        call = self.calls.get(ev.request.call_id)
        if call is None or call.state != "accepted" or ev.request.to_tag != call.local_tag:
            return
        call.state = "confirmed"
        stream = call.stream
        if stream.transport == "udp" or stream.setup == "active":
            self.fleet.spawn(self._media_up(call, listen=False))

    async def _media_up(self, call: LiveCall, *, listen: bool) -> None:
        """Open the media path (listen for the platform, or start sending/connect); a device
        that cannot gives the call up with a BYE (Annex M: no media, no dialog)."""
        stream = call.stream
        sender = call.playback or self.fleet.media
        try:
            if listen:
                await stream.listen(sender)  # type: ignore[arg-type]
            else:
                await stream.start(sender)  # type: ignore[arg-type]
        except (OSError, TimeoutError) as exc:
            stream.error = f"media to/from {stream.remote[0]}:{stream.remote[1]} failed: {exc}"
            log.info("%s: %s", call.channel_id, stream.error)
            await self.hang_up(call)

    def _media_lost(self, call: LiveCall) -> None:
        async def later() -> None:
            await asyncio.sleep(MEDIA_LOST_GRACE)
            await self.hang_up(call)
        if call.state != "ended":
            self.fleet.spawn(later())

    def _on_bye(self, ev: RequestReceived) -> None:
        req = ev.request
        call = self.calls.get(req.call_id)
        if call is None or not call.dialog.matches(req):
            self._reply(ev, 481, "Call/Transaction Does Not Exist")
            return
        call.dialog.receive_request(req)
        self._reply(ev, 200)
        self.stats.byes_received += 1
        self._end_call(call, "bye")

    def _on_info(self, ev: RequestReceived) -> None:
        """Playback control (Annex B): a MANSRTSP body in an INFO of a playback dialog."""
        req = ev.request
        call = self.calls.get(req.call_id)
        if call is None or not call.dialog.matches(req):
            self._reply(ev, 481, "Call/Transaction Does Not Exist")
            return
        if call.playback is None:
            self._reply(ev, 488, "Not Acceptable Here: a live stream takes no playback control")
            return
        refused = call.dialog.receive_request(req)
        if refused is not None:
            self._reply(ev, refused)
            return
        try:
            control = mansrtsp.parse(req.body)
        except mansrtsp.MansrtspError as exc:
            self._reply(ev, 400, f"Bad Request: {exc}"[:120])
            return
        call.playback.control(control)
        self.stats.controls += 1
        assert ev.transaction is not None
        # Hikvision answers with an RTSP status body (DH-CAP); a plain 200 is as good.
        resp = make_response(req, 200, to_tag=call.local_tag,
                             body=f"RTSP/1.0 200 OK\r\nCSeq: {control.cseq}\r\n\r\n".encode(),
                             content_type=mansrtsp.CONTENT_TYPE)
        self.vendor.shape(resp)
        self.ep.respond(ev.transaction, resp)
        if control.action == "teardown":
            call.stream.close()

    def _file_end(self, call: LiveCall) -> None:
        """The range is sent: MediaStatus 121 inside the dialog (§9.8.2, A.2.5.5); the
        platform then ends the call with a BYE."""
        if call.state == "ended":
            return
        body = self.vendor.body("Notify", "MediaStatus", self._next_sn(), call.channel_id,
                                [("NotifyType", "121")])
        request = call.dialog.request("MESSAGE", via=self.ep.via(call.sip_transport), body=body,
                                      content_type=CONTENT_TYPE)
        self.vendor.shape(request)
        self.stats.media_status_sent += 1

        async def send() -> None:
            try:
                await self.ep.request(request, call.addr, call.sip_transport,
                                      timeout=self.cfg.request_timeout or 32.0)
            except (SipTimeoutError, SipTransportError) as exc:
                self.last_error = f"MediaStatus: {exc}"
        self.fleet.spawn(send())

    def on_cancel(self, call: LiveCall) -> None:
        """The platform CANCELled the INVITE before our final answer: 487 and forget the call."""
        if call.state == "early" and call.invite is not None:
            self._invite_reply(call.invite, 487, "Request Terminated", call=call)
        self._end_call(call, "cancel")

    def _end_call(self, call: LiveCall, why: str) -> None:
        """Stop the stream and forget the dialog (no SIP sent)."""
        if call.state == "ended":
            return
        call.state = "ended"
        call.ended_by = why
        call.invite = None
        call.stream.close()
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]
        if self.fleet._calls.get(call.call_id) is call:
            del self.fleet._calls[call.call_id]

    def hang_up(self, call: LiveCall) -> Coroutine[Any, Any, int | None]:
        """End a call from the device's side: the media stops and the dialog is forgotten at
        once; the returned coroutine sends the BYE (or, while the INVITE is still unanswered,
        nothing: a 480 has gone out instead) and gives the status of its answer, None without."""
        if call.state == "ended":
            return _nothing()
        if call.state == "early":
            if call.invite is not None:
                self._invite_reply(call.invite, 480, "Temporarily Unavailable", call=call)
            self._end_call(call, "hangup")
            return _nothing()
        self._end_call(call, "hangup")
        request = call.dialog.request("BYE", via=self.ep.via(call.sip_transport))
        self.vendor.shape(request)
        return self._send_bye(call, request)

    async def _send_bye(self, call: LiveCall, request: SipRequest) -> int | None:
        self.stats.byes_sent += 1
        try:
            resp = await self.ep.request(request, call.addr, call.sip_transport,
                                         timeout=self.cfg.request_timeout)
        except (SipTimeoutError, SipTransportError) as exc:
            self.last_error = f"BYE: {exc}"
            return None
        return resp.status


async def _nothing() -> None:
    return None


#: Bytes per recorded second announced in a history answer's a=filesize (§9.9.1).
_FILE_BYTES_PER_S = 250_000


def _history_plan(offer: SessionDescription) -> tuple[str, int, int, float] | None:
    """(Playback|Download, start, end, scale) of a history offer (Annex F: ``u=``, ``t=`` in
    Unix seconds, ``a=downloadspeed``), None for live video. SdpError for a bad range."""
    name = offer.session_name.strip().lower()
    if name not in ("playback", "download"):
        return None
    if not 0 < offer.start < offer.stop:
        raise SdpError(f"t={offer.start} {offer.stop} is not a time range")
    scale = 1.0
    video = offer.video
    if name == "download" and video is not None:
        speed = dict(video.attributes).get("downloadspeed") or "1"
        scale = float(speed) if speed.strip().isdigit() and 1 <= int(speed) <= 32 else 1.0
    return ("Playback" if name == "playback" else "Download"), offer.start, offer.stop, scale


def _media_plan(offer: SessionDescription) -> tuple[str, str | None, tuple[str, int], str | None]:
    """What an Annex F offer asks of the device: (transport, the device's TCP role, where to send,
    the offered ``y=`` or None). Raises SdpError for anything a camera here cannot serve."""
    if offer.session_name.strip().lower() not in ("play", "playback", "download", ""):
        raise SdpError(f"s={offer.session_name}: only Play, Playback and Download are simulated")
    _history_plan(offer)  # a bad range is refused with the rest
    video = offer.video
    if video is None:
        raise SdpError("no m=video line")
    if "RTP/AVP" not in video.proto.upper():
        raise SdpError(f"m=video uses {video.proto}, not RTP/AVP or TCP/RTP/AVP")
    if 96 not in video.formats or "PS/" not in video.rtpmap.get(96, "PS/90000").upper():
        raise SdpError("PT 96 PS/90000 is not offered")
    if video.direction in ("sendonly", "inactive"):
        raise SdpError(f"a={video.direction}: the device only sends")
    host = offer.connection_addr
    transport = video.transport
    setup: str | None = None
    if transport == "tcp":
        # a=setup describes the offerer; Annex L's default is the device connecting.
        setup = "passive" if (video.setup or "passive") == "active" else "active"
    needs_address = setup != "passive"
    if needs_address:
        try:
            socket.inet_aton(host)
        except OSError:
            raise SdpError(f"c=IN IP4 {host} is not an IPv4 address") from None
        if host == "0.0.0.0" or not video.port:
            raise SdpError(f"no address to send to (c={host}, m= port {video.port})")
    offered = offer.ssrc.strip() if offer.ssrc else None
    if offered is not None and offer.ssrc_value is None:
        offered = None  # garbage y=: choose our own, as for a missing one
    return transport, setup, (host, video.port), offered


_ANSWERED = frozenset({
    ("Query", "DeviceInfo"), ("Query", "DeviceStatus"), ("Query", "Catalog"),
    ("Query", "ConfigDownload"), ("Query", "PresetQuery"), ("Query", "RecordInfo"),
    ("Control", "DeviceControl"), ("Control", "DeviceConfig"),
})


def _check_media_config(cfg: FleetConfig) -> tuple[int, int]:
    """ValueError naming the first bad live-video field; returns the video size."""
    if cfg.media_mode not in MEDIA_MODES:
        raise ValueError(f"media_mode {cfg.media_mode!r} is not one of {', '.join(MEDIA_MODES)}")
    if cfg.query_mode not in QUERY_MODES:
        raise ValueError(f"query_mode {cfg.query_mode!r} is not one of {', '.join(QUERY_MODES)}")
    for name in ("loss", "reorder"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must be a probability between 0 and 1")
    if not 1 <= cfg.fps <= 120:
        raise ValueError("fps must be 1..120")
    if cfg.gop < 1:
        raise ValueError("gop must be at least 1 frame")
    if cfg.bitrate_kbps < 1:
        raise ValueError("bitrate_kbps must be at least 1")
    if cfg.max_streams < 0:
        raise ValueError("max_streams must not be negative")
    if cfg.answer_delay < 0:
        raise ValueError("answer_delay must not be negative")
    size = parse_video_size(cfg.video_size)
    check_video_codec(cfg.video_codec)
    return size


def _expires_of(req: SipMessage) -> int:
    value = (req.get("expires") or "").strip()
    return int(value) if value.isdigit() else DEFAULT_SUBSCRIBE_EXPIRES


class Fleet:
    """Start, pause, resume and stop a set of ``SimDevice``s; see the module docstring."""

    def __init__(self, cfg: FleetConfig) -> None:
        if not 0.0 <= cfg.missing_location_ratio <= 1.0:
            raise ValueError("missing_location_ratio must be between 0 and 1")
        size = _check_media_config(cfg)
        self.id_blocks = id_blocks(cfg)
        self.cfg = cfg
        self.vendor = personality(cfg)
        self._calls: dict[str, LiveCall] = {}
        self._stream_serial = itertools.count()
        self._ssrc_serial = itertools.count(1)
        #: Called with every datagram/TCP message the fleet sends, exactly as it goes out.
        self.taps: list[Callable[[bytes], Any]] = []
        self.shared: SipEndpoint | None = None
        self.devices: dict[str, SimDevice] = {}
        self._channel_owner: dict[str, SimDevice] = {}
        self.endpoints: list[SipEndpoint] = []
        self.running = asyncio.Event()
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()
        self.started_at = 0.0
        #: The one pacing task that feeds every live stream of the fleet (media.py); during a
        #: link outage (``pause``) its packets are lost like everything else.
        self.media = MediaSender(codec=cfg.video_codec, size=size, fps=cfg.fps, gop=cfg.gop,
                                 bitrate_kbps=cfg.bitrate_kbps, audio=cfg.audio,
                                 running=self.running, spawn=self.spawn,
                                 start_variants=cfg.start_variants)

    def spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def sleep(self, seconds: float) -> None:
        # A plain sleep: stop() cancels the device tasks, which ends any sleep at once.
        if not self.stopping:
            await asyncio.sleep(max(0.0, seconds))

    def _dispatch(self, ev: RequestReceived) -> None:
        req = ev.request
        # In-dialog requests of a live call (ACK, BYE, re-INVITE) go to its device whatever
        # their Request-URI says (WVP ACKs to sip:<o= user>@<source>).
        call = self._calls.get(req.call_id) if req.to_tag else None
        if call is not None:
            device: SimDevice | None = call.device
        else:
            try:
                user = parse_uri(req.uri).user
            except SipParseError:
                user = ""
            device = self.devices.get(user)
            if device is None and (req.method == "INVITE" or req.to_tag):
                # Live video is asked of a channel; a late in-dialog request to one gets its 481.
                device = self._channel_owner.get(user)
        if device is None:
            if ev.transaction is not None:
                ev_ep = self.shared
                assert ev_ep is not None
                ev_ep.respond(ev.transaction, make_response(ev.request, 404, "Not Found: no such device here",
                                                            to_tag=new_tag()))
            return
        if not self.running.is_set():
            return  # link outage: the server's request is lost
        device.on_request(ev)

    def _endpoint(self) -> SipEndpoint:
        cfg = self.cfg
        return SipEndpoint(cfg.bind_host, cfg.bind_port if not cfg.per_device_ports else 0,
                           on_request=self._dispatch, on_cancel=self._on_cancel,
                           on_server_timeout=self._on_server_timeout, udp=cfg.transport == "udp",
                           tcp=cfg.transport == "tcp", t1=cfg.t1, outgoing=self._outgoing)

    def _on_cancel(self, ev: CancelReceived) -> None:
        call = ev.transaction.context
        if isinstance(call, LiveCall):
            call.device.on_cancel(call)
            return
        # An INVITE we never took up (it arrived during an outage): what the endpoint does by
        # default without an on_cancel hook.
        for ep in ([self.shared] if self.shared is not None else self.endpoints):
            if ev.transaction in ep.layer.server.values():
                invite = ev.transaction.request
                if invite is not None:
                    ep.respond(ev.transaction, make_response(invite, 487, to_tag=new_tag()))
                return

    def _on_server_timeout(self, txn: ServerTransaction) -> None:
        # Timer L: our 200 was never ACKed (RFC 3261 13.3.1.4): give the call up with a BYE.
        call = txn.context
        if isinstance(call, LiveCall) and call.state == "accepted":
            self.spawn(call.device.hang_up(call))

    @property
    def media_bind_host(self) -> str:
        """Where device-side media sockets are bound: the SIP bind address."""
        return self.cfg.bind_host

    def new_ssrc(self, base: int = 0) -> str:
        """A ``y=`` of the device's choosing (Annex F: 0 live, domain digits 4-8, a sequence)."""
        return f"0{self.cfg.domain[3:8]}{(base + next(self._ssrc_serial)) % 10000:04d}"

    def _outgoing(self, data: bytes) -> bytes:
        data = self.vendor.outgoing(data)
        for tap in self.taps:
            tap(data)
        return data

    async def start(self) -> None:
        cfg = self.cfg
        ids = device_ids(cfg.first_id, cfg.devices, nvr=cfg.nvr)
        self.started_at = time.monotonic()
        if not cfg.per_device_ports:
            self.shared = self._endpoint()
            await self.shared.start()
        for device_id in ids:
            ep = None
            if cfg.per_device_ports:
                ep = self._endpoint()
                await ep.start()
                self.endpoints.append(ep)
            device = self.devices[device_id] = SimDevice(self, device_id, ep)
            for ch in device.channels:
                self._channel_owner[ch.channel_id] = device
        self.running.set()
        self.spawn(self._ramp())

    async def _ramp(self) -> None:
        # Start devices at register_rate per second: a fleet is a crowd, not a wave.
        interval = 1.0 / self.cfg.register_rate if self.cfg.register_rate > 0 else 0.0
        batch = max(1, int(self.cfg.register_rate / 100)) if interval else len(self.devices)
        for n, device in enumerate(self.devices.values()):
            if self.stopping:
                return
            self.spawn(device.run())
            if self.cfg.alarm_interval > 0:
                self.spawn(device.alarms.run())
            if device.mobility is not None and self.cfg.mobile_interval > 0:
                self.spawn(device.mobility.run())
            if interval and (n + 1) % batch == 0:
                await asyncio.sleep(interval * batch)

    def pause(self) -> None:
        """Cut the link: devices send nothing and ignore the server until ``resume``."""
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    async def stop(self, *, unregister: bool = False) -> None:
        # The devices' lives end first: a device whose keepalive crossed its own unregistration
        # would otherwise be refused and register again, after the server was told it left.
        self.stopping = True
        self.running.set()
        for call in list(self._calls.values()):
            call.device._end_call(call, "stop")
        for device in self.devices.values():
            for sub in list(device.subscriptions.values()):
                device._forget(sub)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if unregister:
            await asyncio.gather(*(d.unregister() for d in self.devices.values() if d.registered))
        if self.shared is not None:
            await self.shared.close()
        for ep in self.endpoints:
            await ep.close()

    # -- catalog changes (tests drive these; subscribers hear of each at once) -----------------
    def channel(self, channel_id: str) -> Channel | None:
        """The channel with this ID on any device of the fleet, or None."""
        device = self._channel_owner.get(channel_id)
        return device.catalog.get(channel_id) if device is not None else None

    def _owner(self, channel_id: str) -> tuple[SimDevice, Channel]:
        device = self._channel_owner.get(channel_id)
        ch = device.catalog.get(channel_id) if device is not None else None
        if device is None or ch is None:
            raise KeyError(f"no channel {channel_id} in this fleet")
        return device, ch

    def set_channel_status(self, channel_id: str, status: str) -> Channel:
        """Set a channel ON/OFF/VLOST/DEFECT and NOTIFY every subscription of its device.

        Later Catalog responses list it with Status ON, or OFF for the three others (A.2.1g
        knows only ON/OFF). Raises KeyError for an unknown channel, ValueError for a bad status.
        """
        value = status.strip().upper()
        if value not in CHANNEL_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(CHANNEL_STATUSES)}")
        device, ch = self._owner(channel_id)
        ch.status = value
        device.channel_changed(ch, value)
        return ch

    def add_channel(self, device_id: str) -> Channel:
        """Add the next camera to ``device_id`` and NOTIFY its subscriptions (Event ADD).

        ValueError when the device has no camera ID left (``IdBlocks``)."""
        device = self.devices.get(device_id)
        if device is None:
            raise KeyError(f"no device {device_id} in this fleet")
        ch = device.catalog.new_channel()
        ch.extra["manufacturer"] = self.vendor.manufacturer
        self._channel_owner[ch.channel_id] = device
        device.channel_changed(ch, "ADD")
        return ch

    def update_channel(self, channel_id: str, **changes: Any) -> Channel:
        """Change fields of a channel (``name="…"``, ``longitude=None``…) and NOTIFY UPDATE."""
        device, ch = self._owner(channel_id)
        for name, value in changes.items():
            if name in ("channel_id", "extra") or not hasattr(ch, name) or name == "online":
                raise AttributeError(f"cannot update {name!r} of a channel")
            setattr(ch, name, value)
        device.channel_changed(ch, "UPDATE")
        return ch

    def remove_channel(self, channel_id: str) -> Channel:
        """Remove a channel from its device and NOTIFY its subscriptions (Event DEL)."""
        device, ch = self._owner(channel_id)
        device.catalog.remove(channel_id)
        del self._channel_owner[channel_id]
        device.channel_changed(ch, "DEL")
        return ch

    # -- live video -------------------------------------------------------------------------
    @property
    def calls(self) -> list[LiveCall]:
        """Every live-video dialog not yet ended, oldest first."""
        return list(self._calls.values())

    @property
    def streams(self) -> list[SimStream]:
        """The streams of the live calls (channel_id, call_id, transport, ssrc, frames_sent,
        packets_sent, bytes_sent, started_at, state, ...), oldest first."""
        return [call.stream for call in self._calls.values()]

    def hangup(self, channel_id: str, call_id: str | None = None) -> asyncio.Task:
        """Make the owning device end its calls on ``channel_id`` (or only ``call_id``): the
        media stops at once, then the device sends BYE. Returns a task (already running, so
        awaiting it is optional) whose result is how many calls were ended once the BYEs are
        answered. KeyError for a channel the fleet does not have."""
        self._owner(channel_id)
        calls = [c for c in self._calls.values()
                 if c.channel_id == channel_id and (call_id is None or c.call_id == call_id)]
        byes = [c.device.hang_up(c) for c in calls]

        async def send() -> int:
            await asyncio.gather(*byes)
            return len(calls)

        return self.spawn(send())

    async def wait_streams(self, count: int, timeout: float, *, sending: bool = True) -> bool:
        """Wait until ``count`` streams exist (and, with ``sending``, have sent a frame)."""
        deadline = time.monotonic() + timeout
        while True:
            ready = [s for s in self.streams if not sending or s.frames_sent > 0]
            if len(ready) >= count:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)

    # -- reporting ------------------------------------------------------------------------
    def registered_count(self) -> int:
        return sum(1 for d in self.devices.values() if d.registered)

    async def wait_registered(self, timeout: float, count: int | None = None) -> bool:
        want = len(self.devices) if count is None else count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.registered_count() >= want:
                return True
            await asyncio.sleep(0.05)
        return self.registered_count() >= want

    def summary(self) -> dict[str, Any]:
        devs = list(self.devices.values())
        lat = sorted(x for d in devs for x in d.stats.register_latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

        errors: dict[str, int] = {}
        for d in devs:
            if d.last_error and not d.registered:
                errors[d.last_error] = errors.get(d.last_error, 0) + 1
        return {
            "devices": len(devs),
            "registered": sum(1 for d in devs if d.registered),
            "never_registered": sum(1 for d in devs if d.stats.registrations == 0),
            "registrations": sum(d.stats.registrations for d in devs),
            "register_failures": sum(d.stats.register_failures for d in devs),
            "keepalives_sent": sum(d.stats.keepalives_sent for d in devs),
            "keepalives_ok": sum(d.stats.keepalives_ok for d in devs),
            "keepalives_failed": sum(d.stats.keepalives_failed for d in devs),
            "queries_answered": sum(d.stats.queries_answered for d in devs),
            **alarm_summary([d.alarms for d in devs]),
            **broadcast_summary([d.broadcasts for d in devs]),
            **mobile_summary([d.mobility for d in devs if d.mobility is not None]),
            "streams": len(self._calls),
            "ptz_commands": sum(d.controls.counts["PTZCmd"] for d in devs),
            "stream_frames_sent": sum(c.stream.frames_sent for c in self._calls.values()),
            "register_latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
                                    "mean": round(statistics.fmean(lat) * 1000, 2) if lat else None},
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
            "elapsed_s": round(time.monotonic() - self.started_at, 2),
        }
