"""Throughput of the sans-IO media codecs on a synthetic GB/T 28181 camera stream.

Builds a 3 Mbit/s-like H.264 stream (default 25 fps, ~15 KB P-frames, 100 KB
IDR every 50 frames, optional G.711 audio), then times each stage alone and the
whole receive path: PsMuxer, packetize, parse_rtp, RtpReorderer +
FrameAssembler, PsDemuxer (fed whole frames and fed per RTP payload), and
TcpRtpFramer. Figures are single-core wall-clock; "streams/core" divides the
stage's packet rate by one stream's packet rate.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from media.ps import PsDemuxer, PsMuxer
from media.rtp import FrameAssembler, RtpReorderer, packetize, parse_rtp
from media.rtp_tcp import TcpRtpFramer, frame_rfc4571

SC = b"\x00\x00\x00\x01"
SPS = bytes.fromhex("67640028acd940780227e5c044000003000400000300c83c60c658")  # x264, 1920x1080 High
PPS = bytes.fromhex("68ebe3cb22c0")


def make_aus(frames: int, gop: int, p_size: int, key_size: int, seed: int = 1) -> list[tuple[bytes, bool]]:
    rng = random.Random(seed)
    pool = rng.randbytes(key_size * 2).replace(b"\x00", b"\x01")  # no stray start codes
    aus = []
    for i in range(frames):
        if i % gop == 0:
            off = rng.randrange(key_size)
            aus.append((SC + b"\x09\xf0" + SC + SPS + SC + PPS + SC + b"\x65\x88" + pool[off : off + key_size], True))
        else:
            size = int(p_size * rng.uniform(0.7, 1.3))
            off = rng.randrange(len(pool) - size)
            aus.append((SC + b"\x09\xf0" + SC + b"\x41\x9a" + pool[off : off + size], False))
    return aus


def timed(fn: Callable[[], object], min_time: float) -> float:
    """Best-of-runs seconds per call, repeating until min_time has passed."""
    best = float("inf")
    spent = 0.0
    runs = 0
    while spent < min_time or runs < 3:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        runs += 1
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="stream length in seconds (default 20)")
    ap.add_argument("--fps", type=int, default=25, help="frames per second (default 25)")
    ap.add_argument("--p-size", type=int, default=15_000, help="mean P-frame bytes (default 15000)")
    ap.add_argument("--key-size", type=int, default=100_000, help="IDR frame bytes (default 100000)")
    ap.add_argument("--gop", type=int, default=50, help="frames per GOP (default 50)")
    ap.add_argument("--audio", action="store_true", help="add one 40 ms G.711A frame per video frame")
    ap.add_argument("--mtu", type=int, default=1400, help="RTP packet size limit (default 1400)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds to spend per measurement (default 1)")
    args = ap.parse_args(argv)

    n_frames = max(1, int(args.seconds * args.fps))
    aus = make_aus(n_frames, args.gop, args.p_size, args.key_size)
    es_bytes = sum(len(a) for a, _ in aus)
    step = 90000 // args.fps

    def mux() -> list[bytes]:
        m = PsMuxer("h264", "g711a" if args.audio else None)
        out = []
        for i, (au, key) in enumerate(aus):
            out.append(m.mux_video(au, i * step, None, key))
            if args.audio:
                out.append(m.mux_audio(b"\xd5" * 320, i * step))
        return out

    ps_packets = mux()
    ps_bytes = sum(len(p) for p in ps_packets)

    def rtp() -> list[bytes]:
        wire, seq = [], 65000
        for i, ps in enumerate(ps_packets):
            pk, seq = packetize(ps, ssrc=200000001, seq=seq, timestamp=i * step, mtu=args.mtu)
            wire += pk
        return wire

    wire = rtp()
    wire_bytes = sum(len(p) for p in wire)
    tcp_stream = b"".join(frame_rfc4571(p) for p in wire)
    tcp_segments = [tcp_stream[i : i + 1448] for i in range(0, len(tcp_stream), 1448)]
    payloads = [parse_rtp(p).payload for p in wire]

    def parse_all() -> None:
        for p in wire:
            parse_rtp(p)

    def reorder_assemble() -> None:
        r, fa = RtpReorderer(), FrameAssembler()
        for p in wire:
            for q in r.push(parse_rtp(p)):
                fa.push(q)

    def demux_frames() -> int:
        d = PsDemuxer()
        n = 0
        for ps in ps_packets:
            n += len(d.feed(ps))
            n += len(d.flush())
        return n

    def demux_payloads() -> int:
        d = PsDemuxer()
        n = 0
        for p in payloads:
            n += len(d.feed(p))
        return n + len(d.flush())

    def tcp_split() -> None:
        f = TcpRtpFramer()
        for s in tcp_segments:
            f.feed(s)

    def receive_path() -> int:
        r, fa, d = RtpReorderer(), FrameAssembler(), PsDemuxer()
        n = 0
        for p in wire:
            for q in r.push(parse_rtp(p)):
                for fr in fa.push(q):
                    n += len(d.feed(fr.payload))
                    n += len(d.flush())
        return n

    def send_path() -> None:
        m = PsMuxer("h264")
        seq = 0
        for i, (au, key) in enumerate(aus):
            _, seq = packetize(m.mux_video(au, i * step, None, key), ssrc=1, seq=seq, timestamp=i * step)

    n_video = len(aus)
    assert demux_frames() == len(ps_packets) and demux_payloads() == len(ps_packets)
    stream_pps = len(wire) / args.seconds
    mb = 1e6
    print(
        f"stream: {args.seconds:g} s, {n_video} video frames at {args.fps} fps, "
        f"{es_bytes * 8 / args.seconds / 1e6:.2f} Mbit/s ES, {len(ps_packets)} PS packets, "
        f"{len(wire)} RTP packets ({stream_pps:.0f}/s, {wire_bytes * 8 / args.seconds / 1e6:.2f} Mbit/s on the wire)"
    )
    rows = []

    def row(name: str, fn: Callable[[], object], nbytes: int, frames: int, packets: int) -> None:
        t = timed(fn, args.min_time)
        rows.append((name, nbytes / t / mb, frames / t, packets / t, (packets / t) / stream_pps))

    row("PsMuxer.mux_video", mux, ps_bytes, len(ps_packets), len(wire))
    row("packetize", rtp, wire_bytes, len(ps_packets), len(wire))
    row("parse_rtp", parse_all, wire_bytes, len(ps_packets), len(wire))
    row("TcpRtpFramer.feed", tcp_split, len(tcp_stream), len(ps_packets), len(wire))
    row("reorder+assemble", reorder_assemble, wire_bytes, len(ps_packets), len(wire))
    row("PsDemuxer (per frame)", demux_frames, ps_bytes, len(ps_packets), len(wire))
    row("PsDemuxer (per RTP)", demux_payloads, ps_bytes, len(ps_packets), len(wire))
    row("send: mux+packetize", send_path, wire_bytes, len(ps_packets), len(wire))
    row("receive: rtp->frames", receive_path, wire_bytes, len(ps_packets), len(wire))
    print(f"{'stage':<24}{'MB/s':>10}{'frames/s':>12}{'packets/s':>12}{'streams/core':>14}")
    for name, mbs, fps, pps, streams in rows:
        print(f"{name:<24}{mbs:>10.0f}{fps:>12.0f}{pps:>12.0f}{streams:>14.0f}")


if __name__ == "__main__":
    main()
