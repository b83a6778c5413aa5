"""A minimal platform to exercise simulated devices: the other end of ``fleet.py`` in tests.

``Probe`` is a real ``SipEndpoint`` that plays the platform without the platform's machinery:
it answers REGISTER with 200 at once (Expires echoed, ``Date`` for time sync, no digest),
answers every MESSAGE and NOTIFY with 200 (after ``answer_delay`` seconds, so tests can see
that a device waits for one 200 before the next part), and records what arrived. It sends
Query/Control MESSAGEs and catalog SUBSCRIBEs (initial, refresh, unsubscribe) to the devices it
has seen register. It checks nothing by itself; tests read ``messages``, ``notifies`` and
``in_flight_max``.

For live video it plays the platform's INVITE side (§9.2, Annex F): ``new_call`` builds an
INVITE with an Annex F offer for UDP, TCP passive (we listen) or TCP active (we connect),
``send_invite`` sends it (provisional responses are kept), ``ack``/``bye``/``cancel`` do the
rest, ``play`` does INVITE + ACK in one go. A device's BYE is answered 200 and recorded in
``byes`` and on its ``ProbeCall``. Receiving the media is the test's business.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gb28181 import manscdp
from gb28181.sdp import MediaDescription, SessionDescription, build_sdp, parse_sdp
from gb28181.sip.dialog import Dialog
from gb28181.sip.endpoint import SipEndpoint
from gb28181.sip.message import (
    SipRequest,
    SipResponse,
    make_response,
    new_request,
    new_tag,
    user_of,
)
from gb28181.sip.transaction import RequestReceived

from .fleet import DialogIds, Fleet, FleetConfig

__all__ = ["Probe", "ProbeCall", "ProbeDialog", "Received", "start_fleet"]

CONTENT_TYPE = "Application/MANSCDP+xml"


@dataclass(slots=True)
class Received:
    """A request the probe got, with its parsed MANSCDP body (None if absent or unparsable)."""

    request: SipRequest
    addr: tuple[str, int]
    at: float
    body: manscdp.Manscdp | None
    error: str = ""
    answered_at: float | None = None


@dataclass(slots=True)
class ProbeDialog(DialogIds):
    """The probe's side of a subscription: the SIP dialog (``sip.dialog.Dialog``) and what
    arrived in it."""

    device_id: str
    event: str
    addr: tuple[str, int]
    dialog: Dialog
    response: SipResponse | None = None
    notifies: list[Received] = field(default_factory=list)

    @property
    def remote_tag(self) -> str:
        return self.dialog.remote_tag

    @remote_tag.setter
    def remote_tag(self, tag: str) -> None:  # tests set a wrong one on purpose
        self.dialog.remote_tag = tag


@dataclass(slots=True)
class ProbeCall:
    """The probe's side of a live-video INVITE dialog. ``transport`` is "udp", "tcp-passive"
    (the probe listens on ``media_port``) or "tcp-active" (the probe connects to the answer).
    ``dialog`` exists from the first response with a To tag."""

    device_id: str
    channel_id: str
    transport: str
    ssrc: str
    invite: SipRequest
    addr: tuple[str, int]
    local_tag: str
    response: SipResponse | None = None
    provisional: list[SipResponse] = field(default_factory=list)
    dialog: Dialog | None = None
    byes: list[Received] = field(default_factory=list)

    @property
    def call_id(self) -> str:
        return self.invite.call_id

    @property
    def remote_tag(self) -> str:
        return self.dialog.remote_tag if self.dialog is not None else ""

    @property
    def answer(self) -> SessionDescription | None:
        """The SDP of the 2xx, parsed, or None."""
        if self.response is None or self.response.status >= 300 or not self.response.body:
            return None
        return parse_sdp(self.response.body)


class Probe:
    """See the module docstring."""

    def __init__(self, server_id: str = "34020000002000000001", host: str = "127.0.0.1", *,
                 transport: str = "udp", answer_delay: float = 0.0, t1: float = 0.5) -> None:
        self.server_id = server_id
        self.domain = server_id[:10]
        self.transport = transport
        self.answer_delay = answer_delay
        self.endpoint = SipEndpoint(host, 0, on_request=self._on_request, udp=transport == "udp",
                                    tcp=transport == "tcp", t1=t1)
        #: Device ID → source address of its last REGISTER.
        self.devices: dict[str, tuple[str, int]] = {}
        self.registers: list[Received] = []
        self.messages: list[Received] = []
        self.notifies: list[Received] = []
        self.dialogs: dict[str, ProbeDialog] = {}
        #: Live-video calls by Call-ID, and every BYE a device sent.
        self.calls: dict[str, ProbeCall] = {}
        self.byes: list[Received] = []
        self._ssrc_seq = itertools.count(1)
        #: Status to answer NOTIFYs with (481 tells the device the dialog is gone).
        self.notify_status = 200
        self._sn = itertools.count(1000)
        self._in_flight = 0
        self.in_flight_max = 0
        self._changed = asyncio.Event()

    @property
    def port(self) -> int:
        return self.endpoint.port

    async def start(self) -> Probe:
        await self.endpoint.start()
        return self

    async def close(self) -> None:
        await self.endpoint.close()

    # -- receiving --------------------------------------------------------------------------
    def _on_request(self, ev: RequestReceived) -> None:
        req = ev.request
        txn = ev.transaction
        if txn is None:
            return
        if req.method == "REGISTER":
            rec = Received(req, ev.addr, time.monotonic(), None)
            self.registers.append(rec)
            self.devices[user_of(req.headers["from"][0])] = ev.addr
            resp = make_response(req, 200, to_tag=new_tag())
            resp.set("Expires", req.get("expires") or "3600")
            resp.set("Date", datetime.now().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3])
            self.endpoint.respond(txn, resp)
            self._wake()
            return
        if req.method == "BYE":
            rec = Received(req, ev.addr, time.monotonic(), None)
            call = self.calls.get(req.call_id)
            known = call is not None and req.to_tag == call.local_tag
            if known:
                assert call is not None
                call.byes.append(rec)
            self.byes.append(rec)
            self.endpoint.respond(txn, make_response(req, 200 if known else 481))
            self._wake()
            return
        if req.method not in ("MESSAGE", "NOTIFY"):
            self.endpoint.respond(txn, make_response(req, 405, to_tag=new_tag()))
            return
        body, error = None, ""
        if req.body.strip():
            try:
                body = manscdp.parse(req.body)
            except manscdp.ManscdpError as exc:
                error = str(exc)
        rec = Received(req, ev.addr, time.monotonic(), body, error)
        status = 200
        if req.method == "MESSAGE":
            self.messages.append(rec)
        else:
            self.notifies.append(rec)
            dialog = self.dialogs.get(req.call_id)
            if dialog is not None:
                dialog.notifies.append(rec)
            status = self.notify_status
        self._in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self._in_flight)
        self._wake()

        def answer() -> None:
            self._in_flight -= 1
            rec.answered_at = time.monotonic()
            self.endpoint.respond(txn, make_response(req, status, to_tag=new_tag()))

        if self.answer_delay > 0:
            asyncio.get_running_loop().call_later(self.answer_delay, answer)
        else:
            answer()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate, timeout: float = 5.0, what: str = "condition") -> Any:
        """Wait until ``predicate()`` is truthy (checked on every arrival); return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))
            except TimeoutError:
                pass

    def responses(self, cmd_type: str, sn: int | None = None) -> list[Received]:
        return [m for m in self.messages if m.body is not None and m.body.root == "Response"
                and m.body.cmd_type == cmd_type and (sn is None or m.body.sn == sn)]

    async def catalog(self, device_id: str, timeout: float = 10.0) -> list[Received]:
        """Send a Catalog query and wait until the parts' Num add up to SumNum."""
        sn = await self.query(device_id, "Catalog")

        def done() -> list[Received] | None:
            parts = self.responses("Catalog", sn)
            if not parts:
                return None
            bodies = [p.body for p in parts if p.body is not None]  # responses() has only parsed ones
            total = int(bodies[0].text("SumNum", "0"))
            got = 0
            for b in bodies:
                device_list = b.element.find("DeviceList")
                got += int(device_list.get("Num") or 0) if device_list is not None else 0
            return parts if got >= total else None

        return await self.wait_for(done, timeout, f"catalog of {device_id}")

    # -- sending ----------------------------------------------------------------------------
    def _device_addr(self, device_id: str) -> tuple[str, int]:
        addr = self.devices.get(device_id)
        if addr is None:
            raise KeyError(f"{device_id} has not registered with the probe")
        return addr

    def _contact(self) -> str:
        return f"sip:{self.server_id}@{self.endpoint.advertised_host}:{self.port}"

    async def query(self, device_id: str, cmd_type: str, fields: Sequence[tuple[str, Any]] = (), *,
                    root: str = "Query", target_id: str | None = None, sn: int | None = None) -> int:
        """Send ``<root><CmdType>…`` to a device (DeviceID = ``target_id`` or the device); return SN."""
        sn = next(self._sn) if sn is None else sn
        body = manscdp.build(root, cmd_type, sn, target_id or device_id, list(fields))
        host, port = self._device_addr(device_id)
        request = new_request(
            "MESSAGE", f"sip:{device_id}@{host}:{port}", via=self.endpoint.via(self.transport),
            from_uri=f"sip:{self.server_id}@{self.domain}", to_uri=f"sip:{device_id}@{self.domain}",
            cseq=20, body=body, content_type=CONTENT_TYPE, user_agent="gb28181-probe")
        resp = await self.endpoint.request(request, (host, port), self.transport, timeout=5.0)
        if resp.status != 200:
            raise RuntimeError(f"{cmd_type} to {device_id}: {resp.status} {resp.reason}")
        return sn

    async def subscribe(self, device_id: str, *, expires: int = 600, event_id: int = 1,
                        event: str | None = None, body: bytes | None = None,
                        sn: int | None = None) -> ProbeDialog:
        """Open a catalog subscription (Annex P); the dialog is kept even when refused."""
        host, port = self._device_addr(device_id)
        event = event or f"Catalog;id={event_id}"
        if body is None:
            body = manscdp.build("Query", "Catalog", next(self._sn) if sn is None else sn, device_id)
        local_tag = new_tag()
        own = f"sip:{self.server_id}@{self.domain}"
        request = new_request(
            "SUBSCRIBE", f"sip:{device_id}@{host}:{port}", via=self.endpoint.via(self.transport),
            from_uri=own, from_tag=local_tag,
            to_uri=f"sip:{device_id}@{self.domain}", cseq=1, contact=self._contact(),
            headers={"event": event, "expires": str(expires)}, body=body,
            content_type=CONTENT_TYPE if body else None, user_agent="gb28181-probe")
        # Until the 200 comes, the dialog is what the request says (a NOTIFY may overtake it).
        early = Dialog(call_id=request.call_id, local_tag=local_tag, remote_tag="", local_uri=own,
                       remote_uri=f"sip:{device_id}@{self.domain}", remote_target=request.uri,
                       local_cseq=1)
        dialog = ProbeDialog(device_id, event, (host, port), early)
        self.dialogs[dialog.call_id] = dialog
        resp = await self.endpoint.request(request, (host, port), self.transport, timeout=5.0)
        dialog.response = resp
        if resp.status < 300:
            dialog.dialog = Dialog.from_response(resp, fallback_target=request.uri)
        return dialog

    async def resubscribe(self, dialog: ProbeDialog, expires: int, *,
                          call_id: str | None = None) -> SipResponse:
        """In-dialog SUBSCRIBE: a refresh, or ``expires=0`` to unsubscribe (CSeq + 1).
        ``call_id`` replaces the dialog's, to test what a device does with an unknown one."""
        request = dialog.dialog.request(
            "SUBSCRIBE", via=self.endpoint.via(self.transport), contact=self._contact(),
            headers={"event": dialog.event, "expires": str(expires)}, user_agent="gb28181-probe")
        if call_id is not None:
            request.set("Call-ID", call_id)
        return await self.endpoint.request(request, dialog.addr, self.transport, timeout=5.0)

    # -- live video ---------------------------------------------------------------------------
    def new_ssrc(self) -> str:
        """An Annex F live ``y=``: 0, digits 4-8 of the domain, a 4-digit sequence."""
        return f"0{self.domain[3:8]}{next(self._ssrc_seq) % 10000:04d}"

    def offer(self, transport: str, media_host: str, media_port: int, ssrc: str | None) -> bytes:
        """An Annex F live offer (PROTOCOL.md §5.2) for "udp", "tcp-passive" or "tcp-active"."""
        rtpmap = {96: "PS/90000", 97: "MPEG4/90000", 98: "H264/90000"}
        if transport == "udp":
            media = MediaDescription(port=media_port, proto="RTP/AVP", formats=[96, 97, 98],
                                     rtpmap=rtpmap, direction="recvonly")
        elif transport in ("tcp-passive", "tcp-active"):
            media = MediaDescription(port=media_port, proto="TCP/RTP/AVP", formats=[96, 97, 98],
                                     rtpmap=rtpmap, direction="recvonly",
                                     setup=transport.partition("-")[2], connection="new")
        else:
            raise ValueError(f"unknown transport {transport!r}")
        return build_sdp(SessionDescription(
            origin_user=self.server_id, origin_addr=media_host, session_name="Play",
            connection_addr=media_host, media=[media], ssrc=ssrc))

    def new_call(self, device_id: str, channel_id: str, *, transport: str = "udp",
                 media_host: str = "127.0.0.1", media_port: int = 0, ssrc: str | None = None,
                 body: bytes | None = None, subject: str | None = None) -> ProbeCall:
        """Build (not send) an INVITE for ``channel_id`` to the device that registered as
        ``device_id``; ``ssrc`` defaults to a fresh one, ``body`` to the Annex F offer."""
        host, port = self._device_addr(device_id)
        ssrc = self.new_ssrc() if ssrc is None else ssrc
        local_tag = new_tag()
        request = new_request(
            "INVITE", f"sip:{channel_id}@{host}:{port}", via=self.endpoint.via(self.transport),
            from_uri=f"sip:{self.server_id}@{self.domain}", from_tag=local_tag,
            to_uri=f"sip:{channel_id}@{self.domain}", cseq=1, contact=self._contact(),
            headers={"subject": subject or f"{channel_id}:{ssrc},{self.server_id}:0"},
            body=self.offer(transport, media_host, media_port, ssrc) if body is None else body,
            content_type="APPLICATION/SDP", user_agent="gb28181-probe")
        call = ProbeCall(device_id, channel_id, transport, ssrc, request, (host, port), local_tag)
        self.calls[call.call_id] = call
        return call

    async def send_invite(self, call: ProbeCall, timeout: float = 10.0) -> SipResponse:
        """Send the INVITE and wait for its final response (not ACKed here when 2xx)."""
        def provisional(resp: SipResponse) -> None:
            call.provisional.append(resp)
            if resp.to_tag and call.dialog is None:
                call.dialog = Dialog.from_response(resp, fallback_target=call.invite.uri)
            self._wake()

        resp = await self.endpoint.request(call.invite, call.addr, self.transport, timeout=timeout,
                                           on_provisional=provisional)
        call.response = resp
        if resp.status < 300:
            call.dialog = Dialog.from_response(resp, fallback_target=call.invite.uri)
        self._wake()
        return resp

    def ack(self, call: ProbeCall) -> SipRequest:
        """ACK the 2xx (RFC 3261 13.2.2.4): new branch, Request-URI = the 200's Contact."""
        assert call.response is not None and call.response.status < 300 and call.dialog is not None
        ack = call.dialog.ack(call.invite.cseq[0], via=self.endpoint.via(self.transport),
                              user_agent="gb28181-probe")
        self.endpoint.send_stateless(ack, call.addr, self.transport)
        return ack

    async def play(self, device_id: str, channel_id: str, **kwargs: Any) -> ProbeCall:
        """INVITE + ACK; raises RuntimeError unless the device answered 200."""
        call = self.new_call(device_id, channel_id, **kwargs)
        resp = await self.send_invite(call)
        if resp.status != 200:
            raise RuntimeError(f"INVITE {channel_id}: {resp.status} {resp.reason}")
        self.ack(call)
        return call

    async def bye(self, call: ProbeCall) -> SipResponse:
        """In-dialog BYE (CSeq + 1) to the 200's Contact."""
        assert call.dialog is not None, "no dialog to end: the INVITE was not answered"
        request = call.dialog.request("BYE", via=self.endpoint.via(self.transport),
                                      user_agent="gb28181-probe")
        return await self.endpoint.request(request, call.addr, self.transport, timeout=5.0)

    async def cancel(self, call: ProbeCall) -> SipResponse:
        """CANCEL the pending INVITE (RFC 3261 9.1: its Via, From, To, Call-ID, CSeq number)."""
        h = call.invite.headers
        headers = {"via": [h["via"][0]], "from": list(h["from"]), "to": list(h["to"]),
                   "call-id": list(h["call-id"]), "cseq": [f"{call.invite.cseq[0]} CANCEL"],
                   "max-forwards": ["70"]}
        request = SipRequest("CANCEL", call.invite.uri, headers)
        return await self.endpoint.request(request, call.addr, self.transport, timeout=5.0)


async def start_fleet(probe: Probe, *, taps: list | None = None, **overrides: Any) -> Fleet:
    """A started ``Fleet`` registered with ``probe``: by default one 10-channel NVR whose
    keepalives stay out of the way for a minute; ``taps`` see every byte from the first
    REGISTER on. The caller stops it."""
    cfg: dict[str, Any] = dict(
        server_host="127.0.0.1", server_port=probe.port, server_id=probe.server_id, devices=1,
        nvr=True, channels=10, first_id="34020000001180000001", keepalive_interval=60.0,
        register_rate=10_000, request_timeout=5.0, transport=probe.transport)
    cfg.update(overrides)
    fleet = Fleet(FleetConfig(**cfg))
    fleet.taps.extend(taps or ())
    await fleet.start()
    try:
        await probe.wait_for(lambda: all(d in probe.devices for d in fleet.devices), 10,
                             "the fleet's REGISTERs")
    except BaseException:
        await fleet.stop()
        raise
    return fleet
