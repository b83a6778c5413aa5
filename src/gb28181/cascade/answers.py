"""MESSAGEs from an upper platform: queries answered, controls relayed (GB/T 28181-2016 §9.3,
§9.5, §9.7, A.2.3, A.2.4, A.2.6, Annex N).

Each is answered 200 at once (A.1), and the data goes up in MESSAGEs of our own, as a device's
would, with the query's SN:

- ``Catalog``: the shared channels and their tree (``share.catalog_items``, Annex O), in as many
  parts as it takes, sent one after the other, each once the one before was accepted (Annex N);
- ``DeviceInfo`` / ``DeviceStatus`` of this platform (DeviceID = our ID), or of a shared channel;
- ``RecordInfo`` of a shared channel: from the platform's own recordings when it has segments in
  the range (``recording.serve_cascade``, on by default), else asked of the device that owns it
  (``RecordSearch``); answered up in parts;
- ``Control`` (PTZ, record, guard, DeviceConfig…) for a shared channel: the body goes to the owning
  device as it came, the device's Response (if any) comes back up, and each is audited under the
  upstream's name. A control for a channel we do not share is refused with 404.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from registry.models import Channel, Device

from .. import __version__, manscdp
from ..control import DeviceControl
from ..queries import DeviceQueries, QueryError
from ..records import CMD_TYPE as RECORD_INFO
from ..records import RecordQuery, RecordSearch
from ..registrar import BEIJING
from ..routing import device_target
from ..sip.endpoint import SipTimeoutError, SipTransportError
from ..sip.message import make_response, new_tag
from ..sip.transaction import RequestReceived
from . import share
from .uplink import Uplink

if TYPE_CHECKING:
    from .manager import CascadeManager

__all__ = ["UpperQueries"]

log = logging.getLogger("gb28181.cascade")

RECORD_ITEMS_PER_MESSAGE = 8
RELAY_TIMEOUT = 10.0  # seconds a device has to answer a relayed control


class UpperQueries:
    """See the module docstring."""

    def __init__(self, manager: CascadeManager, *, control: DeviceControl, queries: DeviceQueries) -> None:
        self.manager = manager
        self.control = control
        self.queries = queries
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- what we share ------------------------------------------------------------------------------
    def shared(self, uplink: Uplink) -> list[Channel]:
        return [c for c in self.manager.channels if c.kind == "channel"
                and share.is_shared(c, uplink.config.share, self.lookup)]

    def lookup(self, channel_id: str) -> Channel | None:
        return self.manager.channels.get(channel_id)

    def shared_count(self, uplink: Uplink) -> int:
        return len(self.shared(uplink))

    def shared_channel(self, uplink: Uplink, channel_id: str) -> tuple[Channel, Device] | None:
        """The shared channel ``channel_id`` and its device, or None."""
        channel = self.manager.channels.get(channel_id)
        if channel is None or not share.is_shared(channel, uplink.config.share, self.lookup):
            return None
        device = self.manager.registry.get(channel.device_id)
        return (channel, device) if device is not None else None

    def per_message(self, uplink: Uplink) -> int:
        n = uplink.config.catalog_items_per_message
        return n or (20 if uplink.transport == "tcp" else 4)

    def keepalive_body(self, uplink: Uplink) -> bytes:
        return self.manager.build("Notify", "Keepalive", self.queries.next_sn(), uplink.local_id,
                                  [("Status", "OK")])

    # -- MESSAGE ------------------------------------------------------------------------------------
    def handle(self, uplink: Uplink, ev: RequestReceived) -> None:
        req = ev.request
        txn = ev.transaction
        assert txn is not None

        def reply(status: int, reason: str = "") -> None:
            self.manager.endpoint.respond(txn, make_response(req, status, reason, to_tag=new_tag()))

        try:
            msg = manscdp.parse_request(req.content_type, req.body)
        except manscdp.BodyRefused as exc:
            reply(exc.status, exc.reason)
            return
        sn = msg.sn if msg.sn is not None else 0
        if msg.root == "Query":
            if msg.cmd_type == "Catalog":
                reply(200)
                self._spawn(self._catalog(uplink, sn))
            elif msg.cmd_type in ("DeviceInfo", "DeviceStatus"):
                reply(200)
                self._spawn(self._about(uplink, msg, sn))
            elif msg.cmd_type == RECORD_INFO:
                if self.shared_channel(uplink, msg.device_id) is None:
                    reply(404, f"Not Found: channel {msg.device_id} is not shared")
                    return
                reply(200)
                self._spawn(self._records(uplink, msg, sn))
            elif msg.cmd_type == "ConfigDownload":
                reply(200)
                self._spawn(self._config(uplink, msg, sn))
            else:
                # Accepted, and answered ERROR at once rather than left to time out (A.2.6).
                reply(200)
                body = self.manager.build("Response", msg.cmd_type, sn, msg.device_id or uplink.local_id,
                                          [("Result", "ERROR"),
                                           ("Reason", f"{msg.cmd_type} is not answered by a lower platform")])
                self._spawn(self._send_up(uplink, [body], msg.cmd_type))
        elif msg.root == "Control":
            found = self.shared_channel(uplink, msg.device_id)
            if found is None:
                reply(404, f"Not Found: channel {msg.device_id} is not shared")
                return
            reply(200)
            self._spawn(self._relay_control(uplink, msg, req.body, *found, source=ev.addr[0]))
        else:
            reply(200)

    async def _send_up(self, uplink: Uplink, bodies: list[bytes], what: str) -> None:
        """Send ``bodies`` one after the other, each once the one before was accepted (Annex N)."""
        for n, body in enumerate(bodies, 1):
            try:
                resp = await uplink.message(body)
            except (SipTimeoutError, SipTransportError, OSError) as exc:
                log.warning("%s to upper platform %s stopped at part %d of %d: %s", what, uplink.id,
                            n, len(bodies), exc)
                return
            if resp.status >= 300:
                log.warning("upper platform %s refused part %d of %d of %s: %d %s", uplink.id, n,
                            len(bodies), what, resp.status, resp.reason)
                return

    async def _catalog(self, uplink: Uplink, sn: int) -> None:
        items = share.catalog_items(self.manager.channels, local_id=uplink.local_id,
                                    share=uplink.config.share)
        bodies = share.catalog_bodies(items, sn=sn, device_id=uplink.local_id,
                                      per_message=self.per_message(uplink),
                                      encoding=self.manager.charset())
        await self._send_up(uplink, bodies, f"Catalog ({len(items)} items)")

    async def _about(self, uplink: Uplink, msg: manscdp.Manscdp, sn: int) -> None:
        target = msg.device_id or uplink.local_id
        cfg = self.manager.config
        fields: list[tuple[str, Any]]
        if target == uplink.local_id:
            if msg.cmd_type == "DeviceInfo":
                fields = [("DeviceName", cfg.server.name), ("Result", "OK"),
                          ("Manufacturer", "gb28181"), ("Model", "platform"),
                          ("Firmware", __version__), ("Channel", self.shared_count(uplink))]
            else:
                fields = [("Result", "OK"), ("Online", "ONLINE"), ("Status", "OK"),
                          ("DeviceTime", manscdp.format_time(_now_beijing())),
                          ("Encode", "ON"), ("Record", "OFF")]
        else:
            found = self.shared_channel(uplink, target)
            if found is None:
                fields = [("Result", "ERROR"), ("Reason", f"{target} is not shared")]
            elif msg.cmd_type == "DeviceInfo":
                channel = found[0]
                fields = [("DeviceName", channel.name), ("Result", "OK"),
                          ("Manufacturer", channel.manufacturer), ("Model", channel.model),
                          ("Firmware", ""), ("Channel", 1)]
            else:
                on = found[0].state == "ON"
                fields = [("Result", "OK"), ("Online", "ONLINE" if on else "OFFLINE"),
                          ("Status", "OK" if on else "ERROR"),
                          ("DeviceTime", manscdp.format_time(_now_beijing()))]
        body = self.manager.build("Response", msg.cmd_type, sn, target, fields)
        await self._send_up(uplink, [body], msg.cmd_type)

    async def _config(self, uplink: Uplink, msg: manscdp.Manscdp, sn: int) -> None:
        """ConfigDownload (A.2.4.7, A.2.6.7): our BasicParam towards this upper, so that it takes
        our keepalive interval and count for its offline deadline (§9.6.1)."""
        c = uplink.config
        wanted = {t.strip() for t in msg.text("ConfigType").split("/") if t.strip()}
        fields: list[tuple[str, Any]] = [("Result", "OK")]
        if not wanted or "BasicParam" in wanted:
            fields.append(("BasicParam", [
                ("Name", self.manager.config.server.name), ("Expiration", c.expires),
                ("HeartBeatInterval", max(1, round(c.keepalive_interval))),
                ("HeartBeatCount", c.keepalive_count)]))
        body = self.manager.build("Response", "ConfigDownload", sn, uplink.local_id, fields)
        await self._send_up(uplink, [body], "ConfigDownload")

    async def _records(self, uplink: Uplink, msg: manscdp.Manscdp, sn: int) -> None:
        found = self.shared_channel(uplink, msg.device_id)
        assert found is not None
        channel, device = found
        start = manscdp.parse_time(msg.text("StartTime"))
        end = manscdp.parse_time(msg.text("EndTime"))
        items: list[dict[str, Any]] = []
        if start is not None and end is not None and end > start:
            kind = (msg.text("Type") or "all").strip().lower()
            query = RecordQuery(channel.channel_id, start, end,
                                kind if kind in ("all", "time", "alarm", "manual") else "all")
            items = await self._platform_records(uplink, channel, query)
            if not items:
                try:
                    result = await RecordSearch(self.queries, self.manager.config.records).search(device, query)
                    items = [r.raw for r in result.records]
                except (QueryError, ValueError) as exc:
                    log.info("RecordInfo for upper platform %s: %s", uplink.id, exc)
        name = channel.name
        bodies = []
        per = RECORD_ITEMS_PER_MESSAGE
        for i in range(0, max(len(items), 1), per):
            part = items[i:i + per]
            fields: list[tuple[str, Any]] = [
                ("Name", name), ("SumNum", len(items)),
                ("RecordList", manscdp.Node({"Num": len(part)}, [("Item", _record_item(it)) for it in part]))]
            bodies.append(self.manager.build("Response", RECORD_INFO, sn, channel.channel_id, fields))
        await self._send_up(uplink, bodies, f"RecordInfo ({len(items)} items)")

    async def _platform_records(self, uplink: Uplink, channel: Channel, query: RecordQuery) -> list[dict]:
        """RecordInfo items (A.2.6.6) of the platform's own segments in the range, one per file,
        clipped to it; none when the platform has none there (or does not serve them up)."""
        if not self.manager.config.recording.serve_cascade or query.type not in ("all", "time"):
            return []
        playbacks = self.manager.sessions.playbacks
        start, end = query.start.timestamp(), query.end.timestamp()
        try:
            segments = await playbacks.platform_segments(channel.channel_id, start, end)
        except Exception:  # the index unreadable: the device is asked instead
            log.exception("RecordInfo of %s from the platform's recordings", channel.channel_id)
            return []
        return [{"DeviceID": channel.channel_id, "Name": channel.name,
                 "FilePath": PurePath(s["path"]).name, "Address": channel.address or "",
                 "StartTime": manscdp.format_time(datetime.fromtimestamp(max(s["start"], start), BEIJING)),
                 "EndTime": manscdp.format_time(datetime.fromtimestamp(min(s["end"], end), BEIJING)),
                 "Secrecy": "0", "Type": "time", "RecorderID": uplink.local_id}
                for s in segments]

    async def _relay_control(self, uplink: Uplink, msg: manscdp.Manscdp, body: bytes, channel: Channel,
                             device: Device, *, source: str) -> None:
        """The upper's Control goes to the device as it came; its Response goes back up."""
        queries = self.queries
        commands = [child.tag for child in msg.element if child.tag not in ("CmdType", "SN", "DeviceID")]
        result = "sent"
        answer: asyncio.Future = asyncio.get_running_loop().create_future()

        def sink(reply: manscdp.Manscdp) -> None:
            if not answer.done():
                answer.set_result(reply)

        confirmed = msg.cmd_type == "DeviceConfig" or any(c not in ("PTZCmd",) for c in commands)
        try:
            if not device.online or not device.host:
                raise QueryError(f"device {device.device_id} is offline")
            target = device_target(device)
            with queries.parts(device.device_id, msg.cmd_type, msg.sn or 0, sink):
                resp = await self.manager.endpoint.request(
                    queries.message_to(device, body), target.addr, target.transport,
                    timeout=RELAY_TIMEOUT, fallback=target.fallback)
                if resp.status >= 300:
                    raise QueryError(f"{device.device_id} refused it: {resp.status} {resp.reason}")
                if confirmed:
                    try:
                        reply = await asyncio.wait_for(answer, RELAY_TIMEOUT)
                    except TimeoutError:
                        result = "no response"
                    else:
                        result = (reply.text("Result") or "missing").upper()
                        up = self.manager.build("Response", msg.cmd_type, msg.sn or 0,
                                                channel.channel_id, [("Result", result)])
                        await self._send_up(uplink, [up], f"{msg.cmd_type} Response")
        except (QueryError, SipTimeoutError, SipTransportError, OSError) as exc:
            result = f"failed: {exc}"
            log.info("control from upper platform %s for %s: %s", uplink.id, channel.channel_id, exc)
        self.manager.audit.record("control", who=f"upstream:{uplink.id}", source=source,
                                  target=channel.channel_id, command=msg.cmd_type,
                                  fields=",".join(commands), ptzcmd=msg.text("PTZCmd") or None,
                                  result=result, device_id=device.device_id)


def _record_item(raw: dict[str, Any]) -> list[tuple[str, Any]]:
    """A RecordList Item as the device sent it (A.2.6.6), nested dicts kept."""
    return [(k, v if isinstance(v, (str, dict, list)) else str(v)) for k, v in raw.items()
            if isinstance(k, str) and k[:1].isalpha()]


def _now_beijing() -> datetime:
    return datetime.now(BEIJING)
