"""GB/T 28181 identifiers (Annex D.1, rule A): the one place that reads a 20-digit ID.

Digits 1–8 are the centre (administrative division) code, 9–10 the industry, 11–13 the type
(111–130 front-end main devices, 131–199 peripherals, 200–299 platform parts), 14 the network
and 15–20 a serial. The type code tells the registrar what registered: an IPC, an NVR, a
lower platform.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BUSINESS_GROUP", "GROUP_TYPES", "VIRTUAL_ORG", "GbId", "IdError", "kind_of_type", "parse_id",
           "registrable_type", "type_digits"]

#: Type digits of catalog groups (Annex D.1, Annex O): business group, virtual organisation.
BUSINESS_GROUP, VIRTUAL_ORG = "215", "216"
GROUP_TYPES = (BUSINESS_GROUP, VIRTUAL_ORG)


def type_digits(gid: str) -> str:
    """Digits 11-13 (the type code) of a 20-digit ID, as text; "" for anything else. For the hot
    paths that only ask "is this a 215/216 group?" without building a ``GbId``."""
    return gid[10:13] if len(gid) == 20 and gid.isascii() and gid.isdigit() else ""


def registrable_type(type_code: int) -> bool:
    """Whether something with this type code may REGISTER: devices 111-199, platforms 200-299."""
    return 111 <= type_code <= 299


class IdError(ValueError):
    """Not a GB/T 28181 device ID; the message says what is wrong."""


#: Type codes (Annex D.1, digits 11–13) to the coarse kind the registry stores.
_KINDS = {
    111: "dvr", 112: "encoder", 113: "encoder", 114: "decoder", 115: "matrix", 116: "matrix",
    117: "alarm", 118: "nvr", 130: "hvr",
    131: "camera", 132: "ipc", 133: "display", 134: "alarm-input", 135: "alarm-output",
    136: "audio-input", 137: "audio-output", 138: "mobile", 139: "peripheral",
    200: "platform", 215: "business-group", 216: "virtual-organization",
}


def kind_of_type(type_code: int) -> str:
    kind = _KINDS.get(type_code)
    if kind is not None:
        return kind
    if 111 <= type_code <= 130:
        return "device"
    if 131 <= type_code <= 199:
        return "peripheral"
    if 200 <= type_code <= 299:
        return "platform-part"
    if 300 <= type_code <= 499:
        return "user"
    return "other"


@dataclass(frozen=True, slots=True)
class GbId:
    """A parsed 20-digit ID."""

    value: str

    @property
    def centre(self) -> str:
        return self.value[:8]

    @property
    def domain(self) -> str:
        """The SIP domain this ID belongs to: its first 10 digits (§6.1.2)."""
        return self.value[:10]

    @property
    def industry(self) -> int:
        return int(self.value[8:10])

    @property
    def type_code(self) -> int:
        return int(self.value[10:13])

    @property
    def network(self) -> int:
        return int(self.value[13])

    @property
    def kind(self) -> str:
        return kind_of_type(self.type_code)

    @property
    def registrable(self) -> bool:
        """Whether something with this type code may REGISTER (devices and platforms do)."""
        return registrable_type(self.type_code)

    def __str__(self) -> str:
        return self.value


def parse_id(text: str) -> GbId:
    """Validate a 20-digit rule-A ID; raises IdError naming the fault."""
    if len(text) != 20:
        raise IdError(f"device ID {text[:32]!r} has {len(text)} characters; GB/T 28181 IDs have 20 digits")
    if not text.isascii() or not text.isdigit():
        raise IdError(f"device ID {text!r} contains non-digits; GB/T 28181 IDs are 20 decimal digits")
    return GbId(text)
