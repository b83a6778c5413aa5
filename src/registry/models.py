"""Records the registry keeps: one `Device` per GB/T 28181 device, one
`StatusEvent` per online/offline transition and one `FaultEvent` per change of
the fault state its keepalives report; one `Channel` per catalog item
and one `ChannelEvent` per change of a channel's effective state.

They are plain slotted dataclasses because the SIP registrar and the catalog
handling read and write them on every REGISTER, keepalive and NOTIFY;
`DeviceRegistry` (devices.py) and `ChannelRegistry` (channels.py) own the live
objects and hand `copy()` snapshots to a `Store` (store.py) for persistence.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class Device:
    """One device as the platform knows it; mutated in place on the hot path."""

    device_id: str                 # 20-digit GB/T 28181 ID
    # "ipc" | "camera" | "nvr" | "dvr" | "platform" | "alarm" | "other" (from the ID's type code; set by caller)
    kind: str = ""
    name: str = ""
    manufacturer: str = ""
    model: str = ""
    firmware: str = ""
    transport: str = "udp"         # "udp" | "tcp"
    host: str = ""                 # last known source address (NAT-refreshed)
    port: int = 0
    contact: str = ""              # Contact URI from REGISTER
    expires: int = 0               # registration Expires granted, seconds
    registered_at: float = 0.0     # unix time of the last successful REGISTER
    expires_at: float = 0.0        # unix time the registration runs out; 0 = not registered
    last_seen: float = 0.0         # unix time of the last REGISTER/keepalive/any message
    keepalive_at: float = 0.0      # unix time of the last keepalive
    online: bool = False
    status_changed_at: float = 0.0
    password: str | None = None    # per-device password; None = use the configured default
    created_at: float = 0.0
    updated_at: float = 0.0
    extra: dict = field(default_factory=dict)   # stored as JSON; for later fields

    def copy(self) -> Device:
        """A detached snapshot: later changes to this device do not show in it."""
        # Positional construction from one attrgetter call is ~3x faster than
        # dataclasses.replace(), which matters when a flush snapshots 100k devices.
        snap = Device(*device_values(self))
        # `extra` is the only mutable field; one level is copied because values
        # put there are expected to be JSON scalars or small flat containers.
        snap.extra = dict(self.extra)
        return snap


DEVICE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Device))
"""Field names in declaration order; stores use it as their column order."""

device_values = operator.attrgetter(*DEVICE_FIELDS)
"""`device_values(device)` -> tuple of its field values in DEVICE_FIELDS order."""


@dataclass(slots=True, frozen=True)
class StatusEvent:
    """A device went online or offline."""

    device_id: str
    online: bool
    at: float          # unix time
    reason: str        # "register" | "keepalive" | "unregister" | "keepalive-timeout" | "expired" | "admin" ...


@dataclass(slots=True, frozen=True)
class FaultEvent:
    """A device reported faults in its keepalive (``Status`` ERROR with an ``Info`` list of the
    faulty sub-devices, A.2.5a), or reported OK again after that."""

    device_id: str
    at: float          # unix time
    status: str        # "ERROR" | "OK"
    devices: tuple[str, ...] = ()   # the faulty sub-devices (channels, alarm inputs) named


@dataclass(slots=True, frozen=True)
class AlarmEvent:
    """An alarm a device reported (GB/T 28181-2016 §9.4, Annex A.2.5 Notify Alarm), as stored.

    ``device_id`` is the device that sent it, ``channel_id`` the body's DeviceID (a camera or
    alarm input of it; the device itself for device alarms). ``alarm_time`` is the device's
    AlarmTime (unix time, None when absent or unreadable), ``received_at`` ours. ``info``
    holds what else the body said (AlarmTypeParam, vendor extras)."""

    device_id: str
    channel_id: str
    priority: int | None      # AlarmPriority: 1 first-level (most urgent) .. 4 fourth-level
    method: int | None        # AlarmMethod: 1 phone .. 7 other
    alarm_type: int | None    # Info/AlarmType, read against the method
    alarm_time: float | None
    description: str
    longitude: float | None
    latitude: float | None
    received_at: float
    info: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(slots=True, frozen=True)
class PositionEvent:
    """A position fix a mobile device reported (GB/T 28181-2016 §9.11.2, Annex A.2.5
    Notify MobilePosition), as stored in its track.

    ``device_id`` is the device that sent it, ``target_id`` the body's DeviceID (the device
    itself, or one of its channels). ``time`` is the device's Time (unix time, None when absent
    or unreadable), ``received_at`` ours; the track is ordered by ``received_at``. ``speed`` is
    in km/h, ``direction`` in degrees clockwise from north, ``altitude`` in metres."""

    device_id: str
    target_id: str
    time: float | None
    longitude: float
    latitude: float
    speed: float | None
    direction: float | None
    altitude: float | None
    received_at: float


CHANNEL_STATES: tuple[str, ...] = ("ON", "OFF", "VLOST", "DEFECT")
"""A channel's status as a catalog Item (A.2.1g `Status`) or a catalog NOTIFY
`Event` (§4, Annex P) reports it: ON, OFF, video lost, defect."""


@dataclass(slots=True)
class Channel:
    """One catalog item ("one device, one file"); mutated in place by `ChannelRegistry`."""

    channel_id: str                 # the Item's DeviceID (20 digits, or 2/4/6/8-digit civil code items)
    device_id: str                  # the device (NVR/IPC/lower platform) whose catalog listed it
    # "channel" | "civil-code" | "system" | "business-group" | "virtual-org" | "device" | "alarm" | "other"
    kind: str = "channel"
    name: str = ""
    manufacturer: str = ""
    model: str = ""
    owner: str = ""
    civil_code: str = ""
    block: str = ""
    address: str = ""
    parental: int = 0
    parent_id: str = ""             # as sent; may be '/'-joined (device ID plus virtual-org IDs)
    business_group_id: str = ""
    safety_way: int | None = None
    register_way: int | None = None
    secrecy: int = 0
    ip_address: str = ""
    port: int = 0
    status: str = "ON"              # the channel's own last reported status: ON | OFF | VLOST | DEFECT
    longitude: float | None = None
    latitude: float | None = None
    ptz_type: int | None = None
    info: dict = field(default_factory=dict)   # the <Info> block, parsed
    raw: dict = field(default_factory=dict)    # every Item field exactly as received (incl. vendor extras)
    tier: int = 3                   # 1/2/3 (field tiers: 1 key sites, 2 key organisations, 3 other)
    tier_locked: bool = False       # set through the API: tier rules leave it alone
    state: str = "OFF"              # EFFECTIVE state: OFF whenever the device is offline, else `status`
    state_changed_at: float = 0.0
    seen_at: float = 0.0            # last time a catalog listed it
    created_at: float = 0.0
    updated_at: float = 0.0

    def copy(self) -> Channel:
        """A detached snapshot: later changes to this channel do not show in it."""
        snap = Channel(*channel_values(self))
        # One level, as Device.copy does for `extra`: the catalog codec builds
        # these from XML, so values are strings or small nested dicts that are
        # replaced, not edited, on the next catalog.
        snap.info = dict(self.info)
        snap.raw = dict(self.raw)
        return snap

    def share_strings(self) -> None:
        """Make this channel's strings the same objects as equal ones elsewhere.

        100k catalog items repeat the same few values (vendor, model, owner,
        civil codes, the NVR's ID) and, in `raw` and `info`, the same keys,
        but a parser makes new objects for each; interning them cuts a loaded
        registry's memory by two thirds. Interned strings are freed with
        their last user, so nothing leaks. Replaces `raw` and `info`.
        """
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if type(value) is str:
                setattr(self, name, _intern(value))
        self.info = _shared_dict(self.info)
        self.raw = _shared_dict(self.raw)

    @property
    def area_code(self) -> str:
        """The civil code availability and queries group by: CivilCode, or the
        ID's own leading centre code (Annex D.1 digits 1-8) when a device left it out."""
        return self.civil_code or self.channel_id[:8]

    @property
    def has_location(self) -> bool:
        """Longitude and latitude present, non-zero and on the globe."""
        lon, lat = self.longitude, self.latitude
        return (
            lon is not None and lat is not None and lon != 0 and lat != 0
            and -180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0
        )


_intern = sys.intern


def _shared_dict(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if type(k) is str:
            k = _intern(k)
        kind = type(v)
        if kind is str:
            v = _intern(v)
        elif kind is dict:
            v = _shared_dict(v)
        out[k] = v
    return out


CHANNEL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Channel))
"""Field names in declaration order; stores use it as their column order."""

channel_values = operator.attrgetter(*CHANNEL_FIELDS)
"""`channel_values(channel)` -> tuple of its field values in CHANNEL_FIELDS order."""

_STR_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Channel) if f.type == "str")


@dataclass(slots=True, frozen=True)
class ChannelEvent:
    """A channel entered an effective state."""

    channel_id: str
    state: str      # effective state entered: ON | OFF | VLOST | DEFECT
    at: float       # unix time
    reason: str     # "catalog" | "notify" | "device-offline" | "device-online" | "removed" | "admin" ...
