"""Device control and configuration (GB/T 28181-2016 §9.3, A.2.3): sending, confirming, auto-stop.

Every control is a MESSAGE with a ``<Control>`` body: CmdType DeviceControl (PTZCmd, TeleBoot,
RecordCmd, GuardCmd, AlarmCmd, IFameCmd, DragZoomIn/Out, HomePosition) or DeviceConfig
(BasicParam). §9.3.1 splits them in two. PTZ, TeleBoot, IFameCmd and DragZoom get only the
device's 200: :meth:`DeviceControl.send` returns once it arrives. RecordCmd, GuardCmd, AlarmCmd,
HomePosition and DeviceConfig are confirmed by a separate ``<Response>`` MESSAGE with the
request's SN and a ``Result`` of OK or ERROR (§9.3.2, A.2.6): ``send`` waits for it. The wait
goes through ``DeviceQueries.parts`` rather than ``DeviceQueries.query``, so an operator's
command never queues behind a catalog being collected from the same device.

A PTZ move (pan/tilt/zoom, focus, iris) goes on until a stop (A.3.2 note 1). A client that
vanished between the two would leave a camera turning for ever, so every move arms a timer of
``ptz.auto_stop`` seconds, re-armed by the next move and cleared by a stop; when it fires the
server sends the stop itself and audits it. The HTTP handlers (``api_control.py``) validate,
call this module and audit what people do; the PTZCmd bytes come from ``ptz.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from registry.devices import DeviceRegistry
from registry.models import Device

from . import ptz
from .config import Config
from .queries import DeviceQueries, QueryError
from .stats import Counters

if TYPE_CHECKING:
    from .audit import AuditLog
    from .presence import Presence
    from .sip.endpoint import SipEndpoint

__all__ = ["CONFIRMED_CONTROLS", "ControlError", "ControlResult", "DeviceControl", "iframe_after_ack"]

log = logging.getLogger("gb28181.control")

#: DeviceControl elements whose command the device confirms with a Response (§9.3.1); a
#: DeviceConfig is always confirmed.
CONFIRMED_CONTROLS = frozenset({"RecordCmd", "GuardCmd", "AlarmCmd", "HomePosition"})
#: How long a confirmed command waits for the device's Response.
RESPONSE_TIMEOUT = 10.0


class ControlError(RuntimeError):
    """The command did not reach the device or was not confirmed; ``status`` is for HTTP."""

    def __init__(self, text: str, status: int = 504) -> None:
        super().__init__(text)
        self.status = status


@dataclass(slots=True)
class ControlResult:
    """What came of one command: the 200 (``result`` None) or the device's Result."""

    cmd_type: str
    target: str
    sn: int
    confirmed: bool
    result: str | None = None  # OK | ERROR (confirmed commands only)
    ptzcmd: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.confirmed or self.result == "OK"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cmd_type": self.cmd_type, "target": self.target, "sn": self.sn,
                               "confirmed": self.confirmed,
                               "result": self.result if self.confirmed else "delivered"}
        if self.ptzcmd:
            out["ptzcmd"] = list(self.ptzcmd)  # a stop may take two (PTZ and FI, A.3.2/A.3.3)
        return out


@dataclass(slots=True)
class _Moving:
    """A channel with a move going on: which kinds (``motion``, ``fi``) and the auto-stop timer."""

    device_id: str
    kinds: set[str]
    timer: asyncio.TimerHandle | None = None


class DeviceControl:
    """Send controls and configuration to devices; see the module docstring."""

    def __init__(self, *, config: Config, registry: DeviceRegistry, queries: DeviceQueries,
                 presence: Presence | None = None, audit: AuditLog | None = None) -> None:
        self.config = config
        self.registry = registry
        self.queries = queries
        self.presence = presence
        self.audit = audit
        self.moving: dict[str, _Moving] = {}  # by channel ID
        self.auto_stops = 0
        #: How long a confirmed command waits for the device's Response, seconds.
        self.response_timeout = RESPONSE_TIMEOUT
        self._tasks: set[asyncio.Task] = set()

    async def send(self, device: Device, target: str, fields: Sequence[tuple[str, Any]], *,
                   cmd_type: str = "DeviceControl", confirmed: bool | None = None,
                   timeout: float | None = None) -> ControlResult:
        """Deliver one ``<Control>`` to ``target`` (the device or one of its channels) and, for a
        confirmed command (§9.3.1), wait for the device's Result. ControlError if that fails."""
        if confirmed is None:
            confirmed = cmd_type == "DeviceConfig" or any(tag in CONFIRMED_CONTROLS for tag, _ in fields)
        if not device.online or not device.host:
            raise ControlError(f"device {device.device_id} is offline", 409)
        queries = self.queries
        sn = queries.next_sn()
        timeout = self.response_timeout if timeout is None else timeout
        if not confirmed:
            try:
                await queries.send(device, cmd_type, fields, sn=sn, root="Control", target=target)
            except QueryError as exc:
                raise ControlError(str(exc)) from None
            return ControlResult(cmd_type, target, sn, False)
        answer: asyncio.Future = asyncio.get_running_loop().create_future()

        def sink(msg: Any) -> None:
            if not answer.done():
                answer.set_result(msg)

        # Open before sending: a quick device may answer before its 200 reaches us.
        with queries.parts(device.device_id, cmd_type, sn, sink):
            try:
                await queries.send(device, cmd_type, fields, sn=sn, root="Control", target=target)
                msg = await asyncio.wait_for(answer, timeout)
            except QueryError as exc:
                raise ControlError(str(exc)) from None
            except TimeoutError:
                raise ControlError(f"{device.device_id} accepted the {cmd_type} but sent no Response "
                                   f"within {timeout:g} s") from None
        result = (msg.text("Result") or "missing").upper()
        return ControlResult(cmd_type, target, sn, True, result)

    # -- PTZ (Annex A.3) and auto-stop -------------------------------------------------------------
    async def ptz(self, device: Device, channel_id: str, command: ptz.PtzCommand) -> ControlResult:
        """Send one PTZCmd; a move arms the auto-stop timer of ``channel_id``, a stop clears it."""
        code = ptz.encode(command)
        result = await self.send(device, channel_id, [("PTZCmd", code)], confirmed=False)
        result.ptzcmd.append(code)
        if isinstance(command, ptz.Motion | ptz.FocusIris):
            kind = "motion" if isinstance(command, ptz.Motion) else "fi"
            if command.is_stop:
                self._stopped(channel_id, kind)
            else:
                self._moved(device.device_id, channel_id, kind)
        elif isinstance(command, ptz.Cruise | ptz.Scan) and command.action == "start":
            # A cruise or scan is meant to run until stopped; it is not a forgotten move.
            self._stopped(channel_id, "motion")
        return result

    async def ptz_stop(self, device: Device, channel_id: str) -> ControlResult:
        """Stop whatever the channel is doing: the PTZ stop (which also ends cruise and scan,
        A.3.5 note 4, A.3.6 note 3), and the FI stop too when a focus or iris move is running."""
        kinds = set(self.moving[channel_id].kinds) if channel_id in self.moving else set()
        result = await self.ptz(device, channel_id, ptz.STOP)
        if "fi" in kinds:
            fi = await self.ptz(device, channel_id, ptz.FocusIris())
            result.ptzcmd += fi.ptzcmd
        return result

    def _moved(self, device_id: str, channel_id: str, kind: str) -> None:
        seconds = self.config.ptz.auto_stop
        moving = self.moving.get(channel_id)
        if moving is None:
            moving = self.moving[channel_id] = _Moving(device_id, set())
        moving.kinds.add(kind)
        if moving.timer is not None:
            moving.timer.cancel()
            moving.timer = None
        if seconds > 0:
            moving.timer = asyncio.get_running_loop().call_later(seconds, self._expired, channel_id)

    def _stopped(self, channel_id: str, kind: str) -> None:
        moving = self.moving.get(channel_id)
        if moving is None:
            return
        moving.kinds.discard(kind)
        if kind == "motion":
            moving.kinds.clear()  # A.3.2 table A.5: the PTZ stop ends every operation
        if not moving.kinds:
            if moving.timer is not None:
                moving.timer.cancel()
            del self.moving[channel_id]

    def _expired(self, channel_id: str) -> None:
        moving = self.moving.pop(channel_id, None)
        if moving is None:
            return
        task = asyncio.get_running_loop().create_task(self._auto_stop(channel_id, moving))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _auto_stop(self, channel_id: str, moving: _Moving) -> None:
        device = self.registry.get(moving.device_id)
        seconds = self.config.ptz.auto_stop
        commands = [ptz.STOP] + ([ptz.FocusIris()] if "fi" in moving.kinds else [])
        error = ""
        sent: list[str] = []
        for command in commands:
            if device is None:
                error = "device gone"
                break
            try:
                await self.send(device, channel_id, [("PTZCmd", ptz.encode(command))], confirmed=False)
                sent.append(ptz.encode(command))
            except ControlError as exc:
                error = str(exc)
        self.auto_stops += 1
        log.info("PTZ move of %s not stopped within %g s: %s", channel_id, seconds,
                 f"stop failed: {error}" if error else "stopped")
        if self.audit is not None:
            self.audit.record("ptz-auto-stop", who="server", source="", target=channel_id,
                              after=seconds, ptzcmd=sent, result=error or "delivered")

    # -- DeviceConfig (A.2.3 b) --------------------------------------------------------------------
    async def configure_basic(self, device: Device, params: dict[str, Any]) -> ControlResult:
        """DeviceConfig BasicParam, addressed to the device ID (Dahua needs it; Uniview reboots
        when sent a channel ID). Once the device says OK, its record follows: name, and the
        heartbeat interval and count that set its offline deadline (§9.6.1)."""
        order = (("Name", "name"), ("Expiration", "expiration"),
                 ("HeartBeatInterval", "heartbeat_interval"), ("HeartBeatCount", "heartbeat_count"))
        basic = [(tag, params[key]) for tag, key in order if params.get(key) is not None]
        result = await self.send(device, device.device_id, [("BasicParam", basic)],
                                 cmd_type="DeviceConfig", confirmed=True)
        if result.result == "OK":
            if params.get("name") is not None:
                device.name = params["name"]
            for key in ("heartbeat_interval", "heartbeat_count"):
                if params.get(key) is not None:
                    device.extra[key] = int(params[key])
            self.registry.touch(device)
            if self.presence is not None and device.online:
                self.presence.seen(device)
        return result

    async def stop(self) -> None:
        for moving in self.moving.values():
            if moving.timer is not None:
                moving.timer.cancel()
        self.moving.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def iframe_after_ack(endpoint: SipEndpoint, config: Config, device: Device, channel_id: str) -> None:
    """A.2.3 IFameCmd to a channel whose live INVITE was just ACKed, so a camera that would wait
    for its next GOP sends an IDR at once. Fire and forget: the play never waits for it, and a
    device that ignores or refuses it is only logged. (``invite.py`` knows the endpoint, not the
    server's ``DeviceQueries``, hence a sender of its own.)"""
    queries = DeviceQueries(config=config, endpoint=endpoint, counters=Counters(), in_flight=1,
                            encoding=config.catalog.charset)
    try:
        await queries.send(device, "DeviceControl", [("IFameCmd", "Send")], root="Control",
                           target=channel_id, timeout=5.0)
    except QueryError as exc:
        log.info("IFameCmd to %s after the ACK: %s", channel_id, exc)
