"""Shared fixtures: a real server on loopback with ephemeral ports and a throwaway data dir."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import pytest_asyncio

from gb28181.config import Config, load_config
from gb28181.server import GbServer

TOKEN = "test-token-0123456789"


def server_config(tmp_path, **overrides) -> Config:
    """Loopback, ephemeral ports, fast keepalive timers; overrides are config sections."""
    base = {
        "data_dir": str(tmp_path / "data"),
        "sip": {"host": "127.0.0.1", "port": 0},
        "http": {"host": "127.0.0.1", "port": 0},
        "api": {"token": TOKEN},
        "keepalive": {"interval": 0.5, "count": 3},
        "database": {"flush_interval": 0.1},
        "media": {"host": "127.0.0.1", "rtp_port": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_config(None, **base)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """A developer's GB28181_* variables must not change what the tests see."""
    import os
    for name in list(os.environ):
        if name.upper().startswith("GB28181_"):
            monkeypatch.delenv(name)


@pytest_asyncio.fixture
async def make_server(tmp_path):
    """``await make_server(**overrides)`` → a started GbServer, stopped at teardown."""
    servers: list[GbServer] = []

    async def factory(**overrides) -> GbServer:
        server = GbServer(server_config(tmp_path, **overrides))
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        try:
            await server.stop()
        except Exception:
            pass


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0,
                   interval: float = 0.05, what: str = "condition") -> None:
    """Poll until ``predicate`` is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
