"""Interop with a third-party SIP peer: sipp registers 1000 devices and sends keepalives.

Uses the scenario in ../shared/interop/sipp (digest REGISTER, then a Keepalive MESSAGE that
reuses the REGISTER's Call-ID; the digest uri is sipp's own, not the Request-URI).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import wait_for

pytestmark = [pytest.mark.interop, pytest.mark.slow]

SIPP_DIR = Path(__file__).resolve().parents[2] / "shared" / "interop" / "sipp"
SCENARIO = SIPP_DIR / "gb_reg_keepalive_uac.xml"


def _need_sipp() -> str:
    path = shutil.which("sipp")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("sipp is not installed; the test command installs it (apt-get install sip-tester)")
        pytest.skip("sipp not installed (apt-get install sip-tester)")
    if not SCENARIO.exists():
        pytest.skip(f"sipp scenario not found at {SCENARIO}")
    return path


@pytest.mark.parametrize("qop", [False, True])
async def test_sipp_1000_devices_register_and_keepalive(make_server, tmp_path, qop):
    sipp = _need_sipp()
    count = 1000 if not qop else 200
    # sipp sends one keepalive per device, so keep the default 60 s x 3 timeout here.
    server = await make_server(auth={"qop": qop}, registration={"query_device_info": False},
                               keepalive={"interval": 60, "count": 3})
    csv = tmp_path / "devices.csv"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SIPP_DIR / "make_devices_csv.py"), "--count", str(count),
        "--out", str(csv))
    assert await proc.wait() == 0
    proc = await asyncio.create_subprocess_exec(
        sipp, f"127.0.0.1:{server.sip_port}", "-sf", str(SCENARIO), "-inf", str(csv),
        "-i", "127.0.0.1", "-p", "0", "-r", "500", "-m", str(count), "-nostdin",
        "-timeout", "60s", "-trace_err", "-trace_screen",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    text = out.decode(errors="replace")
    screen = "".join(p.read_text(errors="replace") for p in tmp_path.glob("*_screen.log"))
    failed = re.search(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", text + screen)
    successful = re.search(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", text + screen)
    assert proc.returncode == 0, text[-3000:]
    assert failed is not None and int(failed.group(1)) == 0, text[-3000:]
    assert successful is not None and int(successful.group(1)) == count
    await wait_for(lambda: server.registry.counts() == (count, count), 5, what="all sipp devices online")
    assert server.counters.register_ok == count
    assert server.counters.keepalives == count
    assert server.counters.register_challenged == count  # one challenge each, no stale nonces
