"""``gb28181`` command line: run the server, check a config, print the effective config."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
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
    check = sub.add_parser("check-config", help="validate a config file and exit",
                           description="Validate FILE plus the environment; print the effective "
                                       "config as JSON, or the faults one per line (exit 2).")
    check.add_argument("config", metavar="FILE", nargs="?", help="YAML config (default: none)")
    return p


def _serve(path: str | None) -> int:
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
                             "GB28181_SIP__PORT / GB28181_HTTP__PORT to another one.") from None
        if server.api_token_file is not None:
            print(f"API token (from {server.api_token_file}): {server.api_token}", flush=True)
        print(f"gb28181 serving: SIP {config.sip.host}:{server.sip_port} udp/tcp, "
              f"HTTP http://{config.http.host}:{server.http_port}/api/v1/devices, "
              f"server ID {config.server.id}, domain {config.server.domain}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("gb28181: stopping (flushing the registry)", flush=True)
        await server.stop()

    asyncio.run(run())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args.config)
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
