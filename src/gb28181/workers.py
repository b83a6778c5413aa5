"""The server's own media workers: ``media.workers`` ``gb28181 media-node`` processes on this
machine, so the relay uses every core out of the box.

Each worker links back to the server like any node (``nodes.NodeManager.link``) and gets its own
RTP port (``media.rtp_port + i``), its own slice of ``media.tcp_port_range`` and, when
``media.node_http_port`` is set, the viewer port ``node_http_port + i``. A worker that exits is
started again after a pause (its streams have already moved: the link dropped first). Workers
watch the server's PID and stop when it is gone, so a server killed with SIGKILL leaves none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

from .config import Config

__all__ = ["Workers", "worker_count"]

log = logging.getLogger("gb28181.workers")

_RESTART_PAUSE = (0.5, 1.0, 2.0, 5.0, 10.0)  # seconds before restarting a worker that exited


def worker_count(config: Config) -> int:
    workers = config.media.workers
    if workers == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    return int(workers)


def _split(span: tuple[int, int] | None, parts: int, i: int) -> tuple[int, int] | None:
    if span is None:
        return None
    lo, hi = span
    size = (hi - lo + 1) // parts
    if size < 1:
        return (lo, hi)  # fewer ports than workers: they share (each binds what it can)
    return (lo + i * size, lo + (i + 1) * size - 1 if i < parts - 1 else hi)


def _loopback_of(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class Workers:
    """Start, watch and stop the local media workers."""

    def __init__(self, config: Config, *, count: int, token: str) -> None:
        self.config = config
        self.count = count
        self.token = token
        self.procs: list[asyncio.subprocess.Process | None] = [None] * count
        self.restarts = 0
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    def argv(self, i: int, http_port: int) -> list[str]:
        media, cfg = self.config.media, self.config
        server = f"http://{_loopback_of(cfg.http.host)}:{http_port}"
        argv = [sys.executable, "-m", "gb28181.cli", "media-node", "--server", server,
                "--name", f"worker-{i + 1}", "--http-host", cfg.http.host,
                "--http-port", str(media.node_http_port + i if media.node_http_port else 0),
                "--media-host", media.host,
                "--rtp-port", str(media.rtp_port + i if media.rtp_port else 0),
                "--max-streams", str(media.node_max_streams), "--parent-pid", str(os.getpid()),
                "--data-dir", str(cfg.data_dir),
                "--log-level", cfg.log.level]
        span = _split(media.tcp_port_range, self.count, i)
        if span is not None:
            argv += ["--tcp-port-range", f"{span[0]}-{span[1]}"]
        return argv

    def start(self, http_port: int) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keep(i, http_port)) for i in range(self.count)]

    async def _keep(self, i: int, http_port: int) -> None:
        env = {**os.environ, "GB28181_NODE_TOKEN": self.token}
        failures = 0
        while not self._stopping:
            proc = await asyncio.create_subprocess_exec(*self.argv(i, http_port), env=env)
            self.procs[i] = proc
            code = await proc.wait()
            self.procs[i] = None
            if self._stopping:
                return
            pause = _RESTART_PAUSE[min(failures, len(_RESTART_PAUSE) - 1)]
            failures += 1
            self.restarts += 1
            log.warning("media worker %d exited with %s: starting it again in %g s", i + 1, code, pause)
            await asyncio.sleep(pause)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    async def stop(self) -> None:
        self._stopping = True
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.procs:
            if proc is None:
                continue
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
