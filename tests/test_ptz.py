"""PTZCmd (GB/T 28181-2016 Annex A.3) byte for byte, its parser, the A.2.3 bodies that move a
camera, and the simulator's PTZ head that obeys them (sans-IO: an injected clock, no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gb28181 import manscdp
from gb28181.ptz import (
    STOP,
    Aux,
    Cruise,
    FocusIris,
    Motion,
    Preset,
    PtzError,
    Scan,
    drag_zoom_fields,
    encode,
    home_position_fields,
    parse,
    parse_frame,
)
from simulators.catalog import DeviceCatalog
from simulators.ptz import DeviceControls, PtzHead

# Every instruction of tables A.4-A.11, address 01 (as the standard's J.6 examples). The bytes
# were worked out from the tables (byte 2 = 0F: version 0, check (A+5+0) % 16; byte 8 = sum of
# bytes 1-7 mod 256), not produced by the encoder.
TABLE = [
    (STOP, "A50F0100000000B5"),                                          # A.5 row 7, J.6
    (Motion(tilt=1, tilt_speed=0x80), "A50F01080080003D"),                # A.5 row 3
    (Motion(tilt=-1, tilt_speed=0x40), "A50F0104004000F9"),               # A.5 row 4
    (Motion(pan=-1, pan_speed=0x40), "A50F0102400000F7"),                 # A.5 row 5
    (Motion(pan=1, pan_speed=0x40), "A50F0101400000F6"),                  # A.5 row 6
    (Motion(pan=-1, tilt=1, pan_speed=0x20, tilt_speed=0x30), "A50F010A2030000F"),
    (Motion(pan=1, tilt=1, pan_speed=0x20, tilt_speed=0x30), "A50F01092030000E"),
    (Motion(pan=-1, tilt=-1, pan_speed=0x20, tilt_speed=0x30), "A50F01062030000B"),
    (Motion(pan=1, tilt=-1, pan_speed=0xFF, tilt_speed=0xFF), "A50F0105FFFF00B8"),
    (Motion(zoom=1, zoom_speed=1), "A50F0110000010D5"),                   # A.5 row 2
    (Motion(zoom=-1, zoom_speed=0xF), "A50F01200000F0C5"),                # A.5 row 1
    (Motion(pan=1, tilt=1, zoom=-1, pan_speed=0x20, tilt_speed=0x30, zoom_speed=5),
     "A50F01292030507E"),                                                 # A.5 row 8: 29H
    (FocusIris(iris=-1, iris_speed=0x80), "A50F01480080007D"),            # A.7 row 1
    (FocusIris(iris=1, iris_speed=0x80), "A50F014400800079"),             # A.7 row 2
    (FocusIris(focus=-1, focus_speed=0x10), "A50F014210000007"),          # A.7 row 3
    (FocusIris(focus=1, focus_speed=0x10), "A50F014110000006"),           # A.7 row 4
    (FocusIris(), "A50F0140000000F5"),                                    # A.7 row 5
    (FocusIris(focus=1, iris=-1, focus_speed=0x11, iris_speed=0x22), "A50F014911220031"),  # row 6
    (Preset("set", 1), "A50F018100010037"),                               # A.8
    (Preset("call", 3), "A50F01820003003A"),                              # A.8, J.6
    (Preset("delete", 255), "A50F018300FF0037"),
    (Cruise("add", 1, preset=2), "A50F01840102003C"),                     # A.9 row 1
    (Cruise("delete", 1, preset=2), "A50F01850102003D"),                  # row 2
    (Cruise("delete", 1, preset=0), "A50F01850100003B"),                  # row 2, whole cruise
    (Cruise("speed", 1, value=0x123), "A50F01860123106F"),                # row 3: 12 bits
    (Cruise("dwell", 1, value=4095), "A50F018701FFF02C"),                 # row 4
    (Cruise("start", 1), "A50F01880100003E"),                             # row 5
    (Scan("start", 2), "A50F018902000040"),                               # A.10 row 1
    (Scan("left", 2), "A50F018902010041"),                                # row 2
    (Scan("right", 2), "A50F018902020042"),                               # row 3
    (Scan("speed", 2, value=0x200), "A50F018A02002061"),                  # row 4: 12 bits
    (Aux(True, 1), "A50F018C01000042"),                                   # A.11 row 1 (wiper)
    (Aux(False, 1), "A50F018D01000043"),                                  # row 2
]


@pytest.mark.parametrize("command, wire", TABLE, ids=[w for _, w in TABLE])
def test_every_instruction_matches_annex_a3(command, wire):
    assert encode(command) == wire
    assert parse(wire) == command
    assert parse(wire.lower()) == command


def test_the_standards_own_examples():
    assert encode(STOP) == "A50F0100000000B5"
    assert encode(Preset("call", 3)) == "A50F01820003003A"
    # A Dahua device's PTZCmd (address 0, up at tilt speed 0x64).
    assert parse("A50F000800640020") == Motion(tilt=1, tilt_speed=0x64)


def test_address_is_twelve_bits_in_byte_3_and_the_low_nibble_of_byte_7():
    wire = encode(Motion(zoom=1, zoom_speed=0xA), address=0x9BC)
    assert wire[4:6] == "BC" and wire[12:14] == "A9"
    frame = parse_frame(wire)
    assert (frame.address, frame.instruction, frame.data3) == (0x9BC, 0x10, 0xA)
    with pytest.raises(PtzError):
        encode(STOP, address=0x1000)


@pytest.mark.parametrize("wire, why", [
    ("A50F01000000B5", "16 hex digits"),
    ("A50F0100000000B5FF", "16 hex digits"),
    ("A50F01000000ZZB5", "hex"),
    ("A40F0100000000B4", "starts with A5"),
    ("A50E0100000000B4", "check nibble"),
    ("A51F0100000000C5", "check nibble"),         # version 1 needs check nibble 0
    ("A50F0100000000B6", "checksum"),
    ("A50F0130000000E5", "opposite"),             # zoom in and out at once
    ("A50F010C000000C1", "opposite"),             # up and down
    ("A50F0103000000B8", "opposite"),             # left and right
    ("A50F014C00000001", "opposite"),             # iris open and close
    ("A50F018B00000040", "not defined"),
    ("A50F018000000035", "not defined"),
    ("A50F01C000000075", "not defined"),
    ("A50F018200000037", "reserved"),  # preset 0
    ("A50F018902030043", "scan"),
])
def test_broken_or_undefined_commands_are_refused_with_the_reason(wire, why):
    with pytest.raises(PtzError, match=why):
        parse(wire)


@pytest.mark.parametrize("command", [
    Motion(pan=2), Motion(pan=1, pan_speed=256), Motion(zoom=1, zoom_speed=16),
    FocusIris(focus=1, focus_speed=-1), Preset("call", 0), Preset("call", 256), Preset("go", 1),
    Cruise("add", 1, preset=0), Cruise("speed", 1, value=0), Cruise("dwell", 1, value=4096),
    Cruise("pause"), Cruise("add", 256, preset=1), Scan("speed", 0, value=0), Scan("spin"),
    Aux(True, 256),
])
def test_the_encoder_refuses_values_the_tables_do_not_allow(command):
    with pytest.raises(PtzError):
        encode(command)


# -- properties ----------------------------------------------------------------------------------

sign = st.sampled_from((-1, 0, 1))
byte = st.integers(0, 255)
twelve = st.integers(1, 4095)
commands = st.one_of(
    st.builds(Motion, sign, sign, sign, byte, byte, st.integers(0, 15)),
    st.builds(FocusIris, sign, sign, byte, byte),
    st.builds(Preset, st.sampled_from(("set", "call", "delete")), st.integers(1, 255)),
    st.builds(Cruise, st.just("add"), byte, preset=st.integers(1, 255)),
    st.builds(Cruise, st.just("delete"), byte, preset=byte),
    st.builds(Cruise, st.sampled_from(("speed", "dwell")), byte, value=twelve),
    st.builds(Cruise, st.just("start"), byte),
    st.builds(Scan, st.sampled_from(("start", "left", "right")), byte),
    st.builds(Scan, st.just("speed"), byte, value=twelve),
    st.builds(Aux, st.booleans(), byte),
)


@given(commands, st.integers(0, 0xFFF))
def test_round_trip(command, address):
    wire = encode(command, address=address)
    assert len(wire) == 16 and wire == wire.upper()
    b = bytes.fromhex(wire)
    assert b[0] == 0xA5 and b[1] == 0x0F and sum(b[:7]) % 256 == b[7]
    assert parse(wire) == command
    assert parse_frame(wire).address == address


@given(st.binary(min_size=7, max_size=7))
def test_any_eight_bytes_parse_or_fail_cleanly(head):
    # The checksum is made right, so the instruction and data bytes are what is exercised.
    wire = (head + bytes([sum(head) % 256])).hex()
    try:
        command = parse(wire)
    except PtzError:
        return
    # What parses is a command the encoder writes back the same way, bar the × bits.
    again = parse(encode(command, address=parse_frame(wire).address))
    assert again == command


@given(st.one_of(st.text(max_size=40), st.binary(max_size=40)))
def test_garbage_only_ever_raises_ptz_error(junk):
    try:
        parse(junk)
    except PtzError:
        pass


# -- HomePosition and DragZoom bodies (A.2.3) ---------------------------------------------------

def test_home_position_and_drag_zoom_bodies_parse_back():
    body = manscdp.build("Control", "DeviceControl", 7, "34020000001320000001",
                         home_position_fields(True, 30, 5))
    msg = manscdp.parse(body)
    assert (msg.text("HomePosition/Enabled"), msg.text("HomePosition/ResetTime"),
            msg.text("HomePosition/PresetIndex")) == ("1", "30", "5")
    off = manscdp.parse(manscdp.build("Control", "DeviceControl", 8, "x", home_position_fields(False, 30, 5)))
    assert off.text("HomePosition/Enabled") == "0" and off.element.find("HomePosition/PresetIndex") is None
    body = manscdp.build("Control", "DeviceControl", 9, "x", drag_zoom_fields(
        False, length=1920, width=1080, mid_x=960, mid_y=540, length_x=200, length_y=100))
    dz = manscdp.parse(body).element.find("DragZoomOut")
    assert dz is not None and [c.tag for c in dz] == ["Length", "Width", "MidPointX", "MidPointY",
                                                       "LengthX", "LengthY"]
    assert [c.text for c in dz] == ["1920", "1080", "960", "540", "200", "100"]
    with pytest.raises(PtzError):
        drag_zoom_fields(True, length=100, width=100, mid_x=101, mid_y=1, length_x=1, length_y=1)


# -- the simulator's head ------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_head_moves_while_a_direction_is_set_and_stops_on_stop():
    clock = Clock()
    head = PtzHead("34020000001310000001", clock)
    head.apply(parse(encode(Motion(pan=1, tilt=1, pan_speed=255, tilt_speed=0))))
    clock.now += 1.0
    s = head.snapshot()
    assert s["moving"] and s["pan"] == pytest.approx(100.0) and 0 < s["tilt"] < 1
    head.apply(STOP)
    clock.now += 5.0
    assert head.snapshot()["pan"] == pytest.approx(100.0) and not head.snapshot()["moving"]
    head.apply(Motion(pan=-1, pan_speed=255))  # left wraps below 0
    clock.now += 2.0
    assert head.snapshot()["pan"] == pytest.approx(260.0)
    head.apply(Motion(zoom=1, zoom_speed=15))
    clock.now += 10.0
    assert head.snapshot()["zoom"] == 30.0  # clamped at the lens's end
    head.apply(Motion(zoom=-1, zoom_speed=15))
    clock.now += 1.0
    assert head.snapshot()["zoom"] == pytest.approx(20.0)
    head.apply(Motion(tilt=-1, tilt_speed=255))
    clock.now += 10.0
    assert head.snapshot()["tilt"] == -90.0


def test_head_lens_presets_cruise_scan_and_aux():
    clock = Clock()
    head = PtzHead("34020000001310000002", clock)
    focus, iris = head.focus, head.iris
    head.apply(FocusIris(focus=1, iris=-1, focus_speed=255, iris_speed=255))
    clock.now += 0.5
    s = head.snapshot()
    assert s["focus"] > focus and s["iris"] < iris and s["moving"]
    head.apply(FocusIris())
    assert not head.snapshot()["moving"]
    head.apply(Motion(pan=1, pan_speed=255))
    clock.now += 0.5
    head.apply(STOP)
    head.apply(Preset("set", 200))
    where = head.snapshot()["pan"]
    head.apply(Motion(pan=1, pan_speed=255))
    clock.now += 0.3
    head.apply(Preset("call", 200))
    assert head.snapshot()["pan"] == where and head.last_preset == 200 and not head.moving
    head.apply(Preset("delete", 200))
    assert 200 not in head.presets
    head.apply(Cruise("add", 3, preset=1))
    head.apply(Cruise("add", 3, preset=200))
    head.apply(Cruise("delete", 3, preset=200))
    head.apply(Cruise("speed", 3, value=300))
    head.apply(Cruise("dwell", 3, value=15))
    head.apply(Cruise("start", 3))
    assert head.snapshot()["cruises"][3] == ([1], 300, 15) and head.cruising == 3
    head.apply(Scan("left", 1))
    head.apply(Motion(pan=1, pan_speed=255))
    clock.now += 0.2
    head.apply(STOP)
    head.apply(Scan("right", 1))
    head.apply(Scan("speed", 1, value=9))
    head.apply(Scan("start", 1))
    left, right, speed = head.scans[1].left, head.scans[1].right, head.scans[1].speed
    assert left is not None and right is not None and right > left and speed == 9
    assert head.scanning == 1 and head.cruising is None  # one pattern at a time
    head.apply(STOP)  # A.3.6 note 3: the PTZ stop ends the scan
    assert head.scanning is None
    head.apply(Aux(True, 1))
    assert head.aux == {1: True}
    head.apply(Aux(False, 1))
    assert head.aux == {1: False}


def _control(device_id: str, *fields, cmd: str = "DeviceControl") -> manscdp.Manscdp:
    return manscdp.parse(manscdp.build("Control", cmd, 1, device_id, list(fields)))


def test_device_controls_results_and_flags():
    nvr = "34020000001180000001"
    catalog = DeviceCatalog(nvr, 2, is_nvr=True)
    cam = catalog.channels[0].channel_id
    ctl = DeviceControls(nvr, catalog)
    assert ctl.apply(_control(cam, ("PTZCmd", encode(Motion(tilt=1, tilt_speed=9))))) is None
    assert ctl.heads[cam].motion == Motion(tilt=1, tilt_speed=9)
    assert ctl.apply(_control(cam, ("PTZCmd", "A50F0100000000B6"))) is None  # bad checksum
    assert ctl.bad_ptz == 1 and ctl.heads[cam].motion.tilt == 1
    assert ctl.apply(_control(cam, ("RecordCmd", "Record"))) == "OK" and ctl.record_status(cam) == "ON"
    assert ctl.record_status(catalog.channels[1].channel_id) == "OFF"
    assert ctl.apply(_control(nvr, ("GuardCmd", "SetGuard"))) == "OK"
    assert ctl.guard_status(catalog.alarm_inputs[0]) == "ONDUTY"
    assert ctl.apply(_control("34020000001310999999", ("RecordCmd", "Record"))) == "ERROR"
    missing = next(p for p in range(2, 256) if p not in ctl.heads[cam].presets)
    assert ctl.apply(_control(cam, *home_position_fields(True, 10, missing))) == "ERROR"
    assert ctl.apply(_control(cam, *home_position_fields(True, 10, 1))) == "OK"
    assert ctl.heads[cam].home == {"preset": 1, "reset_time": 10}
    assert ctl.apply(_control(nvr, ("TeleBoot", "Boot"))) is None
    assert ctl.apply(_control(cam, ("IFameCmd", "Send"))) is None
    assert ctl.counts["TeleBoot"] == 1 and ctl.counts["IFameCmd"] == 1 and ctl.counts["PTZCmd"] == 2
    basic = ("BasicParam", [("HeartBeatInterval", 30)])
    assert ctl.apply(_control(nvr, basic, cmd="DeviceConfig")) == "OK"
    assert ctl.basic_param([("HeartBeatInterval", 60), ("Name", "x")]) == [("HeartBeatInterval", "30"),
                                                                           ("Name", "x")]
    assert ctl.apply(_control(cam, basic, cmd="DeviceConfig")) == "OK"  # generic firmware takes it
    dahua = DeviceControls(nvr, catalog, config_needs_device_id=True)
    assert dahua.apply(_control(cam, basic, cmd="DeviceConfig")) == "ERROR"
    assert dahua.apply(_control(nvr, basic, cmd="DeviceConfig")) == "OK"
