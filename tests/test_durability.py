"""A REGISTER answered 200 is on disk: `gb28181 serve` killed with SIGKILL while a fleet
registers, three times over, loses no answered registration, and a device and its channels
are only ever written together."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from simulators.fleet import Fleet, FleetConfig

from .conftest import ServedServer

pytestmark = pytest.mark.slow


def answered(fleet: Fleet) -> set[str]:
    """Devices that have received a 200 to their REGISTER."""
    return {d.device_id for d in fleet.devices.values() if d.stats.registrations}


def on_disk(server: ServedServer) -> tuple[dict[str, int], set[str], list[tuple[str, str]]]:
    """(device ID -> online flag, devices with a "register" event, channels whose device is
    not in the devices table)."""
    with sqlite3.connect(server.data_dir / "gb28181.db") as db:
        devices = dict(db.execute("SELECT device_id, online FROM devices").fetchall())
        registered = {row[0] for row in db.execute(
            "SELECT device_id FROM status_events WHERE online = 1 AND reason = 'register'")}
        orphans = db.execute("SELECT channel_id, device_id FROM channels WHERE device_id NOT IN "
                             "(SELECT device_id FROM devices)").fetchall()
    return devices, registered, orphans


@pytest.mark.parametrize("kind", ["ipc", "nvr"])
async def test_sigkill_during_registration_loses_no_answered_register(tmp_path, kind):
    server = ServedServer(tmp_path, GB28181_KEEPALIVE__INTERVAL="60",
                          GB28181_CATALOG__SUBSCRIBE="false")
    prefix = "34020000001320" if kind == "ipc" else "34020000001180"
    devices = 1500 if kind == "ipc" else 300
    try:
        for round_no in range(3):
            # New devices each round: a registration of a device already online on disk would
            # leave no new "register" event to look for.
            first = f"{prefix}{1 + round_no * devices:06d}"
            server.start()
            fleet = Fleet(FleetConfig(
                server_port=server.sip_port, devices=devices, first_id=first, nvr=kind == "nvr",
                channels=4, register_rate=1500, retry_min=0.2, keepalive_interval=60,
                request_timeout=2.0))
            await fleet.start()
            try:
                # Kill while registrations (and, for NVRs, catalogs) are in full flow.
                deadline = time.monotonic() + 20
                while len(answered(fleet)) < devices // 3 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                server.kill()
                acked = answered(fleet)
            finally:
                await fleet.stop()
            assert acked, f"round {round_no}: no registration was answered before the kill"
            stored, registered, orphans = on_disk(server)
            lost = acked - registered
            assert not lost, (f"round {round_no}: {len(lost)} of {len(acked)} registrations "
                              f"answered 200 are not on disk, e.g. {sorted(lost)[:3]}")
            assert all(stored[d] for d in acked if d in stored)
            assert not orphans, f"round {round_no}: channels on disk without their device: {orphans[:3]}"
    finally:
        server.kill()
