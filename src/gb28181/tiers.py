"""Channel tiers (1 key sites, 2 key organisations, 3 the rest) from configurable rules.

The field runs on tiers: tier 1 points are watched 24 h, recorded 30+ days and must be online
95 % of the time; tier 2 recorded 15 days, 90 %. Which channel is which tier is local policy,
so it is configured as an ordered list of rules over what a catalog says about a channel (ID
industry and type code, civil code, business group, name). The first matching rule wins; an
operator's choice through the API (``tier_locked``) beats every rule.
"""

from __future__ import annotations

from registry.models import Channel

from .config import TierRule, TiersSection

__all__ = ["tier_for", "apply_tier"]


def _matches(rule: TierRule, ch: Channel) -> bool:
    cid = ch.channel_id
    if rule.id_prefix and not any(cid.startswith(p) for p in rule.id_prefix):
        return False
    if rule.industry and cid[8:10] not in rule.industry:
        return False
    if rule.type_code and cid[10:13] not in rule.type_code:
        return False
    if rule.civil_code_prefix and not any(ch.civil_code.startswith(p) for p in rule.civil_code_prefix):
        return False
    if rule.business_group and ch.business_group_id not in rule.business_group and not any(
            part in rule.business_group for part in ch.parent_id.split("/")):
        return False
    if rule.name_contains and not any(word in ch.name for word in rule.name_contains):
        return False
    return True


def tier_for(ch: Channel, tiers: TiersSection) -> int:
    for rule in tiers.rules:
        if _matches(rule, ch):
            return rule.tier
    return tiers.default


def apply_tier(ch: Channel, tiers: TiersSection) -> bool:
    """Set the rule-given tier unless an operator locked it; True if it changed."""
    if ch.tier_locked:
        return False
    tier = tier_for(ch, tiers)
    if tier != ch.tier:
        ch.tier = tier
        return True
    return False
