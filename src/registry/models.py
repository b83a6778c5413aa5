"""Records the device registry keeps: one `Device` per GB/T 28181 device and one
`StatusEvent` per online/offline transition.

They are plain slotted dataclasses because the SIP registrar reads and writes
them on every REGISTER and keepalive; `DeviceRegistry` (devices.py) owns the
live objects and hands `Device.copy()` snapshots to a `Store` (store.py) for
persistence.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class Device:
    """One device as the platform knows it; mutated in place on the hot path."""

    device_id: str                 # 20-digit GB/T 28181 ID
    kind: str = ""                 # "ipc" | "camera" | "nvr" | "dvr" | "platform" | "alarm" | "other" (from the ID's type code; set by caller)
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
