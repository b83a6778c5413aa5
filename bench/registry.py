"""Benchmark of the device registry (src/registry) over a real SQLite file.

Prints how long it takes to add N devices and flush them, to load them back
at startup, to flush batches of 5,000 dirty devices (what the write-behind
loop sees under a REGISTER/keepalive storm), the longest event-loop stall
while such a flush runs, and the resident memory per 10,000 devices.

    python bench/registry.py --devices 100000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

# Run as a script, this file's directory comes first on sys.path and this
# module, also named "registry", would shadow the package it measures.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

from registry import Device, DeviceRegistry, SqliteStore  # noqa: E402


def make_device(n: int, now: float) -> Device:
    device_id = f"3402000000132{n:07d}"
    host = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
    return Device(
        device_id=device_id,
        kind="ipc",
        name=f"Camera {n}",
        manufacturer="Hikvision",
        model="DS-2CD2T47G2-L",
        firmware="V5.7.3 build 220112",
        transport="udp",
        host=host,
        port=5060,
        contact=f"sip:{device_id}@{host}:5060",
        expires=3600,
        registered_at=now,
        expires_at=now + 3600,
        last_seen=now,
        keepalive_at=now,
    )


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


async def max_stall_during(coro, tick: float = 0.001) -> tuple[float, float]:
    """Run coro; return (its duration, longest gap between 1 ms ticks meanwhile)."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(tick)
            now = time.perf_counter()
            worst = max(worst, now - last - tick)
            last = now

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = time.perf_counter()
    await coro
    elapsed = time.perf_counter() - start
    done = True
    await t
    return elapsed, worst


async def run(n: int, batch: int, batches: int, path: Path, gc_freeze: bool) -> None:
    now = time.time()
    print(f"registry bench: {n} devices, database {path}")

    reg = DeviceRegistry(SqliteStore(path), flush_interval=3600)
    await reg.start()
    rss_before = rss()
    fresh = [make_device(i, now) for i in range(n)]
    t0 = time.perf_counter()
    for d in fresh:
        reg.add(d)
    t_add = time.perf_counter() - t0
    del fresh
    t_flush, stall_full = await max_stall_during(reg.flush())
    # Measured after the flush, when the dirty set is empty again: steady state.
    rss_after = rss()
    print(f"add {n} devices:        {t_add:8.3f} s  ({n / t_add:,.0f} adds/s, {t_add / n * 1e6:.2f} us each)")
    print(
        f"flush {n} devices:      {t_flush:8.3f} s  ({n / t_flush:,.0f} devices/s, one transaction; "
        f"event loop stalled {stall_full * 1e3:.0f} ms at worst)"
    )
    print(f"memory:                 {(rss_after - rss_before) / n * 10_000 / 2**20:8.2f} MiB RSS per 10k devices")

    # Hot path: what a REGISTER refresh does to the registry.
    ids = [f"3402000000132{i:07d}" for i in range(n)]
    t0 = time.perf_counter()
    for device_id in ids:
        d = reg.get(device_id)
        d.last_seen = now
        reg.touch(d)
        reg.set_online(d, True, "register")
    t_hot = time.perf_counter() - t0
    print(f"get+touch+set_online:   {t_hot / n * 1e6:8.2f} us per device ({n / t_hot:,.0f}/s)")
    await reg.flush()
    await reg.stop()

    reg = DeviceRegistry(SqliteStore(path), flush_interval=3600)
    t0 = time.perf_counter()
    await reg.start()
    t_load = time.perf_counter() - t0
    assert len(reg) == n, len(reg)
    print(f"load {n} devices:       {t_load:8.3f} s  ({n / t_load:,.0f} devices/s, open + read + index)")
    if gc_freeze:
        # What an application can do after startup: full collections then skip
        # the loaded devices, which otherwise dominate event-loop stalls.
        gc.freeze()

    devices = list(reg)
    batch = min(batch, n)
    times: list[float] = []
    stalls: list[float] = []
    for b in range(batches):
        start = (b * batch) % n
        for d in devices[start : start + batch]:
            d.keepalive_at = d.last_seen = now + b
            reg.touch(d)
        elapsed, stall = await max_stall_during(reg.flush())
        times.append(elapsed)
        stalls.append(stall)
    await reg.stop()
    med = statistics.median(times)
    print(
        f"flush {batch} dirty:       {med * 1e3:8.1f} ms median per batch over {batches} batches "
        f"({batch / med:,.0f} devices/s), max {max(times) * 1e3:.1f} ms"
    )
    print(
        f"event-loop stall:       {max(stalls) * 1e3:8.1f} ms worst during those flushes "
        f"({'after gc.freeze()' if gc_freeze else 'mostly full GC passes; try --gc-freeze'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000, metavar="N", help="devices to create (default 100000)")
    parser.add_argument("--batch", type=int, default=5_000,
                        help="dirty devices per flush in the flush-rate test (default 5000)")
    parser.add_argument("--batches", type=int, default=20, help="flushes in the flush-rate test (default 20)")
    parser.add_argument("--db", type=Path,
                        help="database file to use (default: a temporary one, deleted afterwards); must not exist")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="call gc.freeze() after loading, as an application may")
    args = parser.parse_args()
    if args.devices < 1 or args.batch < 1 or args.batches < 1:
        parser.error("--devices, --batch and --batches must be positive")
    if args.db is not None:
        if args.db.exists():
            parser.error(f"{args.db} exists; the bench needs a fresh file")
        asyncio.run(run(args.devices, args.batch, args.batches, args.db, args.gc_freeze))
        return
    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        asyncio.run(run(args.devices, args.batch, args.batches, Path(tmp) / "registry.db", args.gc_freeze))


if __name__ == "__main__":
    main()
