"""Stream hub: GOP cache, fan-out, slow consumers, idle callback, close, keyframe wait.

The helpers at the top (real H.264 from PyAV turned into MediaPackets) are shared with
test_flv.py and test_forward.py.
"""

from __future__ import annotations

import asyncio
import fractions
import functools
import gc
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media import nal
from media.hub import Consumer, Stream, StreamClosed
from media.packet import MediaPacket
from media.ps import SID_AUDIO, PsFrame, PsMuxer

FPS = 25
TICKS = 90000 // FPS  # 3600 per frame
WIDTH, HEIGHT = 320, 240
GOP = 25
N_FRAMES = 75


# -- shared fixtures: real encoder output as MediaPackets ---------------------------------


@functools.cache
def encode(codec: str = "libx264", n: int = N_FRAMES, width: int = WIDTH, height: int = HEIGHT,
           gop: int = GOP) -> tuple[tuple[bytes, int, int, bool], ...]:
    """(Annex-B AU, pts, dts, keyframe) per frame, pts/dts in frames; encoded once per run."""
    av = pytest.importorskip("av", exc_type=ImportError)
    np = pytest.importorskip("numpy", exc_type=ImportError)
    cc = av.CodecContext.create(codec, "w")
    cc.width, cc.height, cc.pix_fmt = width, height, "yuv420p"
    cc.time_base = fractions.Fraction(1, FPS)
    cc.framerate = FPS
    cc.gop_size = gop
    if codec == "libx264":
        cc.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(gop), "keyint_min": str(gop)}
    else:
        cc.options = {"preset": "ultrafast",
                      "x265-params": f"log-level=none:keyint={gop}:min-keyint={gop}:pools=none:frame-threads=1"}
    out = []

    def take(packets) -> None:
        for p in packets:
            out.append((bytes(p), int(p.pts), int(p.dts), bool(p.is_keyframe)))

    for i in range(n):
        img = np.zeros((height, width, 3), np.uint8)
        img[:, :, 0] = (np.arange(width) * 4 + i * 8) % 256
        img[:, :, 1] = (np.arange(height)[:, None] * 5 + i * 3) % 256
        img[(i * 3) % height:(i * 3) % height + 20, 40:80, 2] = 255  # a moving block
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        take(cc.encode(frame))
    take(cc.encode(None))
    return tuple(out)


def h264_aus() -> list[bytes]:
    return [a for a, *_ in encode()]


def make_packets(frames=None, *, codec: str = "h264", start: int = 0, audio: str | None = None,
                 first_index: int = 0) -> list[MediaPacket]:
    """MediaPackets (PS from PsMuxer) for encoded frames; pts = start + frame * 3600 (33-bit).

    With `audio` ("g711a"/"g711u"), a 40 ms G.711 packet follows each video packet.
    """
    frames = encode() if frames is None else frames
    mux = PsMuxer(codec, audio)
    out = []
    for i, (au, pts, dts, _) in enumerate(frames):
        p = (start + (first_index + pts) * TICKS) % (1 << 33)
        d = (start + (first_index + dts) * TICKS) % (1 << 33)
        key = nal.is_keyframe(au, codec)
        out.append(MediaPacket(
            ps=mux.mux_video(au, p, d, key), timestamp=p & 0xFFFFFFFF,
            frames=[PsFrame("video", codec, au, p, d, key)], keyframe=key,
        ))
        if audio:
            samples = (b"\xd5" if audio == "g711a" else b"\xff") * 320
            ts = (start + (first_index + i) * TICKS) % (1 << 33)
            out.append(MediaPacket(
                ps=mux.mux_audio(samples, ts), timestamp=ts & 0xFFFFFFFF,
                frames=[PsFrame("audio", audio, samples, ts, None, False, SID_AUDIO)],
            ))
    return out


def looped_packets(count: int, *, audio: str | None = None) -> list[MediaPacket]:
    """`count` video frames (plus audio) cycling the encoded GOPs with continuous timestamps."""
    out: list[MediaPacket] = []
    loop = 0
    while len([p for p in out if p.frames[0].stream == "video"]) < count:
        out += make_packets(audio=audio, first_index=loop * N_FRAMES)
        loop += 1
    n = 0
    for i, p in enumerate(out):
        n += p.frames[0].stream == "video"
        if n > count:
            return out[:i]
    return out


def synthetic(n: int, gop: int = 10, size: int = 1000) -> list[MediaPacket]:
    """Cheap packets for the hub's bookkeeping tests; timestamp = index."""
    return [MediaPacket(ps=bytes(size), timestamp=i, keyframe=i % gop == 0,
                        frames=[PsFrame("video", "h264", b"", i, i, i % gop == 0)])
            for i in range(n)]


def drain(c: Consumer) -> list[MediaPacket]:
    out = []
    while (p := c.get_nowait()) is not None:
        out.append(p)
    return out


@pytest.fixture(scope="module")
def packets() -> list[MediaPacket]:
    return make_packets()


# -- tests -----------------------------------------------------------------------------------


def test_real_fixture_shape(packets: list[MediaPacket]) -> None:
    assert len(packets) == N_FRAMES
    assert [i for i, p in enumerate(packets) if p.keyframe] == [0, 25, 50]
    info = nal.sps_info(packets[0].frames[0].data, "h264")
    assert info is not None and (info.width, info.height) == (WIDTH, HEIGHT)


async def test_late_consumer_starts_at_cached_keyframe(packets: list[MediaPacket]) -> None:
    s = Stream("34020000001320000001_34020000001310000001")
    for p in packets[:40]:
        s.publish(p)
    c = s.subscribe("late")
    first = await c.get()
    assert first is packets[25] and first.keyframe
    assert drain(c) == packets[26:40]
    s.publish(packets[40])
    assert await asyncio.wait_for(c.get(), 1) is packets[40]
    assert c.packets == 16 and c.dropped == 0


async def test_ten_consumers_get_the_same_objects(packets: list[MediaPacket]) -> None:
    s = Stream("fanout")
    consumers = [s.subscribe(f"c{i}") for i in range(10)]
    got: list[list[MediaPacket]] = [[] for _ in consumers]

    async def read(i: int, c: Consumer) -> None:
        async for p in c:
            got[i].append(p)

    tasks = [asyncio.create_task(read(i, c)) for i, c in enumerate(consumers)]
    for p in packets:
        s.publish(p)
        if p.keyframe:
            await asyncio.sleep(0)  # some packets arrive while readers wait, some in bursts
    await asyncio.sleep(0.01)
    s.close("test end")
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    for seq in got:
        assert len(seq) == N_FRAMES
        assert all(a is b for a, b in zip(seq, packets))  # shared, not copied
    assert all(c.dropped == 0 for c in consumers)
    assert s.stats.consumers_total == 10


def test_slow_consumer_memory_bounded_and_resumes_at_keyframe() -> None:
    max_lag = 16
    s = Stream("slow", max_lag_packets=max_lag, gop_cache_packets=50)
    slow = s.subscribe("never reads")
    fast = s.subscribe("reads")

    def publish(n: int, offset: int) -> None:
        for i in range(offset, offset + n):
            # Distinct 20 KB payloads, so that holding them would show in tracemalloc.
            s.publish(MediaPacket(ps=i.to_bytes(4, "big") * 5000, timestamp=i, keyframe=i % 10 == 0,
                                  frames=[PsFrame("video", "h264", b"", i, i, i % 10 == 0)]))
            assert fast.get_nowait().timestamp == i

    publish(200, 0)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        publish(2000, 200)  # 40 MB published
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2 * 2**20, grown  # the ring (<= 50 packets) is all that is kept
    assert s.buffered_packets <= max(max_lag, 10) + 1
    first = slow.get_nowait()
    assert first is not None and first.keyframe and first.timestamp >= 2200 - max_lag
    assert slow.dropped == first.timestamp  # everything before it was skipped
    rest = drain(slow)
    assert [p.timestamp for p in rest] == list(range(first.timestamp + 1, 2200))
    assert fast.dropped == 0 and fast.packets == 2200


def test_byte_limit_drops_to_next_keyframe() -> None:
    s = Stream("bytes", max_lag_packets=1000, max_lag_bytes=10_000, gop_cache_packets=0)
    c = s.subscribe()
    pk = synthetic(40, gop=10, size=1000)
    for p in pk[:10]:
        s.publish(p)
    assert drain(c) == pk[:10]
    for p in pk[10:35]:  # 25 KB behind: more than 10 KB
        s.publish(p)
    got = drain(c)
    assert got[0].keyframe and got[0].timestamp in (30,)
    assert c.dropped == 20
    assert s.buffered_bytes <= 10_000


def test_no_cached_gop_starts_at_next_keyframe() -> None:
    s = Stream("nocache", gop_cache_packets=0)
    pk = synthetic(25, gop=10)
    for p in pk[:13]:
        s.publish(p)
    c = s.subscribe()
    assert c.get_nowait() is None
    for p in pk[13:]:
        s.publish(p)
    got = drain(c)
    assert got[0] is pk[20] and c.dropped == 0  # skipped at start, not dropped for lagging


def test_gop_longer_than_cache_is_not_served() -> None:
    s = Stream("longgop", gop_cache_packets=5)
    pk = synthetic(30, gop=20)
    for p in pk[:4]:
        s.publish(p)
    assert s.subscribe().get_nowait() is pk[0]  # still within the cache
    for p in pk[4:8]:
        s.publish(p)
    late = s.subscribe()
    assert late.get_nowait() is None
    for p in pk[8:]:
        s.publish(p)
    assert late.get_nowait() is pk[20]


def test_consumer_inside_cached_gop_is_not_dropped() -> None:
    """A new consumer bursting through a GOP longer than max_lag_packets keeps it all."""
    s = Stream("burst", max_lag_packets=8, gop_cache_packets=100)
    pk = synthetic(60, gop=50)
    for p in pk[:40]:
        s.publish(p)
    c = s.subscribe()
    assert drain(c) == pk[:40] and c.dropped == 0


def test_audio_only_stream_is_delivered_without_keyframes() -> None:
    s = Stream("audio", gop_cache_packets=0, max_lag_packets=4)
    c = s.subscribe()
    pk = [MediaPacket(ps=b"x" * 10, timestamp=i, frames=[PsFrame("audio", "g711a", b"\xd5", i, None, False, 0xC0)])
          for i in range(10)]
    for p in pk[:3]:
        s.publish(p)
    assert drain(c) == pk[:3]
    for p in pk[3:]:
        s.publish(p)
    got = drain(c)  # lagged by 7 > 4: no keyframe to wait for, resumes 4 packets back
    assert got == pk[6:] and c.dropped == 3
    assert s.stats.audio_codec == "g711a" and s.stats.video_codec is None


async def test_on_idle_when_last_consumer_leaves() -> None:
    idle: list[Stream] = []
    s = Stream("idle", on_idle=idle.append)
    a, b = s.subscribe("a"), s.subscribe("b")
    assert s.consumer_count == 2 and s.consumers() == [a, b]
    a.close()
    a.close()  # idempotent
    assert idle == [] and s.consumer_count == 1
    with b:
        pass
    assert idle == [s] and s.consumer_count == 0
    c = s.subscribe("again")
    s.close("gone")
    c.close()
    assert idle == [s]  # not called for a closed stream


async def test_on_idle_errors_do_not_propagate(caplog: pytest.LogCaptureFixture) -> None:
    def boom(stream: Stream) -> None:
        raise RuntimeError("boom")

    s = Stream("idle-err", on_idle=boom)
    s.subscribe().close()
    assert "on_idle" in caplog.text


async def test_close_ends_consumers(packets: list[MediaPacket]) -> None:
    s = Stream("close")
    waiting = s.subscribe("waiting")
    iterating = s.subscribe("iterating")
    pending = s.subscribe("pending")
    got: list[MediaPacket] = []

    async def iterate() -> None:
        async for p in iterating:
            got.append(p)

    t_get = asyncio.create_task(waiting.get())
    t_iter = asyncio.create_task(iterate())
    await asyncio.sleep(0)
    s.publish(packets[0])
    await asyncio.sleep(0)
    assert t_get.done() and t_get.result() is packets[0]
    t_get = asyncio.create_task(waiting.get())
    await asyncio.sleep(0)
    s.publish(packets[1])
    s.publish(packets[2])  # `pending` never read these: close does not drain them
    s.close("device BYE")
    with pytest.raises(StreamClosed):
        await asyncio.wait_for(t_get, 1)
    await asyncio.wait_for(t_iter, 1)
    assert got[0] is packets[0]
    with pytest.raises(StreamClosed, match="device BYE"):
        await pending.get()
    with pytest.raises(StreamClosed):
        s.subscribe()
    assert s.closed and s.close_reason == "device BYE" and s.consumer_count == 0
    s.publish(packets[3])  # ignored after close
    assert s.stats.packets == 3


async def test_consumer_close_wakes_its_get() -> None:
    s = Stream("leave")
    c = s.subscribe()
    other = s.subscribe()
    t = asyncio.create_task(c.get())
    t_other = asyncio.create_task(other.get())
    await asyncio.sleep(0)
    c.close()
    with pytest.raises(StreamClosed):
        await asyncio.wait_for(t, 1)
    assert not t_other.done()
    t_other.cancel()
    await asyncio.gather(t_other, return_exceptions=True)


async def test_cancelled_get_leaves_no_waiter() -> None:
    s = Stream("cancel")
    c = s.subscribe()
    for _ in range(100):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.get(), 0.0001)
    assert len(s._waiters) <= 1


def test_listener_takes_packets_as_they_are_published(caplog: pytest.LogCaptureFixture) -> None:
    s = Stream("listen", max_lag_packets=8, gop_cache_packets=0)
    pk = synthetic(40, gop=10)
    s.publish(pk[0])
    c = s.subscribe()
    got: list[int] = []
    calls = [0]
    paused = [False]

    def on_publish() -> None:
        calls[0] += 1
        while not paused[0] and not c.closed and (p := c.get_nowait()) is not None:
            got.append(p.timestamp)

    c.listen(on_publish)
    for p in pk[1:20]:
        s.publish(p)
    assert got == list(range(10, 20)) and calls[0] == 19  # from the first keyframe, one call each
    paused[0] = True  # a listener that stops taking packets lags like any reader
    for p in pk[20:35]:
        s.publish(p)
    paused[0] = False
    s.publish(pk[35])
    assert got[10:] == [30, 31, 32, 33, 34, 35] and c.dropped == 10
    c.listen(None)
    s.publish(pk[36])
    assert got[-1] == 35 and calls[0] == 35
    c.listen(on_publish)
    c.close()  # called once more when the consumer closes, and never again
    assert calls[0] == 36
    s.publish(pk[37])
    assert calls[0] == 36

    # A listener that raises is dropped; the publisher and the other readers go on.
    bad, good = s.subscribe("bad"), s.subscribe("good")
    bad_calls = [0]

    def fails() -> None:
        bad_calls[0] += 1
        raise RuntimeError("listener bug")

    bad.listen(fails)
    s.publish(pk[38])
    s.publish(pk[39])
    assert bad_calls[0] == 1 and "listener of consumer bad" in caplog.text
    assert not bad.closed and good.get_nowait() is None  # waits for a keyframe, as before

    # Closing the stream calls the listeners, which see their consumer closed.
    seen_closed: list[bool] = []
    good.listen(lambda: seen_closed.append(good.closed))
    s.close("done")
    assert seen_closed == [True]


async def test_wait_for_keyframe(packets: list[MediaPacket]) -> None:
    s = Stream("key")
    assert await s.wait_for_keyframe(0.01) is False
    s.publish(packets[1])  # a P-frame is not enough
    waiter = asyncio.create_task(s.wait_for_keyframe(5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    s.publish(packets[25])
    assert await asyncio.wait_for(waiter, 1) is True
    assert await s.wait_for_keyframe(0) is True  # cached: at once
    other = Stream("key2")
    t = asyncio.create_task(other.wait_for_keyframe(5))
    await asyncio.sleep(0)
    other.close()
    assert await asyncio.wait_for(t, 1) is False


def test_stats(packets: list[MediaPacket]) -> None:
    s = Stream("stats")
    pk = make_packets(audio="g711u")
    for p in pk:
        s.publish(p)
    st_ = s.stats
    assert st_.packets == len(pk) == 2 * N_FRAMES
    assert st_.bytes == sum(len(p.ps) for p in pk)
    assert st_.keyframes == 3 and st_.last_keyframe_at is not None
    assert st_.video_codec == "h264" and st_.audio_codec == "g711u"
    s.subscribe()
    s.subscribe()
    assert st_.consumers_total == 2
    with pytest.raises(ValueError):
        Stream("bad", max_lag_packets=0)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.one_of(
        st.tuples(st.just("pub"), st.integers(1, 40)),
        st.tuples(st.just("read"), st.integers(0, 3), st.integers(1, 50)),
        st.tuples(st.just("sub"), st.just(0)),
    ), max_size=60),
    gop=st.integers(1, 30),
    max_lag=st.integers(1, 40),
    cache=st.integers(0, 40),
    max_bytes=st.integers(100, 20_000),
)
def test_fuzz_hub_invariants(ops, gop: int, max_lag: int, cache: int, max_bytes: int) -> None:
    """Delivery is in order; after any gap the next packet is a keyframe; the ring is bounded."""
    s = Stream("fuzz", max_lag_packets=max_lag, max_lag_bytes=max_bytes, gop_cache_packets=cache)
    consumers: list[tuple[Consumer, list[int], int]] = []
    n = 0
    for op in ops:
        if op[0] == "pub":
            for _ in range(op[1]):
                s.publish(MediaPacket(ps=bytes(100 + n % 7 * 50), timestamp=n, keyframe=n % gop == 0,
                                      frames=[PsFrame("video", "h264", b"", n, n, n % gop == 0)]))
                n += 1
                assert s.buffered_packets <= max(max_lag, cache) + 1
        elif op[0] == "sub":
            consumers.append((s.subscribe(), [], n))
        elif consumers:
            c, seen, _ = consumers[op[1] % len(consumers)]
            for _ in range(op[2]):
                p = c.get_nowait()
                if p is None:
                    break
                seen.append(p.timestamp)
    for c, seen, _start in consumers:
        seen += [p.timestamp for p in drain(c)]
        assert seen == sorted(set(seen))
        if seen:
            assert seen[0] % gop == 0  # starts at a keyframe
        gaps = 0
        for a, b in zip(seen, seen[1:]):
            if b != a + 1:
                assert b % gop == 0, (a, b)
                gaps += b - a - 1
        assert gaps <= c.dropped
        assert (c.packets, c.lag) == (len(seen), 0)
