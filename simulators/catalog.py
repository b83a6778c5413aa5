"""What a simulated device says about itself: DeviceInfo and Catalog bodies (A.2.6).

Plausible data derived from the device ID, so that runs are reproducible: a civil code from
the ID's centre code, coordinates scattered around a city centre, PTZ types, names with the
channel number. Catalog items follow the field order of A.2.1g.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from gb28181 import manscdp

__all__ = ["Channel", "device_info_fields", "catalog_item"]


@dataclass(slots=True)
class Channel:
    """One video channel of a simulated device."""

    channel_id: str
    name: str
    parent_id: str
    civil_code: str
    longitude: float
    latitude: float
    ptz_type: int
    online: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def make_channels(device_id: str, count: int, *, manufacturer: str, is_nvr: bool) -> list[Channel]:
    """Channels of a device: an IPC has one (type 131), an NVR ``count`` of them."""
    rnd = random.Random(device_id)
    civil = device_id[:6]
    base_lon, base_lat = 117.2 + rnd.random() * 0.2, 31.8 + rnd.random() * 0.2
    serial = int(device_id[14:])
    out = []
    for n in range(1, max(1, count) + 1):
        # Channel IDs: same centre and industry, type 131, serial from the device's.
        cid = f"{device_id[:10]}131{device_id[13]}{(serial * 1000 + n) % 1_000_000:06d}"
        name = f"{'NVR' if is_nvr else 'IPC'}-{serial} Camera {n:02d}"
        out.append(Channel(
            channel_id=cid, name=name, parent_id=device_id, civil_code=civil,
            longitude=round(base_lon + rnd.uniform(-0.01, 0.01), 6),
            latitude=round(base_lat + rnd.uniform(-0.01, 0.01), 6),
            ptz_type=rnd.choice((1, 2, 3, 3, 3)),
            extra={"manufacturer": manufacturer}))
    return out


def device_info_fields(*, name: str, manufacturer: str, model: str, firmware: str,
                       channels: int) -> list[tuple[str, Any]]:
    return [("DeviceName", name), ("Result", "OK"), ("Manufacturer", manufacturer),
            ("Model", model), ("Firmware", firmware), ("Channel", channels)]


def catalog_item(ch: Channel, *, model: str) -> manscdp.Node:
    fields: list[tuple[str, Any]] = [
        ("DeviceID", ch.channel_id), ("Name", ch.name),
        ("Manufacturer", ch.extra.get("manufacturer", "Simulator")), ("Model", model),
        ("Owner", "Owner"), ("CivilCode", ch.civil_code), ("Address", f"Road {ch.channel_id[-4:]}"),
        ("Parental", 0), ("ParentID", ch.parent_id), ("SafetyWay", 0), ("RegisterWay", 1),
        ("Secrecy", 0), ("Status", "ON" if ch.online else "OFF"),
        ("Longitude", ch.longitude), ("Latitude", ch.latitude),
        ("Info", manscdp.Node({}, [("PTZType", ch.ptz_type)])),
    ]
    return manscdp.Node({}, fields)
