"""WebRTC out (WHEP): simulated camera → server → media node → aiortc as the viewer.

The offer/answer planning is tested on its own (text in, text out); the rest end to end over
loopback with an aiortc peer as the WHEP client, which decodes what it gets (FFmpeg through
aiortc), in process (``media.workers: 0``) and once through ``gb28181 serve`` with real media
worker processes.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from media.webrtc import OfferRefused, finish_answer, plan_offer, sps_profile_level_id

from .conftest import TOKEN, wait_for
from .test_live import IPC, camera_channel, ipc_fleet
from .test_nodes import SIM_ARGS, camera_channels, nodes_of, streams_of

SDP = "application/sdp"

# A browser-like offer: several H.264 profiles, RTX, VP8 first, opus before G.711.
BROWSER_OFFER = "\r\n".join([
    "v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0 1",
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 106 107 112",
    "c=IN IP4 0.0.0.0", "a=mid:0", "a=recvonly", "a=rtcp-mux",
    "a=ice-ufrag:abcd", "a=ice-pwd:abcdefghijklmnopqrstuvwx",
    "a=fingerprint:sha-256 " + ":".join(["AA"] * 32), "a=setup:actpass",
    "a=rtpmap:96 VP8/90000", "a=rtpmap:97 rtx/90000", "a=fmtp:97 apt=96",
    "a=rtpmap:102 H264/90000",
    "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
    "a=rtpmap:103 rtx/90000", "a=fmtp:103 apt=102",
    "a=rtpmap:106 H264/90000",
    "a=fmtp:106 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640032",
    "a=rtpmap:107 rtx/90000", "a=fmtp:107 apt=106", "a=rtcp-fb:106 nack",
    "a=rtpmap:112 H264/90000", "a=fmtp:112 packetization-mode=0;profile-level-id=42e01f",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 0 8", "c=IN IP4 0.0.0.0", "a=mid:1", "a=recvonly",
    "a=rtpmap:111 opus/48000/2", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000", ""])


# -- planning the answer -----------------------------------------------------------------------

def test_plan_keeps_the_offers_h264_of_the_streams_profile():
    plan = plan_offer(BROWSER_OFFER, "h264", "640028", "g711a")
    assert (plan.video_pt, plan.profile_level_id, plan.exact_profile) == (106, "640032", True)
    video = plan.offer.split("m=audio")[0]
    assert "m=video 9 UDP/TLS/RTP/SAVPF 106 107\r\n" in video
    assert "VP8" not in video and "a=rtpmap:102" not in video and "a=fmtp:112" not in video
    assert "profile-level-id=42e01f" in video  # what aiortc is told
    assert (plan.audio_pt, plan.audio) == (8, "PCMA")
    assert "m=audio 9 UDP/TLS/RTP/SAVPF 8\r\n" in plan.offer and "opus" not in plan.offer
    answer = finish_answer("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 106 107\r\n"
                           "a=fmtp:106 level-asymmetry-allowed=1;packetization-mode=1;"
                           "profile-level-id=42e01f\r\n", plan)
    assert "profile-level-id=640032" in answer and "42e01f" not in answer


def test_plan_prefers_the_same_profile_then_a_higher_one():
    cb = plan_offer(BROWSER_OFFER, "h264", "42e01e")  # constrained baseline: 42001f is baseline
    assert cb.video_pt == 102 and not cb.exact_profile  # baseline covers it
    main = plan_offer(BROWSER_OFFER, "h264", "4d0029")  # main: only high covers it
    assert (main.video_pt, main.exact_profile) == (106, False)
    assert plan_offer(BROWSER_OFFER, "h264", None, None).audio is None  # no audio in the stream
    assert plan_offer(BROWSER_OFFER, "h264", None, "g711u").audio_pt == 0


@pytest.mark.parametrize("offer, codec, status", [
    ("hello", "h264", 400),
    ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\n", "h264", 400),
    (BROWSER_OFFER, "h265", 406),
    (BROWSER_OFFER.replace("H264", "H263"), "h264", 406),
    (BROWSER_OFFER.replace("packetization-mode=1", "packetization-mode=0"), "h264", 406),
])
def test_plan_refuses(offer, codec, status):
    with pytest.raises(OfferRefused) as err:
        plan_offer(offer, codec, "42e01f")
    assert err.value.status == status and str(err.value)


def test_sps_profile_level_id():
    au = b"\x00\x00\x00\x01\x09\xf0\x00\x00\x00\x01\x67\x42\xc0\x1e\xda\x02\x80"
    assert sps_profile_level_id(au) == "42c01e"
    assert sps_profile_level_id(b"\x00\x00\x01\x65\x88") is None


# -- a WHEP client ---------------------------------------------------------------------------------

class WhepViewer:
    """An aiortc peer that POSTs its offer and counts the frames it decodes."""

    def __init__(self, base: str, channel_id: str, audio: bool = False) -> None:
        self.base = base
        self.channel_id = channel_id
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        if audio:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.frames: list = []
        self.audio_frames = 0
        self.location = ""
        self.answer = ""
        self.first_frame_at: float | None = None
        self._tasks: list[asyncio.Task] = []

        @self.pc.on("track")
        def on_track(track) -> None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._read(track)))

    async def _read(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                if track.kind == "video":
                    if self.first_frame_at is None:
                        self.first_frame_at = time.monotonic()
                    self.frames.append(frame)
                else:
                    self.audio_frames += 1
        except MediaStreamError:
            pass

    async def start(self, http: aiohttp.ClientSession) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http.post(f"{self.base}/api/v1/channels/{self.channel_id}/whep",
                             data=self.pc.localDescription.sdp, headers={"Content-Type": SDP}) as r:
            assert r.status == 201, await r.text()
            assert r.headers["Content-Type"] == SDP
            self.location = r.headers["Location"]
            self.answer = await r.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=self.answer, type="answer"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.pc.close()


def _http() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})


async def test_whep_viewer_decodes_90_frames_in_4_s(make_server):
    server = await make_server()
    fleet = ipc_fleet(server, audio=True)
    await fleet.start()
    viewer = None
    try:
        cid = await camera_channel(server, fleet)
        base = f"http://127.0.0.1:{server.http_port}"
        async with _http() as http:
            viewer = WhepViewer(base, cid, audio=True)
            await viewer.start(http)
            await asyncio.sleep(4.0)
            assert len(viewer.frames) >= 90, f"only {len(viewer.frames)} frames decoded in 4 s"
            assert {(f.width, f.height) for f in viewer.frames} == {(320, 240)}
            assert viewer.audio_frames > 50, "G.711 as PCMA"
            assert "PCMA/8000" in viewer.answer and "a=candidate:" in viewer.answer
            assert " 127.0.0.1 " in viewer.answer.split("a=candidate:")[1]
            port = int(viewer.answer.split("a=candidate:")[1].split()[5])
            assert 31000 <= port <= 31999, "media.webrtc.port_min/port_max"
            assert any("webrtc" in str(e) and "view" in str(e) for e in server.audit.recent)
            async with http.delete(base + viewer.location) as r:
                assert r.status == 200
            async with http.delete(base + viewer.location) as r:
                assert r.status == 404
            node = server.nodes.local.node
            await wait_for(lambda: not node.webrtc.sessions and node.streams[cid].hub.consumer_count == 0,
                           5, what="the session to end")
    finally:
        if viewer is not None:
            await viewer.close()
        await fleet.stop()


async def test_two_viewers_share_one_invite_and_bye_follows(make_server):
    server = await make_server(media={"idle_grace": 0.5, "webrtc": {"port_min": 0, "port_max": 0}})
    fleet = ipc_fleet(server)
    await fleet.start()
    viewers: list[WhepViewer] = []
    try:
        cid = await camera_channel(server, fleet)
        base = f"http://127.0.0.1:{server.http_port}"
        async with _http() as http:
            viewers = [WhepViewer(base, cid), WhepViewer(base, cid)]
            await asyncio.gather(*(v.start(http) for v in viewers))
            await wait_for(lambda: all(len(v.frames) >= 25 for v in viewers), 6, what="both decode")
            assert server.invites.invites_sent == 1, "two WebRTC viewers, one upstream INVITE"
            assert all(v.frames[0].key_frame for v in viewers), "they start at the GOP's keyframe"
            for v in viewers:
                async with http.delete(base + v.location) as r:
                    assert r.status == 200
        await wait_for(lambda: not fleet.streams, 4, what="BYE after the last WebRTC viewer left")
        assert not server.nodes.local.node.webrtc.sessions
    finally:
        for v in viewers:
            await v.close()
        await fleet.stop()


async def test_whep_refusals(make_server):
    server = await make_server()
    fleet = ipc_fleet(server)
    await fleet.start()
    try:
        cid = await camera_channel(server, fleet)
        url = f"http://127.0.0.1:{server.http_port}/api/v1/channels/{cid}/whep"
        async with _http() as http:
            async with http.post(url, data="v=0\r\n", headers={"Content-Type": "application/json"}) as r:
                assert r.status == 415
            async with http.post(url, data="not sdp", headers={"Content-Type": SDP}) as r:
                assert r.status == 400 and "SDP" in (await r.json())["error"]
            audio_only = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\n"
            async with http.post(url, data=audio_only, headers={"Content-Type": SDP}) as r:
                assert r.status == 400
            no_h264 = BROWSER_OFFER.replace("H264", "H263")
            async with http.post(url, data=no_h264, headers={"Content-Type": SDP}) as r:
                assert r.status == 406 and "H.264" in (await r.json())["error"]
            async with http.post(url.replace(cid, "34020000001329999999"), data=BROWSER_OFFER,
                                 headers={"Content-Type": SDP}) as r:
                assert r.status == 404
            async with http.delete(f"http://127.0.0.1:{server.http_port}/api/v1/whep/local:nope") as r:
                assert r.status == 404
    finally:
        await fleet.stop()


async def test_h265_channel_is_refused_clearly(make_server):
    server = await make_server()
    fleet = ipc_fleet(server, video_codec="h265")
    await fleet.start()
    try:
        cid = await camera_channel(server, fleet)
        url = f"http://127.0.0.1:{server.http_port}/api/v1/channels/{cid}/whep"
        async with _http() as http:
            async with http.post(url, data=BROWSER_OFFER, headers={"Content-Type": SDP}) as r:
                assert r.status == 406
                assert "H.265" in (await r.json())["error"]
    finally:
        await fleet.stop()


@pytest.mark.slow
def test_whep_through_served_media_workers(served, sims):
    """``gb28181 serve`` with two media worker processes: the session lives across the node link."""
    server = served(GB28181_MEDIA__WORKERS="2")
    sims(server, "--devices", "1", "--first-id", IPC, *SIM_ARGS)
    (cid,) = camera_channels(server, 1)

    async def view() -> tuple[int, str, int]:
        async with _http() as http:
            viewer = WhepViewer(server.base, cid)
            try:
                await viewer.start(http)
                await asyncio.sleep(4.0)
                async with http.delete(server.base + viewer.location) as r:
                    return len(viewer.frames), viewer.location, r.status
            finally:
                await viewer.close()

    frames, location, status = asyncio.run(view())
    assert frames >= 90, f"only {frames} frames through a worker process"
    (stream,) = streams_of(server).values()
    assert location.startswith(f"/api/v1/whep/{stream['node_id']}:") and status == 200
    assert all(n["worker"] for n in nodes_of(server))
