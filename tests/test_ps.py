"""PS mux/demux (media.ps), NAL helpers (media.nal) and the whole RTP receive path."""

from __future__ import annotations

import fractions
import io
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media import nal
from media.ps import PsDemuxer, PsFrame, PsMuxer, crc32_mpeg2
from media.rtp import FrameAssembler, RtpError, RtpReorderer, packetize, parse_rtp

# SPS/PPS as libx264 writes them for 64x48 High profile (captured with PyAV).
X264_SPS = bytes.fromhex("6764000aacd9447a1000000300100000030320f1225960")
X264_PPS = bytes.fromhex("68ebe3cb22c0")
SC = b"\x00\x00\x00\x01"


def _body(rng: random.Random, size: int) -> bytes:
    # Non-zero bytes: no accidental start codes, like emulation-prevented slices.
    if size < 4096:
        return bytes(rng.randrange(1, 256) for _ in range(size))
    return rng.randbytes(size).replace(b"\x00", b"\x01")


def synthetic_gop(n: int = 12, seed: int = 0, key_size: int = 3000, p_size: int = 600) -> list[tuple[bytes, bool]]:
    """Real-shaped H.264 AUs: AUD SPS PPS IDR for the first, AUD + P slice after."""
    rng = random.Random(seed)
    aus = []
    for i in range(n):
        if i % 25 == 0:
            au = SC + b"\x09\xf0" + SC + X264_SPS + SC + X264_PPS + SC + b"\x65\x88" + _body(rng, key_size)
        else:
            au = SC + b"\x09\xf0" + SC + b"\x41\x9a" + _body(rng, p_size + rng.randrange(200))
        aus.append((au, i % 25 == 0))
    return aus


def mux_stream(aus: list[tuple[bytes, bool]], muxer: PsMuxer | None = None, audio: bool = False) -> list[bytes]:
    m = muxer or PsMuxer("h264", "g711a" if audio else None)
    out = []
    for i, (au, key) in enumerate(aus):
        out.append(m.mux_video(au, pts=i * 3600 + 3600, dts=i * 3600, keyframe=key))
        if audio:
            out.append(m.mux_audio(bytes([i]) * 320, pts=i * 3600))
    return out


def demux_all(chunks: list[bytes], demuxer: PsDemuxer | None = None) -> list[PsFrame]:
    d = demuxer or PsDemuxer()
    frames = []
    for c in chunks:
        frames += d.feed(c)
    return frames + d.flush()


def pes(sid: int, payload: bytes, pts: int | None = None, length: int | None = None) -> bytes:
    hdr = b"\x80\x80\x05" + _pts(pts) if pts is not None else b"\x80\x00\x00"
    n = len(hdr) + len(payload) if length is None else length
    return b"\x00\x00\x01" + bytes((sid,)) + n.to_bytes(2, "big") + hdr + payload


def _pts(ts: int) -> bytes:
    return bytes((0x21 | ((ts >> 29) & 0x0E), (ts >> 22) & 0xFF, ((ts >> 14) & 0xFE) | 1,
                  (ts >> 7) & 0xFF, ((ts << 1) & 0xFE) | 1))


PACK = bytes.fromhex("000001ba44000400040101dfa3f8")  # SCR 0, mux_rate 6106


# -- PyAV fixtures: real encoder output --------------------------------------


def _encode(codec: str, width: int, height: int, pix_fmt: str = "yuv420p", options: dict | None = None) -> list[bytes]:
    av = pytest.importorskip("av", exc_type=ImportError)
    np = pytest.importorskip("numpy", exc_type=ImportError)
    cc = av.CodecContext.create(codec, "w")
    cc.width, cc.height, cc.pix_fmt = width, height, pix_fmt
    cc.time_base = fractions.Fraction(1, 25)
    cc.framerate = 25
    cc.options = {"bframes": "0", **(options or {})} if codec == "libx264" else dict(options or {})
    packets = []
    for i in range(5):
        img = np.zeros((height, width, 3), np.uint8)
        img[:, :, 0] = (np.arange(width) * 4 + i * 16) % 256
        img[:, :, 1] = (np.arange(height)[:, None] * 5) % 256
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)
        frame.pts = i
        packets += [bytes(p) for p in cc.encode(frame)]
    packets += [bytes(p) for p in cc.encode(None)]
    return packets


@pytest.fixture(scope="module")
def x264_aus() -> list[bytes]:
    return _encode("libx264", 64, 48)


@pytest.fixture(scope="module")
def x265_aus() -> list[bytes]:
    return _encode("libx265", 64, 48, options={"x265-params": "log-level=none:pools=none:frame-threads=1"})


def test_real_h264_sps_and_keyframes(x264_aus: list[bytes]) -> None:
    assert len(x264_aus) == 5
    info = nal.sps_info(x264_aus[0], "h264")
    assert info is not None and (info.width, info.height) == (64, 48)
    assert info.profile_idc == 100  # High: exercises chroma_format_idc & co
    assert [nal.is_keyframe(a, "h264") for a in x264_aus] == [True, False, False, False, False]
    assert nal.sps_info(x264_aus[1], "h264") is None


@pytest.mark.parametrize(
    "size, pix_fmt, options",
    [((72, 40), "yuv420p", {}), ((64, 48), "yuv444p", {}), ((64, 48), "yuv420p", {"x264-params": "interlaced=1"})],
    ids=["cropped", "high444", "interlaced"],
)
def test_real_h264_sps_variants(size: tuple[int, int], pix_fmt: str, options: dict) -> None:
    aus = _encode("libx264", *size, pix_fmt=pix_fmt, options=options)
    info = nal.sps_info(aus[0], "h264")
    assert info is not None and (info.width, info.height) == size
    if pix_fmt == "yuv444p":
        assert info.chroma_format_idc == 3 and info.profile_idc == 244


def test_real_h265_sps_and_keyframes(x265_aus: list[bytes]) -> None:
    info = nal.sps_info(x265_aus[0], "h265")
    assert info is not None and (info.width, info.height) == (64, 48)
    assert nal.is_keyframe(x265_aus[0], "h265") and not nal.is_keyframe(x265_aus[-1], "h265")
    cropped = _encode("libx265", 72, 40, options={"x265-params": "log-level=none:pools=none:frame-threads=1"})
    info = nal.sps_info(cropped[0], "h265")
    assert info is not None and (info.width, info.height) == (72, 40)


def test_real_h264_through_ps_and_rtp(x264_aus: list[bytes]) -> None:
    aus = [(a, nal.is_keyframe(a, "h264")) for a in x264_aus]
    frames = _through_rtp(mux_stream(aus), seq=65533)
    assert [f.data for f in frames] == x264_aus
    assert [f.keyframe for f in frames] == [k for _, k in aus]


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_pyav_reads_our_ps(codec: str, x264_aus: list[bytes], x265_aus: list[bytes]) -> None:
    """Interop: FFmpeg's MPEG-PS demuxer and decoder accept what PsMuxer writes."""
    av = pytest.importorskip("av", exc_type=ImportError)
    aus = x264_aus if codec == "h264" else x265_aus
    m = PsMuxer(codec, "g711a")
    ps = mux_stream([(a, nal.is_keyframe(a, codec)) for a in aus], muxer=m, audio=True)
    with av.open(io.BytesIO(b"".join(ps)), format="mpeg") as c:
        assert {s.codec_context.name for s in c.streams} == {codec.replace("h265", "hevc"), "pcm_alaw"}
        decoded = [f for p in c.demux(c.streams.video[0]) for f in p.decode()]
    assert len(decoded) == 5 and (decoded[0].width, decoded[0].height) == (64, 48)


# -- NAL helpers ---------------------------------------------------------------


class _BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, n: int, v: int) -> None:
        self.bits += [(v >> (n - 1 - i)) & 1 for i in range(n)]

    def ue(self, v: int) -> None:
        k = (v + 1).bit_length()
        self.u(k - 1, 0)
        self.u(k, v + 1)

    def se(self, v: int) -> None:
        self.ue(2 * v - 1 if v > 0 else -2 * v)

    def rbsp(self) -> bytes:
        bits = self.bits + [1]
        bits += [0] * (-len(bits) % 8)
        return bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


def test_h264_sps_scaling_lists_cropping_poc1() -> None:
    """Hand-built High 4:2:2 SPS: scaling matrices, POC type 1, fields, cropping."""
    w = _BitWriter()
    w.u(8, 122), w.u(8, 0), w.u(8, 40), w.ue(0)
    w.ue(2)  # chroma_format_idc 4:2:2
    w.ue(2), w.ue(2), w.u(1, 0)  # 10-bit
    w.u(1, 1)  # seq_scaling_matrix_present_flag
    for i in range(8):
        w.u(1, i % 2)
        if i % 2:
            for j in range(16 if i < 6 else 64):
                w.se(1 if j % 3 else -2)
    w.ue(0), w.ue(1)  # log2_max_frame_num, poc type 1
    w.u(1, 0), w.se(-3), w.se(5), w.ue(2), w.se(1), w.se(-1)
    w.ue(4), w.u(1, 0)
    w.ue(119), w.ue(33)  # 120 MBs wide, 34 map units high
    w.u(1, 0), w.u(1, 1), w.u(1, 1)  # field coding, mb_adaptive, direct_8x8
    w.u(1, 1), w.ue(0), w.ue(0), w.ue(0), w.ue(4)  # crop 4 units of SubHeightC*2 = 8 rows
    sps = b"\x67" + nal.escape_rbsp(w.rbsp())
    info = nal.parse_h264_sps(sps)
    assert (info.width, info.height, info.chroma_format_idc, info.bit_depth) == (1920, 1080, 2, 10)
    assert nal.sps_info(SC + sps + SC + b"\x65\x88", "h264") == info


def test_h265_sps_with_sub_layers() -> None:
    w = _BitWriter()
    w.u(4, 0), w.u(3, 2), w.u(1, 1)  # two extra sub-layers
    w.u(2, 0), w.u(1, 0), w.u(5, 1), w.u(32, 0x60000000), w.u(4, 0xB), w.u(43, 0), w.u(1, 0), w.u(8, 123)
    w.u(1, 1), w.u(1, 1), w.u(1, 0), w.u(1, 1)  # sub-layer 0: profile+level, 1: level
    w.u(2 * 6, 0)
    w.u(88, 0), w.u(8, 90), w.u(8, 93)
    w.ue(0), w.ue(1), w.ue(1920), w.ue(1088)
    w.u(1, 1), w.ue(0), w.ue(0), w.ue(0), w.ue(4)  # conformance window: 8 rows
    w.ue(0), w.ue(0)
    sps = b"\x42\x01" + nal.escape_rbsp(w.rbsp())
    info = nal.parse_h265_sps(sps)
    assert (info.width, info.height, info.profile_idc, info.level_idc) == (1920, 1080, 1, 123)


def test_iter_nal_units_and_types() -> None:
    au = b"\x00\x00\x00\x01\x09\xf0\x00\x00\x01\x67\x64\x00\x00\x00\x00\x01\x65\x88\x00"
    assert list(nal.iter_nal_units(au)) == [b"\x09\xf0", b"\x67\x64", b"\x65\x88"]
    assert nal.is_keyframe(au, "h264")
    assert not nal.is_keyframe(SC + b"\x09\xf0" + SC + b"\x41\x9a", "h264")
    assert nal.is_keyframe(SC + b"\x40\x01" + SC + b"\x26\x01\xaf", "h265")  # VPS, IDR_W_RADL
    assert not nal.is_keyframe(SC + b"\x02\x01\xd0", "h265")  # TRAIL_R
    assert not nal.is_keyframe(b"", "h264") and not nal.is_keyframe(au, "unknown")
    with pytest.raises(nal.NalError):
        nal.parse_h264_sps(b"\x67\x64")


def _units_by_find(au: bytes) -> list[bytes]:
    """Annex B (H.264 B.2) NAL units by a plain bytes.find walk, the reference."""
    units = []
    i = au.find(SC[1:])
    while i >= 0:
        j = au.find(SC[1:], i + 3)
        unit = au[i + 3 : j if j >= 0 else len(au)].rstrip(b"\x00")
        if unit:
            units.append(unit)
        i = j
    return units


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"\x00", b"\x01", b"\x00\x00\x01", b"\x00\x00\x00\x01", b"\x67",
                                 b"\x68", b"\x65", b"\x42\x01", b"\x41", b"\x03"]), max_size=40))
def test_fuzz_nal_units_match_a_find_walk(pieces: list[bytes]) -> None:
    au = b"".join(pieces)
    units = _units_by_find(au)
    assert list(nal.iter_nal_units(au)) == units
    assert [au[s:e] for s, e in nal.nal_spans(au)] == units
    assert nal.nal_spans_py(au) == nal.nal_spans(au)  # the C twin (media._fast) when built
    assert nal.nal_spans_py(bytearray(au)) == nal.nal_spans(memoryview(au))  # any bytes-like
    for codec, wanted in (("h264", 7), ("h264", 8), ("h265", 33), ("h265", 32)):
        first = next((u for u in units if nal.nal_type(u, codec) == wanted), None)
        assert nal.find_nal(au, codec, wanted) == first
    # is_keyframe: the type of the first VCL unit, header bytes read after every start code.
    headers = []
    i = au.find(SC[1:])
    while 0 <= i and i + 3 < len(au):
        headers.append(au[i + 3])
        i = au.find(SC[1:], i + 3)
    vcl264 = next((h & 0x1F for h in headers if h & 0x1F in (1, 2, 3, 4, 5)), None)
    vcl265 = next(((h >> 1) & 0x3F for h in headers if (h >> 1) & 0x3F <= 31), None)
    assert nal.is_keyframe(au, "h264") == (vcl264 == 5)
    assert nal.is_keyframe(au, "h265") == (vcl265 is not None and 16 <= vcl265 <= 23)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(["h264", "h265"]))
def test_fuzz_sps_parsers(data: bytes, codec: str) -> None:
    header = b"\x67" if codec == "h264" else b"\x42\x01"
    try:
        info = nal.parse_sps(header + data, codec)
    except nal.NalError:
        return
    assert info.width > 0 and info.height > 0
    nal.is_keyframe(data, codec)


# -- muxer ---------------------------------------------------------------------


def test_crc32_mpeg2_check_value() -> None:
    assert crc32_mpeg2(b"123456789") == 0x0376E6E7


def test_muxer_keyframe_layout() -> None:
    au = SC + X264_SPS + SC + b"\x65\x88\x84"
    ps = PsMuxer("h264", "g711a").mux_video(au, pts=90000, dts=86400, keyframe=True)
    assert ps[:4] == b"\x00\x00\x01\xba" and len(ps) > 14
    sys_hdr = ps[14:32]
    assert sys_hdr[:6] == b"\x00\x00\x01\xbb\x00\x0c" and sys_hdr[-6:] == bytes.fromhex("e0e0e8c0c020")
    psm = ps[32:56]
    assert psm[:6] == b"\x00\x00\x01\xbc\x00\x12"
    assert psm[12:20] == bytes.fromhex("1be000009 0c00000".replace(" ", ""))
    assert crc32_mpeg2(psm) == 0  # the CRC covers the PSM and itself
    assert ps[56:60] == b"\x00\x00\x01\xe0" and ps[62:65] == b"\x80\xc0\x0a"
    assert ps.endswith(au)
    p = PsMuxer("h265").mux_video(au, pts=0, keyframe=True)
    assert bytes.fromhex("24e00000") in p and b"\x00\x00\x01\xbc" in p
    assert b"\x00\x00\x01\xbb" not in PsMuxer().mux_video(au, pts=0, keyframe=False)


def test_muxer_splits_large_frames_into_pes() -> None:
    au = SC + b"\x65\x88" + _body(random.Random(3), 200_000)
    ps = PsMuxer().mux_video(au, pts=1234, keyframe=True)
    pes_offsets = [i for i in range(len(ps) - 3) if ps[i : i + 4] == b"\x00\x00\x01\xe0"]
    assert len(pes_offsets) == 4
    for k, off in enumerate(pes_offsets):
        length = int.from_bytes(ps[off + 4 : off + 6], "big")
        assert length <= 0xFF00
        assert ps[off + 7] == (0x80 if k == 0 else 0x00)  # PTS only on the first
    frames = demux_all([ps])
    assert len(frames) == 1 and frames[0].data == au and frames[0].pts == 1234


def test_muxer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        PsMuxer("mpeg4")
    with pytest.raises(ValueError):
        PsMuxer("h264", "aac")
    with pytest.raises(ValueError):
        PsMuxer().mux_audio(b"x", 0)


def test_pts_33_bit_round_trip() -> None:
    ps = PsMuxer().mux_video(SC + b"\x65\x88", pts=(1 << 33) - 1, dts=(1 << 33) + 5)
    (f,) = demux_all([ps])
    assert (f.pts, f.dts) == ((1 << 33) - 1, 5)


# -- demuxer -------------------------------------------------------------------


def test_round_trip_video_and_audio() -> None:
    aus = synthetic_gop(30)
    frames = demux_all(mux_stream(aus, audio=True))
    video = [f for f in frames if f.stream == "video"]
    audio = [f for f in frames if f.stream == "audio"]
    assert [f.data for f in video] == [a for a, _ in aus]
    assert [f.keyframe for f in video] == [k for _, k in aus]
    assert [f.pts for f in video] == [i * 3600 + 3600 for i in range(30)]
    assert [f.dts for f in video] == [i * 3600 for i in range(30)]
    assert {f.codec for f in video} == {"h264"} and {f.codec for f in audio} == {"g711a"}
    assert [f.data for f in audio] == [bytes([i]) * 320 for i in range(30)]
    # Output keeps stream order: each audio frame follows the video frame before it.
    assert [f.stream for f in frames[:4]] == ["video", "audio", "video", "audio"]


def test_flush_after_each_frame_gives_it_at_once() -> None:
    d = PsDemuxer()
    for ps in mux_stream(synthetic_gop(5)):
        assert d.feed(ps) == []  # the frame could still continue
        (f,) = d.flush()
        assert f.stream == "video"


def test_feed_split_at_every_byte_boundary() -> None:
    ps = b"".join(mux_stream(synthetic_gop(3, key_size=300, p_size=50), audio=True))
    expected = demux_all([ps])
    assert len(expected) == 6
    for i in range(len(ps) + 1):
        d = PsDemuxer()
        assert d.feed(ps[:i]) + d.feed(ps[i:]) + d.flush() == expected, i


def test_h265_psm_and_psm_less_p_frames() -> None:
    m = PsMuxer("h265", "g711u")
    idr = SC + b"\x40\x01\x0c" + SC + b"\x42\x01\x01" + SC + b"\x26\x01\xaf\x11"
    trail = SC + b"\x02\x01\xd0\x22"
    chunks = [m.mux_video(idr, 0, keyframe=True), m.mux_audio(b"\xff" * 160, 0)]
    chunks += [m.mux_video(trail, 3600 * i) for i in range(1, 4)]
    frames = demux_all(chunks)
    assert [(f.stream, f.codec, f.keyframe) for f in frames] == [
        ("video", "h265", True),
        ("audio", "g711u", False),
    ] + [("video", "h265", False)] * 3


def test_no_psm_defaults_to_h264() -> None:
    # A stream joined mid-GOP: only P-frames, never a PSM.
    chunks = [PsMuxer().mux_video(au, pts=i * 3600) for i, (au, _) in enumerate(synthetic_gop(6)[1:])]
    frames = demux_all(chunks)
    assert len(frames) == 5 and {f.codec for f in frames} == {"h264"}


def test_hikvision_truncated_pack_header() -> None:
    idr = SC + b"\x40\x01\x0c" + SC + b"\x26\x01\xaf\x11"
    trail = SC + b"\x02\x01\xd0\x22"
    psm = PsMuxer("h265").mux_video(b"", 0, keyframe=True)[14 + 15 : 14 + 15 + 20]
    assert psm[:4] == b"\x00\x00\x01\xbc"
    stream = PACK + psm + pes(0xE0, idr, pts=0) + b"\x00\x00\x01\xba" + pes(0xE0, trail, pts=3600)
    stream += b"\x00\x00\x01\xba" + pes(0xE0, trail, pts=7200)
    d = PsDemuxer()
    frames = demux_all([stream], d)
    assert [(f.data, f.pts, f.codec) for f in frames] == [
        (idr, 0, "h265"), (trail, 3600, "h265"), (trail, 7200, "h265")]
    assert d.resyncs == 0


def test_resync_after_garbage() -> None:
    chunks = mux_stream(synthetic_gop(6))
    rng = random.Random(5)
    garbage = [b"\x00\x00\x01\x00junk", rng.randbytes(3000).replace(b"\x00\x00\x01", b"xyz"), b"\x00\x00\x01"]
    dirty = [garbage[0] + chunks[0], chunks[1] + garbage[1], chunks[2], garbage[2], chunks[3],
             chunks[4] + garbage[0], chunks[5]]
    d = PsDemuxer()
    frames = demux_all(dirty, d)
    assert [f.data for f in frames] == [a for a, _ in synthetic_gop(6)]
    assert d.resyncs >= 3 and d.dropped_bytes >= 3000


def test_damaged_frame_does_not_poison_the_next() -> None:
    chunks = mux_stream(synthetic_gop(4))
    cut = chunks[1][: len(chunks[1]) // 2]  # tail lost in transit
    d = PsDemuxer()
    frames = demux_all([chunks[0], cut, chunks[2], chunks[3]], d)
    aus = [a for a, _ in synthetic_gop(4)]
    assert [f.data for f in frames] == [aus[0], aus[2], aus[3]]
    assert d.truncated == 1


def test_pes_cut_short_inside_one_buffer() -> None:
    """A video PES cut short with the next pack in the same buffer (one RTP frame, as the
    ingest feeds it): the cut frame is dropped, the next one comes out whole."""
    chunks = mux_stream(synthetic_gop(4))
    aus = [a for a, _ in synthetic_gop(4)]
    for keep in (0.3, 0.6, 0.9):
        cut = chunks[1][: int(len(chunks[1]) * keep)]
        d = PsDemuxer()
        frames = []
        for c in (chunks[0], cut + chunks[2], chunks[3]):
            frames += d.feed(c) + d.flush()
        assert [f.data for f in frames] == [aus[0], aus[2], aus[3]]
        assert d.truncated == 1


def test_pack_stuffing_mpeg1_pack_and_skipped_streams() -> None:
    au1, au2 = SC + b"\x65\x88\x01", SC + b"\x41\x9a\x02"
    stuffed = PACK[:13] + b"\xfb" + b"\xff\xff\xff"  # pack_stuffing_length 3
    mpeg1_pack = bytes.fromhex("000001ba2100010001800001")
    private = b"\x00\x00\x01\xbd\x00\x06" + b"\x00\x00\x01\xba\x00\x00"  # BD hides a fake pack
    padding = b"\x00\x00\x01\xbe\x00\x04\xff\xff\xff\xff"
    unknown = b"\x00\x00\x01\xf0\x00\x02\x00\x00"
    stream = stuffed + private + pes(0xE0, au1, pts=100) + padding + mpeg1_pack + unknown + pes(0xE0, au2, pts=200)
    stream += b"\x00\x00\x01\xbf\x00\x01\x00" + b"\x00\x00\x01\xb9"
    d = PsDemuxer()
    frames = demux_all([stream], d)
    assert [(f.data, f.pts) for f in frames] == [(au1, 100), (au2, 200)]
    assert d.resyncs == 0


def test_unbounded_video_pes() -> None:
    """PES_packet_length 0 (allowed for video): payload runs to the next start code."""
    au1 = SC + b"\x67\x64" + SC + b"\x65\x88" + bytes(range(1, 200))
    au2 = SC + b"\x41\x9a\x05"
    stream = PACK + pes(0xE0, au1, pts=0, length=0) + PACK + pes(0xE0, au2, pts=3600, length=0) + PACK
    assert [f.data for f in demux_all([stream])] == [au1, au2]
    pieces = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    assert [f.data for f in demux_all(pieces)] == [au1, au2]
    # At end of stream the last unbounded PES ends at flush().
    assert [f.data for f in demux_all([PACK + pes(0xE0, au2, pts=0, length=0)])] == [au2]


def test_per_nal_pes_with_repeated_pts_join() -> None:
    sps, idr = SC + X264_SPS, SC + b"\x65\x88\x01\x02"
    stream = PACK + pes(0xE0, sps, pts=90) + pes(0xE0, idr, pts=90) + PACK + pes(0xE0, SC + b"\x41\x01", pts=90)
    frames = demux_all([stream])
    assert [f.data for f in frames] == [sps + idr, SC + b"\x41\x01"]
    assert frames[0].keyframe


def test_pts_less_stream_splits_on_pack_headers() -> None:
    a, b = SC + b"\x65\x01", SC + b"\x41\x02"
    stream = PACK + pes(0xE0, a) + pes(0xE0, b"\x03") + PACK + pes(0xE0, b)
    frames = demux_all([stream])
    assert [(f.data, f.pts) for f in frames] == [(a + b"\x03", None), (b, None)]


def test_oversized_frames_are_dropped_with_their_continuations() -> None:
    big = SC + b"\x65\x88" + _body(random.Random(1), 150_000)
    small = SC + b"\x41\x9a\x01"
    m = PsMuxer()
    chunks = [m.mux_video(big, 0, keyframe=True), m.mux_video(small, 3600)]
    d = PsDemuxer(max_frame_size=100_000)
    frames = demux_all(chunks, d)
    assert [f.data for f in frames] == [small] and d.oversized == 1


# -- the whole receive path ----------------------------------------------------


def _through_rtp(chunks: list[bytes], seq: int = 0, shuffle: int = 0, drop: set[int] | None = None) -> list[PsFrame]:
    """mux -> packetize -> (reorder/drop in transit) -> parse_rtp -> reorder -> assemble -> demux."""
    wire = []
    for i, ps in enumerate(chunks):
        pk, seq = packetize(ps, ssrc=200000001, seq=seq, timestamp=i * 3600)
        wire += pk
    if shuffle:
        # Displace each packet by up to `shuffle` places; the first stays first.
        rng = random.Random(shuffle)
        order = sorted(range(1, len(wire)), key=lambda k: k + rng.uniform(-shuffle, shuffle))
        wire = [wire[0]] + [wire[k] for k in order]
    reorderer, assembler, demuxer = RtpReorderer(window=32), FrameAssembler(), PsDemuxer()
    frames: list[PsFrame] = []
    for k, datagram in enumerate(wire):
        if drop and k in drop:
            continue
        for packet in reorderer.push(parse_rtp(datagram)):
            for rtp_frame in assembler.push(packet):
                if rtp_frame.damaged:
                    demuxer.flush()  # forget what was open: the PS bytes have a hole
                    continue
                frames += demuxer.feed(rtp_frame.payload)
                frames += demuxer.flush()
    for packet in reorderer.flush():
        for rtp_frame in assembler.push(packet):
            frames += demuxer.feed(rtp_frame.payload)
    for rtp_frame in assembler.flush():
        frames += demuxer.feed(rtp_frame.payload)
    return frames + demuxer.flush()


def test_pipeline_round_trip_with_wraparound() -> None:
    aus = synthetic_gop(60, key_size=100_000, p_size=15_000)
    frames = _through_rtp(mux_stream(aus), seq=65000)
    assert [f.data for f in frames] == [a for a, _ in aus]
    assert [f.keyframe for f in frames] == [k for _, k in aus]


def test_pipeline_reordered_packets() -> None:
    aus = synthetic_gop(40, p_size=5000)
    frames = _through_rtp(mux_stream(aus), seq=65500, shuffle=8)
    assert [f.data for f in frames] == [a for a, _ in aus]


def test_pipeline_loss_drops_only_the_damaged_frame() -> None:
    aus = synthetic_gop(10, p_size=3000)
    chunks = mux_stream(aus)
    per_frame = [-(-len(c) // 1388) for c in chunks]
    lost_packet = sum(per_frame[:4]) + 1  # second packet of frame 4
    frames = _through_rtp(chunks, seq=100, drop={lost_packet})
    assert [f.data for f in frames] == [a for i, (a, _) in enumerate(aus) if i != 4]


# -- fuzz: the demuxer never raises and never grows without bound ---------------

_FUZZ = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_VALID = b"".join(mux_stream(synthetic_gop(4, key_size=400, p_size=100), audio=True))


def _check_frames(frames: list[PsFrame], d: PsDemuxer) -> None:
    for f in frames:
        assert f.stream in ("video", "audio")
        assert f.codec in ("h264", "h265", "g711a", "g711u", "unknown")
        assert isinstance(f.data, bytes) and len(f.data) <= d.max_frame_size
        assert f.pts is None or 0 <= f.pts < 1 << 33
    assert d.buffered <= 2 * d.max_frame_size + 0x10006


@_FUZZ
@given(st.lists(st.binary(max_size=400), max_size=20))
def test_fuzz_demuxer_arbitrary_bytes(chunks: list[bytes]) -> None:
    d = PsDemuxer(max_frame_size=2000)
    for c in chunks:
        _check_frames(d.feed(c), d)
    _check_frames(d.flush(), d)
    assert d.buffered == 0


@_FUZZ
@given(st.lists(st.sampled_from([PACK, b"\x00\x00\x01\xbc", b"\x00\x00\x01\xe0", b"\x00\x00\x01\xc0",
                                  b"\x00\x00\x01\xba\x00\x00\x01", b"\x00\x00", b"\xff\xff", b"\x05",
                                  b"\x80\xc0\x0a"]) | st.binary(max_size=8), max_size=60))
def test_fuzz_demuxer_start_code_soup(parts: list[bytes]) -> None:
    d = PsDemuxer(max_frame_size=500)
    _check_frames(d.feed(b"".join(parts)), d)
    _check_frames(d.flush(), d)


@_FUZZ
@given(st.data())
def test_fuzz_demuxer_mutated_stream(data: st.DataObject) -> None:
    stream = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        i = data.draw(st.integers(0, len(stream) - 1))
        if op == "flip":
            stream[i] = data.draw(st.integers(0, 255))
        elif op == "delete":
            del stream[i : i + data.draw(st.integers(1, 50))]
        else:
            stream[i:i] = data.draw(st.binary(min_size=1, max_size=20))
        if not stream:
            return
    step = data.draw(st.integers(1, 2000))
    d = PsDemuxer(max_frame_size=4000)
    for k in range(0, len(stream), step):
        _check_frames(d.feed(bytes(stream[k : k + step])), d)
    _check_frames(d.flush(), d)


@_FUZZ
@given(st.data())
def test_fuzz_rtp_path_with_mutations(data: st.DataObject) -> None:
    wire, _ = packetize(_VALID, ssrc=1, seq=data.draw(st.integers(0, 0xFFFF)), timestamp=0, mtu=200)
    wire = [bytearray(p) for p in wire]
    for _ in range(data.draw(st.integers(0, 6))):
        p = data.draw(st.sampled_from(wire))
        p[data.draw(st.integers(0, len(p) - 1))] = data.draw(st.integers(0, 255))
    order = data.draw(st.permutations(range(len(wire))))
    r, fa, d = RtpReorderer(window=8), FrameAssembler(max_frame_size=20_000), PsDemuxer(max_frame_size=5000)
    for k in order:
        try:
            packet = parse_rtp(bytes(wire[k]))
        except RtpError:
            continue
        for q in r.push(packet):
            for fr in fa.push(q):
                _check_frames(d.feed(fr.payload), d)
        assert r.buffered <= 8
    _check_frames(d.flush(), d)


_GOP = synthetic_gop(8, key_size=3000, p_size=800)
_GOP_PS = mux_stream(_GOP, audio=True)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_fuzz_loss_and_reorder_never_yield_corrupt_frames(data: st.DataObject) -> None:
    """Under any loss/reordering, what comes out undamaged is an original frame, in order."""
    wire, seq = [], data.draw(st.integers(0, 0xFFFF))
    for i, ps in enumerate(_GOP_PS):
        pk, seq = packetize(ps, ssrc=1, seq=seq, timestamp=i * 1800, mtu=500)
        wire += pk
    kept = [p for p in wire if not data.draw(st.integers(0, 9)) == 0]  # ~10 % loss
    jitter = data.draw(st.integers(0, 6))
    order = sorted(range(len(kept)), key=lambda k: k + data.draw(st.integers(0, jitter)))
    r, fa, d = RtpReorderer(window=16), FrameAssembler(), PsDemuxer()
    frames: list[PsFrame] = []
    for k in order:
        for packet in r.push(parse_rtp(kept[k])):
            for fr in fa.push(packet):
                if fr.damaged:
                    d.flush()
                else:
                    frames += d.feed(fr.payload) + d.flush()
    originals = [a for a, _ in _GOP]
    video = [f.data for f in frames if f.stream == "video"]
    positions = [originals.index(v) for v in video]  # ValueError if corrupt
    assert positions == sorted(positions)
    assert all(f.data == bytes([f.pts // 3600]) * 320 for f in frames if f.stream == "audio")
