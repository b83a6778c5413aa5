"""SQLite implementation of the registry `Store`, through aiosqlite.

`DeviceRegistry` (devices.py) calls `write_batch` and `ChannelRegistry`
(channels.py) calls `write_channel_batch` once per flush; here each is one
transaction of executemany upserts, deletes and event inserts, so a flush
lands whole or not at all. The database runs in WAL mode with
synchronous=NORMAL: a power cut may lose the last flushes but never corrupts
the file, and readers (an admin shell, a backup) do not block the writer.
The schema is versioned in `schema_version` and moved forward by `_MIGRATIONS`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import aiosqlite

from .models import (
    CHANNEL_FIELDS,
    DEVICE_FIELDS,
    AlarmEvent,
    Channel,
    ChannelEvent,
    Device,
    FaultEvent,
    PositionEvent,
    StatusEvent,
    channel_values,
    device_values,
)
from .store import RecordSegment, Store, StoreBatch, StoreError, UserRecord

log = logging.getLogger(__name__)

_SQLITE_MAGIC = b"SQLite format 3\x00"

# Each entry moves the schema from version n-1 to n inside one transaction.
# Columns of `devices` and `channels` mirror Device and Channel field by field;
# a new field needs a migration here (or a key in `extra` / `raw`), which the
# check below enforces. Released entries are never edited.
_MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE schema_version (version INTEGER NOT NULL);
    CREATE TABLE devices (
        device_id         TEXT    NOT NULL PRIMARY KEY,
        kind              TEXT    NOT NULL DEFAULT '',
        name              TEXT    NOT NULL DEFAULT '',
        manufacturer      TEXT    NOT NULL DEFAULT '',
        model             TEXT    NOT NULL DEFAULT '',
        firmware          TEXT    NOT NULL DEFAULT '',
        transport         TEXT    NOT NULL DEFAULT 'udp',
        host              TEXT    NOT NULL DEFAULT '',
        port              INTEGER NOT NULL DEFAULT 0,
        contact           TEXT    NOT NULL DEFAULT '',
        expires           INTEGER NOT NULL DEFAULT 0,
        registered_at     REAL    NOT NULL DEFAULT 0,
        expires_at        REAL    NOT NULL DEFAULT 0,
        last_seen         REAL    NOT NULL DEFAULT 0,
        keepalive_at      REAL    NOT NULL DEFAULT 0,
        online            INTEGER NOT NULL DEFAULT 0,
        status_changed_at REAL    NOT NULL DEFAULT 0,
        password          TEXT,
        created_at        REAL    NOT NULL DEFAULT 0,
        updated_at        REAL    NOT NULL DEFAULT 0,
        extra             TEXT    NOT NULL DEFAULT '{}'
    ) WITHOUT ROWID;
    CREATE TABLE status_events (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT    NOT NULL,
        online    INTEGER NOT NULL,
        at        REAL    NOT NULL,
        reason    TEXT    NOT NULL DEFAULT ''
    );
    CREATE INDEX status_events_device_at ON status_events (device_id, at);
    CREATE INDEX status_events_at ON status_events (at);
    """,
    # 2: channels (catalog items) and their effective-state history
    """
    CREATE TABLE channels (
        channel_id        TEXT    NOT NULL PRIMARY KEY,
        device_id         TEXT    NOT NULL,
        kind              TEXT    NOT NULL DEFAULT 'channel',
        name              TEXT    NOT NULL DEFAULT '',
        manufacturer      TEXT    NOT NULL DEFAULT '',
        model             TEXT    NOT NULL DEFAULT '',
        owner             TEXT    NOT NULL DEFAULT '',
        civil_code        TEXT    NOT NULL DEFAULT '',
        block             TEXT    NOT NULL DEFAULT '',
        address           TEXT    NOT NULL DEFAULT '',
        parental          INTEGER NOT NULL DEFAULT 0,
        parent_id         TEXT    NOT NULL DEFAULT '',
        business_group_id TEXT    NOT NULL DEFAULT '',
        safety_way        INTEGER,
        register_way      INTEGER,
        secrecy           INTEGER NOT NULL DEFAULT 0,
        ip_address        TEXT    NOT NULL DEFAULT '',
        port              INTEGER NOT NULL DEFAULT 0,
        status            TEXT    NOT NULL DEFAULT 'ON',
        longitude         REAL,
        latitude          REAL,
        ptz_type          INTEGER,
        info              TEXT    NOT NULL DEFAULT '{}',
        raw               TEXT    NOT NULL DEFAULT '{}',
        tier              INTEGER NOT NULL DEFAULT 3,
        tier_locked       INTEGER NOT NULL DEFAULT 0,
        state             TEXT    NOT NULL DEFAULT 'OFF',
        state_changed_at  REAL    NOT NULL DEFAULT 0,
        seen_at           REAL    NOT NULL DEFAULT 0,
        created_at        REAL    NOT NULL DEFAULT 0,
        updated_at        REAL    NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE channel_events (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        channel_id TEXT    NOT NULL,
        state      TEXT    NOT NULL,
        at         REAL    NOT NULL,
        reason     TEXT    NOT NULL DEFAULT ''
    );
    CREATE INDEX channel_events_channel_at ON channel_events (channel_id, at);
    CREATE INDEX channel_events_at ON channel_events (at);
    """,
    # 3: faults reported in keepalives (Status ERROR and the Info list)
    """
    CREATE TABLE device_faults (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT    NOT NULL,
        at        REAL    NOT NULL,
        status    TEXT    NOT NULL,
        devices   TEXT    NOT NULL DEFAULT '[]'
    );
    CREATE INDEX device_faults_device_at ON device_faults (device_id, at);
    """,
    # 4: alarms devices reported (GB/T 28181-2016 §9.4, A.2.5); `at` is when we received one
    """
    CREATE TABLE alarms (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id   TEXT    NOT NULL,
        channel_id  TEXT    NOT NULL DEFAULT '',
        priority    INTEGER,
        method      INTEGER,
        alarm_type  INTEGER,
        alarm_time  REAL,
        description TEXT    NOT NULL DEFAULT '',
        longitude   REAL,
        latitude    REAL,
        at          REAL    NOT NULL,
        info        TEXT    NOT NULL DEFAULT '{}'
    );
    CREATE INDEX alarms_device_at ON alarms (device_id, at);
    CREATE INDEX alarms_at ON alarms (at);
    """,
    # 5: mobile device positions (GB/T 28181-2016 §9.11.2, A.2.5 MobilePosition); `at` is when
    # we received a fix, `time` the device's Time; pruned by `at` (positions.keep_days)
    """
    CREATE TABLE positions (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT    NOT NULL,
        target_id TEXT    NOT NULL DEFAULT '',
        time      REAL,
        longitude REAL    NOT NULL,
        latitude  REAL    NOT NULL,
        speed     REAL,
        direction REAL,
        altitude  REAL,
        at        REAL    NOT NULL
    );
    CREATE INDEX positions_device_at ON positions (device_id, at);
    CREATE INDEX positions_at ON positions (at);
    """,
    # 6: console and API user accounts (gb28181/users.py); scopes and tokens are JSON, tokens
    # hold SHA-256 hashes only, password_hash is an argon2id PHC string
    """
    CREATE TABLE users (
        name          TEXT    NOT NULL PRIMARY KEY,
        role          TEXT    NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
        scopes        TEXT    NOT NULL DEFAULT '{}',
        password_hash TEXT    NOT NULL,
        tokens        TEXT    NOT NULL DEFAULT '[]',
        disabled      INTEGER NOT NULL DEFAULT 0,
        created_at    REAL    NOT NULL DEFAULT 0,
        updated_at    REAL    NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    """,
    # 7: platform recordings (gb28181/recording.py): one row per MP4 segment, keyed by its path
    # under the records root; times are Unix seconds of the first and last frame. `state` is
    # open | closed | failed. record_plans holds a channel's own recording mode, which beats its
    # tier's plan (kept apart from `channels` so a catalog sync never overwrites it).
    """
    CREATE TABLE record_segments (
        id         INTEGER PRIMARY KEY,
        channel_id TEXT    NOT NULL,
        path       TEXT    NOT NULL UNIQUE,
        start      REAL    NOT NULL,
        end        REAL    NOT NULL,
        bytes      INTEGER NOT NULL DEFAULT 0,
        frames     INTEGER NOT NULL DEFAULT 0,
        codec      TEXT    NOT NULL DEFAULT '',
        gap_before INTEGER NOT NULL DEFAULT 0,
        tier       INTEGER NOT NULL DEFAULT 3,
        state      TEXT    NOT NULL DEFAULT 'closed',
        created_at REAL    NOT NULL DEFAULT 0
    );
    CREATE INDEX record_segments_channel_start ON record_segments (channel_id, start);
    CREATE INDEX record_segments_tier_start ON record_segments (tier, start);
    CREATE TABLE record_plans (
        channel_id TEXT NOT NULL PRIMARY KEY,
        mode       TEXT NOT NULL,
        updated_at REAL NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    """,
]

SCHEMA_VERSION = len(_MIGRATIONS)

_COLUMNS = ", ".join(DEVICE_FIELDS)
_SELECT_DEVICES = f"SELECT {_COLUMNS} FROM devices"
_UPSERT_DEVICE = (
    f"INSERT INTO devices ({_COLUMNS}) VALUES ({', '.join('?' * len(DEVICE_FIELDS))}) "
    "ON CONFLICT (device_id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in DEVICE_FIELDS[1:])
)
_DELETE_DEVICE = "DELETE FROM devices WHERE device_id = ?"
_INSERT_EVENT = "INSERT INTO status_events (device_id, online, at, reason) VALUES (?, ?, ?, ?)"
_INSERT_FAULT = "INSERT INTO device_faults (device_id, at, status, devices) VALUES (?, ?, ?, ?)"
_ALARM_COLUMNS = ("device_id, channel_id, priority, method, alarm_type, alarm_time, description, "
                  "longitude, latitude, at, info")
_INSERT_ALARM = f"INSERT INTO alarms ({_ALARM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_POSITION_COLUMNS = "device_id, target_id, time, longitude, latitude, speed, direction, altitude, at"
_INSERT_POSITION = f"INSERT INTO positions ({_POSITION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: Rows one prune statement deletes at most: a week of a big fleet's fixes is not one long
#: transaction that holds up the group commit.
_PRUNE_CHUNK = 20_000

_ONLINE = DEVICE_FIELDS.index("online")
_EXTRA = DEVICE_FIELDS.index("extra")

_CHANNEL_COLUMNS = ", ".join(CHANNEL_FIELDS)
_SELECT_CHANNELS = f"SELECT {_CHANNEL_COLUMNS} FROM channels"
_UPSERT_CHANNEL = (
    f"INSERT INTO channels ({_CHANNEL_COLUMNS}) VALUES ({', '.join('?' * len(CHANNEL_FIELDS))}) "
    "ON CONFLICT (channel_id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in CHANNEL_FIELDS[1:])
)
_DELETE_CHANNEL = "DELETE FROM channels WHERE channel_id = ?"
_INSERT_CHANNEL_EVENT = "INSERT INTO channel_events (channel_id, state, at, reason) VALUES (?, ?, ?, ?)"

_USER_COLUMNS = "name, role, scopes, password_hash, tokens, disabled, created_at, updated_at"
_UPSERT_USER = (
    f"INSERT INTO users ({_USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _USER_COLUMNS.split(", ")[1:])
)
_DELETE_USER = "DELETE FROM users WHERE name = ?"

_SEGMENT_COLUMNS = "channel_id, path, start, end, bytes, frames, codec, gap_before, tier, state, created_at"
_UPSERT_SEGMENT = (
    f"INSERT INTO record_segments ({_SEGMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (path) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _SEGMENT_COLUMNS.split(", ") if c not in ("path", "created_at"))
)
_SELECT_SEGMENTS = f"SELECT {_SEGMENT_COLUMNS}, id FROM record_segments"
_DELETE_SEGMENT = "DELETE FROM record_segments WHERE path = ?"
_UPSERT_PLAN = ("INSERT INTO record_plans (channel_id, mode, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (channel_id) DO UPDATE SET mode = excluded.mode, updated_at = excluded.updated_at")
_DELETE_PLAN = "DELETE FROM record_plans WHERE channel_id = ?"
#: Per channel: segments, bytes, earliest start, latest end, and over [:since, :until) the
#: seconds covered, gaps, failed segments and bytes (the storage report's "meets the plan").
_SEGMENT_SUMMARY = """
SELECT channel_id, MAX(tier), COUNT(*), SUM(bytes), MIN(start), MAX(end),
       SUM(MAX(0, MIN(end, :until) - MAX(start, :since))),
       SUM(CASE WHEN start >= :since AND start < :until AND gap_before THEN 1 ELSE 0 END),
       SUM(CASE WHEN start >= :since AND start < :until AND state = 'failed' THEN 1 ELSE 0 END),
       SUM(CASE WHEN start >= :since AND start < :until THEN bytes ELSE 0 END)
FROM record_segments GROUP BY channel_id
"""

_LOAD_CHUNK = 2_000

_INFO = CHANNEL_FIELDS.index("info")
_RAW = CHANNEL_FIELDS.index("raw")
_TIER_LOCKED = CHANNEL_FIELDS.index("tier_locked")
# For every channel with history, its last event at or before :since, plus
# the events inside the window. The recursive CTE walks the distinct channel
# IDs through the (channel_id, at) index one seek each, instead of scanning
# every event ever recorded as SELECT DISTINCT would; the last event before
# the window is one backward seek in the same index.
_CHANNEL_HISTORY = """
WITH RECURSIVE ids(cid) AS (
    SELECT MIN(channel_id) FROM channel_events
    UNION ALL
    SELECT (SELECT MIN(channel_id) FROM channel_events WHERE channel_id > cid)
    FROM ids WHERE cid IS NOT NULL
)
SELECT e.channel_id, e.state, e.at, e.reason, e.id
FROM ids JOIN channel_events e ON e.id = (
    SELECT id FROM channel_events
    WHERE channel_id = ids.cid AND at <= :since
    ORDER BY at DESC, id DESC LIMIT 1
)
UNION ALL
SELECT channel_id, state, at, reason, id FROM channel_events
WHERE at > :since AND at < :until
ORDER BY 1, 3, 5
"""


def _check_columns() -> None:
    # Fails at import, in every test run, instead of at the first flush in production.
    con = sqlite3.connect(":memory:")
    try:
        con.executescript("".join(_MIGRATIONS))
        tables = {
            table: tuple(row[1] for row in con.execute(f"PRAGMA table_info({table})"))
            for table in ("devices", "channels")
        }
    finally:
        con.close()
    for table, cls, names in (("devices", Device, DEVICE_FIELDS), ("channels", Channel, CHANNEL_FIELDS)):
        if tables[table] != names:
            raise ImportError(
                f"{table} table columns {tables[table]} do not match {cls.__name__} fields {names}; "
                "add a migration to registry/sqlite.py"
            )


_check_columns()


def _device_row(device: Device) -> tuple:
    row = list(device_values(device))
    row[_ONLINE] = int(row[_ONLINE])
    row[_EXTRA] = _json(row[_EXTRA])
    return tuple(row)


def _id_row(key: str) -> tuple:
    return (key,)


def _row_device(row: sqlite3.Row | tuple) -> Device:
    values = list(row)
    values[_ONLINE] = bool(values[_ONLINE])
    values[_EXTRA] = json.loads(values[_EXTRA]) if values[_EXTRA] else {}
    return Device(*values)


def _event_row(event: StatusEvent) -> tuple:
    return (event.device_id, int(event.online), event.at, event.reason)


def _split_events(events: Sequence) -> tuple[list[StatusEvent], list[FaultEvent], list[AlarmEvent],
                                             list[PositionEvent]]:
    """A device batch carries every kind of device history; each has its table."""
    status = [e for e in events if type(e) is StatusEvent]
    if len(status) == len(events):
        return status, [], [], []
    return (status, [e for e in events if type(e) is FaultEvent],
            [e for e in events if type(e) is AlarmEvent],
            [e for e in events if type(e) is PositionEvent])


def _position_row(event: PositionEvent) -> tuple:
    return (event.device_id, event.target_id, event.time, event.longitude, event.latitude,
            event.speed, event.direction, event.altitude, event.received_at)


def _alarm_row(event: AlarmEvent) -> tuple:
    return (event.device_id, event.channel_id, event.priority, event.method, event.alarm_type,
            event.alarm_time, event.description, event.longitude, event.latitude,
            event.received_at, _json(event.info))


def _fault_row(event: FaultEvent) -> tuple:
    return (event.device_id, event.at, event.status, _json(list(event.devices)))


# default=str: one record with an unserialisable value must not fail every flush forever; it
# is stored lossily instead. One encoder for all rows: json.dumps() with options builds a new
# encoder per call.
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode


def _user_row(user: UserRecord) -> tuple:
    return (user.name, user.role, _json(user.scopes), user.password_hash, _json(user.tokens),
            int(user.disabled), user.created_at, user.updated_at)


def _segment_row(seg: RecordSegment) -> tuple:
    return (seg.channel_id, seg.path, seg.start, seg.end, seg.bytes, seg.frames, seg.codec,
            int(seg.gap_before), seg.tier, seg.state, seg.created_at)


def _row_segment(row: Sequence) -> RecordSegment:
    return RecordSegment(channel_id=row[0], path=row[1], start=row[2], end=row[3], bytes=row[4],
                         frames=row[5], codec=row[6], gap_before=bool(row[7]), tier=row[8],
                         state=row[9], created_at=row[10], id=row[11])


def _channel_row(channel: Channel) -> tuple:
    row = list(channel_values(channel))
    row[_TIER_LOCKED] = int(row[_TIER_LOCKED])
    row[_INFO] = _json(row[_INFO])
    row[_RAW] = _json(row[_RAW])
    return tuple(row)


def _row_channel(cursor: sqlite3.Cursor, row: tuple) -> Channel:
    values = list(row)
    values[_TIER_LOCKED] = bool(values[_TIER_LOCKED])
    values[_INFO] = json.loads(values[_INFO]) if values[_INFO] else {}
    values[_RAW] = json.loads(values[_RAW]) if values[_RAW] else {}
    channel = Channel(*values)
    # Every row's strings are new objects; 100k of them repeat a few values.
    channel.share_strings()
    return channel


def _history_event(cursor: sqlite3.Cursor, row: tuple) -> ChannelEvent:
    return ChannelEvent(row[0], row[1], row[2], row[3])


def _channel_event_row(event: ChannelEvent) -> tuple:
    return (event.channel_id, event.state, event.at, event.reason)


#: Batches up to this many rows are turned into rows on the event loop (see _transaction).
_ROWS_INLINE = 2_000


def _as_is(row: object) -> tuple:
    return row  # type: ignore[return-value]


#: Rows per multi-row INSERT: a batch is cut into statements of these sizes, largest first.
#: A few fixed shapes keep SQLite's statement cache small (a statement of 1,024 rows is a
#: program of several hundred kB; one per batch size seen would hold tens of MB) while a group
#: commit of a few hundred rows still takes a handful of statements.
_CHUNKS = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


@functools.lru_cache(maxsize=32)
def _multi_row(sql: str, rows: int) -> str:
    """``sql``, an INSERT with one ``VALUES (?, …)`` group, with that group ``rows`` times."""
    head, _, rest = sql.partition(" VALUES (")
    group, _, tail = rest.partition(")")
    return f"{head} VALUES {', '.join([f'({group})'] * rows)}{tail}"


@functools.lru_cache(maxsize=32)
def _columns(sql: str) -> int:
    """How many values one row of an INSERT's ``VALUES (?, …)`` group binds."""
    return sql.partition(" VALUES (")[2].partition(")")[0].count("?")


def _insert_rows(conn: sqlite3.Connection, sql: str, items: Sequence,
                 to_row: Callable[[Any], tuple]) -> None:
    """Insert ``items`` (made rows by ``to_row``) with a few multi-row statements.

    The sqlite3 module releases the GIL around every call into SQLite (prepare, step,
    reset), and a worker thread that wants it back from a busy event loop waits for it: up
    to ``sys.getswitchinterval()`` each time, plus a context switch for both threads.
    ``executemany`` makes two such calls a row, so under a registration storm a group
    commit of 1,000 rows spent most of its time handing the GIL back and forth (130 ms for
    20 ms of work). Statements of many rows need two calls each. Rows are made a
    statement's worth at a time, so a flush of 100k channels never holds 100k encoded rows.
    """
    if not isinstance(items, (list, tuple)):
        items = list(items)  # sliced below
    total = len(items)
    done = 0
    # A statement binds at most this many values (32766 by default since SQLite 3.32).
    most = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _columns(sql)
    for size in _CHUNKS:
        if size > most and size > 1:
            continue
        while total - done >= size:
            chunk = items[done:done + size]
            rows = chunk if to_row is _as_is else [to_row(item) for item in chunk]
            if size == 1:
                conn.execute(sql, rows[0])
            else:
                conn.execute(_multi_row(sql, size), list(itertools.chain.from_iterable(rows)))
            done += size


def _write_transaction(conn: sqlite3.Connection,
                       steps: Sequence[tuple[str, Sequence, Callable[[object], tuple]]]) -> None:
    """On aiosqlite's worker thread: one transaction, committed or rolled back whole."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, items, to_row in steps:
            if sql.startswith("INSERT"):
                _insert_rows(conn, sql, items, to_row)
            else:
                conn.executemany(sql, items if to_row is _as_is else map(to_row, items))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        # aiosqlite's worker keeps its last call (and so these arguments) until the next one
        # arrives; emptied, they do not hold a big flush's snapshots in memory meanwhile.
        if isinstance(steps, list):
            steps.clear()


class SqliteStore(Store):
    """Registry store in one SQLite file; creates the file and its directories."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        # One connection is shared; two writers interleaving their BEGIN/COMMIT
        # awaits on it would nest transactions, so writes take turns.
        self._write_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    async def open(self) -> None:
        if self._db is not None:
            return
        self._check_file()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the directory for registry database {self.path}: {e}") from e
        try:
            # isolation_level=None: transactions are begun and ended explicitly,
            # so a flush is exactly one transaction and nothing commits behind our back.
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open registry database {self.path}: {e}") from e
        try:
            await self._prepare(db)
        except BaseException as e:
            await db.close()
            if isinstance(e, sqlite3.DatabaseError) and "not a database" in str(e):
                raise self._not_sqlite() from e
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot open registry database {self.path}: {e}") from e
            raise
        self._db = db

    def _check_file(self) -> None:
        # SQLite only notices a foreign file at the first read, with a terse
        # "file is not a database"; checking the header gives a clearer error.
        try:
            with self.path.open("rb") as f:
                header = f.read(len(_SQLITE_MAGIC))
        except (FileNotFoundError, NotADirectoryError):
            return
        except IsADirectoryError:
            raise StoreError(
                f"registry database {self.path} is a directory; point the registry at a file path"
            ) from None
        except OSError as e:
            raise StoreError(f"cannot read registry database {self.path}: {e}") from e
        if header and header != _SQLITE_MAGIC:
            raise self._not_sqlite()

    def _not_sqlite(self) -> StoreError:
        return StoreError(
            f"{self.path} is not a SQLite database; move it aside or point the registry "
            "at a new file, which will be created"
        )

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA journal_mode = WAL") as cur:
            row = await cur.fetchone()
            assert row is not None  # the pragma always answers with the mode now in force
            mode = row[0]
        if mode != "wal":
            log.warning("registry database %s runs in %s journal mode, not WAL", self.path, mode)
        await db.execute("PRAGMA synchronous = NORMAL")
        # An admin tool or backup holding a lock briefly should delay us, not fail a flush.
        await db.execute("PRAGMA busy_timeout = 5000")

        version = await self._schema_version(db)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"registry database {self.path} has schema version {version}, newer than "
                f"version {SCHEMA_VERSION} that this build of gb28181 understands; upgrade "
                "gb28181 or point the registry at another database file"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            log.info("migrating registry database %s to schema version %d", self.path, target)
            script = _MIGRATIONS[target - 1]
            try:
                await db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\n"
                    f"DELETE FROM schema_version;\n"
                    f"INSERT INTO schema_version (version) VALUES ({target});\n"
                    "COMMIT;"
                )
            except BaseException:
                if db.in_transaction:
                    await db.rollback()
                raise

    @staticmethod
    async def _schema_version(db: aiosqlite.Connection) -> int:
        rows = await db.execute_fetchall(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        )
        if not rows:
            return 0
        rows = list(await db.execute_fetchall("SELECT MAX(version) FROM schema_version"))
        return rows[0][0] or 0

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            async with self._write_lock:
                await db.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"registry database {self.path} is not open; call open() first")
        return self._db

    async def load_devices(self) -> list[Device]:
        db = self._conn()
        try:
            rows = await db.execute_fetchall(_SELECT_DEVICES)
        except sqlite3.Error as e:
            raise StoreError(f"cannot read devices from {self.path}: {e}") from e
        return [_row_device(row) for row in rows]

    async def save_devices(self, devices: Sequence[Device]) -> None:
        await self.write_batch(devices, (), ())

    async def delete_devices(self, ids: Sequence[str]) -> None:
        await self.write_batch((), ids, ())

    async def add_status_events(self, events: Sequence[StatusEvent]) -> None:
        await self.write_batch((), (), events)

    async def write_batch(
        self,
        devices: Sequence[Device],
        deleted_ids: Sequence[str],
        events: Sequence[StatusEvent | FaultEvent | AlarmEvent | PositionEvent],
    ) -> None:
        await self.write_all([StoreBatch("devices", devices, deleted_ids, events)])

    async def write_channel_batch(
        self,
        channels: Sequence[Channel],
        deleted_ids: Sequence[str],
        events: Sequence[ChannelEvent],
    ) -> None:
        await self._transaction(
            (_DELETE_CHANNEL, deleted_ids, _id_row),
            (_UPSERT_CHANNEL, channels, _channel_row),
            (_INSERT_CHANNEL_EVENT, events, _channel_event_row),
        )

    def snapshots_needed(self, records: int) -> bool:
        # Small batches become rows on the loop, at once (see _transaction).
        return records > _ROWS_INLINE

    async def write_all(self, batches: Sequence[StoreBatch]) -> None:
        steps: list[tuple[str, Sequence, Callable[[Any], tuple]]] = []
        for batch in batches:
            if batch.kind == "devices":
                status, faults, alarms, positions = _split_events(batch.events)
                steps += [(_DELETE_DEVICE, batch.deleted_ids, _id_row),
                          (_UPSERT_DEVICE, batch.records, _device_row),
                          (_INSERT_EVENT, status, _event_row),
                          (_INSERT_FAULT, faults, _fault_row),
                          (_INSERT_ALARM, alarms, _alarm_row),
                          (_INSERT_POSITION, positions, _position_row)]
            elif batch.kind == "channels":
                steps += [(_DELETE_CHANNEL, batch.deleted_ids, _id_row),
                          (_UPSERT_CHANNEL, batch.records, _channel_row),
                          (_INSERT_CHANNEL_EVENT, batch.events, _channel_event_row)]
            else:
                raise StoreError(f"SqliteStore cannot store {batch.kind!r}")
        # Records handed over without snapshots (snapshots_needed said no) must become rows now.
        inline = not self.snapshots_needed(sum(len(batch.records) for batch in batches))
        await self._transaction(*steps, inline=inline)

    async def _transaction(self, *steps: tuple[str, Sequence, Callable[[Any], tuple]],
                           inline: bool | None = None) -> None:
        """Write each (sql, items, to_row), all in one transaction: INSERTs as multi-row
        statements (``_insert_rows``), DELETEs with ``executemany``.

        The whole transaction is one call on aiosqlite's worker thread (``_execute``, stable
        in the pinned aiosqlite release): issued statement by statement, each would be a
        round trip between the threads, and a registrar commits hundreds of times a second.
        Rows of a large batch are built on that thread too, which keeps JSON encoding off the
        event loop; a small one (``inline``) becomes rows here, before anything is awaited.
        """
        steps = tuple(step for step in steps if step[1])
        if not steps:
            return
        if inline if inline is not None else sum(len(items) for _, items, _ in steps) <= _ROWS_INLINE:
            # A small batch (a group commit of registrations): rows built here, so that the
            # worker thread runs SQLite only, which releases the GIL, instead of Python code
            # that the event loop would have to wait for.
            steps = tuple((sql, list(map(to_row, items)), _as_is) for sql, items, to_row in steps)
        db = self._conn()
        async with self._write_lock:
            try:
                await db._execute(_write_transaction, db._conn, list(steps))
            except sqlite3.Error as e:
                raise StoreError(f"cannot write to registry database {self.path}: {e}") from e
            # Cancelled meanwhile, the thread still finishes the transaction (commit or
            # rollback), and the next one queues behind it: nothing is left open.

    async def status_events(
        self,
        device_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[StatusEvent]:
        rows = await self._events(
            "SELECT device_id, online, at, reason FROM status_events",
            "device_id", device_id, since, until, limit, newest_first, "status events",
        )
        return [StatusEvent(d, bool(o), at, reason) for d, o, at, reason in rows]

    async def fault_events(
        self,
        device_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[FaultEvent]:
        rows = await self._events(
            "SELECT device_id, at, status, devices FROM device_faults",
            "device_id", device_id, since, until, limit, newest_first, "device faults",
        )
        return [FaultEvent(d, at, status, tuple(json.loads(devices) if devices else ()))
                for d, at, status, devices in rows]

    async def alarm_events(
        self,
        device_id: str | None = None,
        since: float | None = None,
        priorities: tuple[int, int] | None = None,
        limit: int = 1000,
    ) -> list[AlarmEvent]:
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        where: list[str] = []
        params: list[object] = []
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        if priorities is not None:
            where.append("priority BETWEEN ? AND ?")
            params += priorities
        sql = f"SELECT {_ALARM_COLUMNS} FROM alarms"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at DESC, id DESC LIMIT ?"
        params.append(limit)
        try:
            rows = await self._conn().execute_fetchall(sql, params)
        except sqlite3.Error as e:
            raise StoreError(f"cannot read alarms from {self.path}: {e}") from e
        return [AlarmEvent(device_id=d, channel_id=c, priority=p, method=m, alarm_type=t,
                           alarm_time=when, description=text, longitude=lon, latitude=lat,
                           received_at=at, info=json.loads(info) if info else {})
                for d, c, p, m, t, when, text, lon, lat, at, info in rows]

    async def position_events(
        self,
        device_id: str,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[PositionEvent]:
        rows = await self._events(
            f"SELECT {_POSITION_COLUMNS} FROM positions",
            "device_id", device_id, since, until, limit, False, "positions",
        )
        return [PositionEvent(*row) for row in rows]

    async def prune_positions(self, before: float) -> int:
        # A chunk per statement (each its own transaction), the write lock released in
        # between, so flushes go on while a long backlog is pruned.
        db = self._conn()
        total = 0
        while True:
            async with self._write_lock:
                try:
                    cursor = await db.execute(
                        "DELETE FROM positions WHERE id IN (SELECT id FROM positions "
                        "WHERE at < ? ORDER BY at LIMIT ?)", (before, _PRUNE_CHUNK))
                except sqlite3.Error as e:
                    raise StoreError(f"cannot prune positions in {self.path}: {e}") from e
                deleted = cursor.rowcount
                await cursor.close()
            total += deleted
            if deleted < _PRUNE_CHUNK:
                return total

    async def channel_events(
        self,
        channel_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[ChannelEvent]:
        rows = await self._events(
            "SELECT channel_id, state, at, reason FROM channel_events",
            "channel_id", channel_id, since, until, limit, newest_first, "channel events",
        )
        return [ChannelEvent(*row) for row in rows]

    async def _events(
        self,
        select: str,
        key_column: str,
        key: str | None,
        since: float | None,
        until: float | None,
        limit: int,
        newest_first: bool,
        what: str,
    ) -> Iterable:
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        where: list[str] = []
        params: list[object] = []
        if key is not None:
            where.append(f"{key_column} = ?")
            params.append(key)
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        if until is not None:
            where.append("at < ?")
            params.append(until)
        sql = select
        if where:
            sql += " WHERE " + " AND ".join(where)
        # id breaks ties so events stamped with the same time keep their order.
        sql += " ORDER BY at DESC, id DESC LIMIT ?" if newest_first else " ORDER BY at, id LIMIT ?"
        params.append(limit)
        try:
            return await self._conn().execute_fetchall(sql, params)
        except sqlite3.Error as e:
            raise StoreError(f"cannot read {what} from {self.path}: {e}") from e

    async def load_users(self) -> list[UserRecord]:
        try:
            rows = await self._conn().execute_fetchall(f"SELECT {_USER_COLUMNS} FROM users")
        except sqlite3.Error as e:
            raise StoreError(f"cannot read users from {self.path}: {e}") from e
        return [UserRecord(name=name, role=role, scopes=json.loads(scopes or "{}"),
                           password_hash=password_hash, tokens=json.loads(tokens or "[]"),
                           disabled=bool(disabled), created_at=created_at, updated_at=updated_at)
                for name, role, scopes, password_hash, tokens, disabled, created_at, updated_at in rows]

    async def save_user(self, user: UserRecord) -> None:
        await self._transaction((_UPSERT_USER, [user], _user_row))

    async def delete_user(self, name: str) -> None:
        await self._transaction((_DELETE_USER, [name], _id_row))

    async def load_channels(self) -> list[Channel]:
        channels: list[Channel] = []
        try:
            async with self._conn().execute(_SELECT_CHANNELS) as cursor:
                # Rows become channels on aiosqlite's worker thread, a chunk at
                # a time, so 100k rows of JSON text never sit in memory at once
                # (that peak stays in RSS after it is freed).
                # aiosqlite types row_factory as a class; sqlite3 takes any callable.
                cursor.row_factory = _row_channel  # type: ignore[assignment]
                while chunk := await cursor.fetchmany(_LOAD_CHUNK):
                    channels.extend(cast("Iterable[Channel]", chunk))
        except sqlite3.Error as e:
            raise StoreError(f"cannot read channels from {self.path}: {e}") from e
        return channels

    async def channel_history(self, since: float, until: float) -> list[ChannelEvent]:
        try:
            async with self._conn().execute(_CHANNEL_HISTORY, {"since": since, "until": until}) as cursor:
                # Events are built on aiosqlite's worker thread: a 100k-channel
                # history is ~250k objects, ~0.5 s the event loop need not wait out.
                cursor.row_factory = _history_event  # type: ignore[assignment]  # as in load_channels
                return list(cast("Iterable[ChannelEvent]", await cursor.fetchall()))
        except sqlite3.Error as e:
            raise StoreError(f"cannot read channel history from {self.path}: {e}") from e

    # -- platform recordings (gb28181/record_index.py) --------------------------------------------

    async def save_segments(self, segments: Sequence[RecordSegment]) -> None:
        # One row per path: a multi-row upsert may not touch the same row twice.
        unique = list({seg.path: seg for seg in segments}.values())
        await self._transaction((_UPSERT_SEGMENT, unique, _segment_row))

    async def delete_segments(self, paths: Sequence[str]) -> None:
        await self._transaction((_DELETE_SEGMENT, list(paths), _id_row))

    async def segments(self, channel_id: str | None = None, start: float | None = None,
                       end: float | None = None, *, tier: int | None = None,
                       offset: int = 0, limit: int = 1000,
                       count: bool = True) -> tuple[int, list[RecordSegment]]:
        where: list[str] = []
        params: list[object] = []
        if channel_id is not None:
            where.append("channel_id = ?")
            params.append(channel_id)
        if tier is not None:
            where.append("tier = ?")
            params.append(tier)
        if start is not None:  # overlapping [start, end): ends after start ...
            where.append("end > ?")
            params.append(start)
        if end is not None:  # ... and starts before end
            where.append("start < ?")
            params.append(end)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        db = self._conn()
        try:
            rows = await db.execute_fetchall(f"{_SELECT_SEGMENTS}{clause} ORDER BY start, id LIMIT ? OFFSET ?",
                                             [*params, limit, offset])
            page = [_row_segment(row) for row in rows]
            if not count:
                return len(page), page
            total = (await db.execute_fetchall(f"SELECT COUNT(*) FROM record_segments{clause}", params))
        except sqlite3.Error as e:
            raise StoreError(f"cannot read record segments from {self.path}: {e}") from e
        return list(total)[0][0], page

    async def segment_paths(self) -> dict[str, str]:
        try:
            rows = await self._conn().execute_fetchall("SELECT path, state FROM record_segments")
        except sqlite3.Error as e:
            raise StoreError(f"cannot read record segments from {self.path}: {e}") from e
        return {path: state for path, state in rows}

    async def segment_summary(self, since: float, until: float) -> list[tuple]:
        try:
            rows = await self._conn().execute_fetchall(_SEGMENT_SUMMARY, {"since": since, "until": until})
        except sqlite3.Error as e:
            raise StoreError(f"cannot summarise record segments in {self.path}: {e}") from e
        return [tuple(row) for row in rows]

    async def load_record_plans(self) -> dict[str, str]:
        try:
            rows = await self._conn().execute_fetchall("SELECT channel_id, mode FROM record_plans")
        except sqlite3.Error as e:
            raise StoreError(f"cannot read recording plans from {self.path}: {e}") from e
        return {cid: mode for cid, mode in rows}

    async def save_record_plan(self, channel_id: str, mode: str | None, at: float) -> None:
        if mode is None:
            await self._transaction((_DELETE_PLAN, [channel_id], _id_row))
        else:
            await self._transaction((_UPSERT_PLAN, [(channel_id, mode, at)], _as_is))
