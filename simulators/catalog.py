"""What a simulated device says about itself: DeviceInfo and Catalog items (A.2.1g, Annex O).

Everything is derived from the device ID so that runs are reproducible (``random.Random``
seeded with the device or channel ID, never Python's salted ``hash``):

- civil codes (6 or 8 digits) come from the ID's centre code (Annex D.1 digits 1–8), spread
  over a few districts per NVR;
- names are Chinese road intersections ("长江路与黄山路交叉口 01"), addresses street numbers;
- coordinates scatter around a city centre, except for a ``missing_location_ratio`` share of
  channels chosen by a hash of the channel ID (:func:`location_missing`), which carry no
  Longitude/Latitude at all, as incompletely archived cameras do;
- with ``groups`` the catalog also holds one business group (215) and a few virtual
  organisations (216), and each camera's ParentID is ``<device ID>/<VO ID>`` (Annex O), so a
  platform can build a tree;
- with ``malformed`` every 7th channel (numbers 3, 10, 17, ...) gets a bare ``&`` in its
  name and every 7th (5, 12, 19, ...) a ``<`` in its address; ``Channel.name`` and
  ``Channel.address`` hold the text as meant, the vendor layer (``vendors.py``) decides
  whether it reaches the wire escaped;
- the IDs a device derives (cameras, groups, alarm inputs) keep its centre, industry and
  network digits and take their serials from a block reserved for the device
  (:class:`IdBlocks`), so that no two devices of a fleet share one.

The fleet (``fleet.py``) owns one :class:`DeviceCatalog` per device and turns its items into
MANSCDP with :func:`catalog_item` / :func:`group_item`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from gb28181 import manscdp

__all__ = [
    "CHANNEL_STATUSES",
    "Channel",
    "DeviceCatalog",
    "Group",
    "IdBlocks",
    "catalog_item",
    "device_info_fields",
    "group_item",
    "location_missing",
    "make_channels",
    "presets",
]

#: Channel states a catalog NOTIFY can report (P.4.1 / A.2.5c Event values besides ADD/DEL/UPDATE).
CHANNEL_STATUSES = ("ON", "OFF", "VLOST", "DEFECT")

_ROADS = ("长江路", "黄山路", "金寨路", "望江路", "徽州大道", "马鞍山路", "宿州路", "淮河路",
          "潜山路", "繁华大道", "包河大道", "芜湖路", "休宁路", "太湖路", "银屏路", "九华山路",
          "北京路", "中山路", "人民路", "解放路", "和平路", "建设路", "文化路", "胜利路",
          "新华路", "青年路", "赭山路", "银湖路", "鸠江大道", "弋江路")
_VIEWS = ("东向西", "西向东", "南向北", "北向南", "全景", "出口", "入口")
_VO_NAMES = ("城东片区", "城西片区", "城南片区", "城北片区", "开发区片区")
# District (county) digits 5–6 of real GB/T 2260 codes are small numbers; these are picked
# when the device's own centre code leaves the district open (digits 5–6 = 00).
_DISTRICTS = ("02", "03", "04", "07", "11", "21", "22", "23", "25")
_RESOLUTIONS = ("6/4/2", "6/4", "5/3", "6/5/4/2")  # A.2.1g f= resolution codes, joined by '/'


@dataclass(slots=True)
class Channel:
    """One video channel (camera, type 131) of a simulated device, as its catalog item says."""

    channel_id: str
    name: str
    parent_id: str
    civil_code: str
    longitude: float | None
    latitude: float | None
    ptz_type: int
    status: str = "ON"
    number: int = 1
    block: str = ""
    address: str = ""
    ip_address: str = ""
    port: int = 0
    position_type: int = 1
    room_type: int = 1
    use_type: int = 1
    supply_light_type: int = 1
    direction_type: int = 1
    resolution: str = "6/4"
    download_speed: str = "1/2/4/8"
    business_group_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def online(self) -> bool:
        return self.status == "ON"


@dataclass(slots=True)
class Group:
    """A business group (type 215) or virtual organisation (type 216) item (Annex O)."""

    group_id: str
    name: str
    parent_id: str
    business_group_id: str | None = None

    @property
    def kind(self) -> str:
        return "business-group" if self.group_id[10:13] == "215" else "virtual-organisation"


#: Digits 15–20 of an ID are its serial (GB/T 28181-2016 Annex D.1): a million per prefix.
_SERIALS = 1_000_000
#: Virtual organisations of a device: numbers 1–3 (one per district) and 4 (the nested one).
_ORGANISATIONS = 4
#: The usual blocks: the IDs the simulator has always given, kept whenever a fleet fits them.
_USUAL_CHANNELS, _USUAL_ORGANISATIONS, _USUAL_ALARM_INPUTS = 1000, 100, 10


@dataclass(frozen=True, slots=True)
class IdBlocks:
    """How many serials each device reserves for each type of ID it derives.

    A fleet's devices have consecutive serials under one prefix (GB/T 28181-2016 Annex D.1:
    centre, industry, type, network digits). The IDs a device derives keep its centre,
    industry and network digits, so a derived type has a million serials for the whole fleet.
    Device serial ``s`` owns serials ``s·B + 1`` … ``s·B + B`` of each type, with B the block
    of that type, so with the usual B = 1000 channel 5 of device 000123 has serial 123005.
    Blocks never overlap, and a fleet is refused when the IDs of its last device would not fit
    in 6 digits. A business group (215) takes its device's own serial and needs no block.
    """

    #: Cameras (type 131): numbers 1 … B per device, room for channels added later.
    channels: int = _USUAL_CHANNELS
    #: Virtual organisations (type 216): see ``_ORGANISATIONS``.
    organisations: int = _USUAL_ORGANISATIONS
    #: Alarm inputs (type 134) reported by DeviceStatus: 1 and 2.
    alarm_inputs: int = _USUAL_ALARM_INPUTS

    @classmethod
    def plan(cls, first_serial: int, devices: int, channels: int, *, groups: bool) -> IdBlocks:
        """Blocks for ``devices`` consecutive serials from ``first_serial``, each with
        ``channels`` cameras (and, with ``groups``, virtual organisations); ValueError naming
        the limit and the fix when they cannot fit.

        Each block keeps its usual size when the fleet fits it, else becomes the largest power
        of ten that fits (IDs still read as device serial then number), else the largest size
        that fits. Same arguments, same blocks: nothing here is random.
        """
        last = first_serial + max(devices, 1) - 1
        return cls(
            channels=_block(first_serial, last, channels, _USUAL_CHANNELS,
                            "cameras (type 131)", "fewer devices or channels per device"),
            organisations=_block(first_serial, last, _ORGANISATIONS, _USUAL_ORGANISATIONS,
                                 "virtual organisations (type 216)", "fewer devices, no groups")
            if groups else _USUAL_ORGANISATIONS,
            alarm_inputs=_block(first_serial, last, 2, _USUAL_ALARM_INPUTS,
                                "alarm inputs (type 134)", "fewer devices"))


def _block(first: int, last: int, count: int, usual: int, what: str, fewer: str) -> int:
    """The block that gives each device serial ``first``…``last`` ``count`` IDs of one type."""
    # The largest B with last·B + count < _SERIALS: the last device's IDs still have 6 digits.
    fits = (_SERIALS - 1 - count) // last if last else _SERIALS
    if count <= usual <= fits:
        return usual
    power = 10 ** (len(str(fits)) - 1) if fits > 0 else 0
    for size in (power, fits):
        if count <= size:
            return size
    most = (_SERIALS - 1) // count - first  # devices that fit from this serial (B = count)
    room = f"at most {most} devices from that serial" if most > 0 else "none from that serial"
    raise ValueError(
        f"{last - first + 1} devices from serial {first:06d} with {count} {what} each do not fit "
        f"the 6-digit serial of GB/T 28181-2016 Annex D: {room}; use {fewer}, or a --first-id "
        "with a smaller serial")


def location_missing(channel_id: str, ratio: float) -> bool:
    """Whether ``channel_id`` is one of the ``ratio`` share of channels without coordinates.

    A stable hash of the ID, so a test can tell which channels lack a location without
    asking the simulator.
    """
    if ratio <= 0:
        return False
    digest = hashlib.blake2b(channel_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < ratio


def _civil_codes(device_id: str, rnd: random.Random) -> list[str]:
    """The 6-digit district codes one device's channels spread over."""
    province, city, district = device_id[:2], device_id[2:4], device_id[4:6]
    if city == "00":
        city = "01"
    if district != "00":
        return [province + city + district]
    return [province + city + d for d in sorted(rnd.sample(_DISTRICTS, 3))]


class DeviceCatalog:
    """The catalog of one device: group items (optional) and channels, mutable by tests."""

    def __init__(self, device_id: str, channels: int, *, is_nvr: bool, groups: bool = False,
                 missing_location_ratio: float = 0.0, malformed: bool = False,
                 blocks: IdBlocks | None = None) -> None:
        self.device_id = device_id
        self.is_nvr = is_nvr
        self.missing_location_ratio = missing_location_ratio
        self.malformed = malformed
        rnd = random.Random(device_id)
        self.districts = _civil_codes(device_id, rnd)
        self.base = (118.3 + rnd.random() * 0.2, 31.3 + rnd.random() * 0.2)
        self.serial = int(device_id[14:])
        count = max(1, channels) if is_nvr else 1
        #: The fleet's blocks (``Fleet`` passes them); alone, a device is a fleet of one.
        self.blocks = blocks if blocks is not None else IdBlocks.plan(self.serial, 1, count,
                                                                      groups=groups)
        #: The alarm inputs a DeviceStatus response lists under Alarmstatus.
        self.alarm_inputs = [self._derived_id("134", k, self.blocks.alarm_inputs) for k in (1, 2)]
        self.groups: list[Group] = []
        self._vo_of_district: list[str] = []
        self._nested_vo: str | None = None
        self.business_group_id: str | None = None
        if groups:
            self._make_groups()
        self.channels: list[Channel] = []
        self._next = 1
        for _ in range(count):
            self.new_channel()

    def _derived_id(self, type_code: str, number: int, block: int) -> str:
        """ID ``number`` of a type in this device's block (IdBlocks); the device's centre,
        industry and network digits (Annex D.1) with ``type_code`` in digits 11–13."""
        d = self.device_id
        return f"{d[:10]}{type_code}{d[13]}{self.serial * block + number:06d}"

    def _make_groups(self) -> None:
        d = self.device_id
        self.business_group_id = f"{d[:10]}215{d[13]}{d[14:]}"
        # Annex O: a business group's ParentID is the system ID; the NVR is that system here.
        self.groups.append(Group(self.business_group_id, f"视频监控{self.serial:03d}业务分组", d))
        block = self.blocks.organisations
        for k, _ in enumerate(self.districts):
            vo = self._derived_id("216", k + 1, block)
            self.groups.append(Group(vo, _VO_NAMES[k % len(_VO_NAMES)], self.business_group_id,
                                     self.business_group_id))
            self._vo_of_district.append(vo)
        # One nested organisation shows the optional "ParentID = parent VO" form.
        nested = self._derived_id("216", _ORGANISATIONS, block)
        self.groups.append(Group(nested, "重点路口", self._vo_of_district[0], self.business_group_id))
        self._nested_vo = nested

    # -- channels ----------------------------------------------------------------------------
    def new_channel(self) -> Channel:
        """Create the next channel (number and ID one past the highest so far) and add it.

        ValueError when the device's block of camera IDs is used up (see IdBlocks).
        """
        n = self._next
        block = self.blocks.channels
        if n > block or self.serial * block + n >= _SERIALS:
            raise ValueError(f"device {self.device_id} has no camera ID left for channel {n} "
                             f"(a block of {block} from serial {self.serial * block + 1:06d})")
        self._next += 1
        ch = self._make_channel(n)
        self.channels.append(ch)
        return ch

    def _make_channel(self, n: int) -> Channel:
        cid = self._derived_id("131", n, self.blocks.channels)
        rnd = random.Random(cid)
        a, b = rnd.sample(_ROADS, 2)
        k = rnd.randrange(len(self.districts))
        civil = self.districts[k]
        if rnd.random() < 0.25:  # grassroots unit: an 8-digit civil code
            civil += f"{rnd.randint(1, 9):02d}"
        if self.malformed and n % 7 == 3:
            name = f"{a[:-1]}&{b}口 {n:02d}"  # e.g. 长江&黄山路口 03: a bare & on the wire
        elif rnd.random() < 0.7:
            name = f"{a}与{b}交叉口 {n:02d}"
        else:
            name = f"{a}{rnd.randint(1, 300)}号{rnd.choice(_VIEWS)} {n:02d}"
        number = rnd.randint(1, 300)
        if self.malformed and n % 7 == 5:
            address = f"{a}{number}<{number + 1}号"  # e.g. 长江路3<4号: a raw < inside <Address>
        else:
            address = f"{a}{number}号"
        lon: float | None = round(self.base[0] + k * 0.03 + rnd.uniform(-0.01, 0.01), 6)
        lat: float | None = round(self.base[1] + k * 0.02 + rnd.uniform(-0.01, 0.01), 6)
        if location_missing(cid, self.missing_location_ratio):
            lon = lat = None
        parent = self.device_id
        if self._vo_of_district:
            vo = self._vo_of_district[k]
            if k == 0 and n % 2 == 0 and self._nested_vo:
                vo = self._nested_vo
            parent = f"{self.device_id}/{vo}"
        return Channel(
            channel_id=cid, name=name, parent_id=parent, civil_code=civil,
            longitude=lon, latitude=lat, ptz_type=rnd.choice((1, 2, 3, 3, 3, 4)), number=n,
            block=f"{civil[:6]}{k + 1:02d}", address=address,
            ip_address=f"192.168.{1 + n // 250}.{10 + n % 250}",
            position_type=rnd.randint(1, 10), room_type=rnd.choice((1, 1, 1, 2)),
            use_type=rnd.choice((1, 1, 2, 3)), supply_light_type=rnd.choice((1, 2, 2, 3)),
            direction_type=rnd.randint(1, 8), resolution=rnd.choice(_RESOLUTIONS),
            business_group_id=self.business_group_id)

    def get(self, channel_id: str) -> Channel | None:
        for ch in self.channels:
            if ch.channel_id == channel_id:
                return ch
        return None

    def remove(self, channel_id: str) -> Channel | None:
        ch = self.get(channel_id)
        if ch is not None:
            self.channels.remove(ch)
        return ch

    def items(self) -> list[Group | Channel]:
        """Everything a Catalog response lists: groups first (parents before children), then cameras."""
        return [*self.groups, *self.channels]


def make_channels(device_id: str, count: int, *, manufacturer: str = "Simulator",
                  is_nvr: bool) -> list[Channel]:
    """Channels of a device: an IPC has one (type 131), an NVR ``count`` of them."""
    channels = DeviceCatalog(device_id, count, is_nvr=is_nvr).channels
    for ch in channels:
        ch.extra["manufacturer"] = manufacturer
    return channels


def device_info_fields(*, name: str, manufacturer: str, model: str, firmware: str,
                       channels: int) -> list[tuple[str, Any]]:
    return [("DeviceName", name), ("Result", "OK"), ("Manufacturer", manufacturer),
            ("Model", model), ("Firmware", firmware), ("Channel", channels)]


def catalog_item(ch: Channel, *, model: str, manufacturer: str | None = None, owner: str = "Owner",
                 port: int = 8000, stream_num: int | None = None,
                 event: str | None = None) -> manscdp.Node:
    """A camera's ``<Item>`` in A.2.1g order; ``event`` appends ``<Event>`` (NOTIFY ADD/UPDATE).

    ``stream_num`` adds Dahua's extra ``<StreamNum>`` before ``<Status>`` (DH-CAP).
    Status is ON or OFF (A.2.1g); VLOST and DEFECT channels are listed as OFF, as WVP reads them.
    """
    info: list[tuple[str, Any]] = [
        ("PTZType", ch.ptz_type), ("PositionType", ch.position_type), ("RoomType", ch.room_type),
        ("UseType", ch.use_type), ("SupplyLightType", ch.supply_light_type),
        ("DirectionType", ch.direction_type), ("Resolution", ch.resolution),
        ("BusinessGroupID", ch.business_group_id), ("DownloadSpeed", ch.download_speed),
    ]
    fields: list[tuple[str, Any]] = [
        ("DeviceID", ch.channel_id), ("Name", ch.name),
        ("Manufacturer", manufacturer or ch.extra.get("manufacturer", "Simulator")),
        ("Model", model), ("Owner", owner), ("CivilCode", ch.civil_code), ("Block", ch.block),
        ("Address", ch.address), ("Parental", 0), ("ParentID", ch.parent_id), ("SafetyWay", 0),
        ("RegisterWay", 1), ("Secrecy", 0), ("IPAddress", ch.ip_address),
        ("Port", ch.port or port), ("StreamNum", stream_num),
        ("Status", "ON" if ch.online else "OFF"),
        ("Longitude", ch.longitude), ("Latitude", ch.latitude),
        ("Info", info), ("Event", event),
    ]
    return manscdp.Node({}, fields)


def group_item(g: Group, *, event: str | None = None) -> manscdp.Node:
    """A 215/216 item as Annex O shows it: DeviceID, Name, ParentID[, BusinessGroupID]."""
    return manscdp.Node({}, [("DeviceID", g.group_id), ("Name", g.name), ("ParentID", g.parent_id),
                             ("BusinessGroupID", g.business_group_id), ("Event", event)])


def presets(channel_id: str) -> list[tuple[int, str]]:
    """A few presets of a camera (PresetQuery, A.2.6): (PresetID, PresetName), stable per ID."""
    rnd = random.Random(f"presets/{channel_id}")
    ids = sorted(rnd.sample(range(1, 256), rnd.randint(2, 5)))
    return [(1, "初始位置")] + [(p, f"预置点{p}") for p in ids if p != 1]
