"""The command lines as an operator runs them: ``gb28181`` and ``gb28181-sim`` as subprocesses,
configured through GB28181_* variables, ending with a server, a simulated fleet, the API and the
SQLite file on disk."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ServedServer, clean_env, command, http, wait_until

pytestmark = pytest.mark.slow


def run(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 30,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command(name) + list(args), capture_output=True, text=True,
                          env=env if env is not None else clean_env(), timeout=timeout, cwd=cwd)


# -- help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, args, mentions", [
    ("gb28181", ["--help"], ["serve", "check-config", "--version"]),
    ("gb28181", ["serve", "--help"], ["--config", "GB28181_"]),
    ("gb28181", ["check-config", "--help"], ["FILE", "exit 2"]),
    ("gb28181-sim", ["--help"], ["--server", "--devices", "--keepalive-interval", "--duration",
                                 "--json", "--password", "--passwords", "--transport", "--nvr"]),
])
def test_help(name, args, mentions):
    result = run(name, *args)
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())       # argparse wraps lines
    for word in mentions:
        assert word in out, f"{word!r} not in `{name} {' '.join(args)}` output:\n{result.stdout}"


@pytest.mark.parametrize("module", ["numpy", "av"])
def test_simulator_without_its_extra_names_the_extra(module):
    # As after a plain `pip install gb28181`: the simulator's dependencies are the 'sim' extra.
    code = (f"import sys, importlib.util; sys.modules[{module!r}] = None; "
            "importlib.util.find_spec = (lambda f: lambda name, *a: None if name == 'av' and "
            f"{module!r} == 'av' else f(name, *a))(importlib.util.find_spec); "
            "from simulators.cli import main; main(['--help'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"{module} is not installed" in result.stderr and "gb28181[sim]" in result.stderr
    assert "Traceback" not in result.stderr


def test_version():
    result = run("gb28181", "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("gb28181 ")


def test_no_command_prints_help_and_fails():
    result = run("gb28181")
    assert result.returncode == 2
    assert "serve" in result.stdout


# -- check-config --------------------------------------------------------------------------------

def test_check_config_bad_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sip:\n  port: 70000\n")
    result = run("gb28181", "check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "sip.port" in lines[0] and "65535" in lines[0] and "GB28181_SIP__PORT" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text, needle", [
    ("sip: [1\n", "line"),
    ("- a\n- b\n", "mapping"),
    ("auth:\n  unknown_devices: maybe\n", "GB28181_AUTH__UNKNOWN_DEVICES"),
])
def test_check_config_other_faults(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run("gb28181", "check-config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_check_config_missing_file(tmp_path):
    result = run("gb28181", "check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "nope.yaml" in result.stderr


def test_check_config_env_fault(tmp_path):
    result = run("gb28181", "check-config", env=clean_env(GB28181_KEEPALIVE__COUNT="0"))
    assert result.returncode == 2
    assert "keepalive.count" in result.stderr and "GB28181_KEEPALIVE__COUNT" in result.stderr


def test_check_config_prints_the_effective_config(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("sip:\n  port: 5070\napi:\n  token: file-token-123\n")
    result = run("gb28181", "check-config", str(path),
                 env=clean_env(GB28181_HTTP__PORT="18080", GB28181_SIP__HOST="127.0.0.1"))
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["sip"]["port"] == 5070
    assert effective["sip"]["host"] == "127.0.0.1"
    assert effective["http"]["port"] == 18080
    assert effective["api"]["token"] == "***"           # never printed
    assert "file-token-123" not in result.stdout + result.stderr


def test_check_config_default_yaml():
    default = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    if not default.exists():
        pytest.skip(f"{default} does not exist (yet)")
    result = run("gb28181", "check-config", str(default))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sip"]["port"] == 5060


def test_serve_with_bad_config_exits_2(tmp_path):
    result = run("gb28181", "serve", env=clean_env(GB28181_SIP__PORT="70000",
                                                   GB28181_DATA_DIR=str(tmp_path)))
    assert result.returncode == 2
    assert "GB28181_SIP__PORT" in result.stderr and "Traceback" not in result.stderr


def test_serve_port_in_use_says_so(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("gb28181", "serve", timeout=20, env=clean_env(
            GB28181_DATA_DIR=str(tmp_path), GB28181_SIP__HOST="127.0.0.1",
            GB28181_SIP__PORT="0", GB28181_HTTP__HOST="127.0.0.1", GB28181_MEDIA__RTP_PORT="0",
            GB28181_HTTP__PORT=str(port)))
    assert result.returncode != 0
    assert "cannot bind" in result.stderr
    assert "GB28181_HTTP__PORT" in result.stderr
    assert "Traceback" not in result.stderr


# -- end to end ------------------------------------------------------------------------------------

def test_end_to_end_serve_sim_api_sqlite(tmp_path):
    server = ServedServer(tmp_path, GB28181_KEEPALIVE__INTERVAL="1", GB28181_API__TOKEN="")
    del server.env["GB28181_API__TOKEN"]  # the generated token is part of what is tested
    server.start()
    data_dir = server.data_dir
    sim = None
    try:
        base = server.base
        status, body = http(base + "/healthz")
        assert status == 200 and (body["status"], body["devices"], body["online"]) == ("ok", 0, 0)

        # The generated token: in DATA_DIR/api-token (mode 600) and printed once at start.
        token_file = data_dir / "api-token"
        token = token_file.read_text().strip()
        assert len(token) >= 16
        assert token_file.stat().st_mode & 0o777 == 0o600
        printed = wait_until(lambda: "gb28181 serving" in server.log() and server.log(),
                             5, "the start banner", server.exited)
        assert f"API token (from {token_file}): {token}" in printed
        assert f":{server.sip_port}" in printed and f":{server.ports['http_port']}" in printed
        assert http(base + "/api/v1/devices")[0] == 401

        sim = subprocess.Popen(
            command("gb28181-sim") + ["--server", f"127.0.0.1:{server.sip_port}", "--devices", "20",
                                      "--keepalive-interval", "1", "--duration", "3", "--json"],
            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def all_online():
            status, body = http(base + "/api/v1/devices?status=online&limit=1000", token=token)
            return status == 200 and body["total"] == 20 and body
        listed = wait_until(all_online, 10, "20 devices online in the API", server.exited)
        ids = sorted(d["device_id"] for d in listed["devices"])
        assert ids == [f"3402000000132{n:07d}" for n in range(1, 21)]
        assert all(d["status"] == "online" and d["registered"] for d in listed["devices"])

        sim_out, sim_err = sim.communicate(timeout=20)
        assert sim.returncode == 0, sim_err
        summary = json.loads(sim_out)
        assert summary["devices"] == 20
        assert summary["registered"] == 20
        assert summary["never_registered"] == 0
        assert summary["register_failures"] == 0
        assert summary["keepalives_ok"] >= 20
        assert summary["errors"] == {}

        status, body = http(base + "/api/v1/devices?limit=1000", token=token)
        assert status == 200 and body["total"] == 20
        status, body = http(base + "/metrics")
        assert status == 200
        assert b"gb28181_devices_registered 20.0" in body
        assert b'gb28181_register_requests_total{result="ok"} 20.0' in body

        assert server.stop() == 0, server.log()
    finally:
        if sim is not None and sim.poll() is None:
            sim.kill()
            sim.wait()
        server.kill()
    assert "stopping" in server.log()
    assert "Traceback" not in server.log()

    # Everything reached the database before the process ended.
    db = data_dir / "gb28181.db"
    assert db.is_file()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT device_id, kind, host, registered_at, expires_at "
                            "FROM devices ORDER BY device_id").fetchall()
        events = conn.execute("SELECT device_id, online, reason FROM status_events").fetchall()
    assert [r[0] for r in rows] == ids
    assert all(kind == "ipc" and host == "127.0.0.1" and 0 < reg < exp
               for _, kind, host, reg, exp in rows)
    assert sorted((d, o, r) for d, o, r in events if o) == [(i, 1, "register") for i in ids]
