"""H.264 / H.265 Annex-B helpers: NAL iteration, keyframe test, SPS geometry.

The PS demuxer (`media.ps`) hands out access units as Annex-B byte strings; this
module answers the few questions the platform asks about them without decoding:
where the NAL units are, whether the AU starts a GOP, and what size the picture
is (stream health, FLV sequence headers). Everything works on `bytes` with
`bytes.find` for start codes, so the cost per AU is a handful of C-level scans,
and parsing stops at the first VCL NAL unit whenever it can.

References: ITU-T H.264 (Annex B byte stream, 7.3.2.1.1 SPS, 7.4.1.2 NAL types),
ITU-T H.265 (7.3.2.2 SPS, 7.3.3 profile_tier_level, Table 7-1 NAL types).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from . import accel

__all__ = [
    "NalError",
    "SpsInfo",
    "iter_nal_units",
    "h264_nal_type",
    "h265_nal_type",
    "nal_type",
    "is_keyframe",
    "find_nal",
    "parse_h264_sps",
    "parse_h265_sps",
    "parse_sps",
    "sps_info",
]

_START = b"\x00\x00\x01"
# Whole-AU scans use the regex engine: it looks for the start code's 01 byte, which is
# rarer than 00 in slice data, then checks the two bytes before; ~1.25x bytes.find
# (CPython 3.11). A match ends where the NAL unit begins and starts 2 bytes after the
# start code does.
_finditer_start = re.compile(b"\x01(?<=\x00\x00\x01)").finditer

# H.264 Table 7-1.
H264_NAL_SLICE = 1
H264_NAL_IDR = 5
H264_NAL_SEI = 6
H264_NAL_SPS = 7
H264_NAL_PPS = 8
H264_NAL_AUD = 9

# H.265 Table 7-1: VCL types are 0..31; IRAP (BLA/IDR/CRA and reserved IRAP) 16..23.
H265_NAL_IRAP_FIRST = 16
H265_NAL_IRAP_LAST = 23
H265_NAL_VCL_LAST = 31
H265_NAL_VPS = 32
H265_NAL_SPS = 33
H265_NAL_PPS = 34
H265_NAL_AUD = 35

# H.264 7.3.2.1.1: profiles whose SPS carries chroma_format_idc, bit depths and
# scaling matrices (High, High 10/4:2:2/4:4:4, CAVLC 4:4:4, SVC, MVC, ...).
_H264_HIGH_PROFILES = frozenset((100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135))

# (SubWidthC, SubHeightC) by chroma_format_idc: H.264 Table 6-1 / H.265 Table 6-1.
_SUB_WH = {0: (1, 1), 1: (2, 2), 2: (2, 1), 3: (1, 1)}


class NalError(ValueError):
    """A NAL unit (usually an SPS) is truncated or has out-of-range fields."""


@dataclass(slots=True, frozen=True)
class SpsInfo:
    """Picture geometry and profile read from a sequence parameter set."""

    codec: str
    width: int
    height: int
    profile_idc: int
    level_idc: int
    chroma_format_idc: int
    bit_depth: int


def iter_nal_units(au: bytes) -> Iterator[bytes]:
    """Yield the NAL units of an Annex-B byte string, without start codes.

    Accepts 3- and 4-byte start codes; the zero_byte before a 4-byte start code
    (and any trailing_zero_8bits) is stripped from the preceding NAL unit, which
    cannot legally end in 0x00 (its RBSP ends with a stop bit). Bytes before the
    first start code are ignored.
    """
    for start, end in nal_spans(au):
        yield au[start:end]


def nal_spans(au: bytes) -> list[tuple[int, int]]:
    """(start, end) offsets of each NAL unit of an Annex-B AU, by the rules of
    :func:`iter_nal_units`, without copying (the FLV muxer slices only what it keeps)."""
    spans = []
    start = -1
    for m in _finditer_start(au):
        if start >= 0:
            # Strip zero bytes that belong to this start code (a 4-byte one).
            e = m.start() - 2
            while e > start and au[e - 1] == 0:
                e -= 1
            if e > start:
                spans.append((start, e))
        start = m.end()
    if start >= 0:
        # ... and trailing_zero_8bits after the last unit.
        e = len(au)
        while e > start and au[e - 1] == 0:
            e -= 1
        if e > start:
            spans.append((start, e))
    return spans


nal_spans_py = nal_spans  # the pure-Python twin, kept for the tests that compare the two
if accel.fast is not None:  # the same spans, found with memchr (~10x faster on slice data)
    nal_spans = accel.fast.nal_spans  # noqa: F811


def escape_rbsp(rbsp: bytes) -> bytes:
    """Insert emulation-prevention bytes (H.264 7.4.1.1, H.265 7.4.2): 00 00 0x (x <= 3)
    becomes 00 00 03 0x, so a payload written into a NAL unit cannot fake a start code."""
    out = bytearray()
    zeros = 0
    for b in rbsp:
        if zeros >= 2 and b <= 3:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


def _nal_header_offsets(au: bytes) -> Iterator[int]:
    """Offsets of NAL header bytes (the byte after each start code).

    Cheaper than `iter_nal_units` when only types are needed: no slicing.
    """
    find = au.find
    n = len(au)
    i = find(_START)
    while 0 <= i and i + 3 < n:
        yield i + 3
        i = find(_START, i + 3)


def h264_nal_type(header_byte: int) -> int:
    """nal_unit_type of an H.264 NAL header byte (H.264 7.3.1)."""
    return header_byte & 0x1F


def h265_nal_type(header_byte: int) -> int:
    """nal_unit_type of the first H.265 NAL header byte (H.265 7.3.1.2)."""
    return (header_byte >> 1) & 0x3F


def nal_type(nal: bytes, codec: str) -> int:
    """nal_unit_type of a NAL unit (without start code) for "h264" or "h265"."""
    if not nal:
        raise NalError("empty NAL unit")
    return h265_nal_type(nal[0]) if codec == "h265" else h264_nal_type(nal[0])


def is_keyframe(au: bytes, codec: str) -> bool:
    """True if the AU's first VCL NAL unit is an IDR (H.264) or IRAP (H.265) picture.

    Scanning stops at the first VCL NAL unit, which in practice sits right after
    AUD/SPS/PPS/SEI at the start of the AU, so cost does not grow with AU size.
    """
    if codec != "h264" and codec != "h265":
        return False
    find = au.find
    last = len(au) - 4  # a start code needs its NAL header byte after it
    i = find(_START)
    if codec == "h265":
        while 0 <= i <= last:
            t = (au[i + 3] >> 1) & 0x3F
            if t <= H265_NAL_VCL_LAST:
                return H265_NAL_IRAP_FIRST <= t <= H265_NAL_IRAP_LAST
            i = find(_START, i + 3)
        return False
    while 0 <= i <= last:
        t = au[i + 3] & 0x1F
        if t == H264_NAL_IDR:
            return True
        if 1 <= t <= 4:  # non-IDR slice / data partitions A-C
            return False
        i = find(_START, i + 3)
    return False


def find_nal(au: bytes, codec: str, wanted: int) -> bytes | None:
    """First NAL unit of type `wanted` in the AU, or None.

    Only the AU up to the end of that unit is scanned (parameter sets come first).
    """
    hevc = codec == "h265"
    find = au.find
    for off in _nal_header_offsets(au):
        t = (au[off] >> 1) & 0x3F if hevc else au[off] & 0x1F
        if t != wanted:
            continue
        j = find(_START, off)
        end = j if j >= 0 else len(au)
        while end > off and au[end - 1] == 0:
            end -= 1
        if end > off:
            return au[off:end]
    return None


class _BitReader:
    """MSB-first bit reader over an RBSP, with exp-Golomb (H.264 9.1)."""

    __slots__ = ("_value", "_bits", "_pos")

    def __init__(self, rbsp: bytes) -> None:
        self._value = int.from_bytes(rbsp, "big")
        self._bits = len(rbsp) * 8
        self._pos = 0

    def u(self, n: int) -> int:
        if n == 0:
            return 0
        end = self._pos + n
        if end > self._bits:
            raise NalError("SPS truncated")
        self._pos = end
        return (self._value >> (self._bits - end)) & ((1 << n) - 1)

    def skip(self, n: int) -> None:
        self._pos += n
        if self._pos > self._bits:
            raise NalError("SPS truncated")

    def ue(self) -> int:
        remaining = self._bits - self._pos
        if remaining <= 0:
            raise NalError("SPS truncated")
        rest = self._value & ((1 << remaining) - 1)
        if rest == 0:
            raise NalError("SPS truncated in exp-Golomb code")
        zeros = remaining - rest.bit_length()
        if zeros > 31:  # 9.1: values are at most 2^32 - 2
            raise NalError("exp-Golomb code too long")
        self._pos += zeros
        return self.u(zeros + 1) - 1

    def se(self) -> int:
        k = self.ue()
        return (k + 1) >> 1 if k & 1 else -(k >> 1)


def _rbsp(nal: bytes, header_len: int) -> bytes:
    # Removing emulation_prevention_three_byte (7.4.1): non-overlapping left-to-right
    # replacement is exact for conforming NAL units and the SPS is tiny.
    return bytes(nal[header_len:]).replace(b"\x00\x00\x03", b"\x00\x00")


def _skip_scaling_list(r: _BitReader, size: int) -> None:
    # H.264 7.3.2.1.1.1: the values are irrelevant here, only their bit length.
    last = nxt = 8
    for _ in range(size):
        if nxt:
            delta = r.se()
            if not -128 <= delta <= 127:
                raise NalError("delta_scale out of range")
            nxt = (last + delta + 256) % 256
        if nxt:
            last = nxt


def parse_h264_sps(nal: bytes) -> SpsInfo:
    """Parse an H.264 SPS NAL unit (with its 1-byte header) into SpsInfo.

    Handles the High-profile fields (chroma_format_idc, bit depth, scaling
    matrices), both pic_order_cnt types, field coding and frame cropping.
    """
    if len(nal) < 4 or nal[0] & 0x1F != H264_NAL_SPS:
        raise NalError("not an H.264 SPS")
    r = _BitReader(_rbsp(nal, 1))
    profile_idc = r.u(8)
    r.skip(8)  # constraint_set flags + reserved_zero_2bits
    level_idc = r.u(8)
    if r.ue() > 31:
        raise NalError("seq_parameter_set_id out of range")
    chroma_format_idc = 1
    separate_colour_plane = 0
    bit_depth = 8
    if profile_idc in _H264_HIGH_PROFILES:
        chroma_format_idc = r.ue()
        if chroma_format_idc > 3:
            raise NalError("chroma_format_idc out of range")
        if chroma_format_idc == 3:
            separate_colour_plane = r.u(1)
        bit_depth = r.ue() + 8
        r.ue()  # bit_depth_chroma_minus8
        r.skip(1)  # qpprime_y_zero_transform_bypass_flag
        if r.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format_idc != 3 else 12):
                if r.u(1):
                    _skip_scaling_list(r, 16 if i < 6 else 64)
    r.ue()  # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()  # log2_max_pic_order_cnt_lsb_minus4
    elif poc_type == 1:
        r.skip(1)  # delta_pic_order_always_zero_flag
        r.se()  # offset_for_non_ref_pic
        r.se()  # offset_for_top_to_bottom_field
        cycle = r.ue()
        if cycle > 255:
            raise NalError("num_ref_frames_in_pic_order_cnt_cycle out of range")
        for _ in range(cycle):
            r.se()
    elif poc_type != 2:
        raise NalError("pic_order_cnt_type out of range")
    r.ue()  # max_num_ref_frames
    r.skip(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = r.ue() + 1
    height_map_units = r.ue() + 1
    frame_mbs_only = r.u(1)
    if not frame_mbs_only:
        r.skip(1)  # mb_adaptive_frame_field_flag
    r.skip(1)  # direct_8x8_inference_flag
    width = width_mbs * 16
    height = (2 - frame_mbs_only) * height_map_units * 16
    if r.u(1):  # frame_cropping_flag
        left, right, top, bottom = r.ue(), r.ue(), r.ue(), r.ue()
        # 7.4.2.1.1: crop units depend on ChromaArrayType and field coding.
        if separate_colour_plane or chroma_format_idc == 0:
            cx, cy = 1, 2 - frame_mbs_only
        else:
            sw, sh = _SUB_WH[chroma_format_idc]
            cx, cy = sw, sh * (2 - frame_mbs_only)
        width -= cx * (left + right)
        height -= cy * (top + bottom)
    if width <= 0 or height <= 0:
        raise NalError("SPS cropping exceeds picture size")
    return SpsInfo("h264", width, height, profile_idc, level_idc, chroma_format_idc, bit_depth)


def _skip_profile_tier_level(r: _BitReader, max_sub_layers_minus1: int) -> tuple[int, int]:
    """H.265 7.3.3 with profilePresentFlag=1; returns (general_profile_idc, level)."""
    r.skip(3)  # general_profile_space, general_tier_flag
    profile_idc = r.u(5)
    # general_profile_compatibility_flag[32], progressive/interlaced/non-packed/
    # frame-only flags (4), 43 reserved/constraint bits, 1 inbld/reserved bit.
    r.skip(32 + 4 + 43 + 1)
    level_idc = r.u(8)
    profile_present = []
    level_present = []
    for _ in range(max_sub_layers_minus1):
        profile_present.append(r.u(1))
        level_present.append(r.u(1))
    if max_sub_layers_minus1 > 0:
        r.skip(2 * (8 - max_sub_layers_minus1))  # reserved_zero_2bits
    for i in range(max_sub_layers_minus1):
        if profile_present[i]:
            r.skip(88)  # sub_layer profile space .. reserved bits
        if level_present[i]:
            r.skip(8)
    return profile_idc, level_idc


def parse_h265_sps(nal: bytes) -> SpsInfo:
    """Parse an H.265 SPS NAL unit (with its 2-byte header) into SpsInfo.

    Skips profile_tier_level including sub-layers, applies the conformance window.
    """
    if len(nal) < 4 or (nal[0] >> 1) & 0x3F != H265_NAL_SPS:
        raise NalError("not an H.265 SPS")
    r = _BitReader(_rbsp(nal, 2))
    r.skip(4)  # sps_video_parameter_set_id
    max_sub_layers_minus1 = r.u(3)
    if max_sub_layers_minus1 > 6:
        raise NalError("sps_max_sub_layers_minus1 out of range")
    r.skip(1)  # sps_temporal_id_nesting_flag
    profile_idc, level_idc = _skip_profile_tier_level(r, max_sub_layers_minus1)
    if r.ue() > 15:
        raise NalError("sps_seq_parameter_set_id out of range")
    chroma_format_idc = r.ue()
    if chroma_format_idc > 3:
        raise NalError("chroma_format_idc out of range")
    separate_colour_plane = r.u(1) if chroma_format_idc == 3 else 0
    width = r.ue()
    height = r.ue()
    if r.u(1):  # conformance_window_flag
        left, right, top, bottom = r.ue(), r.ue(), r.ue(), r.ue()
        sw, sh = (1, 1) if separate_colour_plane else _SUB_WH[chroma_format_idc]
        width -= sw * (left + right)
        height -= sh * (top + bottom)
    bit_depth = r.ue() + 8
    if width <= 0 or height <= 0:
        raise NalError("SPS picture size out of range")
    return SpsInfo("h265", width, height, profile_idc, level_idc, chroma_format_idc, bit_depth)


def parse_sps(nal: bytes, codec: str) -> SpsInfo:
    """Parse an SPS NAL unit of the given codec ("h264" or "h265")."""
    if codec == "h265":
        return parse_h265_sps(nal)
    if codec == "h264":
        return parse_h264_sps(nal)
    raise NalError(f"unsupported codec {codec!r}")


def sps_info(au: bytes, codec: str) -> SpsInfo | None:
    """SpsInfo of the first SPS in an access unit, or None if it has no SPS.

    Raises NalError if an SPS is present but malformed.
    """
    wanted = H265_NAL_SPS if codec == "h265" else H264_NAL_SPS
    nal = find_nal(au, codec, wanted)
    return None if nal is None else parse_sps(nal, codec)
