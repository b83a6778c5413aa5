"""Server configuration: a YAML file validated by pydantic, every key overridable from the environment.

Environment names follow the pydantic-settings convention and are a public contract that
deployment scripts rely on: prefix ``GB28181_``, ``__`` between section and key
(``GB28181_SIP__PORT``, ``GB28181_API__TOKEN``, ``GB28181_DATA_DIR``). The environment beats
the file, the file beats the defaults. A bad value is reported as one line per fault naming
the key, what is allowed and the environment variable that sets it (``ConfigError``). So is a
``GB28181_*`` variable whose name sets no key (a misspelt section or key): pydantic-settings
would silently ignore it, leaving the operator to wonder why the setting has no effect.

The defaults are a working single-host server: SQLite under ``./data``, SIP on 5060 (UDP and
TCP), HTTP on 8080, the timers of GB/T 28181-2016 (§9.1.1, §9.6.1).
"""

from __future__ import annotations

import difflib
import os
import secrets
import types
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .ids import IdError, parse_id

__all__ = ["Config", "ConfigError", "RecordingSection", "UpstreamSection", "UpstreamShare", "load_config",
           "ensure_api_token"]

ENV_PREFIX = "GB28181_"
ENV_DELIMITER = "__"


def _int_from_text(value: object) -> object:
    # The environment delivers text, and pydantic matches an int Literal only against ints
    # ("1" is not 1), so GB28181_TIERS__DEFAULT=1 would be refused. Digits become the int; the
    # Literal still refuses anything but its values.
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value)
    return value


Tier = Annotated[Literal[1, 2, 3], BeforeValidator(_int_from_text)]
"""1 key sites, 2 key organisations, 3 the rest."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSection(_Section):
    id: str = Field("34020000002000000001", description="this platform's 20-digit ID (type code 200)")
    domain: str = Field("3402000000", description="SIP domain: normally the first 10 digits of the ID")
    realm: str | None = Field(None, description="digest realm; defaults to the domain")
    name: str = "gb28181"

    @field_validator("id")
    @classmethod
    def _valid_id(cls, v: str) -> str:
        try:
            parse_id(v)
        except IdError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("domain")
    @classmethod
    def _valid_domain(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v):
            raise ValueError("the SIP domain must be a non-empty token such as 3402000000")
        return v


class SipSection(_Section):
    host: str = Field("0.0.0.0", description="address to bind SIP UDP and TCP on")
    port: int = Field(5060, ge=0, le=65535)
    external_host: str | None = Field(None, description="address devices reach us at, if not host")
    udp: bool = True
    tcp: bool = True
    max_message_size: int = Field(65535, ge=1024, le=4 * 1024 * 1024)
    max_tcp_connections: int = Field(20000, ge=1)
    t1: float = Field(0.5, gt=0, le=10, description="RFC 3261 T1 in seconds")
    overload_queue_delay: float = Field(
        4.0, ge=0, le=30, description="requests waiting this long (seconds) in the UDP receive "
        "queue mean overload: new registrations get 503 with Retry-After until it drains (0: never)")


class HttpSection(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)


class ApiSection(_Section):
    token: str | None = Field(None, description="bearer token; generated into DATA_DIR/api-token if unset")
    metrics_public: bool = Field(True, description="serve /metrics without the token")

    @field_validator("token")
    @classmethod
    def _token_len(cls, v: str | None) -> str | None:
        if v is not None and len(v) < 8:
            raise ValueError("the API token must be at least 8 characters")
        return v


class AuthSection(_Section):
    default_password: str = Field("12345678", min_length=1)
    unknown_devices: Literal["admit", "refuse"] = Field(
        "admit", description="admit unknown IDs with the default password, or refuse them (403)")
    qop: bool = Field(False, description="offer qop=auth in challenges (some devices mishandle it)")
    nonce_ttl: float = Field(300.0, gt=0)
    max_failures: int = Field(5, ge=1, description="wrong passwords before a device ID/source is locked out")
    failure_window: float = Field(300.0, gt=0)
    lockout_seconds: float = Field(600.0, ge=0)


class KeepaliveSection(_Section):
    interval: float = Field(60.0, gt=0, description="expected keepalive interval, seconds (§9.6.1)")
    count: int = Field(3, ge=1, description="missed keepalives before a device is offline")


class RegistrationSection(_Section):
    min_expires: int = Field(60, ge=1, description="shorter Expires get 423 Interval Too Brief")
    max_expires: int = Field(86400, ge=1, description="longer Expires are cut to this")
    default_expires: int = Field(3600, ge=1, description="granted when a REGISTER has no Expires")
    query_device_info: bool = Field(True, description="ask DeviceInfo after each new registration")
    query_basic_param: bool = Field(True, description="ask ConfigDownload/BasicParam after each new "
                                    "registration: the device's heartbeat interval and count set its "
                                    "offline deadline")

    @model_validator(mode="after")
    def _ordered(self) -> RegistrationSection:
        if not self.min_expires <= self.default_expires <= self.max_expires:
            raise ValueError("need min_expires <= default_expires <= max_expires")
        return self


class CatalogSection(_Section):
    query_on_register: bool = Field(True, description="query the Catalog after each new registration")
    sync_rate: float = Field(50.0, ge=0, description="devices whose post-registration queries start "
                             "per second (0: no pacing); keeps a registration storm from starving "
                             "REGISTER and keepalive handling")
    refresh_interval: float = Field(3600.0, ge=0, description="re-query every device's Catalog this often (0: never)")
    silence: float = Field(5.0, gt=0, description="a multi-part Catalog ends after this long without a part")
    first_part: float = Field(60.0, gt=0, description="give up when no part arrives within this long")
    subscribe: bool = Field(True, description="SUBSCRIBE to catalog changes after each sync")
    subscribe_expires: int = Field(600, ge=30, description="Expires of catalog subscriptions (Annex P: 600)")
    remove_missing: bool = Field(True, description="drop channels a complete Catalog no longer lists")
    charset: Literal["GB2312", "GB18030", "UTF-8"] = Field(
        "GB2312", description="charset of bodies we send; per device: PATCH /api/v1/devices/{id}")


class RecordsSection(_Section):
    max_query_span: float = Field(86400.0, ge=60, description="longest time range one RecordInfo "
                                  "query asks a device for, seconds; longer searches are split "
                                  "into several queries (many NVRs refuse or truncate long ranges)")
    timeout: float = Field(15.0, gt=0, description="a RecordInfo answer ends after this long "
                           "without a part; with no part at all the search fails (WVP: 15 s)")


class TierRule(_Section):
    """Channels matching every criterion given (each list: any of its values) get ``tier``."""

    tier: Tier
    id_prefix: list[str] = []
    industry: list[str] = Field([], description="ID digits 9-10, e.g. '04' traffic road")
    type_code: list[str] = Field([], description="ID digits 11-13, e.g. '131'")
    civil_code_prefix: list[str] = []
    business_group: list[str] = []
    name_contains: list[str] = []


class TiersSection(_Section):
    default: Tier = Field(3, description="tier of channels no rule matches")
    rules: list[TierRule] = Field([], description="first matching rule wins")


RecordMode = Literal["continuous", "alarm", "schedule", "off"]
_WINDOW = r"^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-4]):[0-5][0-9]$"


class TierPlans(_Section):
    """The recording mode of each tier's channels."""

    tier1: RecordMode = "continuous"
    tier2: RecordMode = "continuous"
    tier3: RecordMode = "off"

    def of(self, tier: int) -> str:
        return str(getattr(self, f"tier{tier}", "off"))


class TierRetention(_Section):
    """Days the segments of each tier's channels are kept."""

    tier1: float = Field(30.0, gt=0, description="field plans: at least 30 (newer ones 60 or 90)")
    tier2: float = Field(15.0, gt=0, description="field plans: at least 15")
    tier3: float = Field(7.0, gt=0)

    def of(self, tier: int) -> float:
        return float(getattr(self, f"tier{tier}", self.tier3))


class RecordingSection(_Section):
    """Platform recording (recording.py): what each tier records, and how long it is kept.

    The field's plans: tier 1 recorded around the clock and kept 30 days or more (newer plans
    60 or 90), tier 2 15 days; tier 3 is local choice. A channel's own mode
    (``PATCH /api/v1/channels/{id}`` ``{"recording": ...}``) beats its tier's plan.
    """

    enabled: bool = Field(False, description="record what the plans say (off: nothing is "
                          "recorded, the index and old segments are still served and swept)")
    dir: str | None = Field(None, description="where segments are written; default DATA_DIR/records")
    segment_seconds: int = Field(3600, ge=2, le=86400, description="segments end at whole "
                                 "multiples of this many seconds of wall clock (3600: per hour)")
    plans: TierPlans = Field(default_factory=TierPlans, description="mode per tier: continuous | "
                             "alarm (pre/post-roll around alarms) | schedule (the windows in "
                             "`schedule`) | off")
    schedule: list[Annotated[str, Field(pattern=_WINDOW)]] = Field(
        default_factory=lambda: ["08:00-20:00"], description="windows of the schedule mode, "
        "HH:MM-HH:MM Beijing time; one whose end is before its start runs over midnight")
    alarm_preroll: bool = Field(True, description="an alarm recording starts at the stream's "
                                "cached GOP, the seconds before the alarm")
    alarm_postroll: float = Field(60.0, ge=0, le=86400, description="an alarm recording goes on "
                                  "this many seconds after the channel's last alarm")
    retention_days: TierRetention = Field(default_factory=TierRetention, description="days "
                                          "segments of each tier are kept")
    quota_bytes: int = Field(0, ge=0, description="bytes the segments may use at most; 0: the "
                             "disk's free space is the limit")
    low_space_percent: float = Field(5.0, ge=0, lt=100, description="below this share free (of "
                                     "the quota, or of the disk) the low-space policy deletes "
                                     "the oldest segments; tier 1 inside its retention never")
    max_gap_percent: float = Field(5.0, ge=0, le=100, description="a continuous channel missing "
                                   "more of the last day than this does not meet the plan (report)")
    sweep_interval: float = Field(60.0, gt=0, description="seconds between retention sweeps")
    retry_min: float = Field(5.0, gt=0, description="first wait before re-opening a channel's "
                             "recording that failed (device offline, INVITE refused); doubled ...")
    retry_max: float = Field(300.0, gt=0, description="... up to this")
    serve_cascade: bool = Field(True, description="an upper platform's RecordInfo and Playback of "
                                "a range these recordings cover are served from them, not the device")
    max_export_seconds: float = Field(86400.0, ge=60, description="longest range one export "
                                      "(GET /api/v1/channels/{id}/export) covers")

    @model_validator(mode="after")
    def _retry(self) -> RecordingSection:
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max must be at least retry_min")
        return self


class WebrtcSettings(_Section):
    """WebRTC viewers (WHEP, ``POST /api/v1/channels/{id}/whep``): where their ICE lands."""

    port_min: int = Field(31000, ge=0, le=65535, description="lowest UDP port of a WebRTC viewer's "
                          "ICE candidate (one port per viewer; 0 and port_max 0: any free port)")
    port_max: int = Field(31999, ge=0, le=65535, description="highest UDP port for WebRTC viewers")
    host: str | None = Field(None, description="address in the ICE host candidates; default: the "
                             "media node's advertised address (media.advertised_host)")

    @model_validator(mode="after")
    def _range(self) -> WebrtcSettings:
        if not (self.port_min == self.port_max == 0 or 1 <= self.port_min <= self.port_max):
            raise ValueError("need 1 <= port_min <= port_max <= 65535, or both 0 (any port)")
        return self


class MediaSection(_Section):
    host: str = Field("0.0.0.0", description="address to bind media sockets on")
    advertised_host: str | None = Field(None, description="address devices send media to; "
                                        "default: sip.external_host, else the SIP address")
    rtp_port: int = Field(30000, ge=0, le=65535, description="the shared UDP port for RTP (0: any)")
    tcp_port_range: tuple[int, int] | None = Field(
        (30002, 30999), description="ports for TCP-passive media [low, high], shared by streams "
        "(told apart by SSRC); null: an ephemeral port per stream")

    @field_validator("tcp_port_range")
    @classmethod
    def _port_range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 1 <= v[0] <= v[1] <= 65535:
            raise ValueError("need 1 <= low <= high <= 65535, e.g. [30002, 30999]")
        return v
    default_transport: Literal["udp", "tcp-passive", "tcp-active"] = Field(
        "udp", description="media transport unless the request or the device says otherwise")
    invite_timeout: float = Field(10.0, gt=0, description="seconds to wait for the answer to an INVITE")
    stream_timeout: float = Field(10.0, gt=0, description="no RTP this long after the ACK: BYE and fail")
    idle_timeout: float = Field(15.0, gt=0, description="RTP stops this long on a live stream: tear it down")
    idle_grace: float = Field(10.0, ge=0, description="BYE this long after the last viewer left")
    max_streams: int = Field(1000, ge=1, description="live upstream INVITEs at most (486 beyond)")
    play_token_ttl: int = Field(300, ge=10, description="lifetime of signed play URLs, seconds")
    workers: int | Literal["auto"] = Field(
        "auto", description="media node processes this server starts (one relay per core): auto = "
        "one per CPU core; 0 = relay inside the server process")
    node_token: str = Field("", description="token media nodes join with (gb28181 media-node "
                            "--token); empty: generated once into DATA_DIR/node-token")
    node_http_port: int = Field(0, ge=0, le=65535, description="viewer HTTP port of the first "
                                "local worker (worker i: + i); 0: any free port")
    node_max_streams: int = Field(500, ge=1, description="streams one media node carries at most")
    downloads_per_device: int = Field(2, ge=1, le=64, description="downloads of recordings one "
                                      "device serves at once (more get 429)")
    iframe_after_ack: bool = Field(True, description="send IFameCmd (Annex A.2.3) to the channel right "
                                   "after a live INVITE's ACK, so it starts on an IDR at once")
    webrtc: WebrtcSettings = Field(default_factory=WebrtcSettings, description="WebRTC (WHEP) viewers")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: object) -> object:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())  # from the environment (GB28181_MEDIA__WORKERS=2)
        if isinstance(v, int) and not 0 <= v <= 256:
            raise ValueError("need 0 (relay in the server process), 1 to 256, or auto")
        return v


class PtzSection(_Section):
    auto_stop: float = Field(60.0, ge=0, description="a pan/tilt/zoom/focus/iris move not stopped "
                             "within this many seconds is stopped by the server (0: never)")


class BroadcastSection(_Section):
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="largest audio file a "
                                  "broadcast accepts, bytes (400 beyond)")
    max_duration: float = Field(600.0, gt=0, description="longest audio file a broadcast "
                                "accepts, seconds (400 beyond)")
    response_timeout: float = Field(10.0, gt=0, description="seconds to wait for the device's "
                                    "Response to the Broadcast notify (A.2.6)")
    invite_timeout: float = Field(10.0, gt=0, description="seconds to wait for the device's "
                                  "audio INVITE after its Response OK (§9.12.1.2)")
    ws_buffer: float = Field(2.0, gt=0, le=60, description="seconds of push-to-talk audio held "
                             "for a WebSocket talker; beyond, the oldest is dropped")


class Webhook(_Section):
    """One receiver of events: a JSON POST per event, signed when ``secret`` is set."""

    url: str = Field(min_length=1, description="http:// or https:// URL the events are POSTed to")
    secret: str = Field("", description="HMAC-SHA256 key of the X-GB28181-Signature header "
                        "(empty: unsigned)")
    events: list[Literal["alarm", "device", "channel", "position", "upstream", "storage"]] = Field(
        [], description="kinds of event sent (alarm, device on/offline, channel state, mobile "
        "position); empty: all")


class EventsSection(_Section):
    webhooks: list[Webhook] = Field([], description="receivers of every event (JSON POST, retried)")
    history: int = Field(1000, ge=10, le=1_000_000, description="recent events kept in memory "
                         "for SSE clients that resume with Last-Event-ID")
    sse_keepalive: float = Field(15.0, gt=0, description="seconds between SSE keep-alive comments")
    sse_backlog: int = Field(1000, ge=1, description="events queued for one SSE client; a client "
                             "further behind is disconnected (it resumes with Last-Event-ID)")
    webhook_queue: int = Field(10000, ge=1, description="events queued per webhook URL; beyond, "
                               "the oldest are dropped (and counted)")
    webhook_concurrency: int = Field(4, ge=1, le=64, description="POSTs in flight per webhook URL")
    webhook_timeout: float = Field(5.0, gt=0, description="seconds a POST may take")
    webhook_retry_min: float = Field(1.0, gt=0, description="first retry after this many seconds; "
                                     "doubled on each failure")
    webhook_retry_max: float = Field(60.0, gt=0, description="longest wait between retries")


class PositionsSection(_Section):
    """Mobile positions (GB/T 28181-2016 §9.11.2, A.2.5 MobilePosition): the stored tracks."""

    keep_days: float = Field(7.0, gt=0, description="fixes are kept this many days, then pruned")
    prune_interval: float = Field(3600.0, gt=0, description="seconds between prunings of old fixes")


class ReportsSection(_Section):
    civil_code_digits: int = Field(6, ge=2, le=8, description="civil-code prefix length for rates")


class DatabaseSection(_Section):
    path: str | None = Field(None, description="SQLite file; defaults to DATA_DIR/gb28181.db")
    flush_interval: float = Field(0.5, gt=0, le=60)
    commit_delay: float = Field(0.02, ge=0, le=1, description="a registration's commit waits this "
                                "long for others to share its transaction (group commit), seconds")


class ConsoleSection(_Section):
    """The web console at / (api_console.py)."""

    tiles_url: str = Field("", max_length=512, description="map tile URL template, e.g. "
                           "https://tiles.example/{z}/{x}/{y}.png; empty: points on a blank map")
    tiles_attribution: str = Field("", max_length=512, description="attribution shown with the tiles")


class LogSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class UpstreamShare(_Section):
    """Which channels an upper platform sees (GB/T 28181-2016 §9.5.3 catalog): a channel is
    shared when it matches any rule."""

    civil_codes: list[Annotated[str, Field(pattern=r"^[0-9]{2,8}$")]] = Field(
        default_factory=list, description="civil-code prefixes (2-8 digits)")
    business_groups: list[Annotated[str, Field(pattern=r"^[0-9]{20}$")]] = Field(
        default_factory=list, description="business-group (215) or virtual-organisation (216) IDs")
    channels: list[Annotated[str, Field(pattern=r"^[0-9]{20}$")]] = Field(
        default_factory=list, description="channel IDs")


class UpstreamSection(_Section):
    """One upper platform this instance registers to as a lower platform (§9.1, Annex J.1)."""

    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                           description="name of this upstream in the API; defaults to server_id")
    name: str = Field("", max_length=128)
    server_id: str = Field(description="the upper platform's 20-digit ID (type code 200)")
    domain: str | None = Field(None, description="its SIP domain; defaults to the first 10 digits of server_id")
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(5060, ge=1, le=65535)
    password: str = Field("", max_length=128)
    transport: Literal["udp", "tcp"] = "udp"
    local_id: str | None = Field(None, description="the ID we register with; defaults to server.id")
    share: Literal["all"] | UpstreamShare = "all"
    enabled: bool = True
    expires: int = Field(3600, ge=60, le=86400, description="REGISTER Expires, seconds")
    keepalive_interval: float = Field(60.0, ge=0.2, le=3600, description="seconds between keepalives")
    keepalive_count: int = Field(3, ge=1, le=100, description="missed keepalives before re-registering")
    retry_min: float = Field(5.0, ge=0.1, le=3600, description="first back-off after a failed REGISTER")
    retry_max: float = Field(60.0, ge=0.1, le=86400, description="longest back-off")
    catalog_items_per_message: int = Field(0, ge=0, le=100,
                                           description="catalog items per MESSAGE (0: 4 over UDP, 20 over TCP)")

    @field_validator("server_id", "local_id")
    @classmethod
    def _platform_id(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            parse_id(v)
        except IdError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _defaults(self) -> UpstreamSection:
        if self.id is None:
            self.id = self.server_id
        if self.domain is None:
            self.domain = self.server_id[:10]
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max must be at least retry_min")
        return self


class Config(BaseSettings):
    """The whole configuration; see configs/default.yaml for a commented example."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER,
                                      extra="forbid", case_sensitive=False)

    data_dir: Path = Path("data")
    server: ServerSection = ServerSection()
    sip: SipSection = SipSection()
    http: HttpSection = HttpSection()
    api: ApiSection = ApiSection()
    auth: AuthSection = AuthSection()
    keepalive: KeepaliveSection = KeepaliveSection()
    registration: RegistrationSection = RegistrationSection()
    catalog: CatalogSection = CatalogSection()
    records: RecordsSection = RecordsSection()
    tiers: TiersSection = TiersSection()
    reports: ReportsSection = ReportsSection()
    recording: RecordingSection = RecordingSection()
    media: MediaSection = MediaSection()
    ptz: PtzSection = PtzSection()
    broadcast: BroadcastSection = BroadcastSection()
    events: EventsSection = EventsSection()
    positions: PositionsSection = PositionsSection()
    console: ConsoleSection = ConsoleSection()
    upstreams: list[UpstreamSection] = Field(default_factory=list, description="upper platforms we register to")
    database: DatabaseSection = DatabaseSection()
    log: LogSection = LogSection()

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource):
        # The YAML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    @property
    def realm(self) -> str:
        return self.server.realm or self.server.domain

    @property
    def database_path(self) -> Path:
        return Path(self.database.path) if self.database.path else self.data_dir / "gb28181.db"

    @property
    def records_dir(self) -> Path:
        """Where platform recordings are written (``recording.dir``)."""
        return Path(self.recording.dir) if self.recording.dir else self.data_dir / "records"


class ConfigError(ValueError):
    """The configuration cannot be used; ``str()`` is one line per fault."""


def _env_name(loc: tuple) -> str:
    return ENV_PREFIX + ENV_DELIMITER.join(str(p).upper() for p in loc)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model held by a field of this type (``X`` or ``X | None``), whose keys can be set one
    by one; None for a plain value, a list or a mapping."""
    args: tuple[Any, ...] = (annotation,)
    if get_origin(annotation) in (Union, types.UnionType):
        args = tuple(a for a in get_args(annotation) if a is not type(None))
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, Mapping)


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The model whose keys sit at ``path`` below Config; None if nothing (known) is there."""
    model: type[BaseModel] | None = Config
    for part in path:
        field = model.model_fields.get(str(part)) if model is not None else None
        model = _model_of(field.annotation) if field is not None else None
    return model


def _unknown_key(loc: tuple) -> str:
    # Name what is allowed there: the keys of the enclosing section (or the sections).
    model = _model_at(loc[:-1])
    known = list(model.model_fields) if model is not None else []
    if not known:
        return "unknown key (check the spelling against configs/default.yaml)"
    close = difflib.get_close_matches(str(loc[-1]) if loc else "", known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key; {hint}allowed here: {', '.join(known)}"


def format_validation_error(exc: ValidationError, source: str,
                            reported: Collection[tuple[str, ...]] = ()) -> str:
    """One line per fault of ``exc``; ``source`` names the file. Faults at a location in
    ``reported`` are left out: a misnamed environment variable was reported there already."""
    lines = []
    errors = exc.errors()
    for err in errors:
        if _beaten_alternative(err, errors):
            continue
        # Union members name themselves in the location ("literal['all']", "UpstreamShare"):
        # they are not keys. List items show as [n] after their list.
        raw = [p for p in err["loc"] if isinstance(p, int) or not _union_tag(str(p))]
        loc = tuple(p for p in raw if not isinstance(p, int))
        if loc in reported:
            continue
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in raw).lstrip(".") or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(loc)
        got = err.get("input")
        got_text = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) \
            else f" (got {got!r})"
        verb = "fix or remove it" if err["type"] == "extra_forbidden" else "set it"
        lines.append(f"config error: {key}: {msg}{got_text}; {verb} in {source} or {_env_name(_env_path(loc))}")
    return "\n".join(lines)


def _beaten_alternative(err: Any, errors: list[Any]) -> bool:
    """A union's literal member ("all") refused while another member has its own faults: those
    say what is wrong, this line would only add noise."""
    loc = err["loc"]
    tags = [i for i, p in enumerate(loc) if isinstance(p, str) and p.startswith("literal[")]
    if not tags:
        return False
    prefix = loc[:tags[-1]]
    return any(e is not err and e["loc"][:len(prefix)] == prefix and len(e["loc"]) > len(prefix) + 1
               for e in errors)


def _union_tag(part: str) -> bool:
    return "[" in part or part[:1].isupper()


def _env_path(loc: tuple) -> tuple:
    """The part of ``loc`` one environment variable sets: a list is given whole, as JSON, so a
    fault inside one (``upstreams[0].host``) is fixed in the list's variable."""
    model: type[BaseModel] | None = Config
    for i, part in enumerate(loc):
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return loc
        if get_origin(field.annotation) is list:
            return loc[:i + 1]
        model = _model_of(field.annotation)
    return loc


def _closest_path(parts: list[str]) -> tuple[str, ...] | None:
    """``parts`` with each misspelt key replaced by the closest one there, cut at the first plain
    value; None when some key resembles nothing."""
    out: list[str] = []
    model: type[BaseModel] | None = Config
    for part in parts:
        if model is None:
            break           # below a plain value nothing can be set: the name ends there
        if not part:
            continue        # a doubled delimiter (GB28181_SIP____PORT)
        fields = model.model_fields
        close = [part] if part in fields else difflib.get_close_matches(part, list(fields), n=1)
        if not close:
            return None
        out.append(close[0])
        annotation = fields[close[0]].annotation
        if _is_mapping(annotation):
            return tuple(out)   # the keys of a mapping are data: nothing more to correct
        model = _model_of(annotation)
    return tuple(out) or None


def _env_var_fault(name: str) -> tuple[tuple[str, ...] | None, str] | None:
    """Why the ``GB28181_*`` variable ``name`` sets no key of Config, or None if it sets one.

    The answer is the location pydantic reports the same fault at, if it sees the variable at
    all (so the fault is said once), and the line to print. Case-insensitive, as the settings are.
    """
    parts = name[len(ENV_PREFIX):].lower().split(ENV_DELIMITER)
    model: type[BaseModel] = Config
    depth, fault, allowed = 0, "", ""
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            kind = "section" if depth == 0 and len(parts) > 1 else "key"
            fault = (f"unknown {kind} {part!r}" if part else
                     f"empty {kind}" + (f" (a doubled {ENV_DELIMITER!r}?)" if depth else ""))
            where = "at the top level" if depth == 0 else f"in {'.'.join(parts[:depth])}"
            allowed = f" allowed {where}: {', '.join(fields)};"
            break
        annotation = fields[part].annotation
        if depth == len(parts) - 1 or _is_mapping(annotation):
            return None         # a key, a whole section (as JSON) or a mapping's own keys
        sub = _model_of(annotation)
        if sub is None:
            whole = " (the whole list, as JSON)" if get_origin(annotation) is list else ""
            fault = f"{'.'.join(parts[:depth + 1])} takes one value{whole}, not keys below it"
            break
        model = sub
    suggestion = _closest_path(parts)
    hint = f" did you mean {_env_name(suggestion)}?" if suggestion else ""
    key = f" ({'.'.join(parts)})" if any(parts) else ""
    line = (f"config error: environment variable {name}{key}: {fault};{hint}{allowed} "
            f"rename or unset {name}")
    # pydantic-settings looks up only the sections it knows: below one, it sees the variable.
    return (tuple(parts[:depth + 1]) if depth else None), line


def _env_faults(environ: Mapping[str, str]) -> list[tuple[tuple[str, ...] | None, str]]:
    found = (_env_var_fault(name) for name in sorted(environ)
             if name.upper().startswith(ENV_PREFIX))
    return [fault for fault in found if fault is not None]


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> Config:
    """Read ``path`` (YAML; None = defaults only), apply the environment, validate."""
    data: dict[str, Any] = {}
    source = str(path) if path else "the config file"
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"config error: cannot read {path}: {exc.strerror}; "
                              f"check the path of the config file") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config error: {path} is not valid YAML{where}: "
                              f"{getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config error: {path} must hold a mapping of sections "
                              f"(server:, sip:, ...), not a {type(loaded).__name__}")
        data = loaded
    data.update(overrides)
    env_faults = _env_faults(os.environ)
    lines = [line for _, line in env_faults]
    try:
        config = Config(**data)
    except ValidationError as exc:
        reported = {loc for loc, _ in env_faults if loc}
        lines.append(format_validation_error(exc, source, reported))
    lines = [line for line in lines if line]
    if lines:
        raise ConfigError("\n".join(lines))
    return config


def ensure_api_token(config: Config) -> tuple[str, Path | None]:
    """The API token: from config/env, else read or create DATA_DIR/api-token (mode 600)."""
    if config.api.token:
        return config.api.token, None
    return _secret_file(config.data_dir / "api-token")


def ensure_node_token(config: Config) -> tuple[str, Path | None]:
    """The media node token: from config/env, else read or create DATA_DIR/node-token."""
    if config.media.node_token:
        return config.media.node_token, None
    return _secret_file(config.data_dir / "node-token")


def _secret_file(path: Path) -> tuple[str, Path]:
    try:
        token = path.read_text(encoding="utf-8").strip()
        if len(token) >= 8:
            return token, path
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token, path
