"""What a lower platform shows its upper platform: the shared cameras and the tree they hang on.

Pure functions, no I/O. The uplink (``cascade/uplink.py``) calls :func:`catalog_items` with the
registry's channels when an upper platform sends ``Query Catalog`` (§9.5.3, A.2.4/A.2.6), and
sends :func:`catalog_bodies` as serial MESSAGEs (Annex N); subscriptions send
:func:`notify_bodies` (Annex P). The upper platform reads the items back with
``catalog.item_to_channel``, and the tests hold us to that round trip.

Sharing (``UpstreamShare``) is by civil-code prefix, by business group (215) or virtual
organisation (216), or by channel ID; any matching rule shares a camera. Cameras may come from
our devices or from our own lower platforms; the latter's groups are in the registry as channels
of kind ``business-group``/``virtual-org`` and their cameras' ParentID is
``<lower ID>/<VO ID>``. For each shared camera we walk from its innermost VO up to its business
group, preferring what the registry says about a group's parent over the order of the IDs in
the camera's ParentID, and list exactly the groups on those walks (Annex O f, g).

An item is a list of ``(tag, value)`` pairs ready for ``manscdp.build`` (``("Item", item)``).
Camera fields follow A.2.1g's order; civil-code and group items carry only the fields Annex O
fixes for them; ``<Event>`` follows DeviceID, as in the Annex P notification example.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from registry.models import Channel

from .. import manscdp
from ..config import UpstreamShare
from ..ids import BUSINESS_GROUP, GROUP_TYPES, VIRTUAL_ORG, type_digits

__all__ = ["EVENTS", "GroupLookup", "Item", "Share", "catalog_bodies", "catalog_items", "is_shared", "item",
           "notify_bodies", "parent_of"]

#: One catalog item: ``(tag, value)`` pairs in wire order, for ``manscdp.build``.
Item = list[tuple[str, Any]]
Share = Literal["all"] | UpstreamShare
#: How a group is looked up by ID: a mapping, or a registry's ``get`` (None when unknown).
GroupLookup = Mapping[str, Channel] | Callable[[str], Channel | None]

#: Catalog change events of a NOTIFY item (§9.11.1, Annex P).
EVENTS = frozenset({"ON", "OFF", "VLOST", "DEFECT", "ADD", "DEL", "UPDATE"})
#: Events whose item carries the full fields; the others name only DeviceID (Annex P example).
_FULL_EVENTS = frozenset({"ADD", "UPDATE"})
#: ``<Info>`` children in A.2.1g order.
_INFO_ORDER = ("PTZType", "PositionType", "RoomType", "UseType", "SupplyLightType", "DirectionType",
               "Resolution", "BusinessGroupID", "DownloadSpeed", "SVCSpaceSupportMode",
               "SVCTimeSupportMode")
#: Civil-code item IDs: 2, 4, 6 or 8 digits (A.2.1a, Annex D.1 digits 1-8).
_CIVIL = re.compile(r"(?:[0-9]{2}){1,4}")
#: Longest business-group/virtual-organisation chain followed; real trees are a few levels.
_MAX_DEPTH = 32


def _groups_in(path: str) -> list[str]:
    """The 215/216 IDs in a '/'-joined ParentID (Annex O h), in order."""
    return [p for p in (s.strip() for s in path.split("/")) if type_digits(p) in GROUP_TYPES]


def _civil_of(channel: Channel) -> str:
    """CivilCode, or the ID's centre code (Annex D.1 digits 1-8) when it is not 2-8 digits."""
    code = channel.civil_code.strip()
    if _CIVIL.fullmatch(code):
        return code
    centre = channel.channel_id[:8]
    return centre if _CIVIL.fullmatch(centre) else ""


def _civil_levels(code: str) -> list[str]:
    """The 2/4/6/8-digit civil-code items above a code, skipping '00' pairs (Annex O a-d)."""
    return [code[:n] for n in (2, 4, 6, 8) if len(code) >= n and (n == 2 or code[n - 2:n] != "00")]


class _Groups:
    """The registry's groups and the tree edges (group -> parent group) chosen so far.

    An edge, once chosen, is kept, so every camera sees the same tree. A walk only adds edges
    from groups not yet in the tree, so the tree never gets a cycle.
    """

    def __init__(self, groups: GroupLookup | None) -> None:
        self.get: Callable[[str], Channel | None] = (
            (lambda _gid: None) if groups is None else groups.get if isinstance(groups, Mapping) else groups)
        self.up: dict[str, str | None] = {}

    def chain(self, camera: Channel) -> list[str]:
        """Group IDs from the camera's innermost group up to its top (a 215 if one is known)."""
        path = _groups_in(camera.parent_id)
        hint = camera.business_group_id.strip()
        if type_digits(hint) != BUSINESS_GROUP:
            hint = next((g for g in path if type_digits(g) == BUSINESS_GROUP), "")
        vos = [g for g in path if type_digits(g) == VIRTUAL_ORG]
        cur: str | None = vos[-1] if vos else hint
        out: list[str] = []
        while cur and cur not in out and len(out) < _MAX_DEPTH:
            out.append(cur)
            cur = self.up[cur] if cur in self.up else self._parent(cur, path, hint)
        return out

    def _parent(self, gid: str, path: list[str], hint: str) -> str | None:
        if type_digits(gid) == BUSINESS_GROUP:
            return None  # a business group is a root (Annex O f)
        reg = self.get(gid)
        if reg is not None and reg.kind in ("business-group", "virtual-org"):
            above = [g for g in _groups_in(reg.parent_id) if g != gid]
            if above:
                return above[-1]  # Annex O g: ParentID = the parent VO (or the BG)
            if type_digits(reg.business_group_id) == BUSINESS_GROUP:
                return reg.business_group_id
        if gid in path:  # unknown VO: the one before it in the camera's ParentID, as api.tree reads it
            earlier = [g for g in path[: path.index(gid)] if type_digits(g) == VIRTUAL_ORG]
            if earlier:
                return earlier[-1]
        return hint or None

    def record(self, chain: Sequence[str]) -> None:
        for i, gid in enumerate(chain):
            self.up.setdefault(gid, chain[i + 1] if i + 1 < len(chain) else None)

    def above(self, gid: str) -> list[str]:
        """The groups above ``gid`` on the chosen edges, nearest first (a cycle ends the walk)."""
        out: list[str] = []
        seen = {gid}
        while (nxt := self.up.get(gid)) and nxt not in seen:
            seen.add(nxt)
            out.append(nxt)
            gid = nxt
        return out

    def top(self, gid: str) -> str:
        above = self.above(gid)
        return above[-1] if above else gid


def _matches(channel: Channel, share: Share, chain: Sequence[str]) -> bool:
    if share == "all":
        return True
    if channel.channel_id in share.channels:
        return True
    code = _civil_of(channel)
    if code and any(code.startswith(p) for p in share.civil_codes):
        return True
    groups = set(share.business_groups)
    return bool(groups) and (channel.business_group_id in groups or not groups.isdisjoint(chain)
                             or not groups.isdisjoint(_groups_in(channel.parent_id)))


def _group_index(channels: Iterable[Channel]) -> dict[str, Channel]:
    index: dict[str, Channel] = {}
    for c in channels:
        if c.kind in ("business-group", "virtual-org"):
            index.setdefault(c.channel_id, c)
    return index


def is_shared(channel: Channel, share: Share, groups: GroupLookup | None = None) -> bool:
    """Whether an upper platform may see this camera (kind "channel"); any rule matching shares it.

    ``groups`` (group ID -> registry channel, as a mapping or a lookup function) lets a camera
    in a VO match a rule naming one of that VO's ancestors; without it only the IDs in the
    camera's own fields are compared.
    """
    if channel.kind != "channel":
        return False
    return _matches(channel, share, _Groups(groups).chain(channel))


def parent_of(channel: Channel, local_id: str, groups: GroupLookup | None = None) -> str:
    """The ParentID :func:`catalog_items` gives a camera: ``<local ID>/<innermost group>`` or
    ``<local ID>`` (Annex O h: the system ID when no parent device is listed, plus the VO)."""
    chain = _Groups(groups).chain(channel)
    return f"{local_id}/{chain[0]}" if chain else local_id


def item(channel: Channel, *, parent_id: str = "", event: str | None = None,
         business_group_id: str | None = None) -> Item:
    """One catalog item for a camera, civil code, business group or virtual organisation.

    ``parent_id`` is written as given (civil-code items have none, Annex O a-d).
    ``business_group_id`` overrides the channel's own (a VO's BusinessGroupID, Annex O g; a
    camera's ``Info/BusinessGroupID``, A.2.1g). With ``event`` the item is for a catalog
    NOTIFY: ADD and UPDATE carry the full fields, the others only DeviceID and Event (Annex P).
    """
    if event is not None and event not in EVENTS:
        raise ValueError(f"unknown catalog event {event!r}; expected one of {sorted(EVENTS)}")
    out: Item = [("DeviceID", channel.channel_id), ("Event", event)]
    if event is not None and event not in _FULL_EVENTS:
        return out
    name = channel.name.strip() or channel.channel_id  # Name is mandatory (A.2.1g)
    bg = channel.business_group_id if business_group_id is None else business_group_id
    if channel.kind == "civil-code":
        return [*out, ("Name", name)]
    if channel.kind == "business-group":
        return [*out, ("Name", name), ("ParentID", parent_id)]
    if channel.kind == "virtual-org":
        return [*out, ("Name", name), ("ParentID", parent_id), ("BusinessGroupID", bg or None)]
    info: Item = []
    for key in _INFO_ORDER:
        value: Any = channel.info.get(key)
        if key == "PTZType" and channel.ptz_type is not None:
            value = channel.ptz_type
        elif key == "BusinessGroupID":
            value = bg
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            info.append((key, value.strip() if isinstance(value, str) else value))
    located = channel.has_location
    return [
        *out, ("Name", name), ("Manufacturer", channel.manufacturer), ("Model", channel.model),
        ("Owner", channel.owner), ("CivilCode", _civil_of(channel)), ("Block", channel.block or None),
        ("Address", channel.address), ("Parental", 1 if channel.parental else 0), ("ParentID", parent_id),
        ("SafetyWay", channel.safety_way or 0), ("RegisterWay", channel.register_way or 1),
        ("Secrecy", 1 if channel.secrecy else 0), ("IPAddress", channel.ip_address or None),
        ("Port", channel.port or None),
        # The EFFECTIVE state: a camera behind an offline device is OFF whatever it last said.
        ("Status", "ON" if channel.state == "ON" else "OFF"),
        ("Longitude", channel.longitude if located else None),
        ("Latitude", channel.latitude if located else None),
        ("Info", info or None),
    ]


def catalog_items(channels: Iterable[Channel], *, local_id: str, share: Share,
                  names: Mapping[str, str] | None = None) -> list[Item]:
    """The Catalog response items for an upper platform, parents before children (Annex O).

    ``channels`` is the whole registry: cameras (kind "channel") are filtered by ``share``;
    civil-code, business-group and virtual-org channels only name and shape the tree. Order:
    civil codes (by ID, so 34 < 3402 < 340201), business groups, virtual organisations (by
    depth), then the shared cameras in the order given. Groups no shared camera hangs under are
    left out. Names: the registry's, else ``names`` (e.g. a GB/T 2260 table), else the ID.
    """
    channels = list(channels)
    names = names or {}
    registry = _group_index(channels)
    civil_names = {c.channel_id: c.name.strip() for c in channels if c.kind == "civil-code" and c.name.strip()}
    # Sharing is decided as is_shared decides it (from the registry alone, so INVITE and
    # subscriptions agree with the catalog); the tree then reuses edges other cameras taught it.
    rules, tree = _Groups(registry), _Groups(registry)
    cameras: list[tuple[Channel, list[str]]] = []
    seen: set[str] = set()
    for c in channels:
        if c.kind != "channel" or c.channel_id in seen or not _matches(c, share, rules.chain(c)):
            continue
        seen.add(c.channel_id)
        chain = tree.chain(c)
        tree.record(chain)
        cameras.append((c, chain))

    def name(gid: str, known: Mapping[str, str]) -> str:
        return known.get(gid) or names.get(gid, "") or gid

    items: list[Item] = []
    civil = sorted({code for c, _ in cameras for code in _civil_levels(_civil_of(c))})
    for code in civil:
        items.append(item(Channel(code, local_id, kind="civil-code", name=name(code, civil_names)),
                          parent_id=""))

    for gid in sorted(tree.up, key=lambda g: (len(tree.above(g)), type_digits(g), g)):
        reg = registry.get(gid)
        kind = "business-group" if type_digits(gid) == BUSINESS_GROUP else "virtual-org"
        group = Channel(gid, local_id, kind=kind, name=name(gid, {gid: reg.name.strip()} if reg else {}))
        top = tree.top(gid)  # only a BG that is listed too: every ID we write refers to an item
        in_bg = type_digits(top) == BUSINESS_GROUP and kind == "virtual-org"
        items.append(item(group, parent_id=tree.up.get(gid) or local_id,
                          business_group_id=top if in_bg else ""))
    for c, chain in cameras:
        top = tree.top(chain[0]) if chain else ""
        items.append(item(c, parent_id=f"{local_id}/{chain[0]}" if chain else local_id,
                          business_group_id=top if type_digits(top) == BUSINESS_GROUP else ""))
    return items


def _bodies(root: str, items: Sequence[Item], sn: int, device_id: str, per_message: int,
            encoding: str, *, sum_is_total: bool) -> list[bytes]:
    if per_message < 1:
        raise ValueError("per_message must be at least 1")
    parts = [items[i:i + per_message] for i in range(0, len(items), per_message)] or [[]]
    return [
        manscdp.build(root, "Catalog", sn, device_id, [
            ("SumNum", len(items) if sum_is_total else len(part)),
            ("DeviceList", manscdp.Node({"Num": len(part)}, [("Item", it) for it in part])),
        ], encoding=encoding)
        for part in parts
    ]


def catalog_bodies(items: Sequence[Item], *, sn: int, device_id: str, per_message: int,
                   encoding: str = "GB2312") -> list[bytes]:
    """``Response Catalog`` bodies (A.2.6) split per Annex N: every part has the query's SN and
    SumNum = all items; ``DeviceList Num`` counts this part's. No items: one part, SumNum 0 and an
    empty ``DeviceList Num="0"`` (as WVP sends it). Send them serially, one 200 at a time."""
    return _bodies("Response", items, sn, device_id, per_message, encoding, sum_is_total=True)


def notify_bodies(items_with_events: Sequence[Item], *, sn: int, device_id: str, per_message: int,
                  encoding: str = "GB2312") -> list[bytes]:
    """``Notify Catalog`` bodies for a catalog subscription (§9.11.1, Annex P); ``device_id`` is
    the subscribed code. Annex P's example has SumNum equal to the body's own DeviceList Num, so
    each body counts only its items. No items: no bodies."""
    if not items_with_events:
        return []
    return _bodies("Notify", items_with_events, sn, device_id, per_message, encoding, sum_is_total=False)
