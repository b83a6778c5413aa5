"""Voice broadcast (GB/T 28181-2016 §9.12.1, A.2.5 d, A.2.6 l, Annex F, C.4).

Units: the G.711 A-law codec against the ITU reference behaviour and FFmpeg's pcm_alaw, the
reading of a device's audio offer and our SDP answer, and the RTP/PS packets. End to end on the
shipped server (``gb28181 serve``) with ``gb28181-sim`` processes: a file broadcast over UDP, TCP
with the device connecting and TCP with the device listening, bare PCMA and PS, is heard by the
simulated device (the WAV it writes matches the source: normalised cross-correlation above 0.9
at the best lag); push-to-talk over the WebSocket; a device that answers ERROR; a device that
hangs up; a stop through the API; uploads that are refused with their reason.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.error
import urllib.request
import uuid
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from gb28181.broadcast import (
    AudioPacketizer,
    FileSource,
    LiveSource,
    alaw_decode,
    alaw_encode,
    alaw_to_linear,
    answer_sdp,
    decode_audio_file,
    linear_to_alaw,
    plan_media,
)
from gb28181.sdp import SdpError, parse_sdp
from media.ps import PsDemuxer
from media.rtp import parse_rtp

from .conftest import TOKEN, wait_until

IPC = "34020000001320000001"
RATE = 8000


# -- G.711 A-law --------------------------------------------------------------------------------

def test_alaw_known_values():
    # ITU-T G.711 / G.191 reference: 0 and tiny values sit in segment 0, the extremes saturate;
    # even bits are inverted on the wire (0xD5 is +0).
    assert [linear_to_alaw(x) for x in (0, 7, 8, 16, -1, -8, -9, 32767, -32768)] == \
        [0xD5, 0xD5, 0xD5, 0xD4, 0x55, 0x55, 0x55, 0xAA, 0x2A]
    assert [alaw_to_linear(c) for c in (0xD5, 0x55, 0xAA, 0x2A, 0xD4)] == [8, -8, 32256, -32256, 24]
    assert alaw_encode(np.array([0, 32767, -32768], "<i2").tobytes()) == bytes((0xD5, 0xAA, 0x2A))
    assert alaw_decode(bytes((0xD5, 0x2A))) == np.array([8, -32256], "<i2").tobytes()


def _ffmpeg(data: bytes, *, decode: bool) -> bytes:
    if decode:
        ctx = av.CodecContext.create("pcm_alaw", "r")
        ctx.sample_rate, ctx.layout = RATE, "mono"
        return b"".join(bytes(f.planes[0])[: f.samples * 2] for f in ctx.decode(av.Packet(data)))
    ctx = av.CodecContext.create("pcm_alaw", "w")
    ctx.sample_rate, ctx.layout, ctx.format = RATE, "mono", "s16"
    frame = av.AudioFrame(format="s16", layout="mono", samples=len(data) // 2)
    frame.sample_rate = RATE
    frame.planes[0].update(data)
    return b"".join(bytes(p) for p in ctx.encode(frame)) + b"".join(bytes(p) for p in ctx.encode(None))


def test_alaw_agrees_with_ffmpeg_over_every_sample():
    every = np.arange(-32768, 32768, dtype="<i2")
    # Decoding is unambiguous: all 256 codes decode exactly as FFmpeg decodes them.
    assert alaw_decode(bytes(range(256))) == _ffmpeg(bytes(range(256)), decode=True)
    ours = np.frombuffer(alaw_encode(every.tobytes()), np.uint8)
    theirs = np.frombuffer(_ffmpeg(every.tobytes(), decode=False), np.uint8)
    table = np.frombuffer(alaw_decode(bytes(range(256))), "<i2").astype(np.int32)
    # FFmpeg builds its table from the midpoints between decoded levels; G.711's decision values
    # (and the ITU's G.191 code) are the interval edges. The few samples where that matters
    # land on the neighbouring level, never further.
    differ = ours != theirs
    assert 0 < differ.mean() < 0.02
    a, b = (ours[differ] ^ 0x55).astype(int), (theirs[differ] ^ 0x55).astype(int)
    assert ((a & 0x80) == (b & 0x80)).all() and (np.abs((a & 0x7F) - (b & 0x7F)) == 1).all()
    # The quantisation error is at most half a step: 8 near zero, 1/32 of the value above.
    err = np.abs(table[ours] - every.astype(np.int32))
    assert (err <= np.maximum(8, np.abs(every.astype(np.int32)) // 32 + 8)).all()


# -- SDP -------------------------------------------------------------------------------------------

def _offer(m: str, *attrs: str, y: str | None = "0100000001", c: str = "192.168.1.64") -> bytes:
    lines = ["v=0", f"o=34020000001370000001 0 0 IN IP4 {c}", "s=Play", f"c=IN IP4 {c}", "t=0 0", m,
             *attrs]
    if y:
        lines.append(f"y={y}")
    lines.append("f=v/////a/1/8/1")
    return ("\r\n".join(lines) + "\r\n").encode()


def test_the_device_offer_and_our_answer():
    plan = plan_media(parse_sdp(_offer("m=audio 8000 RTP/AVP 8", "a=recvonly", "a=rtpmap:8 PCMA/8000")))
    assert (plan.transport, plan.payload_type, plan.remote, plan.ssrc, plan.format) == \
        ("udp", 8, ("192.168.1.64", 8000), "0100000001", "PCMA")
    answer = parse_sdp(answer_sdp(plan, origin="34020000002000000001", media_host="10.0.0.5",
                                  port=31000, ssrc=plan.ssrc or ""))
    audio = answer.media[0]
    assert (answer.session_name, answer.connection_addr, answer.ssrc, answer.format) == \
        ("Play", "10.0.0.5", "0100000001", "v/////a/1/8/1")
    assert (audio.media, audio.port, audio.proto, audio.formats, audio.direction, audio.rtpmap) == \
        ("audio", 31000, "RTP/AVP", [8], "sendonly", {8: "PCMA/8000"})
    assert audio.setup is None and audio.connection is None
    # The device's order is its preference; PT 96 is PS.
    ps_first = plan_media(parse_sdp(_offer("m=audio 8000 RTP/AVP 96 8", "a=recvonly",
                                           "a=rtpmap:96 PS/90000", "a=rtpmap:8 PCMA/8000")))
    assert (ps_first.payload_type, ps_first.format) == (96, "PS")
    # TCP: a=setup is the device's role (RFC 4145); ours is the other one.
    listens = plan_media(parse_sdp(_offer("m=audio 9000 TCP/RTP/AVP 8", "a=recvonly", "a=setup:passive",
                                          "a=connection:new")))
    connects = plan_media(parse_sdp(_offer("m=audio 9 TCP/RTP/AVP 8", "a=recvonly", "a=setup:active",
                                           "a=connection:new", c="0.0.0.0")))
    assert (listens.transport, connects.transport) == ("tcp-active", "tcp-passive")
    tcp = parse_sdp(answer_sdp(connects, origin="x", media_host="10.0.0.5", port=30500, ssrc="0100000001"))
    assert (tcp.media[0].proto, tcp.media[0].setup, tcp.media[0].connection) == \
        ("TCP/RTP/AVP", "passive", "new")
    assert plan_media(parse_sdp(_offer("m=audio 8000 RTP/AVP 8", y=None))).ssrc is None
    for bad, why in ((_offer("m=video 8000 RTP/AVP 96", "a=rtpmap:96 PS/90000"), "m=audio"),
                     (_offer("m=audio 8000 RTP/AVP 0", "a=rtpmap:0 PCMU/8000"), "PCMA"),
                     (_offer("m=audio 8000 RTP/AVP 8", "a=sendonly"), "sendonly"),
                     (_offer("m=audio 8000 RTP/AVP 8", c="0.0.0.0"), "no address")):
        with pytest.raises(SdpError, match=why):
            plan_media(parse_sdp(bad))


def test_rtp_packets_bare_and_in_ps():
    frames = [bytes([n]) * 160 for n in range(60)]
    bare = AudioPacketizer(8, 123456)
    packets = [parse_rtp(p) for f in frames for p in bare.packets(f)]
    assert [p.payload_type for p in packets] == [8] * 60 and packets[0].marker and not packets[1].marker
    assert [p.timestamp for p in packets[:3]] == [0, 160, 320]
    assert all((b.sequence - a.sequence) & 0xFFFF == 1 for a, b in zip(packets, packets[1:], strict=False))
    assert [bytes(p.payload) for p in packets] == frames and {p.ssrc for p in packets} == {123456}
    ps = AudioPacketizer(96, 7)
    demuxer = PsDemuxer()
    out = []
    for f in frames:
        for raw in ps.packets(f):
            pkt = parse_rtp(raw)
            assert pkt.payload_type == 96 and pkt.marker
            got = demuxer.feed(pkt.payload) + demuxer.flush()
            assert [fr.pts for fr in got] == [pkt.timestamp]  # C.1: RTP timestamp = PTS, 90 kHz
            out += got
    assert [fr.data for fr in out] == frames
    assert {fr.codec for fr in out} == {"g711a"} and demuxer.psm_seen  # the PSM says G.711A
    assert out[1].pts - out[0].pts == 1800


def test_sources():
    source = FileSource(bytes(range(200)))
    assert source.next_frame() == bytes(range(160))
    assert source.next_frame() == bytes(range(160, 200)) + b"\xd5" * 120
    assert source.next_frame() is None
    live = LiveSource(max_seconds=0.05)  # 400 samples
    assert live.next_frame() == b"\xd5" * 160  # nobody talks yet: silence
    live.push(np.full(1000, 1000, "<i2").tobytes()[:-1])  # an odd byte waits for its pair
    assert len(live.buffer) == 400 and live.dropped == 599 and live.received == 999
    live.push(b"\x00")
    assert live.received == 1000
    live.close()
    assert live.next_frame() == bytes((linear_to_alaw(1000),)) * 160
    while live.next_frame() is not None:
        pass


# -- end to end ------------------------------------------------------------------------------------

def chirp(seconds: float, rate: int) -> np.ndarray:
    """A 300 Hz to 3 kHz sweep (inside the 4 kHz of 8 kHz audio) with a slow tremolo."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (300 * t + (3000 - 300) * t**2 / (2 * seconds))
    return 0.5 * np.sin(phase) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t))


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    pcm = (np.clip(samples, -1, 1) * 32000).astype("<i2")
    if channels == 2:
        pcm = np.repeat(pcm, 2)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def best_ncc(reference: np.ndarray, heard: np.ndarray) -> float:
    """max over lags of the normalised cross-correlation of ``reference`` with the stretch of
    ``heard`` under it (both zero-padded where they do not overlap)."""
    ref = reference.astype(np.float64)
    sig = np.concatenate([np.zeros(len(ref)), heard.astype(np.float64), np.zeros(len(ref))])
    n = 1 << int(np.ceil(np.log2(len(sig) + len(ref))))
    corr = np.fft.irfft(np.fft.rfft(sig, n) * np.conj(np.fft.rfft(ref, n)), n)[: len(sig) - len(ref) + 1]
    energy = np.concatenate([[0.0], np.cumsum(sig**2)])
    window = energy[len(ref):] - energy[: len(energy) - len(ref)]
    ncc = corr / (np.linalg.norm(ref) * np.sqrt(np.maximum(window[: len(corr)], 1e-9)))
    return float(ncc.max())


def post_audio(server, channel_id: str, data: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"{server.base}/api/v1/channels/{channel_id}/broadcast", data=data,
                                 method="POST", headers={"Authorization": f"Bearer {TOKEN}",
                                                         "Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def multipart(name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\""
            f"\r\nContent-Type: application/octet-stream\r\n\r\n").encode() + data + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def start(served, sims, tmp_path: Path, *sim_args: str, **env: str):
    server = served(GB28181_MEDIA__WORKERS="0", **env)
    heard = tmp_path / "heard"
    sim = sims(server, "--devices", "1", "--first-id", IPC, "--keepalive-interval", "5",
               "--broadcast-dir", str(heard), *sim_args)

    def channel() -> str | None:
        status, out = server.api(f"/api/v1/devices/{IPC}/channels")
        return out["channels"][0]["channel_id"] if status == 200 and out.get("channels") else None

    return server, sim, wait_until(channel, 20, "the simulated IPC's channel", sim.exited), heard


def finished(server, sim, broadcast_id: str, timeout: float = 20.0) -> dict:
    def end() -> dict | None:
        status, out = server.api(f"/api/v1/broadcasts/{broadcast_id}")
        assert status == 200, out
        return out if out["state"] in ("done", "failed") else None

    return wait_until(end, timeout, f"broadcast {broadcast_id} to end", sim.exited)


def heard_wav(sim, directory: Path, n: int = 1) -> tuple[np.ndarray, dict]:
    path = directory / f"{IPC}-{n}.wav"
    wait_until(path.exists, 10, f"the simulator to write {path.name}", sim.exited)
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
        samples = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    return samples, json.loads(path.with_suffix(".json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("device_transport, fmt, vendor, ours", [
    ("udp", "pcma", "generic", "udp"),
    ("tcp-active", "pcma", "dahua", "tcp-passive"),   # the device connects (Dahua: before its ACK)
    ("tcp-passive", "ps", "generic", "tcp-active"),   # the device listens, we connect
    ("udp", "ps", "hikvision", "udp"),
])
def test_a_file_broadcast_is_heard_by_the_device(served, sims, tmp_path, device_transport, fmt,
                                                 vendor, ours):
    server, sim, cid, heard_dir = start(served, sims, tmp_path, "--vendor", vendor,
                                        "--broadcast-transport", device_transport,
                                        "--broadcast-format", fmt)
    source = chirp(3.0, 44100)
    status, out = post_audio(server, cid, wav_bytes(source, 44100, channels=2), "audio/wav")
    assert status == 201, out
    assert out["state"] in ("notifying", "waiting-invite", "sending") and out["source"] == "file"
    assert out["duration"] == pytest.approx(3.0, abs=0.03)
    end = finished(server, sim, out["id"])
    assert (end["state"], end["reason"]) == ("done", "the source is finished"), end
    assert (end["transport"], end["format"], end["target_id"]) == \
        (ours, fmt.upper() if fmt == "ps" else "PCMA", cid)
    assert end["packets_sent"] == 150 and end["bytes_sent"] > 150 * 160
    samples, info = heard_wav(sim, heard_dir)
    assert info["payload_types"] == [8 if fmt == "pcma" else 96] and info["ended_by"] == "platform-bye"
    assert info["rtp_ssrcs"] == [int(info["ssrc"])]  # the device's y=, echoed and used
    assert len(samples) == pytest.approx(3 * RATE, abs=200)
    assert best_ncc(chirp(3.0, RATE), samples) > 0.9
    assert best_ncc(chirp(3.0, RATE)[::-1], samples) < 0.5  # the measure tells sounds apart
    status, audit = server.api("/api/v1/audit")
    entry = next(e for e in audit["entries"] if e["action"] == "broadcast")
    assert (entry["target"], entry["result"], entry["who"], entry["broadcast_id"]) == \
        (cid, "done", "api-token", out["id"])


@pytest.mark.slow
def test_push_to_talk_over_the_websocket(served, sims, tmp_path):
    import aiohttp

    server, sim, cid, heard_dir = start(served, sims, tmp_path)
    # A sequence of tones, as a talker's 16-bit PCM at 8 kHz.
    t = np.arange(int(0.25 * RATE)) / RATE
    tones = np.concatenate([0.5 * np.sin(2 * np.pi * f * t) for f in (400, 700, 1000, 1300, 1700, 2100,
                                                                      500, 900, 1500, 2500, 800, 1200)])
    pcm = (tones * 32000).astype("<i2").tobytes()
    states: list[str] = []

    async def talk() -> str:
        url = f"{server.base}/api/v1/channels/{cid}/broadcast/ws?token={TOKEN}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
            first = await ws.receive_json(timeout=5)
            states.append(first["state"])
            chunk = RATE * 2 // 10  # 100 ms of samples
            ahead = 4 * chunk  # a browser's jitter buffer: 400 ms ahead, then real time
            await ws.send_bytes(pcm[:ahead])
            begun = time.monotonic()
            for n, off in enumerate(range(ahead, len(pcm), chunk)):
                await ws.send_bytes(pcm[off:off + chunk])
                await asyncio.sleep(max(0.0, begun + (n + 1) * 0.1 - time.monotonic()))
            await ws.send_str("stop")
            async for msg in ws:  # states until the server closes the socket
                if msg.type == aiohttp.WSMsgType.TEXT:
                    states.append(json.loads(msg.data)["state"])
            return first["id"]

    broadcast_id = asyncio.run(talk())
    end = finished(server, sim, broadcast_id)
    assert (end["state"], end["source"]) == ("done", "websocket"), end
    assert states[-1] == "done" and "sending" in states
    samples, info = heard_wav(sim, heard_dir)
    assert info["ended_by"] == "platform-bye"
    assert best_ncc(tones, samples) > 0.9


@pytest.mark.slow
def test_a_device_that_answers_error_fails_the_broadcast(served, sims, tmp_path):
    server, sim, cid, heard_dir = start(served, sims, tmp_path, "--broadcast-result", "ERROR")
    status, out = post_audio(server, cid, wav_bytes(chirp(1.0, RATE), RATE), "audio/x-wav")
    assert status == 201, out
    end = finished(server, sim, out["id"])
    assert end["state"] == "failed" and "Result ERROR" in end["reason"], end
    assert end["packets_sent"] == 0 and end["transport"] is None
    entry = next(e for e in server.api("/api/v1/audit")[1]["entries"] if e["action"] == "broadcast")
    assert entry["result"] == "failed" and "Result ERROR" in entry["reason"]
    assert not heard_dir.exists() or not list(heard_dir.glob("*.wav"))  # it never INVITEd


@pytest.mark.slow
def test_the_device_hangs_up_and_the_api_stops(served, sims, tmp_path):
    server, sim, cid, heard_dir = start(served, sims, tmp_path, "--broadcast-hangup-after", "1")
    status, out = post_audio(server, cid, wav_bytes(chirp(3.0, RATE), RATE), "audio/wav")
    assert status == 201, out
    end = finished(server, sim, out["id"])
    assert (end["state"], end["reason"]) == ("done", "the device sent BYE"), end
    assert 30 < end["packets_sent"] < 100  # about a second of the three
    samples, info = heard_wav(sim, heard_dir)
    assert info["ended_by"] == "device-bye" and 0.8 * RATE < len(samples) < 2 * RATE


@pytest.mark.slow
def test_stop_through_the_api_and_bad_uploads(served, sims, tmp_path):
    server, sim, cid, heard_dir = start(served, sims, tmp_path,
                                        GB28181_BROADCAST__MAX_UPLOAD_BYTES="200000",
                                        GB28181_BROADCAST__MAX_DURATION="5")
    body, ctype = multipart("file", "speech.wav", wav_bytes(chirp(4.0, RATE), RATE))
    status, out = post_audio(server, cid, body, ctype)
    assert status == 201, out
    wait_until(lambda: server.api(f"/api/v1/broadcasts/{out['id']}")[1]["packets_sent"] > 25, 15,
               "audio on the wire", sim.exited)
    busy_status, busy = post_audio(server, cid, wav_bytes(chirp(1.0, RATE), RATE), "audio/wav")
    assert busy_status == 409 and out["id"] in busy["error"]
    status, stopped = server.api(f"/api/v1/broadcasts/{out['id']}", "DELETE")
    assert status == 200 and (stopped["state"], stopped["reason"]) == ("done", "stopped through the API")
    assert stopped["packets_sent"] < 150
    samples, info = heard_wav(sim, heard_dir)
    assert info["ended_by"] == "platform-bye" and len(samples) < 3 * RATE
    actions = [e["action"] for e in server.api("/api/v1/audit")[1]["entries"]]
    assert "broadcast-stop" in actions and "broadcast" in actions
    cases = [
        (b"", "audio/wav", "empty"),
        (b"this is not audio at all " * 40, "application/octet-stream", "not an audio file"),
        (bytes(250_000), "audio/wav", "larger than broadcast.max_upload_bytes"),
        (wav_bytes(chirp(6.0, RATE), RATE), "audio/wav", "longer than broadcast.max_duration"),
        (b'{"file": "x"}', "application/json", "expected an audio file"),
        (*multipart("audio", "x.wav", wav_bytes(chirp(1.0, RATE), RATE)), "no 'file' field"),
    ]
    for data, content_type, why in cases:
        status, answer = post_audio(server, cid, data, content_type)
        assert status == 400 and why in answer["error"], (why, status, answer)
    assert post_audio(server, "34020000001310999999", wav_bytes(chirp(1.0, RATE), RATE),
                      "audio/wav")[0] == 404
    assert server.api("/api/v1/broadcasts/nope")[0] == 404
    assert len(server.api("/api/v1/broadcasts")[1]["broadcasts"]) == 1  # refusals start nothing


def test_decode_refuses_what_is_not_audio():
    with pytest.raises(ValueError, match="empty"):
        decode_audio_file(b"", max_seconds=10)
    with pytest.raises(ValueError, match="not an audio file|no audio stream"):
        decode_audio_file(b"\x00\x01garbage" * 100, max_seconds=10)
    alaw = decode_audio_file(wav_bytes(chirp(1.0, 16000), 16000), max_seconds=10)
    assert len(alaw) == pytest.approx(RATE, abs=50)


async def test_a_sub_device_answering_for_itself_is_its_device(make_server):
    """A.2.6's example Broadcast Response comes From the audio output's ID, a channel of the
    registered device: it is taken as the device's, where an unknown ID still gets 404."""
    from registry.models import Channel

    from .sipclient import RawSip
    server = await make_server()
    async with RawSip(server.sip_port) as dev:
        assert (await dev.register()).status == 200
        output = "34020000001370000001"  # type 137: an audio output of the device
        server.channels.upsert(Channel(channel_id=output, device_id=dev.device_id))
        body = ('<?xml version="1.0" encoding="GB2312"?>\r\n<Response>\r\n<CmdType>Broadcast</CmdType>\r\n'
                f"<SN>77</SN>\r\n<DeviceID>{output}</DeviceID>\r\n<Result>OK</Result>\r\n</Response>\r\n")
        dev.send(dev.message_bytes(body, device_id=output))
        assert (await dev.recv()).status == 200
        stranger = "34020000001370000999"
        dev.send(dev.message_bytes(body.replace(output, stranger), device_id=stranger))
        assert (await dev.recv()).status == 404
