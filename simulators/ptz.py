"""A simulated device's controllable state: PTZ heads and what DeviceControl/DeviceConfig change.

``PtzHead`` is one camera's pan-tilt-zoom head and lens. The PTZCmd of a DeviceControl
(GB/T 28181-2016 A.2.3) is read with the platform's own parser (``gb28181.ptz.parse``; bad bytes
are counted and ignored, as a camera ignores a frame whose checksum is wrong) and changes it:

- a pan/tilt/zoom move (A.3.2) turns the head at a rate from its speed bytes until the next
  command; pan is degrees 0-360 (wrapping, right is +), tilt -90..90 (up is +), zoom 1-30x.
  Focus (0-1000, far is +) and iris (0-100, open is +) move the same way (A.3.3);
- the PTZ stop ends every move and any cruise or scan (A.3.5 note 4, A.3.6 note 3), the FI
  stop ends focus and iris moves;
- presets (A.3.4) remember and recall a position; cruises (A.3.5) keep points, speed and dwell
  per group; scans (A.3.6) bounds (taken at the current pan) and speed; auxiliary switches
  (A.3.7) are on or off. A running cruise or scan is reported, not animated.

Positions are integrated lazily from an injected clock, so tests read them without sleeping
through a loop. ``DeviceControls`` holds the heads of one device's channels (created on first
use), its record and guard flags, the BasicParam a DeviceConfig set, and counts of every
command received (TeleBoot and IFameCmd included). It decides each confirmed command's Result
(§9.3.1): ERROR for a target that is neither the device nor one of its channels, for a
HomePosition naming a preset the head does not have, and, for a vendor that needs the device ID
in DeviceConfig (Dahua), for a DeviceConfig sent to a channel; OK otherwise. ``fleet.py``
calls it from its DeviceControl/DeviceConfig, DeviceStatus, PresetQuery and ConfigDownload
answers.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gb28181 import manscdp
from gb28181 import ptz as ptzcmd

from .catalog import DeviceCatalog, presets

__all__ = ["DeviceControls", "PtzHead"]

PAN_RANGE = 360.0
TILT_LIMITS = (-90.0, 90.0)
ZOOM_LIMITS = (1.0, 30.0)
FOCUS_LIMITS = (0.0, 1000.0)
IRIS_LIMITS = (0.0, 100.0)


def _rate(speed: int, top: float, full: int = 255) -> float:
    """Units a second at ``speed`` (0 slowest, ``full`` fastest): a camera never stands still
    while a direction bit is set (A.3.2 note 2: 00H is the slowest speed, not zero)."""
    return top * (1 + speed) / (1 + full)


def _clamp(value: float, limits: tuple[float, float]) -> float:
    return min(max(value, limits[0]), limits[1])


@dataclass(slots=True)
class Route:
    """A cruise (A.3.5): preset points in order, speed and dwell seconds (12-bit values)."""

    points: list[int] = field(default_factory=list)
    speed: int = 0
    dwell: int = 0


@dataclass(slots=True)
class ScanRange:
    """An auto-scan (A.3.6): left and right bounds (pan degrees) and speed."""

    left: float | None = None
    right: float | None = None
    speed: int = 0


class PtzHead:
    """One camera's pan/tilt/zoom head and lens; see the module docstring."""

    def __init__(self, channel_id: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.channel_id = channel_id
        self.clock = clock
        self.pan, self.tilt, self.zoom = 0.0, 0.0, 1.0
        self.focus, self.iris = 500.0, 50.0
        self.motion = ptzcmd.STOP
        self.lens = ptzcmd.FocusIris()
        self._since = clock()
        # Presets the camera has from the factory (PresetQuery answers them, catalog.presets).
        self.presets: dict[int, tuple[float, float, float]] = {}
        self.preset_names: dict[int, str] = {}
        for pid, name in presets(channel_id):
            self.presets[pid] = (float(pid % 360), 0.0, 1.0)
            self.preset_names[pid] = name
        self.last_preset: int | None = None
        self.cruises: dict[int, Route] = {}
        self.cruising: int | None = None
        self.scans: dict[int, ScanRange] = {}
        self.scanning: int | None = None
        self.aux: dict[int, bool] = {}
        self.home: dict[str, int] | None = None
        self.commands = 0

    # -- time --------------------------------------------------------------------------------
    def advance(self) -> None:
        """Bring the position up to now along the running moves."""
        now = self.clock()
        dt, self._since = max(0.0, now - self._since), now
        m, lens = self.motion, self.lens
        if m.pan:
            self.pan = (self.pan + m.pan * _rate(m.pan_speed, 100.0) * dt) % PAN_RANGE
        if m.tilt:
            self.tilt = _clamp(self.tilt + m.tilt * _rate(m.tilt_speed, 60.0) * dt, TILT_LIMITS)
        if m.zoom:
            self.zoom = _clamp(self.zoom + m.zoom * _rate(m.zoom_speed, 10.0, 15) * dt, ZOOM_LIMITS)
        if lens.focus:
            self.focus = _clamp(self.focus + lens.focus * _rate(lens.focus_speed, 500.0) * dt, FOCUS_LIMITS)
        if lens.iris:
            self.iris = _clamp(self.iris + lens.iris * _rate(lens.iris_speed, 50.0) * dt, IRIS_LIMITS)

    @property
    def moving(self) -> bool:
        return not (self.motion.is_stop and self.lens.is_stop)

    # -- commands ----------------------------------------------------------------------------
    def apply(self, cmd: ptzcmd.PtzCommand) -> None:
        """Obey one decoded PTZCmd."""
        self.advance()
        self.commands += 1
        if isinstance(cmd, ptzcmd.Motion):
            self.motion = cmd
            if cmd.is_stop:  # A.3.2 table A.5 row 7: everything stops
                self.lens = ptzcmd.FocusIris()
                self.cruising = self.scanning = None
        elif isinstance(cmd, ptzcmd.FocusIris):
            self.lens = cmd
        elif isinstance(cmd, ptzcmd.Preset):
            self._preset(cmd)
        elif isinstance(cmd, ptzcmd.Cruise):
            self._cruise(cmd)
        elif isinstance(cmd, ptzcmd.Scan):
            self._scan(cmd)
        elif isinstance(cmd, ptzcmd.Aux):
            self.aux[cmd.switch] = cmd.on

    def _preset(self, cmd: ptzcmd.Preset) -> None:
        if cmd.action == "set":
            self.presets[cmd.index] = (self.pan, self.tilt, self.zoom)
            self.preset_names.setdefault(cmd.index, f"预置点{cmd.index}")
        elif cmd.action == "delete":
            self.presets.pop(cmd.index, None)
            self.preset_names.pop(cmd.index, None)
        elif cmd.index in self.presets:  # call: the head goes there and stops
            self.motion = ptzcmd.STOP
            self.pan, self.tilt, self.zoom = self.presets[cmd.index]
            self.last_preset = cmd.index

    def _cruise(self, cmd: ptzcmd.Cruise) -> None:
        route = self.cruises.setdefault(cmd.group, Route())
        if cmd.action == "add":
            route.points.append(cmd.preset)
        elif cmd.action == "delete":
            if cmd.preset == 0:  # A.3.5 note 2: the whole cruise
                del self.cruises[cmd.group]
            elif cmd.preset in route.points:
                route.points.remove(cmd.preset)
        elif cmd.action == "speed":
            route.speed = cmd.value
        elif cmd.action == "dwell":
            route.dwell = cmd.value
        elif cmd.action == "start":
            self.motion = ptzcmd.STOP
            self.scanning = None
            self.cruising = cmd.group

    def _scan(self, cmd: ptzcmd.Scan) -> None:
        scan = self.scans.setdefault(cmd.group, ScanRange())
        if cmd.action == "left":
            scan.left = self.pan
        elif cmd.action == "right":
            scan.right = self.pan
        elif cmd.action == "speed":
            scan.speed = cmd.value
        else:
            self.motion = ptzcmd.STOP
            self.cruising = None
            self.scanning = cmd.group

    def snapshot(self) -> dict[str, Any]:
        """The head now, as the DeviceStatus extension and the tests read it."""
        self.advance()
        return {
            "pan": round(self.pan, 2), "tilt": round(self.tilt, 2), "zoom": round(self.zoom, 2),
            "focus": round(self.focus, 1), "iris": round(self.iris, 1), "moving": self.moving,
            "motion": asdict(self.motion), "lens": asdict(self.lens), "presets": sorted(self.presets),
            "last_preset": self.last_preset,
            "cruises": {g: (list(r.points), r.speed, r.dwell) for g, r in self.cruises.items()},
            "cruising": self.cruising,
            "scans": {g: (s.left, s.right, s.speed) for g, s in self.scans.items()},
            "scanning": self.scanning, "aux": dict(self.aux), "home": self.home,
            "commands": self.commands,
        }


class DeviceControls:
    """What one device's DeviceControl and DeviceConfig change; see the module docstring."""

    def __init__(self, device_id: str, catalog: DeviceCatalog, *, config_needs_device_id: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device_id = device_id
        self.catalog = catalog
        self.config_needs_device_id = config_needs_device_id
        self.clock = clock
        self.heads: dict[str, PtzHead] = {}
        self.recording: dict[str, bool] = {}
        self.guard: dict[str, bool] = {}
        #: BasicParam values a DeviceConfig set (A.2.3 b), by element name.
        self.basic: dict[str, str] = {}
        #: Commands received, by element (PTZCmd, TeleBoot, IFameCmd, RecordCmd, ...).
        self.counts: Counter[str] = Counter()
        self.bad_ptz = 0
        #: (command element, value, target, Result) of every confirmed command, in order.
        self.confirmed: list[tuple[str, str, str, str]] = []

    def _camera(self, target: str) -> str | None:
        """The channel a command for ``target`` acts on: the channel itself, or an IPC's one
        camera when addressed by the device ID; None for an ID this device does not have."""
        if self.catalog.get(target) is not None:
            return target
        if target == self.device_id and len(self.catalog.channels) == 1:
            return self.catalog.channels[0].channel_id
        return None

    def known(self, target: str) -> bool:
        return target == self.device_id or self.catalog.get(target) is not None

    def head(self, target: str) -> PtzHead | None:
        cid = self._camera(target)
        if cid is None:
            return None
        head = self.heads.get(cid)
        if head is None:
            head = self.heads[cid] = PtzHead(cid, self.clock)
        return head

    # -- DeviceControl / DeviceConfig ----------------------------------------------------------
    def apply(self, msg: manscdp.Manscdp) -> str | None:
        """Obey a ``<Control>`` body; the Result for a confirmed command (§9.3.1), else None."""
        target = msg.device_id or self.device_id
        if msg.cmd_type == "DeviceConfig":
            return self._config(msg, target)
        result: str | None = None
        for el in msg.element:
            tag, text = el.tag, (el.text or "")
            if tag in ("CmdType", "SN", "DeviceID", "Info"):
                continue
            self.counts[tag] += 1
            if tag == "PTZCmd":
                self._ptz(target, text)
            elif tag == "RecordCmd":
                result = self._flag(self.recording, target, text, {"Record": True, "StopRecord": False})
                self.confirmed.append((tag, text, target, result))
            elif tag == "GuardCmd":
                result = self._flag(self.guard, target, text, {"SetGuard": True, "ResetGuard": False})
                self.confirmed.append((tag, text, target, result))
            elif tag == "AlarmCmd":
                result = "OK" if text == "ResetAlarm" and self.known(target) else "ERROR"
                self.confirmed.append((tag, text, target, result))
            elif tag == "HomePosition":
                result = self._home(target, msg)
                self.confirmed.append((tag, msg.text("HomePosition/Enabled"), target, result))
        return result

    def _ptz(self, target: str, text: str) -> None:
        head = self.head(target)
        try:
            cmd = ptzcmd.parse(text)
        except ptzcmd.PtzError:
            self.bad_ptz += 1
            return
        if head is not None:
            head.apply(cmd)

    def _flag(self, flags: dict[str, bool], target: str, text: str, values: dict[str, bool]) -> str:
        if not self.known(target) or text not in values:
            return "ERROR"
        if target == self.device_id:  # the whole device: every channel
            for ch in self.catalog.channels:
                flags[ch.channel_id] = values[text]
        flags[target] = values[text]
        return "OK"

    def _home(self, target: str, msg: manscdp.Manscdp) -> str:
        head = self.head(target)
        enabled = msg.text("HomePosition/Enabled")
        if head is None or enabled not in ("0", "1"):
            return "ERROR"
        if enabled == "0":
            head.home = None
            return "OK"
        preset = msg.text("HomePosition/PresetIndex")
        reset = msg.text("HomePosition/ResetTime")
        if preset and (not preset.isdigit() or int(preset) not in head.presets):
            return "ERROR"  # a home position at a preset the camera does not have
        head.home = {"preset": int(preset) if preset else 0, "reset_time": int(reset) if reset.isdigit() else 0}
        return "OK"

    def _config(self, msg: manscdp.Manscdp, target: str) -> str:
        self.counts["DeviceConfig"] += 1
        basic = msg.element.find("BasicParam")
        if target != self.device_id and (self.config_needs_device_id or not self.known(target)):
            result = "ERROR"
        elif basic is None:
            result = "ERROR"  # only BasicParam is simulated
        else:
            for el in basic:
                if el.text:
                    self.basic[el.tag] = el.text
            result = "OK"
        self.confirmed.append(("DeviceConfig", "BasicParam", target, result))
        return result

    # -- what queries report --------------------------------------------------------------------
    def record_status(self, target: str) -> str:
        """DeviceStatus ``Record`` (A.2.6): ON while a RecordCmd Record is in force."""
        cid = self._camera(target) or target
        return "ON" if self.recording.get(cid) or self.recording.get(target) else "OFF"

    def guard_status(self, target: str) -> str:
        """DeviceStatus Alarmstatus ``DutyStatus`` of an alarm input: ONDUTY once guarded."""
        return "ONDUTY" if self.guard.get(target) or self.guard.get(self.device_id) else "OFFDUTY"

    def position_fields(self, target: str) -> list[tuple[str, Any]]:
        """A ``PTZPosition`` element for a DeviceStatus about one camera (a simulator extension:
        the 2016 schema has no PTZ position; platforms keep unknown elements)."""
        cid = self._camera(target)
        if cid is None:
            return []
        s = self.head(cid).snapshot()  # type: ignore[union-attr]
        return [("PTZPosition", [
            ("Pan", s["pan"]), ("Tilt", s["tilt"]), ("Zoom", s["zoom"]), ("Focus", s["focus"]),
            ("Iris", s["iris"]), ("Moving", "1" if s["moving"] else "0"),
            ("Preset", s["last_preset"] if s["last_preset"] is not None else ""),
            ("Cruise", "" if s["cruising"] is None else s["cruising"]),
            ("Scan", "" if s["scanning"] is None else s["scanning"]),
        ])]

    def presets(self, target: str) -> list[tuple[int, str]]:
        """PresetQuery's list: the head's presets now (set and deleted ones included)."""
        head = self.head(target)
        if head is None:
            return presets(target)
        return [(pid, head.preset_names.get(pid, f"预置点{pid}")) for pid in sorted(head.presets)]

    def basic_param(self, param: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """ConfigDownload BasicParam with the values a DeviceConfig set in place of the defaults."""
        return [(tag, self.basic.get(tag, value)) for tag, value in param]

    def summary(self) -> dict[str, Any]:
        return {"commands": dict(self.counts), "bad_ptz": self.bad_ptz,
                "heads": {cid: h.snapshot() for cid, h in self.heads.items()}}
