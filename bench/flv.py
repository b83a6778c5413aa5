"""FLV muxing and stream-hub fan-out throughput (single core, wall clock).

1. FlvMuxer: MB/s (of H.264 elementary stream in) and frames/s per core, video only and
   with one G.711A packet per frame; "viewers/core" divides the frame rate by the
   stream's frame rate (each HTTP-FLV viewer runs its own muxer). The start-code scan of
   an AU is cached process-wide, so the first viewer of a stream pays it ("cold", the
   default rows) and further viewers do not ("further viewer").
2. The same H.264 packets muxed by FFmpeg's FLV muxer through PyAV (av.open(BytesIO, "w",
   format="flv"), stream copy: Annex-B packets, extradata from the stream) in the same run,
   and the ratio hand-written / PyAV.
3. Hub fan-out: packets/s delivered to N asyncio consumers (N = 1, 10, 100 by default),
   each woken per packet as on a live stream; then the same with an FlvMuxer per consumer
   (what N HTTP-FLV viewers cost).

The stream is synthetic by default (x264 1080p SPS/PPS, random slice payloads: muxing
never looks inside a slice); --encode WxH uses real libx264 output from PyAV instead.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import io
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ps_rtp import make_aus, timed  # noqa: E402  (bench/ps_rtp.py: the same synthetic stream)

from media import nal  # noqa: E402
from media.flv import FlvMuxer, clear_parse_cache  # noqa: E402
from media.hub import Stream  # noqa: E402
from media.packet import MediaPacket  # noqa: E402
from media.ps import SID_AUDIO, PsFrame, PsMuxer  # noqa: E402


def encode_aus(size: str, frames: int, gop: int, fps: int) -> list[tuple[bytes, bool]]:
    import av
    import numpy as np

    w, h = (int(x) for x in size.lower().split("x"))
    cc = av.CodecContext.create("libx264", "w")
    cc.width, cc.height, cc.pix_fmt = w, h, "yuv420p"
    cc.time_base = fractions.Fraction(1, fps)
    cc.framerate = fps
    cc.gop_size = gop
    cc.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(gop), "keyint_min": str(gop)}
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (h, w, 3), np.uint8)
    out = []
    for i in range(frames):
        img = np.roll(base, i * 4, axis=1)
        f = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        f.pts = i
        out += [bytes(p) for p in cc.encode(f)]
    out += [bytes(p) for p in cc.encode(None)]
    return [(a, nal.is_keyframe(a, "h264")) for a in out]


def make_packets(aus: list[tuple[bytes, bool]], step: int, audio: bool) -> list[MediaPacket]:
    mux = PsMuxer("h264", "g711a" if audio else None)
    out = []
    for i, (au, key) in enumerate(aus):
        ts = i * step
        out.append(MediaPacket(mux.mux_video(au, ts, None, key), ts,
                               [PsFrame("video", "h264", au, ts, ts, key)], key))
        if audio:
            samples = b"\xd5" * 320
            out.append(MediaPacket(mux.mux_audio(samples, ts), ts,
                                   [PsFrame("audio", "g711a", samples, ts, None, False, SID_AUDIO)]))
    return out


def pyav_mux(aus: list[tuple[bytes, bool]], step: int) -> Callable[[], int]:
    """A callable muxing the AUs with FFmpeg's FLV muxer (stream copy); returns output bytes."""
    import av

    # A template stream with the codec parameters (and Annex-B extradata) of these AUs.
    raw = b"".join(a for a, _ in aus[: max(1, min(len(aus), 60))])
    src = av.open(io.BytesIO(raw), format="h264")
    template = src.streams.video[0]
    tb = fractions.Fraction(1, 90000)

    def run() -> int:
        buf = io.BytesIO()
        with av.open(buf, "w", format="flv") as out:  # (flvenc seeks back at the end)
            st = out.add_stream_from_template(template)
            for i, (au, key) in enumerate(aus):
                p = av.Packet(au)
                p.pts = p.dts = i * step
                p.time_base = tb
                p.is_keyframe = key
                p.stream = st
                out.mux(p)
        return len(buf.getvalue())

    return run


async def fanout(packets: list[MediaPacket], n: int, flv: bool) -> float:
    """Seconds to deliver every packet to n consumers, each woken per packet."""
    stream = Stream("bench", max_lag_packets=1 << 20, max_lag_bytes=1 << 40)
    done = 0
    sink = 0

    async def consume(c) -> None:
        nonlocal done, sink
        m = FlvMuxer(audio=True) if flv else None
        async for p in c:
            if m is not None:
                sink += len(m.mux(p))
            done += 1

    consumers = [stream.subscribe(f"c{i}") for i in range(n)]
    tasks = [asyncio.create_task(consume(c)) for c in consumers]
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    target = 0
    for p in packets:
        stream.publish(p)
        target += n
        while done < target:
            await asyncio.sleep(0)
    dt = time.perf_counter() - t0
    stream.close()
    await asyncio.gather(*tasks)
    return dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="stream length in seconds (default 20)")
    ap.add_argument("--fps", type=int, default=25, help="frames per second (default 25)")
    ap.add_argument("--p-size", type=int, default=15_000, help="mean P-frame bytes, synthetic (default 15000)")
    ap.add_argument("--key-size", type=int, default=100_000, help="IDR bytes, synthetic (default 100000)")
    ap.add_argument("--gop", type=int, default=50, help="frames per GOP (default 50)")
    ap.add_argument("--encode", metavar="WxH", help="use real libx264 output of this size (PyAV) instead")
    ap.add_argument("--consumers", default="1,10,100", help="fan-out consumer counts (default 1,10,100)")
    ap.add_argument("--fanout-seconds", type=float, default=4.0,
                    help="stream seconds pushed through the hub per fan-out run (default 4)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds to spend per measurement (default 1)")
    args = ap.parse_args(argv)

    n_frames = max(1, int(args.seconds * args.fps))
    step = 90000 // args.fps
    if args.encode:
        aus = encode_aus(args.encode, n_frames, args.gop, args.fps)
        what = f"libx264 {args.encode}"
    else:
        aus = make_aus(n_frames, args.gop, args.p_size, args.key_size)
        what = "synthetic 1080p-like"
    es_bytes = sum(len(a) for a, _ in aus)
    video = make_packets(aus, step, audio=False)
    with_audio = make_packets(aus, step, audio=True)
    print(f"stream: {what}, {args.seconds:g} s, {n_frames} frames at {args.fps} fps, GOP {args.gop}, "
          f"{es_bytes * 8 / args.seconds / 1e6:.2f} Mbit/s H.264")

    def ours(packets: list[MediaPacket], audio: bool, cold: bool = True) -> Callable[[], int]:
        def run() -> int:
            if cold:
                clear_parse_cache()
            m = FlvMuxer(audio=audio)
            n = len(m.header())
            for p in packets:
                n += len(m.mux(p))
            return n
        return run

    flv_size = ours(video, False)()
    rows = []

    def row(name: str, fn: Callable[[], object]) -> float:
        t = timed(fn, args.min_time)
        rows.append((name, es_bytes / t / 1e6, n_frames / t, n_frames / t / args.fps))
        return t

    t_ours = row("FlvMuxer (video)", ours(video, False))
    row("FlvMuxer (video+G.711A)", ours(with_audio, True))
    row("FlvMuxer, further viewer", ours(video, False, cold=False))
    t_pyav = None
    try:
        run_pyav = pyav_mux(aus, step)
        pyav_size = run_pyav()
        t_pyav = row("PyAV/FFmpeg flv (copy)", run_pyav)
    except Exception as exc:  # PyAV missing or too old: report and go on
        print(f"PyAV FLV muxer unavailable: {exc!r}")
    print(f"{'FLV mux':<26}{'MB/s':>10}{'frames/s':>12}{'viewers/core':>14}")
    for name, mbs, fps, viewers in rows:
        print(f"{name:<26}{mbs:>10.0f}{fps:>12.0f}{viewers:>14.0f}")
    if t_pyav is not None:
        print(f"hand-written / PyAV speed ratio (first viewer): {t_pyav / t_ours:.2f}x "
              f"(output {flv_size} vs {pyav_size} bytes)")

    fan_frames = max(1, int(args.fanout_seconds * args.fps))
    fan_packets = with_audio[: 2 * fan_frames]
    print(f"\nhub fan-out: {len(fan_packets)} packets (video + G.711A), each consumer woken per packet")
    print(f"{'consumers':>10}{'hub pkts/s':>14}{'per consumer':>14}{'+FlvMuxer pkts/s':>18}{'per consumer':>14}")
    for n in (int(x) for x in args.consumers.split(",")):
        t_hub = min(asyncio.run(fanout(fan_packets, n, False)) for _ in range(2))
        t_flv = min(asyncio.run(fanout(fan_packets, n, True)) for _ in range(2))
        total = len(fan_packets) * n
        print(f"{n:>10}{total / t_hub:>14.0f}{len(fan_packets) / t_hub:>14.0f}"
              f"{total / t_flv:>18.0f}{len(fan_packets) / t_flv:>14.0f}")


if __name__ == "__main__":
    main()
