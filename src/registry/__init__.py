"""Device and channel registry: which GB/T 28181 devices and catalog channels
exist, where they are, whether they are online, and their history.

`DeviceRegistry` and `ChannelRegistry` keep every record in memory for the SIP
hot path and write changes behind it, in batches, to one shared `Store`
(`SqliteStore` today).
"""

from .channels import ChannelRegistry
from .devices import DeviceRegistry
from .models import (
    CHANNEL_STATES,
    AlarmEvent,
    Channel,
    ChannelEvent,
    Device,
    FaultEvent,
    PositionEvent,
    StatusEvent,
)
from .sqlite import SqliteStore
from .store import Store, StoreError

__all__ = [
    "AlarmEvent",
    "CHANNEL_STATES",
    "Channel",
    "ChannelEvent",
    "ChannelRegistry",
    "Device",
    "DeviceRegistry",
    "FaultEvent",
    "PositionEvent",
    "SqliteStore",
    "StatusEvent",
    "Store",
    "StoreError",
]
