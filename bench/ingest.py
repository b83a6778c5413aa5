"""Throughput of media ingest: RtpIngest alone, and MediaReceiver's shared UDP port.

1. Sans-IO: a 3 Mbit/s-like H.264 camera stream (bench/ps_rtp.py's synthetic
   AUs: 25 fps, ~15 KB P-frames, 100 KB IDR every 50 frames, optional G.711)
   muxed with PsMuxer and packetized, fed packet by packet through
   RtpIngest (parse, reorder, assemble, demux, keyframe gate, stats) in order
   and with 1 % loss + 2 % reordering. Single core; "streams/core" divides the
   packet rate by one stream's packet rate.
2. Sockets: a second process sends N such streams (distinct SSRCs, staggered)
   to one MediaReceiver UDP port on loopback, paced in real time; the receiver
   (uvloop unless --no-uvloop) feeds N RtpIngests. Reports the receiver
   process's CPU time per packet (so the streams one core could carry), the
   packets that did not arrive, and frames handed over.
3. Sockets, blast: the same sender without pacing, to find the receive
   ceiling; the kernel drops what the receiver cannot keep up with.

    python bench/ingest.py --streams 100 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing as mp
import random
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from media.ingest import RtpIngest
from media.packet import MediaPacket
from media.ps import PsMuxer
from media.receiver import MediaReceiver
from media.rtp import packetize


def _ps_rtp_bench():
    # bench/ps_rtp.py's stream generator and timer, loaded by path (bench is no package).
    spec = importlib.util.spec_from_file_location("bench_ps_rtp", Path(__file__).resolve().parent / "ps_rtp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_ps_rtp = _ps_rtp_bench()
make_aus, timed = _ps_rtp.make_aus, _ps_rtp.timed


def build_stream(seconds: float, fps: int, p_size: int, key_size: int, gop: int, audio: bool, seed: int = 1
                 ) -> list[tuple[float, list[bytes]]]:
    """[(send time offset, RTP packets of one PS packet)] for one stream, SSRC 0."""
    aus = make_aus(max(1, int(seconds * fps)), gop, p_size, key_size, seed)
    muxer = PsMuxer("h264", "g711a" if audio else None)
    step = 90000 // fps
    out: list[tuple[float, list[bytes]]] = []
    seq = 0
    for i, (au, key) in enumerate(aus):
        t = i / fps
        pk, seq = packetize(muxer.mux_video(au, i * step, None, key), ssrc=0, seq=seq, timestamp=i * step)
        out.append((t, pk))
        if audio:
            pk, seq = packetize(muxer.mux_audio(b"\xd5" * 320, i * step), ssrc=0, seq=seq, timestamp=i * step)
            out.append((t, pk))
    return out


def with_ssrc(packet: bytes, ssrc_bytes: bytes) -> bytes:
    return packet[:8] + ssrc_bytes + packet[12:]


# -- 1. sans-IO ---------------------------------------------------------------------------


def bench_sans_io(args: argparse.Namespace) -> None:
    frames = build_stream(args.seconds, args.fps, args.p_size, args.key_size, args.gop, args.audio)
    wire = [p for _, pk in frames for p in pk]
    nbytes = sum(len(p) for p in wire)
    stream_pps = len(wire) / args.seconds
    rng = random.Random(1)
    lossy = [p for p in wire if rng.random() >= 0.01]
    for i in range(len(lossy) - 1, 0, -1):
        if rng.random() < 0.02:
            j = min(len(lossy) - 1, i + rng.randint(1, 5))
            lossy.insert(j, lossy.pop(i))
    print(
        f"stream: {len(wire)} RTP packets in {args.seconds:g} s ({stream_pps:.0f} packets/s, "
        f"{nbytes * 8 / args.seconds / 1e6:.2f} Mbit/s on the wire), {len(frames)} PS packets"
    )
    print(f"{'RtpIngest.feed':<30}{'packets/s':>12}{'MB/s':>9}{'streams/core':>14}{'handed over':>13}")
    for name, packets in (("in order", wire), ("1 % loss, 2 % reordered", lossy)):
        delivered = [0]

        def on_packet(p: MediaPacket, delivered: list[int] = delivered) -> None:
            delivered[0] += 1

        def run(delivered: list[int] = delivered, packets: list[bytes] = packets,
                on_packet: Callable[[MediaPacket], None] = on_packet) -> None:
            delivered[0] = 0
            ingest = RtpIngest(on_packet)
            feed = ingest.feed
            for p in packets:
                feed(p)
            ingest.flush()

        t = timed(run, args.min_time)
        size = sum(len(p) for p in packets)
        print(
            f"{name:<30}{len(packets) / t:>12.0f}{size / t / 1e6:>9.1f}{len(packets) / t / stream_pps:>14.0f}"
            f"{delivered[0]:>9}/{len(frames)}"
        )


# -- 2./3. sockets ---------------------------------------------------------------------------


def sender(port: int, n: int, args_d: dict, paced: bool, result: mp.Queue) -> None:
    """Child process: send n streams to 127.0.0.1:port; reports packets sent."""
    frames = build_stream(args_d["seconds"], args_d["fps"], args_d["p_size"], args_d["key_size"], args_d["gop"],
                          args_d["audio"])
    ssrcs = [(1000 + i).to_bytes(4, "big") for i in range(n)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    dest = ("127.0.0.1", port)
    sent = 0
    gop_s = args_d["gop"] / args_d["fps"]
    t0 = time.monotonic() + 0.2
    # Stream i starts gop_s * i / n after stream 0, as independent cameras would:
    # neither their frames nor their keyframes leave at the same moment.
    events = sorted((t + gop_s * i / n, i, k) for k, (t, _) in enumerate(frames) for i in range(n))
    sendto = sock.sendto
    for due, i, k in events:
        if paced:
            delay = t0 + due - time.monotonic()
            if delay > 0.001:
                time.sleep(delay)
        ssrc = ssrcs[i]
        for p in frames[k][1]:
            while True:
                try:
                    sendto(with_ssrc(p, ssrc), dest)
                    break
                except BlockingIOError:  # pragma: no cover - blocking socket
                    time.sleep(0.0001)
            sent += 1
    sock.close()
    result.put(sent)


async def bench_receiver(args: argparse.Namespace, paced: bool) -> None:
    receiver = MediaReceiver("127.0.0.1")
    await receiver.start()
    delivered = [0]

    def on_packet(p: MediaPacket) -> None:
        delivered[0] += 1

    handles = [receiver.expect_udp(1000 + i, RtpIngest(on_packet)) for i in range(args.streams)]
    args_d = {k: getattr(args, k) for k in ("seconds", "fps", "p_size", "key_size", "gop", "audio")}
    ctx = mp.get_context("spawn")  # not fork: the parent runs an event loop
    result = ctx.Queue()
    proc = ctx.Process(target=sender, args=(receiver.udp_port, args.streams, args_d, paced, result), daemon=True)
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    proc.start()
    # The sender reports when it is done; meanwhile the loop receives.
    while proc.is_alive():
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # drain what is still in the socket buffer
    sent = result.get(timeout=5)
    wall = time.monotonic() - wall0
    received = receiver.udp_packets
    cpu = time.process_time() - cpu0
    first = min((h.ingest.stats.first_packet_at or wall0 for h in handles), default=wall0)
    last = max((h.ingest.stats.last_packet_at or wall0 for h in handles), default=wall0)
    active = max(last - first, 1e-9)
    nbytes = sum(h.ingest.stats.bytes for h in handles)
    for h in handles:
        h.ingest.flush()
    await receiver.close()
    per_packet = cpu / max(received, 1)
    stream_pps = sent / args.streams / args.seconds
    mode = "paced (real time)" if paced else "blast (no pacing)"
    print(
        f"{mode}: {args.streams} streams, sent {sent} packets, received {received} "
        f"({100 * (sent - received) / max(sent, 1):.2f} % lost in the kernel), "
        f"{delivered[0]} PS packets handed over"
    )
    print(
        f"  receive rate {received / active:,.0f} packets/s, {nbytes / active / 1e6:.1f} MB/s over {active:.2f} s; "
        f"receiver CPU {cpu:.2f} s of {wall:.2f} s wall = {per_packet * 1e6:.2f} us/packet "
        f"-> {1 / per_packet:,.0f} packets/s/core = {1 / per_packet / stream_pps:.0f} streams/core "
        f"(rcvbuf {receiver.udp_rcvbuf >> 10} KiB)"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="stream length in seconds (default 5)")
    ap.add_argument("--fps", type=int, default=25, help="frames per second (default 25)")
    ap.add_argument("--p-size", type=int, default=15_000, help="mean P-frame bytes (default 15000)")
    ap.add_argument("--key-size", type=int, default=100_000, help="IDR frame bytes (default 100000)")
    ap.add_argument("--gop", type=int, default=50, help="frames per GOP (default 50)")
    ap.add_argument("--audio", action="store_true", help="add one 40 ms G.711A frame per video frame")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per sans-IO measurement (default 1)")
    ap.add_argument("--streams", type=int, default=50, help="concurrent UDP streams (default 50)")
    ap.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    ap.add_argument("--skip", choices=["sans-io", "paced", "blast"], action="append", default=[],
                    help="skip a part (repeatable)")
    args = ap.parse_args(argv)

    if "sans-io" not in args.skip:
        bench_sans_io(args)
    run = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            print("uvloop not installed: default asyncio loop", file=sys.stderr)
    for paced in (True, False):
        if ("paced" if paced else "blast") not in args.skip:
            run(bench_receiver(args, paced))


if __name__ == "__main__":
    main()
