"""The product as it ships: `gb28181 serve` (uvloop, its own process) and `gb28181-sim` as the
README installs them, over real loopback sockets. SIP over UDP and TCP, and live video over each
media transport (udp, tcp-passive, tcp-active) from devices on each SIP transport, decoded by
FFmpeg from the HTTP-FLV a player would read."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import decode_video, listed, read_stream, wait_until

pytestmark = pytest.mark.slow

FIRST = {"udp": "34020000001320000001", "tcp": "34020000001320000101"}
MEDIA = ("udp", "tcp-passive", "tcp-active")


def online_devices(server) -> set[str]:
    status, body = server.api("/api/v1/devices?status=online&limit=1000")
    assert status == 200, body
    return {d["device_id"] for d in listed(body)}


def test_sip_over_udp_and_tcp_and_every_media_transport(served, sims):
    server = served()
    for transport, first in FIRST.items():
        sims(server, "--devices", "3", "--transport", transport, "--first-id", first,
             "--keepalive-interval", "5", "--video-size", "320x240", "--gop", "25", "--progress", "0")
    wanted = {f"{first[:-3]}{int(first[-3:]) + n:03d}" for first in FIRST.values() for n in range(3)}
    wait_until(lambda: wanted <= online_devices(server), 30, "3 UDP and 3 TCP devices online",
               server.exited)

    status, body = server.api("/api/v1/devices?limit=1000")
    by_id = {d["device_id"]: d for d in listed(body)}
    for transport, first in FIRST.items():
        assert by_id[first]["transport"] == transport

    def channel_of(device_id: str) -> str:
        def one():
            status, body = server.api(f"/api/v1/devices/{device_id}/channels")
            return status == 200 and listed(body) and listed(body)[0]["channel_id"]
        return wait_until(one, 20, f"the catalog of {device_id}", server.exited)

    # Each media transport from a UDP device and from a TCP device: six plays at once.
    plays = [(sip, media, channel_of(f"{FIRST[sip][:-3]}{int(FIRST[sip][-3:]) + n:03d}"))
             for sip in FIRST for n, media in enumerate(MEDIA)]

    def play(sip: str, media: str, channel_id: str) -> tuple[str, str, int, str]:
        status, body = server.api(f"/api/v1/channels/{channel_id}/play", "POST", {"transport": media})
        if status != 200:
            return sip, media, 0, f"play answered {status}: {body}"
        frames = decode_video(read_stream(f"{server.base}/live/{channel_id}.flv", 3.0))
        first_key = bool(frames) and frames[0].key_frame
        return sip, media, len(frames), "" if first_key else "the first frame is not a keyframe"

    with ThreadPoolExecutor(len(plays)) as pool:
        results = list(pool.map(lambda p: play(*p), plays))
    for sip, media, frames, problem in results:
        assert not problem and frames >= 40, f"SIP {sip}, media {media}: {frames} frames in 3 s {problem}"

    status, body = server.api("/api/v1/streams")
    assert {(s["channel_id"], s["transport"]) for s in listed(body)} == {(c, m) for _, m, c in plays}
    assert not server.error_lines(), server.error_lines()
    assert server.stop() == 0
