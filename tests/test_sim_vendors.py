"""Vendor personalities on the wire (PROTOCOL.md §9): what a Hikvision or Dahua device, or
broken firmware, really sends, checked on the raw bytes the fleet put on the socket."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from gb28181 import manscdp
from gb28181.sip.message import SipRequest, SipResponse, parse_message, parse_name_addr, parse_uri
from simulators.catalog import DeviceCatalog, catalog_item
from simulators.fleet import MAX_PART_BYTES, FleetConfig
from simulators.probe import Probe, start_fleet
from simulators.vendors import pad_content_length, personality

NVR = "34020000001180000001"
IPC = "34020000001320000001"
CL = re.compile(rb"\r\nContent-Length:( +)(\d+)\r\n\r\n")


@pytest_asyncio.fixture
async def probe():
    p = await Probe(answer_delay=0.001).start()
    yield p
    await p.close()


@pytest_asyncio.fixture
async def wire(probe):
    """``await wire(**cfg)`` → (fleet, raw): a started fleet and every datagram it sent."""
    started = []

    async def start(**kw):
        raw: list[bytes] = []
        fleet = await start_fleet(probe, taps=[raw.append], **kw)
        started.append(fleet)
        return fleet, raw

    yield start
    for fleet in started:
        await fleet.stop()


def strict(body: bytes) -> ET.Element:
    """A plain XML parser with no repair (expat cannot take a GB2312 declaration: drop it)."""
    return ET.fromstring(re.sub(r"^<\?xml[^>]*\?>", "", body.decode("gb18030")))


def parsed(raw: list[bytes]) -> list[SipRequest | SipResponse]:
    return [parse_message(data) for data in raw]


def header_names(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    return [line.split(":", 1)[0] for line in head.split("\r\n")[1:]]


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def requests(raw: list[bytes], method: str) -> list[bytes]:
    return [d for d in raw if d.startswith(method.encode() + b" ")]


def keepalive_of(raw: list[bytes]) -> bytes:
    return next(body_of(d) for d in requests(raw, "MESSAGE") if b"<CmdType>Keepalive" in d)


@pytest.mark.parametrize("vendor", ["generic", "hikvision", "dahua"])
async def test_500_channels_per_vendor_arrive_complete_and_serially(probe, wire, vendor):
    fleet, _ = await wire(channels=500, vendor=vendor, catalog_items_per_message=7)
    parts = await probe.catalog(NVR, timeout=20)
    ordered = sorted(parts, key=lambda p: p.at)
    for prev, nxt in zip(ordered, ordered[1:]):
        assert nxt.at >= prev.answered_at
    assert {p.body.sn for p in parts} == {parts[0].body.sn}
    assert {p.body.text("SumNum") for p in parts} == {"500"}
    sizes = [len(p.body.items()) for p in ordered]
    assert all(int(p.body.element.find("DeviceList").get("Num")) == len(p.body.items()) for p in parts)
    if vendor == "generic":
        assert sizes == [7] * 71 + [3]
    elif vendor == "hikvision":
        assert sizes == [2] * 250
    else:  # "all in one", as far as one datagram carries
        assert all(len(p.request.body) <= MAX_PART_BYTES["udp"] for p in parts)
        assert all(len(p.request.body) > MAX_PART_BYTES["udp"] * 0.75 for p in ordered[:-1])
        assert len(parts) < 12
    ids = [i["DeviceID"] for p in parts for i in p.body.items()]
    assert len(ids) == 500 and set(ids) == {ch.channel_id for ch in fleet.devices[NVR].channels}


@pytest.mark.parametrize("vendor", ["generic", "hikvision", "dahua"])
async def test_malformed_bodies_are_broken_on_the_wire_and_repaired_by_the_codec(probe, wire, vendor):
    fleet, _ = await wire(channels=30, vendor=vendor, malformed=True, catalog_items_per_message=5)
    parts = await probe.catalog(NVR)
    channels = {ch.channel_id: ch for ch in fleet.devices[NVR].channels}
    amp = [ch for ch in channels.values() if "&" in ch.name]
    lt = [ch for ch in channels.values() if "<" in ch.address]
    assert len(amp) >= 4 and len(lt) >= 4
    broken = 0
    for part in parts:
        body = part.request.body
        assert part.body is not None and not part.error, part.error
        if re.search(rb"&(?!amp;|lt;|gt;|quot;|apos;|#)", body) or re.search(rb"<Address>[^<\n]*<\d", body):
            broken += 1
            with pytest.raises(ET.ParseError):
                strict(body)  # a plain parser chokes, as on the real devices
        else:
            strict(body)
    assert broken >= min(4, len(parts))  # Dahua: one message holds them all
    items = {i["DeviceID"]: i for p in parts for i in p.body.items()}
    for ch in amp:
        assert items[ch.channel_id]["Name"] == ch.name and "&" in ch.name
    for ch in lt:
        assert items[ch.channel_id]["Address"] == ch.address and "<" in ch.address
    assert all(items[cid]["Name"] == ch.name for cid, ch in channels.items())


async def test_without_malformed_names_need_no_repair(probe, wire):
    fleet, _ = await wire(channels=30)
    for part in await probe.catalog(NVR):
        strict(part.request.body)
    assert not any("&" in ch.name or "<" in ch.address for ch in fleet.devices[NVR].channels)


async def test_hikvision_nvr_on_the_wire(probe, wire):
    fleet, raw = await wire(channels=6, vendor="hikvision", keepalive_interval=0.2)
    parts = await probe.catalog(NVR)
    await probe.wait_for(lambda: any(b"Keepalive" in d for d in raw), 3, "a keepalive")
    host = f"{probe.domain}.spvmn.cn"
    for msg in parsed(raw):
        if isinstance(msg, SipRequest):
            assert msg.get("user-agent") == "Embedded Net DVR/NVR/DVS"
            assert parse_uri(parse_name_addr(msg.headers["from"][0]).uri).host == host
            assert parse_uri(msg.uri).host == host
    register = parse_message(requests(raw, "REGISTER")[0])
    assert register.uri == f"sip:{probe.server_id}@{host}"
    assert parse_name_addr(register.headers["to"][0]).uri == f"sip:{NVR}@{host}"
    assert header_names(requests(raw, "REGISTER")[0])[:5] == ["Via", "From", "To", "Call-ID", "CSeq"]
    # The NVR sends its Catalog Response to itself: From = To = NVR ID (SRS-CAP).
    for part in parts:
        req = part.request
        assert parse_name_addr(req.headers["from"][0]).uri == f"sip:{NVR}@{host}"
        assert parse_name_addr(req.headers["to"][0]).uri == f"sip:{NVR}@{host}"
        assert req.body.startswith(b'<?xml version="1.0" encoding="gb2312"?>\n<Response>\n')
        assert b"\r" not in req.body
        assert len(part.body.items()) == 2
    keepalive = keepalive_of(raw)
    assert keepalive.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<Notify>\n')
    assert b"<Info>\n</Info>\n" in keepalive and b"\r" not in keepalive
    padded = 0
    for data in raw:
        m = CL.search(data)
        assert m is not None and int(m.group(2)) == len(body_of(data))
        if int(m.group(2)):
            assert len(m.group(1)) - 1 + len(m.group(2)) == 5  # "Content-Length:   175"
            padded += 1
        else:
            assert m.group(1) == b" "  # "Content-Length: 0" stays as it is
    assert padded >= 4


async def test_hikvision_ipc_on_the_wire(probe, wire):
    fleet, raw = await wire(nvr=False, first_id=IPC, vendor="hikvision", keepalive_interval=0.2)
    (part,) = await probe.catalog(IPC)
    await probe.wait_for(lambda: any(b"Keepalive" in d for d in raw), 3, "a keepalive")
    assert all(m.get("user-agent") == "IP Camera" for m in parsed(raw) if isinstance(m, SipRequest))
    assert part.request.body.startswith(b'<?xml version="1.0" encoding="GB2312"?>\n')
    assert parse_name_addr(part.request.headers["to"][0]).uri == f"sip:{probe.server_id}@{probe.domain}.spvmn.cn"
    (item,) = part.body.items()
    assert item["DeviceID"] == fleet.devices[IPC].channels[0].channel_id
    assert b'encoding="UTF-8"' in keepalive_of(raw)


async def test_dahua_on_the_wire(probe, wire):
    fleet, raw = await wire(channels=30, vendor="dahua", keepalive_interval=0.2)
    (part,) = await probe.catalog(NVR)  # the whole catalog in one message
    await probe.wait_for(lambda: any(b"Keepalive" in d for d in raw), 3, "a keepalive")
    sn = await probe.query(NVR, "DeviceStatus")
    (status,) = await probe.wait_for(lambda: probe.responses("DeviceStatus", sn), what="DeviceStatus")
    local = f"127.0.0.1:{fleet.shared.port}"
    server = f"127.0.0.1:{probe.port}"

    for data in raw:  # requests and responses alike
        names = header_names(data)
        assert names[-1] == "Content-Length" and names[-2] == "Via"
        assert names[:-2] == sorted(names[:-2], key=str.lower), names
        msg = parse_message(data)
        assert msg.get("user-agent", "").startswith("SIP UAS V3.0.0.")
        m = CL.search(data)
        if int(m.group(2)):
            assert len(m.group(1)) - 1 + len(m.group(2)) == 5
    register = parse_message(requests(raw, "REGISTER")[0])
    assert register.uri == f"sip:{probe.server_id}@{server}"
    assert register.get("route") == f"<sip:{NVR}@{server};lr>"
    assert parse_name_addr(register.headers["from"][0]).uri == f"sip:{NVR}@{local}"
    assert parse_name_addr(register.headers["to"][0]).uri == f"sip:{NVR}@{local}"
    assert parse_name_addr(part.request.headers["to"][0]).uri == f"sip:{probe.server_id}@{server}"

    body = part.request.body
    assert body.startswith(b'<?xml version="1.0" encoding="GB2312" ?>\n<Response>\n    <CmdType>Catalog</CmdType>\n')
    assert b"\n        <Item>\n            <DeviceID>" in body
    assert part.body.element.find("DeviceList").get("Num") == "30"
    for el in part.body.element.find("DeviceList"):
        tags = [c.tag for c in el]
        assert tags.index("StreamNum") == tags.index("Status") - 1
        assert el.findtext("Owner") == "0" and el.findtext("ParentID") == NVR
        assert el.findtext("StreamNum") == "2" and el.findtext("Manufacturer") == "Dahua"
    keepalive = keepalive_of(raw)
    assert keepalive.startswith(b'<?xml version="1.0" encoding="GB2312" ?>\n<Notify>\n    <CmdType>Keepalive')
    assert b"<Info>" not in keepalive
    alarms = status.body.element.find("Alarmstatus")
    assert alarms.get("Num") == "2" and len(alarms) == 2


async def test_generic_stays_plain(probe, wire):
    fleet, raw = await wire(channels=4, keepalive_interval=0.2)
    await probe.catalog(NVR)
    await probe.wait_for(lambda: any(b"Keepalive" in d for d in raw), 3, "a keepalive")
    for data in raw:
        assert header_names(data)[0] == "Via" and b"\r\nContent-Length: " + str(len(body_of(data))).encode() in data
        assert b"User-Agent: gb28181-sim\r\n" in data
        body = body_of(data)
        if body:
            assert body.count(b"\n") == body.count(b"\r\n")  # CRLF throughout
            assert body.startswith(b'<?xml version="1.0" encoding="GB2312"?>\r\n')


def test_unknown_vendor_is_refused():
    from simulators.fleet import Fleet
    with pytest.raises(ValueError):
        Fleet(FleetConfig(vendor="axis"))


_TEXT = st.text(st.characters(categories=("L", "N", "P", "S", "Zs"), exclude_characters="\x85\xa0"),
                min_size=1, max_size=40).map(str.strip).filter(bool)


@settings(max_examples=60, deadline=None)
@given(name=_TEXT, address=_TEXT, vendor=st.sampled_from(["generic", "hikvision", "dahua"]))
def test_any_name_survives_every_vendor_rendering(name, address, vendor):
    cfg = FleetConfig(vendor=vendor, nvr=True)
    v = personality(cfg)
    ch = DeviceCatalog(NVR, 1, is_nvr=True).channels[0]
    ch.name, ch.address = name, address
    item = catalog_item(ch, model=v.channel_model(), owner=v.owner, stream_num=v.stream_num)
    body = v.body("Response", "Catalog", 1, NVR,
                  [("SumNum", 1), ("DeviceList", manscdp.Node({"Num": 1}, [("Item", item)]))])
    (got,) = manscdp.parse(body).items()
    assert got["Name"] == name and got["Address"] == address


@given(body=st.binary(max_size=3000))
def test_padded_content_length_still_frames_the_body(body):
    msg = SipRequest("MESSAGE", f"sip:{NVR}@3402000000", {
        "via": ["SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1"], "from": [f"<sip:{IPC}@3402000000>;tag=1"],
        "to": [f"<sip:{NVR}@3402000000>"], "call-id": ["1"], "cseq": ["20 MESSAGE"]}, body)
    data = pad_content_length(msg.serialize())
    again = parse_message(data)
    assert again.body == body
    assert parse_message(data, stream=True).body == body
