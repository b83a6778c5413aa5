"""Device registry: which GB/T 28181 devices exist, where they are and whether
they are online.

`DeviceRegistry` keeps every device in memory for the SIP registrar's hot path
and writes changes behind it, in batches, to a `Store` (`SqliteStore` today).
"""

from .devices import DeviceRegistry
from .models import Device, StatusEvent
from .sqlite import SqliteStore
from .store import Store, StoreError

__all__ = ["Device", "DeviceRegistry", "SqliteStore", "StatusEvent", "Store", "StoreError"]
