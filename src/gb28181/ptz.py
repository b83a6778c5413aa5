"""PTZCmd: the 8-byte front-end control code of GB/T 28181-2016 Annex A.3, both ways.

A ``<PTZCmd>`` in a DeviceControl (A.2.3) is 8 bytes written as 16 hex digits (A.3.1, table A.3):

====  ===================================================================================
1     ``A5``
2     version (high nibble, 0 for this standard) and a check nibble = (A + 5 + version) % 16
3     address, low 8 bits (unused: the body's DeviceID names the camera; we write 01 as the
      standard's own examples and WVP do)
4     instruction: PTZ (A.3.2), FI (A.3.3), preset (A.3.4), cruise (A.3.5), scan (A.3.6),
      auxiliary switch (A.3.7)
5, 6  data 1 and data 2
7     data 3 (high nibble) and the address's high 4 bits (low nibble)
8     checksum: (byte 1 + ... + byte 7) % 256
====  ===================================================================================

This module is pure: :func:`encode` writes a command, :func:`parse` reads one (the simulator's
cameras use it; anything broken raises :class:`PtzError`). A command is one of six small frozen
dataclasses, so ``parse(encode(c)) == c`` for every valid command. Bits the standard marks as
irrelevant (× in tables A.5–A.10) are written as zero and ignored when read. The bodies of the
other A.2.3 controls that move a camera, HomePosition and DragZoomIn/Out, are built here too,
as ``manscdp.build`` field lists. ``control.py`` sends them; ``api_control.py`` exposes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DIRECTIONS",
    "Aux",
    "Cruise",
    "FocusIris",
    "Motion",
    "Preset",
    "PtzCommand",
    "PtzError",
    "Scan",
    "STOP",
    "drag_zoom_fields",
    "encode",
    "home_position_fields",
    "parse",
    "parse_frame",
]

FIRST_BYTE = 0xA5  # A.3.1: the first byte of every instruction
VERSION = 0  # A.3.1: version 1.0 of this standard is written as 0H
DEFAULT_ADDRESS = 1  # A.3.1 note: not used; the standard's examples (J.6) write 01

# Instruction bytes (byte 4).
_FI = 0x40  # A.3.3: 0100 xxxx
_PRESET = {0x81: "set", 0x82: "call", 0x83: "delete"}  # A.3.4, table A.8
_CRUISE = {0x84: "add", 0x85: "delete", 0x86: "speed", 0x87: "dwell", 0x88: "start"}  # A.3.5, table A.9
_SCAN_SET, _SCAN_SPEED = 0x89, 0x8A  # A.3.6, table A.10
_SCAN_DATA = {0: "start", 1: "left", 2: "right"}  # byte 6 of 89H
_AUX = {0x8C: True, 0x8D: False}  # A.3.7, table A.11: switch on / off

#: Pan/tilt/zoom direction words of the HTTP API and what they set (pan, tilt, zoom): pan +1
#: right, tilt +1 up, zoom +1 in (tele). A.3.2 note 1: the direction is the picture's.
DIRECTIONS: dict[str, tuple[int, int, int]] = {
    "up": (0, 1, 0), "down": (0, -1, 0), "left": (-1, 0, 0), "right": (1, 0, 0),
    "upleft": (-1, 1, 0), "upright": (1, 1, 0), "downleft": (-1, -1, 0), "downright": (1, -1, 0),
    "zoomin": (0, 0, 1), "zoomout": (0, 0, -1),
}


class PtzError(ValueError):
    """Not a valid PTZCmd (length, hex, first byte, check nibble, checksum or instruction)."""


def _byte(name: str, value: int, hi: int = 0xFF, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise PtzError(f"{name} must be an integer from {lo} to {hi}, not {value!r}")
    return value


def _sign(name: str, value: int) -> int:
    if value not in (-1, 0, 1):
        raise PtzError(f"{name} must be -1, 0 or 1, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Motion:
    """A.3.2: pan (-1 left, +1 right), tilt (-1 down, +1 up), zoom (-1 out, +1 in); all 0 is stop."""

    pan: int = 0
    tilt: int = 0
    zoom: int = 0
    pan_speed: int = 0  # byte 5, 00H-FFH slow to fast
    tilt_speed: int = 0  # byte 6
    zoom_speed: int = 0  # byte 7 high nibble, 0H-FH

    @property
    def is_stop(self) -> bool:
        return not (self.pan or self.tilt or self.zoom)


@dataclass(frozen=True, slots=True)
class FocusIris:
    """A.3.3: focus (-1 near, +1 far), iris (-1 close, +1 open); both 0 stops focus and iris."""

    focus: int = 0
    iris: int = 0
    focus_speed: int = 0  # byte 5
    iris_speed: int = 0  # byte 6

    @property
    def is_stop(self) -> bool:
        return not (self.focus or self.iris)


@dataclass(frozen=True, slots=True)
class Preset:
    """A.3.4: set, call or delete preset ``index`` (1-255; 0 is reserved)."""

    action: str
    index: int


@dataclass(frozen=True, slots=True)
class Cruise:
    """A.3.5: cruise ``group``; ``add``/``delete`` take a ``preset`` (delete 0: the whole cruise),
    ``speed``/``dwell`` a 12-bit ``value`` (dwell in seconds), ``start`` nothing. A PTZ stop ends it."""

    action: str
    group: int = 0
    preset: int = 0
    value: int = 0


@dataclass(frozen=True, slots=True)
class Scan:
    """A.3.6: auto-scan ``group``: ``start``, set the ``left``/``right`` bound at the current
    position, or ``speed`` (a 12-bit ``value``). A PTZ stop ends it."""

    action: str
    group: int = 0
    value: int = 0


@dataclass(frozen=True, slots=True)
class Aux:
    """A.3.7: auxiliary switch ``switch`` on or off (switch 1 is the wiper)."""

    on: bool
    switch: int


PtzCommand = Motion | FocusIris | Preset | Cruise | Scan | Aux

#: A.3.2 table A.5 row 7: every PTZ operation stops.
STOP = Motion()


@dataclass(frozen=True, slots=True)
class Frame:
    """The raw fields of one PTZCmd (A.3.1), checks already verified."""

    instruction: int
    data1: int
    data2: int
    data3: int
    address: int


def _frame(instruction: int, data1: int = 0, data2: int = 0, data3: int = 0,
           address: int = DEFAULT_ADDRESS) -> str:
    _byte("address", address, 0xFFF)
    b = [FIRST_BYTE, (VERSION << 4) | ((0xA + 0x5 + VERSION) % 16), address & 0xFF, instruction,
         data1, data2, ((data3 & 0xF) << 4) | (address >> 8)]
    b.append(sum(b) % 256)
    return bytes(b).hex().upper()


def _twelve_bits(name: str, value: int) -> tuple[int, int]:
    """A.3.5 note 2, A.3.6 note 2: byte 6 holds the low 8 bits, byte 7's high nibble the rest."""
    _byte(name, value, 0xFFF, 1)
    return value & 0xFF, value >> 8


def encode(cmd: PtzCommand, *, address: int = DEFAULT_ADDRESS) -> str:
    """The 16 hex digits (upper case) of ``cmd``; PtzError naming the field that is out of range."""
    if isinstance(cmd, Motion):
        pan, tilt, zoom = _sign("pan", cmd.pan), _sign("tilt", cmd.tilt), _sign("zoom", cmd.zoom)
        code = ((zoom < 0) << 5) | ((zoom > 0) << 4) | ((tilt > 0) << 3) | ((tilt < 0) << 2) \
            | ((pan < 0) << 1) | (pan > 0)
        return _frame(code, _byte("pan_speed", cmd.pan_speed), _byte("tilt_speed", cmd.tilt_speed),
                      _byte("zoom_speed", cmd.zoom_speed, 0xF), address)
    if isinstance(cmd, FocusIris):
        focus, iris = _sign("focus", cmd.focus), _sign("iris", cmd.iris)
        code = _FI | ((iris < 0) << 3) | ((iris > 0) << 2) | ((focus < 0) << 1) | (focus > 0)
        return _frame(code, _byte("focus_speed", cmd.focus_speed), _byte("iris_speed", cmd.iris_speed),
                      0, address)
    if isinstance(cmd, Preset):
        preset = next((c for c, a in _PRESET.items() if a == cmd.action), None)
        if preset is None:
            raise PtzError(f"preset action must be set, call or delete, not {cmd.action!r}")
        return _frame(preset, 0, _byte("preset index", cmd.index, 255, 1), 0, address)
    if isinstance(cmd, Cruise):
        cruise = next((c for c, a in _CRUISE.items() if a == cmd.action), None)
        if cruise is None:
            raise PtzError(f"cruise action must be one of {', '.join(_CRUISE.values())}, not {cmd.action!r}")
        group = _byte("cruise group", cmd.group)
        if cmd.action == "add":
            return _frame(cruise, group, _byte("preset", cmd.preset, 255, 1), 0, address)
        if cmd.action == "delete":
            return _frame(cruise, group, _byte("preset", cmd.preset), 0, address)
        if cmd.action == "start":
            return _frame(cruise, group, 0, 0, address)
        low, high = _twelve_bits(f"cruise {cmd.action}", cmd.value)
        return _frame(cruise, group, low, high, address)
    if isinstance(cmd, Scan):
        group = _byte("scan group", cmd.group)
        if cmd.action == "speed":
            low, high = _twelve_bits("scan speed", cmd.value)
            return _frame(_SCAN_SPEED, group, low, high, address)
        data = next((d for d, a in _SCAN_DATA.items() if a == cmd.action), None)
        if data is None:
            raise PtzError(f"scan action must be start, left, right or speed, not {cmd.action!r}")
        return _frame(_SCAN_SET, group, data, 0, address)
    if isinstance(cmd, Aux):
        return _frame(0x8C if cmd.on else 0x8D, _byte("switch", cmd.switch), 0, 0, address)
    raise TypeError(f"not a PTZ command: {cmd!r}")


def parse_frame(text: str | bytes) -> Frame:
    """The fields of a PTZCmd after checking its length, first byte, check nibble and checksum."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise PtzError("a PTZCmd is ASCII hex digits") from None
    text = text.strip()
    if len(text) != 16:
        raise PtzError(f"a PTZCmd is 16 hex digits (8 bytes), not {len(text)} characters")
    try:
        b = bytes.fromhex(text)
    except ValueError:
        raise PtzError(f"a PTZCmd is hex digits: {text!r}") from None
    if b[0] != FIRST_BYTE:
        raise PtzError(f"a PTZCmd starts with A5, not {b[0]:02X}")
    version = b[1] >> 4
    if b[1] & 0xF != (0xA + 0x5 + version) % 16:
        raise PtzError(f"byte 2 {b[1]:02X}: check nibble should be {(0xA + 0x5 + version) % 16:X}")
    if sum(b[:7]) % 256 != b[7]:
        raise PtzError(f"checksum {b[7]:02X} should be {sum(b[:7]) % 256:02X}")
    return Frame(b[3], b[4], b[5], b[6] >> 4, ((b[6] & 0xF) << 8) | b[2])


def parse(text: str | bytes) -> PtzCommand:
    """The command a PTZCmd carries; PtzError for anything Annex A.3 does not define."""
    f = parse_frame(text)
    code = f.instruction
    if code & 0xC0 == 0:  # A.3.2: bits 7-6 = 00
        if code & 0x30 == 0x30 or code & 0x0C == 0x0C or code & 0x03 == 0x03:
            raise PtzError(f"instruction {code:02X} asks for two opposite directions at once")
        return Motion(pan=(code & 1) - (code >> 1 & 1), tilt=(code >> 3 & 1) - (code >> 2 & 1),
                      zoom=(code >> 4 & 1) - (code >> 5 & 1), pan_speed=f.data1,
                      tilt_speed=f.data2, zoom_speed=f.data3)
    if code & 0xF0 == _FI:  # A.3.3: 0100 xxxx
        if code & 0x0C == 0x0C or code & 0x03 == 0x03:
            raise PtzError(f"instruction {code:02X} asks for two opposite directions at once")
        return FocusIris(focus=(code & 1) - (code >> 1 & 1), iris=(code >> 2 & 1) - (code >> 3 & 1),
                         focus_speed=f.data1, iris_speed=f.data2)
    if code in _PRESET:
        if not f.data2:
            raise PtzError("preset 0 is reserved (A.3.4); presets are 1-255")
        return Preset(_PRESET[code], f.data2)
    if code in _CRUISE:
        action = _CRUISE[code]
        if action == "add":
            if not f.data2:
                raise PtzError("a cruise point is a preset 1-255")
            return Cruise(action, f.data1, preset=f.data2)
        if action == "delete":
            return Cruise(action, f.data1, preset=f.data2)
        if action == "start":
            return Cruise(action, f.data1)
        value = f.data2 | f.data3 << 8
        if not value:
            raise PtzError(f"cruise {action} 0 is out of range (1-4095)")
        return Cruise(action, f.data1, value=value)
    if code == _SCAN_SET:
        if f.data2 not in _SCAN_DATA:
            raise PtzError(f"scan instruction 89 with data {f.data2:02X}: 00 start, 01 left, 02 right")
        return Scan(_SCAN_DATA[f.data2], f.data1)
    if code == _SCAN_SPEED:
        value = f.data2 | f.data3 << 8
        if not value:
            raise PtzError("scan speed 0 is out of range (1-4095)")
        return Scan("speed", f.data1, value=value)
    if code in _AUX:
        return Aux(_AUX[code], f.data1)
    raise PtzError(f"instruction {code:02X} is not defined by Annex A.3")


# -- the other camera-moving controls of A.2.3 -----------------------------------------------------

def home_position_fields(enabled: bool, reset_time: int | None = None,
                         preset_index: int | None = None) -> list[tuple[str, Any]]:
    """A.2.3 HomePosition: return to ``preset_index`` after ``reset_time`` seconds idle (enabled),
    or no home position. The device confirms it with a Response (§9.3.2)."""
    inner: list[tuple[str, Any]] = [("Enabled", 1 if enabled else 0)]
    if enabled:
        if reset_time is not None:
            inner.append(("ResetTime", _byte("reset_time", reset_time, 10**6)))
        if preset_index is not None:
            inner.append(("PresetIndex", _byte("preset_index", preset_index, 255)))
    return [("HomePosition", inner)]


def drag_zoom_fields(zoom_in: bool, *, length: int, width: int, mid_x: int, mid_y: int,
                     length_x: int, length_y: int) -> list[tuple[str, Any]]:
    """A.2.3 DragZoomIn/DragZoomOut: a box (centre ``mid_x, mid_y``, size ``length_x`` by
    ``length_y``) in a player window of ``length`` by ``width`` pixels, origin top left. In:
    the box fills the window; out: the window shrinks into the box. Not confirmed (§9.3.1)."""
    for name, v in (("length", length), ("width", width)):
        _byte(name, v, 65535, 1)
    for name, v, limit in (("mid_x", mid_x, length), ("length_x", length_x, length),
                           ("mid_y", mid_y, width), ("length_y", length_y, width)):
        _byte(name, v, limit)
    return [("DragZoomIn" if zoom_in else "DragZoomOut", [
        ("Length", length), ("Width", width), ("MidPointX", mid_x), ("MidPointY", mid_y),
        ("LengthX", length_x), ("LengthY", length_y)])]
