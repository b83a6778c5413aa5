"""Media nodes: the relay in `gb28181 media-node` processes, as shipped.

`gb28181 serve` with `media.workers` starts its own nodes; a node started elsewhere joins with
the node token. Streams are spread over the nodes, viewers are sent to the node that carries
their stream, and the streams of a node that dies (SIGKILL) are opened again on another node,
where viewers that reconnect through the server's URL get video.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from gb28181.nodes import NodeManager
from media.node import MediaNode, NodeError

from .conftest import command, decode_video, listed, read_stream, wait_until

CAMS = "34020000001320000001"
SIM_ARGS = ("--video-size", "320x240", "--gop", "25", "--progress", "0", "--keepalive-interval", "5")


def nodes_of(server) -> list[dict]:
    status, body = server.api("/api/v1/nodes")
    assert status == 200, body
    return body["nodes"]


def streams_of(server) -> dict[str, dict]:
    status, body = server.api("/api/v1/streams")
    assert status == 200, body
    return {s["channel_id"]: s for s in listed(body)}


def camera_channels(server, count: int) -> list[str]:
    def ready():
        status, body = server.api("/api/v1/channels?limit=1000")
        found = sorted(c["channel_id"] for c in listed(body) if c["kind"] == "channel" and c["status"] == "online")
        return len(found) >= count and found[:count]
    return wait_until(ready, 30, f"{count} camera channels", server.exited)


def play(server, channel_id: str) -> dict:
    status, body = server.api(f"/api/v1/channels/{channel_id}/play", "POST", {})
    assert status == 200, body
    return body["urls"]


def frames_at(url: str, seconds: float = 2.0) -> int:
    frames = decode_video(read_stream(url, seconds, token=None))
    assert frames and frames[0].key_frame, f"{url}: the first frame is not a keyframe"
    return len(frames)


@pytest.mark.slow
def test_workers_share_the_streams_and_a_killed_worker_s_streams_come_back(served, sims):
    server = served(GB28181_MEDIA__WORKERS="2")
    workers = nodes_of(server)
    assert len(workers) == 2 and all(n["worker"] and n["alive"] for n in workers), workers
    sims(server, "--devices", "4", *SIM_ARGS)
    channels = camera_channels(server, 4)
    with ThreadPoolExecutor(4) as pool:
        urls = dict(zip(channels, pool.map(lambda c: play(server, c), channels), strict=True))

    # Two streams on each worker; each viewer URL leads to the worker that carries its stream.
    streams = streams_of(server)
    by_node: dict[str, list[str]] = {}
    for cid, s in streams.items():
        by_node.setdefault(s["node_id"], []).append(cid)
    assert sorted(map(len, by_node.values())) == [2, 2], by_node
    ports = {n["node_id"]: n["http_port"] for n in workers}
    for cid in channels:
        assert urlsplit(urls[cid]["http_flv"]).port == ports[streams[cid]["node_id"]]
    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(lambda c: frames_at(urls[c]["http_flv"]), channels))
    assert min(counts) >= 25, counts

    # SIGKILL one worker: its two streams are opened again on the other one.
    victim = next(n for n in workers if n["node_id"] in by_node)
    moved = by_node[victim["node_id"]]
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    def back() -> bool:
        now = streams_of(server)
        return all(c in now and now[c]["node_id"] != victim["node_id"] and now[c]["session"]
                   for c in moved)
    wait_until(back, 15, "the killed worker's streams on the other worker", server.exited)
    took = time.monotonic() - killed_at
    # A viewer reconnecting through the server's URL is sent to the new node and gets video.
    for cid in moved:
        assert frames_at(urls[cid]["server_flv"]) >= 25, cid
    # The worker is started again and links back.
    wait_until(lambda: len(nodes_of(server)) == 2, 20, "the worker restarted", server.exited)
    status, body = server.api("/api/v1/nodes")
    assert body["streams_moved"] >= 2 and body["workers"]["restarts"] >= 1, body
    status, metrics = server.api("/metrics")
    text = metrics.decode()
    assert "gb28181_media_nodes 2.0" in text and "gb28181_streams_moved_total 2.0" in text, text[-3000:]
    assert 'gb28181_media_node_streams{node="worker-' in text
    print(f"streams back on another node {took:.2f} s after the SIGKILL")
    assert not server.error_lines(), server.error_lines()
    assert server.stop() == 0


@pytest.mark.slow
def test_a_node_elsewhere_joins_with_the_token_and_its_streams_move_when_it_dies(served, sims, media_nodes):
    server = served(GB28181_MEDIA__WORKERS="1")
    token = (server.data_dir / "node-token").read_text().strip()
    refused = media_nodes(server, token="not-the-token", name="intruder")
    wait_until(lambda: "refused the link (401)" in refused.log(), 15, "the wrong token refused",
               refused.exited)
    remote = media_nodes(server, "--media-address", "127.0.0.1", token=token, name="remote-1")
    wait_until(lambda: len(nodes_of(server)) == 2, 15, "the remote node linked", remote.exited)
    names = {n["name"]: n for n in nodes_of(server)}
    assert set(names) == {"worker-1", "remote-1"} and not names["remote-1"]["worker"], names

    sims(server, "--devices", "2", *SIM_ARGS)
    channels = camera_channels(server, 2)
    urls = {cid: play(server, cid) for cid in channels}
    streams = streams_of(server)
    assert {s["node"] for s in streams.values()} == {"worker-1", "remote-1"}, streams
    on_remote = next(c for c, s in streams.items() if s["node"] == "remote-1")
    assert urlsplit(urls[on_remote]["http_flv"]).port == names["remote-1"]["http_port"]
    assert frames_at(urls[on_remote]["http_flv"]) >= 25

    remote.kill()
    wait_until(lambda: streams_of(server).get(on_remote, {}).get("node") == "worker-1", 15,
               "the remote node's stream on the worker", server.exited)
    assert frames_at(urls[on_remote]["server_flv"]) >= 25
    assert not server.error_lines(), server.error_lines()


def test_media_node_command_line_explains_what_is_missing(tmp_path):
    from .conftest import clean_env
    out = subprocess.run(command("gb28181") + ["media-node", "--help"], capture_output=True, text=True,
                         env=clean_env(), timeout=30)
    assert out.returncode == 0 and "--server" in out.stdout and "--token" in out.stdout
    out = subprocess.run(command("gb28181") + ["media-node", "--server", "http://127.0.0.1:9"],
                         capture_output=True, text=True, env=clean_env(), timeout=30)
    assert out.returncode == 2 and "GB28181_NODE_TOKEN" in out.stderr
    out = subprocess.run(command("gb28181") + ["media-node", "--server", "127.0.0.1:9", "--token", "x"],
                         capture_output=True, text=True, env=clean_env(), timeout=30)
    assert out.returncode == 2 and "http://" in out.stderr


async def test_bad_commands_get_a_reason_and_change_nothing():
    node = MediaNode("127.0.0.1", max_streams=1)
    await node.start()
    try:
        bad = [("nope", {}), ("open", {"stream": "", "transport": "udp", "ssrc": 1}),
               ("open", {"stream": "a", "transport": "sctp", "ssrc": 1}),
               ("open", {"stream": "a", "transport": "udp", "ssrc": 2**32}),
               ("open", {"stream": "a", "transport": "udp", "ssrc": True}),
               ("add_ssrc", {"stream": "missing", "ssrc": 5}),
               ("connect", {"stream": "missing", "hosts": ["127.0.0.1"], "port": 9}),
               ("open", [])]
        for op, args in bad:
            with pytest.raises(NodeError) as err:
                await node.call(op, args)  # type: ignore[arg-type]
            assert str(err.value), (op, args)
        assert node.streams == {}
        opened = await node.call("open", {"stream": "a", "transport": "udp", "ssrc": 7})
        assert opened == {"port": node.udp_port}
        with pytest.raises(NodeError, match="limit"):
            await node.call("open", {"stream": "b", "transport": "udp", "ssrc": 8})
        # The same key again replaces the stream (a re-INVITE after a failure).
        await node.call("open", {"stream": "a", "transport": "tcp-passive", "ssrc": 9})
        assert node.streams["a"].transport == "tcp-passive"
        assert (await node.call("close", {"stream": "a"})) == {"closed": True}
        assert (await node.call("close", {"stream": "a"})) == {"closed": False}
    finally:
        await node.close()


async def test_streams_go_to_the_least_loaded_node_with_room():
    manager = NodeManager(token="t", idle_timeout=15.0)
    local = await manager.start_local(MediaNode("127.0.0.1", max_streams=2))
    try:
        legs = [await manager.allocate(f"s{i}") for i in range(2)]
        assert all(leg.node is local for leg in legs)
        with pytest.raises(Exception, match="full"):
            await manager.allocate("s2")
        await legs[0].release("done")
        assert (await manager.allocate("s2")).node is local
    finally:
        await manager.stop()


async def test_the_node_link_refuses_strangers_and_bad_hellos(make_server):
    import aiohttp

    from media.node_service import LINK_PATH

    from .conftest import TOKEN
    server = await make_server()
    url = f"http://127.0.0.1:{server.http_port}{LINK_PATH}"
    auth = {"Authorization": f"Bearer {server.nodes.token}"}
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):  # none, or the API token
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await session.ws_connect(url, headers=headers)
            assert err.value.status == 401
        for hello in ({"hello": {"name": "x"}}, {"hello": {"http_port": 0, "rtp_port": 5}}, ["junk"]):
            async with session.ws_connect(url, headers=auth) as ws:
                await ws.send_json(hello)
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4000, msg
        assert [n["name"] for n in server.nodes.as_list()] == ["local"]
        # A node that joins, reports junk and vanishes: listed, then gone; the server carries on.
        async with session.ws_connect(url, headers=auth) as ws:
            await ws.send_json({"hello": {"name": "odd", "http_port": 8090, "rtp_port": 30010}})
            welcome = (await ws.receive_json(timeout=5))["welcome"]
            assert welcome["idle_timeout"] == server.config.media.idle_timeout
            for junk in ('{"event": "load", "cpu": "lots"}', '{"event": "first_packet", "stream": 5}',
                         '{"id": 99, "ok": true}', "[1, 2]", "not json"):
                await ws.send_str(junk)
            status, body = await _get(server, "/api/v1/nodes")
            assert status == 200 and {n["name"] for n in body["nodes"]} == {"local", "odd"}
        await _wait(lambda: [n["name"] for n in server.nodes.as_list()] == ["local"])
        assert server.nodes.lost_total == 1


async def _get(server, path: str):
    import aiohttp

    from .conftest import TOKEN
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{server.http_port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        return r.status, await r.json()


async def _wait(predicate) -> None:
    from .conftest import wait_for
    await wait_for(predicate, 5, what="the node link to drop")


async def test_a_stream_asked_for_before_any_node_linked_waits_for_the_first():
    import asyncio
    manager = NodeManager(token="t", idle_timeout=15.0)
    try:
        pending = asyncio.ensure_future(manager.allocate("early"))
        await asyncio.sleep(0.2)
        assert not pending.done(), "no node yet: the stream waits instead of failing"
        local = await manager.start_local(MediaNode("127.0.0.1"))
        assert (await asyncio.wait_for(pending, 5)).node is local
    finally:
        await manager.stop()
