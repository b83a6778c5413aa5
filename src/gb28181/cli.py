"""``gb28181`` command line: run the server, check a config, print the effective config."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from . import __version__
from .config import ConfigError, load_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gb28181",
        description="GB/T 28181 platform core: SIP registrar, MANSCDP, device registry, HTTP API.")
    p.add_argument("--version", action="version", version=f"gb28181 {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the server",
                           description="Run the server. Without --config it runs on the embedded "
                                       "defaults (SQLite under ./data, SIP 5060, HTTP 8080). "
                                       "GB28181_* environment variables override any setting.")
    serve.add_argument("--config", "-c", metavar="FILE", help="YAML config (see configs/default.yaml)")
    serve.add_argument("--ready-file", metavar="FILE",
                       help="once listening, write the bound ports and addresses to FILE as JSON "
                            "(for scripts and tests that start the server on port 0)")
    node = sub.add_parser(
        "media-node", help="run a media node that joins a server and relays streams for it",
        description="Run a media node: it receives the RTP of the streams the server gives it, "
                    "and serves their viewers (HTTP-FLV, WS-FLV) and RTP forwards. It joins the "
                    "server over a WebSocket with the server's node token (media.node_token, or "
                    "DATA_DIR/node-token on the server). `gb28181 serve` starts media.workers of "
                    "these by itself; start more on other machines.")
    node.add_argument("--server", required=True, metavar="URL",
                      help="the server's HTTP base, e.g. http://10.0.0.1:8080")
    node.add_argument("--token", metavar="TOKEN",
                      help="the server's node token (default: $GB28181_NODE_TOKEN)")
    node.add_argument("--name", default="", help="name shown by GET /api/v1/nodes (default: node-PID)")
    node.add_argument("--http-host", default="0.0.0.0", help="address viewers connect to (bind)")
    node.add_argument("--http-port", type=int, default=0, help="viewer HTTP port (default: any free)")
    node.add_argument("--public-url", metavar="URL",
                      help="how viewers reach this node if not at its address, e.g. http://203.0.113.5:8090")
    node.add_argument("--media-host", default="0.0.0.0", help="address to bind RTP sockets on")
    node.add_argument("--media-address", metavar="ADDR",
                      help="address devices send RTP to (SDP c=); default: this node's address as "
                           "the server sees it")
    node.add_argument("--rtp-port", type=int, default=0, help="the shared UDP RTP port (default: any free)")
    node.add_argument("--tcp-port-range", metavar="LOW-HIGH",
                      help="ports for TCP-passive media, e.g. 30002-30999 (default: one per stream)")
    node.add_argument("--max-streams", type=int, default=500, help="streams carried at most (default 500)")
    node.add_argument("--data-dir", default="media-node-data", metavar="DIR",
                      help="where downloads are written (DIR/downloads; default ./media-node-data)")
    node.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    node.add_argument("--ready-file", metavar="FILE",
                      help="once listening, write the bound ports to FILE as JSON")
    node.add_argument("--log-level", default="info",
                      choices=("debug", "info", "warning", "error"), help="default info")
    check = sub.add_parser("check-config", help="validate a config file and exit",
                           description="Validate FILE plus the environment; print the effective "
                                       "config as JSON, or the faults one per line (exit 2).")
    check.add_argument("config", metavar="FILE", nargs="?", help="YAML config (default: none)")

    report = sub.add_parser("report", help="online-rate and archive reports from the database",
                            description="Reports read the server's database directly (the server "
                                        "may be running). Times: 24h, 30m, 7d, now, Unix seconds "
                                        "or ISO 8601.")
    rsub = report.add_subparsers(dest="report", metavar="REPORT", required=True)
    online = rsub.add_parser("online", help="time-weighted online and working rates of channels",
                             description="Online rate = share of channel-time not OFF; working rate "
                                         "= share ON (not OFF, VLOST or DEFECT), per group.")
    online.add_argument("--since", default="24h", help="window start (default 24h ago)")
    online.add_argument("--until", default="now", help="window end (default now)")
    online.add_argument("--group-by", choices=("tier", "civil_code", "all"), default="tier")
    online.add_argument("--civil-code-digits", type=int, default=None,
                        help="civil-code prefix length for --group-by civil_code (default: config)")
    archive = rsub.add_parser("archive", help="channels missing mandatory fields or a location")
    archive.add_argument("--limit", type=int, default=50, help="incomplete channels to list (default 50)")
    storage = rsub.add_parser("storage", help="platform recordings held against the plan, disk days left",
                              description="Per tier and civil code: channels planned for recording, "
                                          "days of recordings held against recording.retention_days, "
                                          "channels not meeting the plan (gaps, failures), disk use "
                                          "and days left at the current rate.")
    storage.add_argument("--civil-code-digits", type=int, default=None,
                         help="civil-code prefix length (default: config)")
    for r in (online, archive, storage):
        r.add_argument("--config", "-c", metavar="FILE", help="YAML config (to find the database)")
        r.add_argument("--json", action="store_true", help="JSON instead of a table")
    return p


def _report(args: argparse.Namespace) -> int:
    from .reports import archive_report, online_report
    config = load_config(args.config)
    if args.report == "storage":
        from .record_report import storage_cli
        return storage_cli(config, as_json=args.json, digits=args.civil_code_digits)
    if args.report == "online":
        return online_report(config, since=args.since, until=args.until, group_by=args.group_by,
                             digits=args.civil_code_digits, as_json=args.json)
    return archive_report(config, limit=args.limit, as_json=args.json)


def _say(line: str) -> None:
    """A line for the operator on stdout. A closed stdout (the reader of a pipe went away)
    must not keep the server from stopping cleanly and flushing its registry."""
    try:
        print(line, flush=True)
    except (BrokenPipeError, OSError):
        pass


def _write_ready_file(path: str, info: dict) -> None:
    # Written to a temporary name and renamed, so a reader never sees half a file.
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def _serve(path: str | None, ready_file: str | None = None) -> int:
    config = load_config(path)
    logging.basicConfig(level=config.log.level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # uvloop is optional on platforms without it
        pass
    from .server import GbServer

    async def run() -> None:
        server = GbServer(config)
        try:
            await server.start()
        except OSError as exc:
            await server.stop()
            raise SystemExit(f"gb28181: cannot bind: {exc}. Free the port or set "
                             "GB28181_SIP__PORT / GB28181_HTTP__PORT / GB28181_MEDIA__RTP_PORT "
                             "to another one.") from None
        # The registry's objects live as long as the process: keep the collector off them, so
        # full collections do not stall the event loop for 100+ ms at 100k channels.
        import gc
        gc.collect()
        gc.freeze()
        # Requests allocate many short-lived objects that reference counting frees; cycles are
        # rare. Collecting the young generation every 700 allocations (the default) costs a
        # registrar several per cent of its CPU for nothing.
        gc.set_threshold(20_000, 20, 20)
        if server.api_token_file is not None:
            _say(f"API token (from {server.api_token_file}): {server.api_token}")
        _say(f"gb28181 serving: SIP {config.sip.host}:{server.sip_port} udp/tcp, "
              f"HTTP http://{config.http.host}:{server.http_port}/api/v1/devices, "
              f"server ID {config.server.id}, domain {config.server.domain}")
        if ready_file:
            _write_ready_file(ready_file, server.listening())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        _say("gb28181: stopping (flushing the registry)")
        await server.stop()

    asyncio.run(run())
    return 0


def _media_node(args: argparse.Namespace) -> int:
    from media.node_service import NodeSettings, run_node
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.token or os.environ.get("GB28181_NODE_TOKEN", "")
    if not token:
        print("gb28181 media-node: no node token: pass --token or set GB28181_NODE_TOKEN to the "
              "server's media.node_token (DATA_DIR/node-token on the server)", file=sys.stderr)
        return 2
    if not args.server.startswith(("http://", "https://")):
        print(f"gb28181 media-node: --server must be an http:// or https:// URL, not {args.server!r}",
              file=sys.stderr)
        return 2
    span = None
    if args.tcp_port_range:
        lo, sep, hi = args.tcp_port_range.partition("-")
        if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= 65535):
            print(f"gb28181 media-node: --tcp-port-range must be LOW-HIGH within 1-65535, not "
                  f"{args.tcp_port_range!r}", file=sys.stderr)
            return 2
        span = (int(lo), int(hi))
    for name in ("http_port", "rtp_port"):
        if not 0 <= getattr(args, name) <= 65535:
            print(f"gb28181 media-node: --{name.replace('_', '-')} must be 0-65535", file=sys.stderr)
            return 2
    if args.max_streams < 1:
        print("gb28181 media-node: --max-streams must be at least 1", file=sys.stderr)
        return 2
    return run_node(NodeSettings(
        server=args.server, token=token, name=args.name, http_host=args.http_host,
        http_port=args.http_port, public_url=args.public_url, media_host=args.media_host,
        media_address=args.media_address, rtp_port=args.rtp_port, tcp_port_range=span,
        max_streams=args.max_streams, parent_pid=args.parent_pid, ready_file=args.ready_file,
        data_dir=args.data_dir))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args.config, args.ready_file)
        if args.command == "media-node":
            return _media_node(args)
        if args.command == "report":
            return _report(args)
        if args.command == "check-config":
            config = load_config(args.config)
            data = config.model_dump(mode="json")
            if data["api"]["token"]:
                data["api"]["token"] = "***"
            print(json.dumps(data, indent=2))
            return 0
        _parser().print_help()
        return 2
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
