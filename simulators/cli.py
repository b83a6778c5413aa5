"""``gb28181-sim``: run a fleet of simulated GB/T 28181 IPCs or NVRs against a server."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import signal
import sys
import time
from pathlib import Path

from gb28181.ids import IdError, parse_id

try:
    # PyAV is imported only when video is encoded; its absence is caught here, at once.
    if importlib.util.find_spec("av") is None:
        raise ModuleNotFoundError("No module named 'av'", name="av")
    from .fleet import MEDIA_MODES, QUERY_MODES, Fleet, FleetConfig, device_ids, id_blocks
    from .media import VIDEO_CODECS, parse_video_size
except ModuleNotFoundError as _missing:  # the simulator's own dependencies are an extra
    if _missing.name not in ("numpy", "av"):
        raise
    sys.exit(f"gb28181-sim: {_missing.name} is not installed; the simulator needs the 'sim' "
             "extra: pip install 'gb28181[sim]' (scripts/run.sh installs it)")
from .broadcast import BROADCAST_FORMATS, BROADCAST_TRANSPORTS
from .vendors import VENDORS

__all__ = ["main"]


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:5060)")
    return host.strip("[]") or "127.0.0.1", int(port)


def _gb_id(text: str) -> str:
    try:
        return parse_id(text).value
    except IdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a ratio between 0 and 1 (e.g. 0.05)")
    return value


def _video_size(text: str) -> str:
    try:
        width, height = parse_video_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{width}x{height}"


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _read_passwords(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """Per-device passwords and, where a third field is given, digest usernames."""
    passwords: dict[str, str] = {}
    usernames: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").replace(";", " ").split()
        if len(parts) not in (2, 3):
            raise SystemExit(f"gb28181-sim: {path}:{n}: expected 'DEVICE_ID PASSWORD [AUTH_USERNAME]', "
                             f"got {line!r}")
        passwords[parts[0]] = parts[1]
        if len(parts) == 3:
            usernames[parts[0]] = parts[2]
    return passwords, usernames


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gb28181-sim",
        description="Emulate N GB/T 28181 devices (IPCs, or NVRs with channels) in one process: "
                    "digest REGISTER, refresh, keepalives, re-register with back-off, and "
                    "answers to DeviceInfo/Catalog/DeviceStatus/ConfigDownload/PresetQuery queries, "
                    "catalog subscriptions (SUBSCRIBE/NOTIFY), vendor wire quirks, and live video: "
                    "INVITEs to a channel are answered and streamed as H.264/H.265 in PS over RTP "
                    "(UDP, TCP active or passive) at real-time pace.")
    p.add_argument("--server", type=_host_port, default=("127.0.0.1", 5060), metavar="HOST:PORT",
                   help="the platform's SIP address (default 127.0.0.1:5060)")
    p.add_argument("--server-id", type=_gb_id, default="34020000002000000001",
                   help="the platform's 20-digit ID; its first 10 digits are the SIP domain")
    p.add_argument("--devices", "-n", type=int, default=1, help="how many devices (default 1)")
    p.add_argument("--first-id", type=_gb_id, default="34020000001320000001",
                   help="ID of the first device; the others count up from its serial")
    p.add_argument("--nvr", action="store_true", help="simulate NVRs (type 118) with --channels each")
    p.add_argument("--channels", type=int, default=16, help="channels per NVR (default 16)")
    p.add_argument("--password", default="12345678", help="password of every device (default 12345678)")
    p.add_argument("--passwords", metavar="FILE",
                   help="per-device passwords, lines of 'DEVICE_ID PASSWORD [AUTH_USERNAME]' (override "
                        "--password; AUTH_USERNAME: a digest username other than the device ID)")
    p.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    p.add_argument("--bind", default="127.0.0.1", help="local address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="local SIP port of the shared socket (0: any)")
    p.add_argument("--per-device-ports", action="store_true",
                   help="one socket per device instead of one shared socket")
    p.add_argument("--expires", type=int, default=3600, help="REGISTER Expires (default 3600)")
    p.add_argument("--keepalive-interval", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between keepalives (default 60)")
    p.add_argument("--rate", type=float, default=500.0,
                   help="devices started per second, to spread the first REGISTERs (default 500)")
    p.add_argument("--retry-min", type=float, default=60.0, metavar="SECONDS",
                   help="first back-off after a failed REGISTER (default 60, per §9.1.1)")
    p.add_argument("--catalog-items", type=int, default=2,
                   help="catalog items per Response MESSAGE for --vendor generic (default 2; "
                        "hikvision always sends 2, dahua everything that fits one datagram)")
    p.add_argument("--vendor", choices=VENDORS, default="generic",
                   help="wire personality (PROTOCOL.md §9): generic; hikvision (User-Agent "
                        "'IP Camera'/'Embedded Net DVR/NVR/DVS', <domain>.spvmn.cn URIs, LF-only "
                        "gb2312 bodies, padded Content-Length, 2 catalog items per message); dahua "
                        "('SIP UAS V3.0.0', IP:port URIs, Route on REGISTER, indented GB2312 bodies, "
                        "alphabetical headers with Via last, one-message catalogs with StreamNum)")
    p.add_argument("--malformed", action="store_true",
                   help="send broken XML like some firmware: a bare '&' in some channel names and a "
                        "raw '<' in some addresses")
    p.add_argument("--groups", action="store_true",
                   help="NVR catalogs also list a business group (215) and virtual organisations "
                        "(216); channel ParentID becomes '<NVR ID>/<VO ID>' (Annex O)")
    p.add_argument("--missing-location-ratio", type=_ratio, default=0.05, metavar="RATIO",
                   help="share of channels sent without Longitude/Latitude, 0..1 (default 0.05)")
    media = p.add_argument_group(
        "live video", "one looping clip is encoded once (PyAV) and shared by every stream; each "
                      "frame carries an SEI with a frame counter and its send time")
    media.add_argument("--video-codec", choices=tuple(VIDEO_CODECS), default="h264",
                       help="codec of the clip: h264 (libx264) or h265 (libx265, if PyAV's "
                            "FFmpeg has it) (default h264)")
    media.add_argument("--video-size", type=_video_size, default="640x360", metavar="WxH",
                       help="picture size, even numbers (default 640x360)")
    media.add_argument("--fps", type=_positive_int, default=25, help="frames per second (default 25)")
    media.add_argument("--gop", type=_positive_int, default=50, metavar="FRAMES",
                       help="frames from one keyframe to the next; a new stream starts at the "
                            "next keyframe (default 50)")
    media.add_argument("--bitrate", type=_positive_int, default=1000, metavar="KBPS",
                       help="target video bitrate in kbit/s (default 1000)")
    media.add_argument("--audio", action="store_true",
                       help="add G.711A audio (a 1 kHz tone in 20 ms PS packets of their own)")
    media.add_argument("--start-variants", type=int, default=5, metavar="K",
                       help="copies of the clip with keyframes spread over the GOP, so a new "
                            "stream starts within GOP/K frames (1: wait for the next keyframe)")
    media.add_argument("--max-streams", type=int, default=8, metavar="N",
                       help="live streams per device; one more INVITE gets 486 Busy Here (default 8)")
    media.add_argument("--media-mode", choices=MEDIA_MODES, default="normal",
                       help="normal: stream; silent: answer 200 but never send RTP; refuse: answer "
                            "every INVITE with 488 (default normal)")
    media.add_argument("--loss", type=_ratio, default=0.0, metavar="RATIO",
                       help="probability that an RTP packet is dropped, 0..1 (default 0)")
    media.add_argument("--reorder", type=_ratio, default=0.0, metavar="RATIO",
                       help="probability that an RTP packet is sent after the next one, 0..1 "
                            "(default 0)")
    media.add_argument("--answer-delay", type=float, default=0.0, metavar="SECONDS",
                       help="seconds before a device answers an INVITE (default 0)")
    media.add_argument("--own-ssrc", action="store_true",
                       help="answer INVITEs with an SSRC of the device's choosing, not the offered "
                            "y= (Annex F note 4; NVRs and lower platforms do)")
    p.add_argument("--records", type=int, default=0, metavar="DAYS",
                   help="each channel has DAYS days of recordings up to now (30-minute files with "
                        "gaps, some alarm/manual) and answers RecordInfo queries from them "
                        "(default 0: no recordings, every search answers SumNum 0)")
    p.add_argument("--query-mode", choices=QUERY_MODES, default="answer",
                   help="answer: answer the platform's queries; silent: accept them with 200 and "
                        "never send the data (a device overwhelmed after a power cut) (default answer)")
    p.add_argument("--alarm-interval", type=float, default=0.0, metavar="SECONDS",
                   help="each device raises an alarm (GB/T 28181-2016 §9.4) about this often, "
                        "expects the platform's Response and answers alarm SUBSCRIBEs (default 0: none)")
    p.add_argument("--alarm-seed", type=int, default=1,
                   help="seed of the alarms' priority, method and type (default 1)")
    p.add_argument("--mobile", type=float, default=0.0, metavar="SHARE|COUNT",
                   help="devices that move (GB/T 28181-2016 §9.11.2): below 1 a share, from 1 a "
                        "count; they drive a seeded loop and answer MobilePosition SUBSCRIBEs "
                        "with a NOTIFY every Interval (default 0: none)")
    p.add_argument("--mobile-seed", type=int, default=1, help="seed of the moving devices' loops")
    p.add_argument("--mobile-interval", type=float, default=0.0, metavar="SECONDS",
                   help="moving devices also report by MESSAGE this often while not subscribed "
                        "(default 0: only when subscribed)")
    talk = p.add_argument_group(
        "voice broadcast", "a Broadcast notify (GB/T 28181-2016 §9.12.1) is answered, then the device "
                           "INVITEs the platform for the audio and decodes what it receives")
    talk.add_argument("--broadcast-transport", choices=BROADCAST_TRANSPORTS, default=None,
                      help="media of the device's audio INVITE, in the device's terms: udp, "
                           "tcp-active (the device connects), tcp-passive (it listens) (default: "
                           "the vendor's: dahua tcp-active, others udp)")
    talk.add_argument("--broadcast-format", choices=BROADCAST_FORMATS, default=None,
                      help="pcma: bare G.711A, PT 8; ps: G.711A in PS, PT 96 (default: the "
                           "vendor's: hikvision ps, others pcma)")
    talk.add_argument("--broadcast-result", choices=("OK", "ERROR"), default="OK",
                      help="Result of the Response to a Broadcast notify (default OK)")
    talk.add_argument("--broadcast-dir", metavar="DIR",
                      help="write what each device heard as DIR/<device ID>-<n>.wav (8 kHz mono) "
                           "with a .json beside it, when the broadcast ends")
    talk.add_argument("--broadcast-hangup-after", type=float, default=0.0, metavar="SECONDS",
                      help="a device hangs up (BYE) after this much audio (default 0: never)")
    p.add_argument("--duration", type=float, default=0.0, metavar="SECONDS",
                   help="stop after this long (default: run until Ctrl-C)")
    p.add_argument("--unregister", action="store_true", help="unregister every device on exit")
    p.add_argument("--progress", type=float, default=1.0, metavar="SECONDS",
                   help="progress line interval (0: none)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    if args.devices < 1:
        raise SystemExit("gb28181-sim: --devices must be at least 1")
    if not 0 <= args.records <= 366:
        raise SystemExit("gb28181-sim: --records must be 0 to 366 days")
    try:
        device_ids(args.first_id, args.devices, nvr=args.nvr)
    except ValueError as exc:
        raise SystemExit(f"gb28181-sim: {exc}; lower --devices or --first-id's serial") from None
    passwords, usernames = _read_passwords(args.passwords) if args.passwords else ({}, {})
    cfg = FleetConfig(
        server_host=args.server[0], server_port=args.server[1], server_id=args.server_id,
        devices=args.devices, first_id=args.first_id, nvr=args.nvr, channels=args.channels,
        password=args.password, passwords=passwords, auth_usernames=usernames,
        transport=args.transport, bind_host=args.bind, bind_port=args.port,
        per_device_ports=args.per_device_ports, expires=args.expires,
        keepalive_interval=args.keepalive_interval, register_rate=args.rate,
        retry_min=args.retry_min, catalog_items_per_message=args.catalog_items,
        vendor=args.vendor, malformed=args.malformed, groups=args.groups,
        missing_location_ratio=args.missing_location_ratio,
        video_codec=args.video_codec, video_size=args.video_size, fps=args.fps, gop=args.gop,
        bitrate_kbps=args.bitrate, audio=args.audio, max_streams=args.max_streams,
        start_variants=args.start_variants,
        media_mode=args.media_mode, loss=args.loss, reorder=args.reorder,
        answer_delay=args.answer_delay, own_ssrc=args.own_ssrc, query_mode=args.query_mode,
        broadcast_transport=args.broadcast_transport, broadcast_format=args.broadcast_format,
        broadcast_result=args.broadcast_result, broadcast_dir=args.broadcast_dir,
        broadcast_hangup_after=max(0.0, args.broadcast_hangup_after),
        records_days=args.records, alarm_interval=max(0.0, args.alarm_interval),
        alarm_seed=args.alarm_seed, mobile=max(0.0, args.mobile), mobile_seed=args.mobile_seed,
        mobile_interval=max(0.0, args.mobile_interval))
    try:
        id_blocks(cfg)  # the channel, group and alarm-input IDs must fit too
    except ValueError as exc:
        raise SystemExit(f"gb28181-sim: {exc}") from None
    return cfg


async def _run(cfg: FleetConfig, args: argparse.Namespace) -> dict:
    fleet = Fleet(cfg)
    await fleet.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    step = args.progress if args.progress > 0 else 1.0
    while not stop.is_set():
        timeout = step if deadline is None else max(0.0, min(step, deadline - time.monotonic()))
        try:
            await asyncio.wait_for(stop.wait(), timeout)
        except TimeoutError:
            pass
        if args.progress > 0:
            s = fleet.summary()
            print(f"[{s['elapsed_s']:7.1f}s] registered {s['registered']}/{s['devices']}  "
                  f"register failures {s['register_failures']}  keepalives ok {s['keepalives_ok']} "
                  f"failed {s['keepalives_failed']}  queries answered {s['queries_answered']}  "
                  f"streams {s['streams']}  ptz {s['ptz_commands']}"
                  + (f"  alarms sent {s['alarms_sent']} responses {s['alarm_responses']} "
                     f"notifies {s['alarm_notifies']}" if cfg.alarm_interval > 0 else "")
                  + (f"  positions notifies {s['position_notifies']} messages "
                     f"{s['position_messages']}" if cfg.mobile > 0 else ""),
                  file=sys.stderr, flush=True)
        if deadline is not None and time.monotonic() >= deadline:
            break
    await fleet.stop(unregister=args.unregister)
    return fleet.summary()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    summary = asyncio.run(_run(cfg, args))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        lat = summary["register_latency_ms"]
        print(f"devices {summary['devices']}: registered {summary['registered']}, "
              f"never registered {summary['never_registered']}, register failures "
              f"{summary['register_failures']}; keepalives {summary['keepalives_ok']} ok / "
              f"{summary['keepalives_failed']} failed; REGISTER latency ms p50 {lat['p50']} "
              f"p95 {lat['p95']} p99 {lat['p99']}")
        for err, n in summary["errors"].items():
            print(f"  {n} x {err}")
    return 0 if summary["never_registered"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
