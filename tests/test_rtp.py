"""RTP packets, reordering, frame grouping and TCP framing (media.rtp, media.rtp_tcp)."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media.rtp import (
    MAX_DROPOUT,
    FrameAssembler,
    RtpError,
    RtpPacket,
    RtpReorderer,
    packetize,
    parse_rtp,
)
from media.rtp_tcp import RtpFramingError, TcpRtpFramer, frame_interleaved, frame_rfc4571

# A GB/T 28181 PS-over-RTP packet as devices send it (C.1): V=2, M=1, PT=96,
# seq 0x1234, ts 0x00015F90 (1 s at 90 kHz), SSRC 200000001 (y=0200000001).
CAPTURE_LIKE = bytes.fromhex("80e0123400015f900bebc201") + b"\x00\x00\x01\xba" + bytes(10)


def _pkt(seq: int, ts: int = 0, marker: bool = False, payload: bytes | None = None) -> RtpPacket:
    return RtpPacket(sequence=seq & 0xFFFF, timestamp=ts, ssrc=1, marker=marker,
                     payload=payload or bytes((seq & 0xFF,)))


# -- parse / serialize --------------------------------------------------------


def test_parse_gb_packet() -> None:
    p = parse_rtp(CAPTURE_LIKE)
    assert (p.version, p.marker, p.payload_type, p.sequence) == (2, True, 96, 0x1234)
    assert p.timestamp == 90000 and p.ssrc == 200000001
    assert p.csrc == [] and p.extension is None and p.padding == 0
    assert bytes(p.payload) == CAPTURE_LIKE[12:]
    assert p.serialize() == CAPTURE_LIKE


def test_round_trip_with_csrc_extension_padding() -> None:
    p = RtpPacket(
        payload_type=8,
        sequence=65535,
        timestamp=0xFFFFFFFF,
        ssrc=0xDEADBEEF,
        marker=False,
        payload=b"hello",
        csrc=[1, 2, 3],
        extension=b"\x01\x02\x03\x04\x05\x06\x07\x08",
        extension_profile=0xBEDE,
        padding=3,
    )
    wire = p.serialize()
    assert len(wire) == 12 + 12 + 4 + 8 + 5 + 3
    assert wire[0] == 0x80 | 0x20 | 0x10 | 3
    assert wire[-1] == 3
    q = parse_rtp(wire)
    assert q == p
    assert q.serialize() == wire


def test_parse_accepts_memoryview_and_bytearray() -> None:
    assert parse_rtp(memoryview(CAPTURE_LIKE)).sequence == 0x1234
    assert parse_rtp(bytearray(CAPTURE_LIKE)).ssrc == 200000001


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "too short"),
        (b"\x80" * 11, "too short"),
        (b"\x40" + bytes(11), "version 1"),
        (b"\x82" + bytes(11) + bytes(4), "CSRC"),
        (b"\x90" + bytes(11) + b"\x00\x00", "extension"),
        (b"\x90" + bytes(11) + b"\xbe\xde\x00\x02" + bytes(4), "overruns"),
        (b"\xa0" + bytes(11) + b"\x00", "padding"),
        (b"\xa0" + bytes(11) + b"\x01\x05", "padding"),
    ],
)
def test_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(RtpError, match=message):
        parse_rtp(data)


def test_rtp_error_is_value_error() -> None:
    assert issubclass(RtpError, ValueError)


# -- packetize ----------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 1387, 1388, 1389, 2776, 15000, 100_000])
def test_packetize_sizes_marker_and_reassembly(size: int) -> None:
    payload = random.Random(size).randbytes(size)
    packets, nxt = packetize(payload, ssrc=200000001, seq=65530, timestamp=123456)
    assert all(len(p) <= 1400 for p in packets)
    assert len(packets) == -(-size // 1388)
    parsed = [parse_rtp(p) for p in packets]
    assert [p.marker for p in parsed] == [False] * (len(parsed) - 1) + [True]
    assert [p.sequence for p in parsed] == [(65530 + i) & 0xFFFF for i in range(len(parsed))]
    assert nxt == (65530 + len(parsed)) & 0xFFFF
    assert {p.timestamp for p in parsed} == {123456}
    assert {p.ssrc for p in parsed} == {200000001}
    assert {p.payload_type for p in parsed} == {96}
    assert b"".join(bytes(p.payload) for p in parsed) == payload


def test_packetize_options_and_edges() -> None:
    packets, nxt = packetize(b"x" * 100, ssrc=1, seq=7, timestamp=1 << 33, payload_type=98, mtu=40)
    assert all(len(p) <= 40 for p in packets) and len(packets) == 4 and nxt == 11
    assert parse_rtp(packets[0]).payload_type == 98
    assert parse_rtp(packets[0]).timestamp == 0  # mod 2^32
    assert packetize(b"", ssrc=1, seq=70000, timestamp=0) == ([], 70000 & 0xFFFF)
    with pytest.raises(ValueError):
        packetize(b"x", ssrc=1, seq=0, timestamp=0, mtu=12)


# -- reorderer ----------------------------------------------------------------


def _run(reorderer: RtpReorderer, seqs: list[int]) -> list[RtpPacket]:
    out = []
    for s in seqs:
        out += reorderer.push(_pkt(s))
    return out


def test_reorder_in_order() -> None:
    r = RtpReorderer()
    out = _run(r, list(range(100)))
    assert [p.sequence for p in out] == list(range(100))
    assert r.lost == 0 and r.buffered == 0 and not any(p.gap for p in out)


def test_reorder_shuffled_within_window() -> None:
    rng = random.Random(1)
    seqs = list(range(1000))
    # Displace packets by up to 10 places; the first packet stays first.
    keyed = sorted(seqs[1:], key=lambda s: s + rng.uniform(-10, 10))
    r = RtpReorderer(window=32)
    out = _run(r, [0] + keyed) + r.flush()
    assert [p.sequence for p in out] == seqs
    assert r.lost == 0 and r.late == 0


def test_reorder_wraparound() -> None:
    seqs = [(65530 + i) & 0xFFFF for i in range(20)]
    shuffled = [seqs[0], seqs[2], seqs[1], seqs[6], seqs[5], seqs[4], seqs[3]] + seqs[7:]
    r = RtpReorderer()
    out = _run(r, shuffled)
    assert [p.sequence for p in out] == seqs
    assert r.lost == 0


def test_reorder_loss_sets_gap_and_counter() -> None:
    r = RtpReorderer(window=4)
    seqs = [65534, 65535, 2, 3, 4, 5, 6, 7]  # 0 and 1 never arrive
    out = _run(r, seqs)
    assert [p.sequence for p in out] == seqs
    assert r.lost == 2
    assert [p.gap for p in out] == [0, 0, 2, 0, 0, 0, 0, 0]


def test_reorder_max_delay_is_window() -> None:
    r = RtpReorderer(window=8)
    out = _run(r, [0] + list(range(2, 9)))
    assert [p.sequence for p in out] == [0]  # 2..8 held for 1
    out = r.push(_pkt(9))  # 9 - 1 >= window: give 1 up
    assert [p.sequence for p in out] == list(range(2, 10))
    assert out[0].gap == 1 and r.lost == 1
    assert r.push(_pkt(1)) == [] and r.late == 1  # arrives after being given up


def test_reorder_duplicates_dropped() -> None:
    r = RtpReorderer()
    out = _run(r, [10, 12, 12, 11, 11, 12, 13])
    assert [p.sequence for p in out] == [10, 11, 12, 13]
    assert r.duplicates == 1 and r.late == 2


def test_reorder_far_ahead_within_dropout_skips() -> None:
    r = RtpReorderer(window=16)
    out = _run(r, [100, 101, 600, 601])
    assert [p.sequence for p in out] == [100, 101]  # 600/601 wait in the window
    out = r.flush()
    assert [p.sequence for p in out] == [600, 601] and out[0].gap == 498
    assert r.lost == 498


def test_reorder_sender_restart_needs_two_in_sequence() -> None:
    r = RtpReorderer()
    _run(r, [1000, 1001])
    assert r.push(_pkt(40000)) == []  # probation
    assert r.push(_pkt(1002))[0].sequence == 1002  # stray packet forgotten
    assert r.push(_pkt(40000)) == []
    out = r.push(_pkt(40001))
    assert [p.sequence for p in out] == [40000, 40001]
    assert out[0].gap and r.resets == 1 and r.lost == 0
    assert [p.sequence for p in _run(r, [40002, 40003])] == [40002, 40003]


def test_reorder_rejects_bad_window() -> None:
    with pytest.raises(ValueError):
        RtpReorderer(window=0)
    with pytest.raises(ValueError):
        RtpReorderer(window=MAX_DROPOUT + 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), max_size=300), st.integers(1, 64))
def test_reorder_fuzz_bounded_and_ordered(seqs: list[int], window: int) -> None:
    r = RtpReorderer(window=window)
    for s in seqs:
        resets = r.resets
        out = r.push(_pkt(s))
        assert r.buffered <= window
        # Emitted runs are strictly increasing modulo 2^16 (no duplicates),
        # except across a sender restart, which is flagged as a gap.
        for a, b in zip(out, out[1:]):
            if not 0 < (b.sequence - a.sequence) & 0xFFFF < 0x8000:
                assert r.resets > resets and b.gap
    r.flush()
    assert r.buffered == 0


# -- frame assembler ----------------------------------------------------------


def _frames(packets: list[RtpPacket]) -> list:
    fa = FrameAssembler()
    out = []
    for p in packets:
        out += fa.push(p)
    return out + fa.flush()


def test_assembler_splits_on_timestamp_without_markers() -> None:
    pk = [_pkt(i, ts=i // 3 * 3600, payload=bytes([i])) for i in range(9)]
    out = _frames(pk)
    assert [f.timestamp for f in out] == [0, 3600, 7200]
    assert [f.payload for f in out] == [b"\x00\x01\x02", b"\x03\x04\x05", b"\x06\x07\x08"]
    assert not any(f.damaged or f.marker for f in out)
    assert [f.packets for f in out] == [3, 3, 3] and out[1].first_sequence == 3


def test_assembler_marker_closes_frame_early() -> None:
    fa = FrameAssembler()
    assert fa.push(_pkt(0, ts=0, payload=b"a")) == []
    out = fa.push(_pkt(1, ts=0, marker=True, payload=b"b"))
    assert len(out) == 1 and out[0].payload == b"ab" and out[0].marker
    # Same timestamp after the marker (e.g. audio PS packet): a new frame.
    out = fa.push(_pkt(2, ts=0, marker=True, payload=b"c"))
    assert out[0].payload == b"c"


def test_assembler_gap_inside_frame_damages_it() -> None:
    a, b, c = _pkt(0, ts=0), _pkt(2, ts=0), _pkt(3, ts=90, marker=True)
    b.gap = 1
    out = _frames([a, b, c])
    assert [f.damaged for f in out] == [True, False]


def test_assembler_gap_at_boundary() -> None:
    # Previous frame closed by its marker: only the new frame may miss its head.
    p = [_pkt(0, ts=0, marker=True), _pkt(2, ts=90), _pkt(3, ts=90, marker=True)]
    p[1].gap = 1
    assert [f.damaged for f in _frames(p)] == [False, True]
    # No marker seen: the lost packet may be either frame's, so both are damaged.
    p = [_pkt(0, ts=0), _pkt(2, ts=90), _pkt(3, ts=90, marker=True)]
    p[1].gap = 1
    assert [f.damaged for f in _frames(p)] == [True, True]


def test_assembler_drops_oversized_frames() -> None:
    fa = FrameAssembler(max_frame_size=10)
    out = []
    for i in range(5):
        out += fa.push(_pkt(i, ts=0, payload=b"xxxx"))
    out += fa.push(_pkt(5, ts=90, payload=b"ok", marker=True))
    assert [f.payload for f in out] == [b"ok"] and fa.oversized == 1


# -- TCP framing --------------------------------------------------------------


def _rtp_packets(n: int, size: int = 50) -> list[bytes]:
    return [RtpPacket(sequence=i, timestamp=i * 3600, ssrc=9, payload=bytes([i]) * (size + i)).serialize()
            for i in range(n)]


def test_frame_rfc4571() -> None:
    assert frame_rfc4571(b"\x80" + bytes(13)) == b"\x00\x0e\x80" + bytes(13)
    with pytest.raises(RtpFramingError):
        frame_rfc4571(b"")
    with pytest.raises(RtpFramingError):
        frame_rfc4571(bytes(70000))


@pytest.mark.parametrize("interleaved", [False, True])
def test_tcp_many_packets_per_segment(interleaved: bool) -> None:
    pk = _rtp_packets(20)
    wire = b"".join(frame_interleaved(p) if interleaved else frame_rfc4571(p) for p in pk)
    f = TcpRtpFramer()
    assert f.feed(wire) == pk
    assert f.mode == ("interleaved" if interleaved else "rfc4571")
    assert f.buffered == 0 and f.packets == 20 and f.resyncs == 0


@pytest.mark.parametrize("interleaved", [False, True])
def test_tcp_split_at_every_byte_boundary(interleaved: bool) -> None:
    pk = _rtp_packets(3, size=20)
    wire = b"".join(frame_interleaved(p) if interleaved else frame_rfc4571(p) for p in pk)
    for i in range(len(wire) + 1):
        f = TcpRtpFramer()
        assert f.feed(wire[:i]) + f.feed(wire[i:]) == pk, i
    f = TcpRtpFramer()
    out = []
    for b in wire:
        out += f.feed(bytes((b,)))
    assert out == pk


def test_tcp_large_packet_in_many_segments() -> None:
    big = RtpPacket(sequence=1, payload=bytes(65000)).serialize()
    wire = frame_rfc4571(big) + frame_rfc4571(_rtp_packets(1)[0])
    f = TcpRtpFramer()
    out = []
    for i in range(0, len(wire), 1400):
        out += f.feed(wire[i : i + 1400])
        assert f.buffered <= 65535 + 2
    assert out == [big, _rtp_packets(1)[0]]


def test_tcp_resync_after_garbage() -> None:
    pk = _rtp_packets(5)
    good = b"".join(frame_rfc4571(p) for p in pk)
    # Length 0, then a length with a non-RTP first byte, then stray bytes.
    wire = frame_rfc4571(pk[0]) + b"\x00\x00" + b"\x00\x20\x11" + b"junk" + good
    f = TcpRtpFramer()
    out = f.feed(wire)
    assert out[0] == pk[0] and out[-5:] == pk
    assert f.resyncs >= 1 and f.dropped_bytes > 0


def test_tcp_interleaved_channels_and_resync() -> None:
    pk = _rtp_packets(4)
    rtcp = b"$\x01\x00\x08" + bytes(8)
    wire = frame_interleaved(pk[0]) + rtcp + b"garbage" + frame_interleaved(pk[1]) + frame_interleaved(pk[2], 0)
    f = TcpRtpFramer(channels={0})
    assert f.feed(wire) == pk[:3]
    assert f.skipped == 1 and f.resyncs == 1 and f.dropped_bytes == 7


def test_tcp_rtcp_on_the_connection_is_skipped() -> None:
    pk = _rtp_packets(2)
    rr = bytes.fromhex("80c90001") + (1234).to_bytes(4, "big")  # RTCP RR, no report blocks
    f = TcpRtpFramer()
    assert f.feed(frame_rfc4571(pk[0]) + frame_rfc4571(rr) + frame_rfc4571(pk[1])) == pk
    assert f.rtcp == 1 and f.resyncs == 0
    f = TcpRtpFramer()
    assert f.feed(frame_interleaved(pk[0]) + frame_interleaved(rr, 1) + frame_interleaved(pk[1])) == pk
    assert f.rtcp == 1


def test_tcp_strict_mode_raises() -> None:
    f = TcpRtpFramer(strict=True)
    with pytest.raises(RtpFramingError):
        f.feed(b"\x00\x00" + bytes(20))


def test_tcp_max_packet_size() -> None:
    f = TcpRtpFramer(max_packet_size=1500)
    pk = _rtp_packets(1)[0]
    out = f.feed(struct.pack("!H", 40000) + b"\x80" + bytes(100) + frame_rfc4571(pk))
    assert out == [pk] and f.resyncs >= 1
    with pytest.raises(ValueError):
        TcpRtpFramer(max_packet_size=70000)


# -- fuzz: parsers only raise their own ValueError subclasses, memory stays bounded --

_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=200))
def test_fuzz_parse_rtp(data: bytes) -> None:
    try:
        p = parse_rtp(data)
    except RtpError:
        return
    assert p.version == 2 and 0 <= p.sequence <= 0xFFFF
    assert len(p.payload) + p.padding <= len(data) - 12


@_FUZZ
@given(
    st.builds(
        RtpPacket,
        payload_type=st.integers(0, 127),
        sequence=st.integers(0, 0xFFFF),
        timestamp=st.integers(0, 0xFFFFFFFF),
        ssrc=st.integers(0, 0xFFFFFFFF),
        marker=st.booleans(),
        payload=st.binary(max_size=64),
        csrc=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
        extension=st.none() | st.binary(max_size=16).map(lambda b: b + bytes(-len(b) % 4)),
        extension_profile=st.integers(0, 0xFFFF),
        padding=st.integers(0, 255),
    )
)
def test_fuzz_serialize_parse_round_trip(p: RtpPacket) -> None:
    q = parse_rtp(p.serialize())
    if p.extension is None:
        p.extension_profile = 0
    assert q == p


@_FUZZ
@given(st.lists(st.binary(max_size=300), max_size=30), st.booleans())
def test_fuzz_tcp_framer_arbitrary(chunks: list[bytes], strict: bool) -> None:
    f = TcpRtpFramer(strict=strict, max_packet_size=1500)
    try:
        for c in chunks:
            for p in f.feed(c):
                assert 12 <= len(p) <= 1500
            assert f.buffered <= 1500 + 4 + 300
    except RtpFramingError:
        assert strict


@_FUZZ
@given(st.data())
def test_fuzz_tcp_framer_mutated(data: st.DataObject) -> None:
    pk = _rtp_packets(6)
    interleaved = data.draw(st.booleans())
    wire = bytearray(b"".join(frame_interleaved(p) if interleaved else frame_rfc4571(p) for p in pk))
    for _ in range(data.draw(st.integers(0, 5))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    f = TcpRtpFramer()
    out = f.feed(bytes(wire[:cut])) + f.feed(bytes(wire[cut:]))
    assert all(isinstance(p, bytes) and len(p) >= 12 for p in out)
    assert f.buffered <= 65535 + 4
