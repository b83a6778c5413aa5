"""Benchmark of the channel registry (src/registry/channels.py) over a real SQLite file.

Prints the resident memory per 100,000 channels (built as the catalog codec
builds them, every field and the raw Item dict included), the upsert rate for
new and for known channels, the time to flush all of them in one transaction
and to load them back at startup (in a fresh interpreter, so the memory
figure is not flattered by freed memory being reused), and the time of
availability() over the whole fleet with about two events per channel in the
window, with the longest event-loop stall while it runs.

    python bench/channels.py --channels 100000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

# Run as a script, this file's directory comes first on sys.path; keep it
# out so that `registry` resolves to the package, as in bench/registry.py.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

from registry import Channel, ChannelRegistry, DeviceRegistry, SqliteStore  # noqa: E402


def _registry_bench():
    # bench/registry.py's stall meter, loaded by path: this folder is off sys.path.
    spec = importlib.util.spec_from_file_location("bench_registry", _here / "registry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


max_stall_during = _registry_bench().max_stall_during

CHANNELS_PER_NVR = 64


def nvr_id(n: int) -> str:
    return f"34020000001180{n // CHANNELS_PER_NVR:06d}"


def item(n: int) -> dict:
    """A catalog Item as the XML codec hands it over: fresh strings, keys included
    (a parser per message does not share them across messages)."""
    channel_id = f"340{2 + n % 3:01d}0{n % 10:01d}00001320{n:06d}"
    k = "".join  # new key objects, as a fresh parser would make
    return {
        k(["Device", "ID"]): channel_id,
        k(["Na", "me"]): f"Camera {n} North Gate Road {n % 97}",
        k(["Manu", "facturer"]): "".join(["Hik", "vision"]),
        k(["Mo", "del"]): "".join(["DS-2CD2T47G2", "-L"]),
        k(["Ow", "ner"]): "".join(["Own", "er"]),
        k(["Civil", "Code"]): channel_id[:6],
        k(["Blo", "ck"]): f"B{n % 12}",
        k(["Add", "ress"]): f"No. {n % 500} Huangshan Road, Hefei",
        k(["Paren", "tal"]): "0",
        k(["Parent", "ID"]): nvr_id(n),
        k(["Safety", "Way"]): "0",
        k(["Register", "Way"]): "1",
        k(["Secre", "cy"]): "0",
        k(["IP", "Address"]): f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
        k(["Po", "rt"]): "8000",
        k(["Stat", "us"]): "ON",
        k(["Longi", "tude"]): f"{117 + n % 1000 / 1000:.6f}",
        k(["Lati", "tude"]): f"{31 + n % 777 / 1000:.6f}",
        k(["In", "fo"]): {k(["PTZ", "Type"]): "1", k(["Resol", "ution"]): "6/4/2", k(["Download", "Speed"]): "1/2/4"},
    }


def channel(n: int) -> Channel:
    raw = item(n)
    info = raw["Info"]
    return Channel(
        channel_id=raw["DeviceID"], device_id=nvr_id(n), kind="channel", name=raw["Name"],
        manufacturer=raw["Manufacturer"], model=raw["Model"], owner=raw["Owner"],
        civil_code=raw["CivilCode"], block=raw["Block"], address=raw["Address"], parental=0,
        parent_id=raw["ParentID"], safety_way=0, register_way=1, secrecy=0, ip_address=raw["IPAddress"],
        port=8000, status="ON", longitude=float(raw["Longitude"]), latitude=float(raw["Latitude"]),
        ptz_type=1, info=dict(info), raw=raw, tier=n % 3 + 1,
    )


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def per_100k(nbytes: int, n: int) -> str:
    return f"{nbytes / n * 100_000 / 2**20:8.1f} MiB RSS per 100k channels"


async def timed(coro) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = await coro
    return time.perf_counter() - t0, result


async def upsert_all(channels: ChannelRegistry, n: int, at: float) -> float:
    """Seconds spent in upsert() for n freshly built items, in catalogs of one NVR each."""
    spent = 0.0
    clock = time.perf_counter
    for first in range(0, n, CHANNELS_PER_NVR):
        batch = [channel(i) for i in range(first, min(first + CHANNELS_PER_NVR, n))]
        t0 = clock()
        for c in batch:
            channels.upsert(c, at=at)
        spent += clock() - t0
    return spent


async def run(n: int, path: Path, gc_freeze: bool) -> None:
    print(f"channel registry bench: {n} channels on {n // CHANNELS_PER_NVR + 1} NVRs, database {path}")
    store = SqliteStore(path)
    devices = DeviceRegistry(store, flush_interval=3600)
    await devices.start()
    channels = ChannelRegistry(store, flush_interval=3600)
    await channels.start()
    nvrs = sorted({nvr_id(i) for i in range(n)})
    t_start = time.time() - 3_600
    for d in nvrs:
        channels.set_device_online(d, True, at=t_start)

    # Catalogs arrive: each item is built (what the catalog codec does) and
    # upserted at once, as the server does; only the upserts are timed.
    rss_before = rss()
    t_insert = await upsert_all(channels, n, at=t_start)
    t_flush, _ = await timed(channels.flush())
    rss_live = rss() - rss_before
    print(f"upsert {n} new:        {t_insert:8.3f} s  ({n / t_insert:,.0f}/s, {t_insert / n * 1e6:.2f} us each)")
    print(f"flush {n} channels:    {t_flush:8.3f} s  ({n / t_flush:,.0f}/s, one transaction, {n} events)")
    print(f"memory after catalogs: {per_100k(rss_live, n)}")

    # A full catalog refresh: every channel known, new Item objects.
    t_update = await upsert_all(channels, n, at=t_start + 1)
    t_reflush, _ = await timed(channels.flush())
    print(f"upsert {n} known:      {t_update:8.3f} s  ({n / t_update:,.0f}/s, {t_update / n * 1e6:.2f} us each)")
    print(f"flush {n} updated:     {t_reflush:8.3f} s  ({n / t_reflush:,.0f}/s)")

    # About two events per channel in the window: a third lose video for a
    # while, a third go OFF with their NVR, a third stay up.
    since = t_start + 600
    until = since + 1_800
    ids = sorted(c.channel_id for c in channels)
    for j, channel_id in enumerate(ids):
        c = channels.get(channel_id)
        if j % 3 == 0:
            channels.set_status(c, "VLOST", "notify", at=since + 60 + j % 600)
            channels.set_status(c, "ON", "notify", at=since + 900 + j % 600)
    for k, d in enumerate(nvrs):
        if k % 3 == 1:
            channels.set_device_online(d, False, at=since + 300 + k % 600)
            channels.set_device_online(d, True, at=since + 1_000 + k % 600)
    t_events, _ = await timed(channels.flush())
    history = await store.channel_history(since, until)
    print(f"flush window events:   {t_events:8.3f} s  ({len(history) - n} events in the window, "
          f"{len(history) / n:.1f} history rows per channel)")
    await channels.stop()
    await devices.stop()
    # The rest runs where nothing was allocated before: a server starting up.
    subprocess.run([sys.executable, __file__, "--load", str(path), "--since", repr(since),
                    "--until", repr(until)] + (["--gc-freeze"] if gc_freeze else []), check=True)


async def load_and_report(path: Path, since: float, until: float, gc_freeze: bool) -> None:
    rss_before = rss()
    store = SqliteStore(path)
    devices = DeviceRegistry(store, flush_interval=3600)
    channels = ChannelRegistry(store, flush_interval=3600)
    t0 = time.perf_counter()
    await devices.start()
    await channels.start()
    t_load = time.perf_counter() - t0
    n = len(channels)
    rss_loaded = rss() - rss_before
    print(f"load {n} channels:     {t_load:8.3f} s  ({n / t_load:,.0f}/s, open + read + index)")
    print(f"memory after load:     {per_100k(rss_loaded, n)}")
    if gc_freeze:
        # What an application can do after startup: full collections then skip
        # the loaded channels, which otherwise make each one take ~130 ms.
        gc.freeze()

    rows: list = []

    async def history() -> None:
        rows.extend(await store.channel_history(since, until))

    t_hist, stall = await max_stall_during(history())
    print(f"channel_history():     {t_hist:8.3f} s  ({len(rows)} rows; "
          f"event loop stalled {stall * 1e3:.0f} ms at worst)")
    for group_by in ("tier", "civil_code", "all"):
        result: list[dict] = []

        async def report(result: list[dict] = result, group_by: str = group_by) -> None:
            result.extend(await channels.availability(since, until, group_by=group_by))

        t_av, stall = await max_stall_during(report())
        ratios = ", ".join(f"{r['group']}: {r['online_ratio']:.4f}/{r['working_ratio']:.4f}" for r in result[:3])
        print(f"availability({group_by}):{' ' * (10 - len(group_by))}{t_av:8.3f} s  "
              f"(stall {stall * 1e3:.0f} ms; {len(result)} groups; online/working {ratios}"
              f"{' ...' if len(result) > 3 else ''})")
    t0 = time.perf_counter()
    live = channels.live_ratios(group_by="civil_code")
    t_live = time.perf_counter() - t0
    print(f"live_ratios():         {t_live * 1e3:8.1f} ms ({len(live)} series)")
    t0 = time.perf_counter()
    total, _ = channels.query(civil_code="3402", text="north gate road 5", offset=0, limit=100)
    t_query = time.perf_counter() - t0
    print(f"query(civil+text):     {t_query * 1e3:8.1f} ms ({total} matching)")
    t0 = time.perf_counter()
    report = channels.archive_report()
    t_archive = time.perf_counter() - t0
    print(f"archive_report():      {t_archive * 1e3:8.1f} ms ({report['complete']} complete)")
    await channels.stop()
    await devices.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=100_000, metavar="N",
                        help="channels to create (default 100000)")
    parser.add_argument("--db", type=Path,
                        help="database file to use (default: a temporary one, deleted afterwards); must not exist")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="call gc.freeze() after loading, as an application may")
    # The second half, run in a fresh interpreter by the first.
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--since", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load is not None:
        asyncio.run(load_and_report(args.load, args.since, args.until, args.gc_freeze))
        return
    if args.channels < 1:
        parser.error("--channels must be positive")
    if args.db is not None:
        if args.db.exists():
            parser.error(f"{args.db} exists; the bench needs a fresh file")
        asyncio.run(run(args.channels, args.db, args.gc_freeze))
        return
    with tempfile.TemporaryDirectory(prefix="channels-bench-") as tmp:
        asyncio.run(run(args.channels, Path(tmp) / "registry.db", args.gc_freeze))


if __name__ == "__main__":
    main()
