"""RtpIngest and StreamStats (media.ingest, media.stats): sans-IO, real x264 output.

The stream is what a GB/T 28181 camera sends: one PS packet per video frame and
one per G.711 frame (C.1), sliced into RTP packets. The property that matters is
end to end: whatever the network does, every frame handed downstream decodes
cleanly in FFmpeg (PyAV), and the stream recovers at the next keyframe.
"""

from __future__ import annotations

import fractions
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media.ingest import RtpIngest
from media.nal import is_keyframe
from media.packet import MediaPacket
from media.ps import PsMuxer
from media.rtp import RtpError, packetize, parse_rtp
from media.stats import StreamStats

av = pytest.importorskip("av", exc_type=ImportError)
np = pytest.importorskip("numpy", exc_type=ImportError)

SSRC = 200000001  # y=0200000001
STEP = 3600  # 25 fps at 90 kHz
GOP = 25
ALAW = b"\xd5" * 320  # 40 ms of G.711A silence


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def aus() -> list[bytes]:
    """60 frames 320x240 from libx264 (ultrafast, zerolatency, GOP 25): IDR at 0, 25, 50."""
    cc = av.CodecContext.create("libx264", "w")
    cc.width, cc.height, cc.pix_fmt = 320, 240, "yuv420p"
    cc.time_base = fractions.Fraction(1, 25)
    cc.framerate = 25
    cc.gop_size = GOP
    cc.options = {"preset": "ultrafast", "tune": "zerolatency", "bframes": "0", "keyint_min": str(GOP),
                  "sc_threshold": "0"}
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:240, 0:320]
    noise = rng.integers(0, 20, (240, 320), dtype=np.uint8)  # keyframes ~10 KB, P-frames ~2 KB
    out = []
    for i in range(60):
        img = np.empty((240, 320, 3), np.uint8)
        img[:, :, 0] = (xx * 2 + i * 8) % 256
        img[:, :, 1] = (yy + np.roll(noise, i * 4, axis=1)) % 256
        img[:, :, 2] = np.where((xx - 5 * i) % 320 < 60, 200, 30)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        out += [bytes(p) for p in cc.encode(frame)]
    out += [bytes(p) for p in cc.encode(None)]
    assert len(out) == 60
    assert [i for i, a in enumerate(out) if is_keyframe(a, "h264")] == [0, 25, 50]
    return out


class Frame:
    """One PS packet of the test stream and its RTP packets."""

    def __init__(self, kind: str, index: int, ts: int, ps: bytes) -> None:
        self.kind, self.index, self.ts, self.ps = kind, index, ts, ps
        self.packets: list[bytes] = []


def make_stream(aus: list[bytes], *, audio: bool = True, loops: int = 1, ssrc: int = SSRC, seq: int = 1000,
                ts0: int = 90000, start: int = 0) -> list[Frame]:
    muxer = PsMuxer("h264", "g711a" if audio else None)
    frames = []
    for n in range(start, loops * len(aus)):
        au = aus[n % len(aus)]
        ts = ts0 + n * STEP
        frames.append(Frame("video", n, ts & 0xFFFFFFFF, muxer.mux_video(au, ts, None, is_keyframe(au, "h264"))))
        if audio:
            frames.append(Frame("audio", n, ts & 0xFFFFFFFF, muxer.mux_audio(ALAW, ts)))
    for f in frames:
        f.packets, seq = packetize(f.ps, ssrc=ssrc, seq=seq, timestamp=f.ts)
    return frames


def packets_of(frames: list[Frame]) -> list[bytes]:
    return [p for f in frames for p in f.packets]


def run(packets: list[bytes], **kw) -> tuple[RtpIngest, list[MediaPacket]]:
    out: list[MediaPacket] = []
    ingest = RtpIngest(out.append, **kw)
    for p in packets:
        ingest.feed(p)
    ingest.flush()
    return ingest, out


def video_of(out: list[MediaPacket]) -> list[tuple[int, bytes, bool]]:
    """(RTP timestamp, access unit, keyframe) of every video frame handed over."""
    return [(p.timestamp, f.data, f.keyframe) for p in out for f in p.frames if f.stream == "video"]


def decode_all(access_units: list[bytes]) -> int:
    """Decode with FFmpeg; fail on an exception or any error, warning or frame-number gap it logs."""
    cc = av.CodecContext.create("h264", "r")
    level = av.logging.get_level()
    av.logging.set_level(av.logging.DEBUG)  # "Frame num gap" (a missing reference) is debug level
    decoded = 0
    try:
        with av.logging.Capture(local=False) as logs:
            for au in access_units:
                decoded += len(cc.decode(av.Packet(au)))
            decoded += len(cc.decode(None))
    finally:
        av.logging.set_level(level)
    problems = [m for lvl, _, m in logs if lvl <= av.logging.WARNING or "gap" in m or "missing" in m]
    assert not problems, problems[:5]
    return decoded


# -- in order -----------------------------------------------------------------------


def test_in_order_every_frame_out_and_decodable(aus: list[bytes]) -> None:
    frames = make_stream(aus)
    clock = [100.0]
    out: list[MediaPacket] = []
    ingest = RtpIngest(out.append, expected_ssrc=SSRC, clock=lambda: clock[0])
    for f in frames:
        if f.kind == "video":
            clock[0] += 0.04
        for p in f.packets:
            ingest.feed(p)
    ingest.flush()

    assert [p.ps for p in out] == [f.ps for f in frames]
    assert [p.timestamp for p in out] == [f.ts for f in frames]
    assert all(not p.damaged and p.received_at > 100.0 for p in out)
    video = video_of(out)
    assert [au for _, au, _ in video] == aus
    assert [i for i, (_, _, key) in enumerate(video) if key] == [0, 25, 50]
    assert [p.keyframe for p in out if p.frames[0].stream == "video"] == [v[2] for v in video]
    audio = [f for p in out for f in p.frames if f.stream == "audio"]
    assert len(audio) == 60 and audio[0].data == ALAW
    assert decode_all([au for _, au, _ in video]) == 60

    s = ingest.stats
    assert (s.codec, s.audio_codec, s.width, s.height) == ("h264", "g711a", 320, 240)
    assert (s.frames, s.keyframes, s.audio_frames, s.delivered) == (60, 3, 60, 120)
    assert (s.keyframe_interval_frames, s.keyframe_interval_s) == (25, 1.0)
    assert (s.lost, s.reordered, s.duplicates, s.damaged_frames, s.dropped_until_keyframe) == (0, 0, 0, 0, 0)
    assert s.packets == sum(len(f.packets) for f in frames)
    assert s.bytes == sum(len(p) for f in frames for p in f.packets)
    assert s.ssrc == SSRC and not s.ssrc_mismatch and ingest.learned_ssrc == SSRC
    assert s.fps == pytest.approx(25, abs=1)
    window_bytes = sum(len(p) for f in frames[-100:] for p in f.packets)  # the last 2 s
    assert s.bitrate_bps == pytest.approx(window_bytes * 8 / 2.0, rel=0.1)
    d = s.as_dict(clock[0] + 1.0)
    json.dumps(d)
    assert d["last_packet_age"] == 1.0 and d["width"] == 320 and d["codec"] == "h264"


def test_sequence_and_timestamp_wrap(aus: list[bytes]) -> None:
    frames = make_stream(aus, seq=65536 - 150, ts0=(1 << 32) - 30 * STEP)
    seqs = [int.from_bytes(p[2:4], "big") for p in packets_of(frames)]
    assert seqs[0] > 65000 and 0 in seqs
    ingest, out = run(packets_of(frames))
    assert [au for _, au, _ in video_of(out)] == aus
    assert ingest.stats.lost == 0 and ingest.stats.keyframe_interval_s == 1.0


def test_stream_joined_mid_gop_waits_for_a_keyframe(aus: list[bytes]) -> None:
    frames = make_stream(aus, start=5)
    ingest, out = run(packets_of(frames))
    video = video_of(out)
    assert video[0][2] and [au for _, au, _ in video] == aus[25:]
    assert ingest.stats.dropped_until_keyframe == 20
    # Audio is not held back.
    assert out[0].frames[0].stream == "audio" and out[0].timestamp == frames[1].ts
    assert ingest.stats.audio_frames == ingest.stats.delivered - 35 == 55


# -- loss, reordering, duplicates ------------------------------------------------------


def _jitter(packets: list[bytes], rng: random.Random, loss: float, reorder: float) -> tuple[list[bytes], int]:
    """Drop `loss` of the packets and move `reorder` of them up to 6 places later."""
    kept = [p for p in packets if rng.random() >= loss]
    dropped = len(packets) - len(kept)
    for i in range(len(kept) - 1, -1, -1):
        if rng.random() < reorder:
            j = min(len(kept) - 1, i + rng.randint(1, 6))
            kept.insert(j, kept.pop(i))
    return kept, dropped


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_loss_and_reordering_every_handed_frame_decodes(aus: list[bytes], seed: int) -> None:
    frames = make_stream(aus, loops=4)  # 240 frames, 10 keyframes
    rng = random.Random(seed)
    packets, dropped = _jitter(packets_of(frames), rng, loss=0.05, reorder=0.05)
    ingest, out = run(packets, expected_ssrc=SSRC)
    s = ingest.stats

    assert 0 < dropped - 2 <= s.lost <= dropped  # a loss at either end of the stream is invisible
    assert s.reordered > 0 and s.dropped_until_keyframe > 0
    assert s.duplicates == 0 and s.late == 0

    index = {f.ts: f.index for f in frames}
    video = video_of(out)
    assert video, "the stream never recovered"
    # What is handed over is a run of consecutive, intact frames, each run starting at a keyframe.
    prev = None
    for ts, au, key in video:
        n = index[ts]
        assert au == aus[n % len(aus)]
        assert key or n == prev + 1, f"frame {n} handed over after {prev}"
        prev = n
    assert index[video[-1][0]] >= 200, "the stream must go on after losses"
    assert decode_all([au for _, au, _ in video]) == len(video)
    # Audio kept flowing while video waited for its keyframe.
    video_ts = {ts for ts, _, _ in video}
    assert any(p.frames[0].stream == "audio" and p.timestamp not in video_ts for p in out)
    assert all(not p.damaged for p in out)


def test_duplicates_are_counted_and_dropped(aus: list[bytes]) -> None:
    packets = packets_of(make_stream(aus))
    doubled = [p for p in packets for _ in range(2)]
    doubled[10:10] = [packets[12]]  # a copy that arrives early, while its slot is open
    ingest, out = run(doubled)
    assert [au for _, au, _ in video_of(out)] == aus
    assert ingest.stats.duplicates == len(packets) + 1
    assert ingest.stats.lost == 0 and ingest.stats.dropped_until_keyframe == 0


def test_late_packet_after_it_was_given_up(aus: list[bytes]) -> None:
    packets = packets_of(make_stream(aus))
    late = packets.pop(40)
    packets.insert(40 + 33, late)  # beyond the 32-packet reorder window
    ingest, _ = run(packets, reorder_window=32)
    s = ingest.stats
    assert (s.lost, s.late, s.duplicates) == (1, 1, 0)


def test_frames_lost_before_a_keyframe_do_not_cost_the_keyframe(aus: list[bytes]) -> None:
    """Whole P-frames lost just before an IDR: the IDR is intact and goes out at once."""
    frames = make_stream(aus, audio=False)
    lost = frames[23].packets + frames[24].packets
    ingest, out = run([p for f in frames if f.index not in (23, 24) for p in f.packets])
    assert [au for _, au, _ in video_of(out)] == aus[:23] + aus[25:]
    assert ingest.stats.lost == len(lost)
    assert ingest.stats.damaged_frames == 0 and ingest.stats.dropped_until_keyframe == 0
    assert decode_all(aus[:23]) == 23 and decode_all(aus[25:]) == 35


def test_loss_inside_a_keyframe_waits_for_the_next(aus: list[bytes]) -> None:
    frames = make_stream(aus, audio=False)
    assert len(frames[25].packets) > 2
    packets = [p for f in frames for i, p in enumerate(f.packets) if not (f.index == 25 and i == 1)]
    ingest, out = run(packets)
    assert [au for _, au, _ in video_of(out)] == aus[:25] + aus[50:]
    s = ingest.stats
    assert (s.lost, s.damaged_frames, s.dropped_until_keyframe) == (1, 1, 24)


def test_lost_head_of_a_keyframe_is_not_salvaged(aus: list[bytes]) -> None:
    frames = make_stream(aus, audio=False)
    packets = [p for f in frames for i, p in enumerate(f.packets) if not (f.index == 25 and i == 0)]
    ingest, out = run(packets)
    assert [au for _, au, _ in video_of(out)] == aus[:25] + aus[50:]
    assert ingest.stats.damaged_frames == 1


# -- SSRC ---------------------------------------------------------------------------


def test_ssrc_mismatch_is_flagged_but_accepted(aus: list[bytes]) -> None:
    ingest, out = run(packets_of(make_stream(aus, ssrc=630886)), expected_ssrc=SSRC)
    assert [au for _, au, _ in video_of(out)] == aus
    assert ingest.stats.ssrc_mismatch and ingest.learned_ssrc == ingest.stats.ssrc == 630886


def test_ssrc_change_is_a_restarted_sender(aus: list[bytes]) -> None:
    first = make_stream(aus[:40], ssrc=1, seq=100)
    second = make_stream(aus, ssrc=2, seq=50000, ts0=5_000_000)
    ingest, out = run(packets_of(first) + packets_of(second), expected_ssrc=1)
    assert [au for _, au, _ in video_of(out)] == aus[:40] + aus
    s = ingest.stats
    assert s.ssrc_changes == 1 and s.ssrc_mismatch and ingest.learned_ssrc == 2
    assert s.lost == 0 and s.duplicates == 0


# -- bad input ------------------------------------------------------------------------


def test_bad_packets_are_counted_not_raised() -> None:
    out: list[MediaPacket] = []
    ingest = RtpIngest(out.append)
    for junk in (b"", b"\x80", bytes(12), b"\x40" + bytes(20), b"\xa0" + bytes(11)):
        ingest.feed(junk)
    assert ingest.stats.invalid == 5 and ingest.stats.packets == 0 and not out
    assert ingest.stats.last_packet_age(5.0) is None


def test_garbage_payload_hands_nothing_over() -> None:
    out: list[MediaPacket] = []
    ingest = RtpIngest(out.append)
    pkts, _ = packetize(random.Random(0).randbytes(20000), ssrc=7, seq=0, timestamp=0)
    for p in pkts:
        ingest.feed(p)
    ingest.flush()
    assert not out and ingest.stats.packets == len(pkts) and ingest.stats.frames == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=30))
def test_fuzz_arbitrary_datagrams_never_raise(datagrams: list[bytes]) -> None:
    ingest = RtpIngest(lambda p: None)
    for d in datagrams:
        ingest.feed(d)
    ingest.flush()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 3), st.booleans(), st.integers(0, 3), st.binary(max_size=120)),
        max_size=40,
    ),
    st.sampled_from([b"\x00\x00\x01\xba", b"\x00\x00\x01\xe0", b"\x00\x00\x01\xbc", b""]),
)
def test_fuzz_rtp_with_ps_like_payloads_never_raises(items: list, prefix: bytes) -> None:
    """Valid RTP headers, wandering sequence numbers and SSRCs, PS-looking payloads."""
    ingest = RtpIngest(lambda p: None, expected_ssrc=1, reorder_window=4)
    base = 0
    for dseq, ts, marker, ssrc, payload in items:
        base = (base + dseq) & 0xFFFF if dseq > 0xFF00 else (base + dseq % 8) & 0xFFFF
        hdr = bytes((0x80, (0x80 if marker else 0) | 96)) + base.to_bytes(2, "big") + (ts * STEP).to_bytes(4, "big")
        ingest.feed(hdr + ssrc.to_bytes(4, "big") + prefix + payload)
    ingest.flush()
    s = ingest.stats
    assert s.packets == len(items)


def test_fuzz_mutated_real_stream_never_raises(aus: list[bytes]) -> None:
    rng = random.Random(7)
    packets = packets_of(make_stream(aus[:30]))
    for _ in range(20):
        mutated = []
        for p in packets:
            b = bytearray(p)
            for _ in range(rng.randint(0, 3)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            if rng.random() < 0.05:
                b = b[: rng.randrange(len(b))]
            mutated.append(bytes(b))
        ingest = RtpIngest(lambda p: None)
        for p in mutated:
            ingest.feed(p)
        ingest.flush()


def _general_path(ingest: RtpIngest, packet: bytes, now: float) -> None:
    """What `feed` does without its in-order fast path: parse, then the general stages."""
    try:
        pkt = parse_rtp(packet)
    except RtpError:
        ingest.stats.invalid += 1
        return
    ingest._general(pkt, len(packet), now)


def _same_as_general_path(packets: list[bytes], **kw) -> None:
    """`feed` hands over the same packets and ends in the same counters as the general path."""
    fast_out: list[MediaPacket] = []
    slow_out: list[MediaPacket] = []
    clock = [50.0]
    fast = RtpIngest(fast_out.append, clock=lambda: clock[0], **kw)
    slow = RtpIngest(slow_out.append, clock=lambda: clock[0], **kw)
    for i, p in enumerate(packets):
        clock[0] = 50.0 + i * 0.003
        fast.feed(p)
        _general_path(slow, p, clock[0])
        assert (fast.stats.packets, fast.stats.lost, fast.stats.delivered) == (
            slow.stats.packets, slow.stats.lost, slow.stats.delivered)
    fast.flush()
    slow.flush()
    assert fast.stats.as_dict(clock[0]) == slow.stats.as_dict(clock[0])
    assert fast.waiting_for_keyframe == slow.waiting_for_keyframe
    assert [(p.ps, p.timestamp, p.keyframe, p.received_at, [(f.stream, f.data, f.pts) for f in p.frames])
            for p in fast_out] == [
           (p.ps, p.timestamp, p.keyframe, p.received_at, [(f.stream, f.data, f.pts) for f in p.frames])
            for p in slow_out]


@pytest.mark.parametrize("seed", [1, 2])
def test_fast_path_matches_general_path_on_a_real_stream(aus: list[bytes], seed: int) -> None:
    frames = make_stream(aus, loops=2)
    rng = random.Random(seed)
    packets, _ = _jitter(packets_of(frames), rng, loss=0.02, reorder=0.03)
    packets[40:40] = [packets[38], packets[39]]  # duplicates
    restarted = packets_of(make_stream(aus[:30], ssrc=SSRC + 1, seq=60000, start=5))
    padded = bytearray(restarted[3])
    padded[0] |= 0x20  # RFC 3550 5.1 padding: the last octet counts it
    restarted[3] = bytes(padded) + b"\x00\x02"
    _same_as_general_path(packets + restarted, expected_ssrc=SSRC)
    _same_as_general_path(packets, max_frame_size=4000)  # keyframes oversized


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.integers(0, 3), st.booleans(), st.integers(0, 2), st.binary(max_size=60)),
        max_size=60,
    ),
    st.sampled_from([b"\x00\x00\x01\xba", b"\x00\x00\x01\xe0", b""]),
)
def test_fuzz_fast_path_matches_general_path(items: list, prefix: bytes) -> None:
    packets = []
    base = 0
    for dseq, ts, marker, ssrc, payload in items:
        base = (base + dseq) & 0xFFFF if dseq > 0xFF00 else (base + dseq % 3) & 0xFFFF
        hdr = bytes((0x80, (0x80 if marker else 0) | 96)) + base.to_bytes(2, "big") + (ts * STEP).to_bytes(4, "big")
        packets.append(hdr + ssrc.to_bytes(4, "big") + prefix + payload)
    _same_as_general_path(packets, expected_ssrc=1, reorder_window=4, max_frame_size=200)


# -- H.265 -------------------------------------------------------------------------------


def test_h265_codec_and_geometry() -> None:
    cc = av.CodecContext.create("libx265", "w")
    cc.width, cc.height, cc.pix_fmt = 64, 48, "yuv420p"
    cc.time_base = fractions.Fraction(1, 25)
    cc.framerate = 25
    cc.options = {"x265-params": "log-level=none:keyint=5:bframes=0:pools=none:frame-threads=1"}
    hevc = []
    for i in range(10):
        img = np.full((48, 64, 3), i * 20, np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        hevc += [bytes(p) for p in cc.encode(frame)]
    hevc += [bytes(p) for p in cc.encode(None)]
    muxer = PsMuxer("h265")
    packets, seq = [], 0
    for i, au in enumerate(hevc):
        ps = muxer.mux_video(au, i * STEP, None, is_keyframe(au, "h265"))
        pk, seq = packetize(ps, ssrc=9, seq=seq, timestamp=i * STEP)
        packets += pk
    ingest, out = run(packets)
    assert [au for _, au, _ in video_of(out)] == hevc
    s = ingest.stats
    assert (s.codec, s.width, s.height, s.keyframe_interval_frames) == ("h265", 64, 48, 5)


# -- StreamStats ----------------------------------------------------------------------------


def test_stats_rates_slide_and_decay() -> None:
    now = [10.0]
    s = StreamStats(clock=lambda: now[0])
    assert (s.bitrate_bps, s.fps, s.last_packet_age()) == (0.0, 0.0, None)
    for i in range(250):  # 10 s of 25 fps, 2 packets of 1000 B per frame
        now[0] = 10.0 + i * 0.04
        s.record_packet(1000, now[0])
        s.record_packet(1000, now[0])
        s.record_video_frame(i % 50 == 0, i * STEP, now[0])
    assert s.fps == pytest.approx(25, rel=0.1)
    assert s.bitrate_bps == pytest.approx(25 * 2000 * 8, rel=0.1)
    assert (s.keyframes, s.keyframe_interval_frames, s.keyframe_interval_s) == (5, 50, 2.0)
    assert len(s._buckets) <= 9  # bounded whatever the packet count
    now[0] += 1.0
    assert s.fps == pytest.approx(12.5, rel=0.15)
    now[0] += 2.0
    assert (s.bitrate_bps, s.fps) == (0.0, 0.0)
    assert s.last_packet_age() == pytest.approx(3.0)
    d = s.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["packets"] == 500 and d["bytes"] == 500_000 and d["fps"] == 0.0


def test_stats_young_stream_is_not_overestimated() -> None:
    s = StreamStats(clock=lambda: 0.5)
    s.record_packet(1000, 0.0)
    s.record_packet(1000, 0.5)
    assert s.bitrate_bps == pytest.approx(2000 * 8 / 0.5)
