"""Traffic shaping as data: MX sites, and rules that react to providers' replies.

Layout in the registry's KV store, beside the policies (values are protobuf JSON)::

    epoxi/shaping/rules/<name>   epoxi.v1.ShapingRule
    epoxi/shaping/sites/<name>   epoxi.v1.ShapingSite

A routing key's mail goes to an MX *site*: the stored (or built-in) site one of its MX hosts
matches, else a site of its own named by its sorted MX host names, so thousands of domains
hosted by one provider share a site. Every (site, source IP) has one budget on the node that
runs its keys (``services.node.engine.shaping``).

Rules are tried in order, the first match decides: stored rules by name, then the built-in
``DEFAULT_RULES`` in their order. A stored rule named like a built-in one replaces it, and one
with ``disabled`` turns it off. A stored rule or site that does not validate is reported and
ignored (its last valid version stays), as policies are.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from epoxi import proto_time
from epoxi.v1 import shaping_pb2

RULES = "epoxi/shaping/rules/"
SITES = "epoxi/shaping/sites/"

THROTTLE = shaping_pb2.SHAPING_ACTION_THROTTLE
SUSPEND = shaping_pb2.SHAPING_ACTION_SUSPEND
BOUNCE = shaping_pb2.SHAPING_ACTION_BOUNCE
ACTIONS: dict[int, str] = {THROTTLE: "throttle", SUSPEND: "suspend", BOUNCE: "bounce"}

DEFAULT_RECOVERY_STEP = 0.1
DEFAULT_RECOVERY_INTERVAL = 60.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:,-]{0,252}")
_CODE = re.compile(r"[45](?:\d\d|xx)")
_ENHANCED = re.compile(r"[245]\.(?:\d{1,3}\.(?:\d{1,3})?)?")

Entry = dict[str, Any]


class ShapingError(ValueError):
    """A stored rule or site that cannot be used."""


def action_name(action: int) -> str:
    return ACTIONS.get(action, "unspecified")


@dataclass(frozen=True)
class Rule:
    """A match on a reply (and site) and what it does to the (site, source IP) that got it."""

    name: str
    action: int
    duration: float
    code: str = ""  # "421", "4xx"; "" any 4xx or 5xx
    enhanced_code: str = ""  # "4.7.0", or a prefix ending in "." ("4.7.")
    text: str = ""  # searched in the reply text, case-insensitively
    site: str = ""  # a glob on the site name
    factor: float = 1.0  # THROTTLE
    recovery_step: float = DEFAULT_RECOVERY_STEP
    recovery_interval: float = DEFAULT_RECOVERY_INTERVAL
    _pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.text and self._pattern is None:
            object.__setattr__(self, "_pattern", re.compile(self.text, re.IGNORECASE))

    def matches(self, code: int, enhanced: str, text: str, site: str) -> bool:
        if not 400 <= code < 600:
            return False  # the node's own replies (code 0) say nothing about the provider
        if self.code and not _code_matches(self.code, code):
            return False
        if self.enhanced_code and not _enhanced_matches(self.enhanced_code, enhanced):
            return False
        if self._pattern is not None and not self._pattern.search(text):
            return False
        return not self.site or fnmatch.fnmatchcase(site.lower(), self.site.lower())

    @classmethod
    def from_proto(cls, p: shaping_pb2.ShapingRule, name: str) -> Rule:
        problems = validate_rule(p)
        if problems:
            raise ShapingError(f"rule {name!r}: " + "; ".join(problems))
        return cls(
            name=name,
            action=p.action,
            duration=proto_time.seconds(p.duration),
            code=p.code.lower(),
            enhanced_code=p.enhanced_code,
            text=p.text,
            site=p.site,
            factor=p.factor if p.action == THROTTLE else 1.0,
            recovery_step=p.recovery_step or DEFAULT_RECOVERY_STEP,
            recovery_interval=(
                proto_time.seconds(p.recovery_interval)
                if p.HasField("recovery_interval")
                else DEFAULT_RECOVERY_INTERVAL
            ),
        )

    def to_proto(self) -> shaping_pb2.ShapingRule:
        p = shaping_pb2.ShapingRule(
            name=self.name,
            code=self.code,
            enhanced_code=self.enhanced_code,
            text=self.text,
            site=self.site,
            action=self.action,  # type: ignore[arg-type]
            duration=proto_time.duration(self.duration),
        )
        if self.action == THROTTLE:
            p.factor = self.factor
            p.recovery_step = self.recovery_step
            p.recovery_interval.CopyFrom(proto_time.duration(self.recovery_interval))
        return p


def _code_matches(pattern: str, code: int) -> bool:
    if pattern.endswith("xx"):
        return code // 100 == int(pattern[0])
    return code == int(pattern)


def _enhanced_matches(pattern: str, enhanced: str) -> bool:
    return enhanced.startswith(pattern) if pattern.endswith(".") else enhanced == pattern


def validate_rule(p: shaping_pb2.ShapingRule) -> list[str]:
    """Reasons ``p`` cannot be used; empty when it can (a disabled rule needs nothing else)."""
    if p.disabled:
        return []
    problems = []
    if p.code and not _CODE.fullmatch(p.code.lower()):
        problems.append(f"code {p.code!r} must be a 4xx or 5xx reply code or class, like 421 or 4xx")
    if p.enhanced_code and not _ENHANCED.fullmatch(p.enhanced_code):
        problems.append(f"enhanced_code {p.enhanced_code!r} must be like 4.7.0, or a prefix like 4.7.")
    if p.text:
        try:
            re.compile(p.text)
        except re.error as e:
            problems.append(f"text {p.text!r} is not a regular expression: {e}")
    if p.action not in ACTIONS:
        problems.append(
            "action must be SHAPING_ACTION_THROTTLE, SHAPING_ACTION_SUSPEND or SHAPING_ACTION_BOUNCE"
        )
    if p.action == THROTTLE and not 0 < p.factor < 1:
        problems.append(f"factor {p.factor:g} must be more than 0 and less than 1 for a throttle")
    if p.action == THROTTLE and not 0 <= p.recovery_step <= 1:
        problems.append(f"recovery_step {p.recovery_step:g} must be between 0 and 1")
    for name in ("duration", "recovery_interval"):
        d = getattr(p, name)
        if (p.HasField(name) or name == "duration") and (
            d.seconds < 0 or d.nanos < 0 or d.seconds == d.nanos == 0
        ):
            problems.append(f"{name} must be a positive duration")
    return problems


@dataclass(frozen=True)
class Site:
    """A named MX site and the budget of each source IP there (0: no limit)."""

    name: str
    mx: tuple[str, ...] = ()
    max_connections: int = 0
    allowed_messages: int = 0
    message_interval: float = 0.0

    def holds(self, host: str) -> bool:
        return any(fnmatch.fnmatchcase(host, glob.lower()) for glob in self.mx)

    @classmethod
    def from_proto(cls, p: shaping_pb2.ShapingSite, name: str) -> Site:
        problems = []
        if not p.mx:
            problems.append("mx must name at least one MX host glob, like *.google.com")
        if p.allowed_messages and not p.HasField("message_interval"):
            problems.append("allowed_messages needs a message_interval")
        d = p.message_interval
        if p.HasField("message_interval") and (d.seconds < 0 or d.nanos < 0 or d.seconds == d.nanos == 0):
            problems.append("message_interval must be a positive duration")
        if problems:
            raise ShapingError(f"site {name!r}: " + "; ".join(problems))
        return cls(
            name=name,
            mx=tuple(m.lower() for m in p.mx),
            max_connections=p.max_connections,
            allowed_messages=p.allowed_messages,
            message_interval=proto_time.seconds(p.message_interval),
        )


# The big providers' documented replies asking a sender to slow down, or saying it is blocked.
DEFAULT_RULES: tuple[Rule, ...] = (
    # Gmail: "421-4.7.28 ... unusual rate of unsolicited mail originating from your IP address".
    Rule("gmail-rate-limited", THROTTLE, 600.0, code="421", enhanced_code="4.7.28", factor=0.5),
    # Gmail: "421-4.7.26 This mail has been rate limited because it is unauthenticated".
    Rule("gmail-unauthenticated", THROTTLE, 1800.0, code="421", enhanced_code="4.7.26", factor=0.5),
    # Microsoft: "451 4.7.650 The mail server [IP] has been temporarily rate limited due to IP reputation".
    Rule("microsoft-ip-reputation", THROTTLE, 3600.0, code="451", enhanced_code="4.7.650", factor=0.5),
    # Microsoft: "451 4.7.500 Server busy. Please try again later from [IP]" (4.7.500-699).
    Rule("microsoft-server-busy", SUSPEND, 300.0, code="451", enhanced_code="4.7.", text=r"try again later"),
    # Microsoft: "550 5.7.606 Access denied, banned sending IP [IP]" (5.7.606-649).
    Rule("microsoft-banned-ip", BOUNCE, 3600.0, code="550", enhanced_code="5.7.", text=r"banned sending ip"),
    # Yahoo: "421 4.7.0 [TSS04] Messages from IP temporarily deferred due to unexpected volume or
    # user complaints" (TS01-TS03 likewise).
    Rule("yahoo-deferred", SUSPEND, 900.0, code="421", text=r"\[TSS?0[1-4]\]"),
    # Anyone: "421 4.7.0 Try again later", "421 Too many connections", "450 ... rate limited".
    Rule(
        "try-again-later",
        THROTTLE,
        300.0,
        code="421",
        enhanced_code="4.7.0",
        text=r"try again later",
        factor=0.5,
    ),
    Rule(
        "too-many-connections",
        THROTTLE,
        300.0,
        code="4xx",
        text=r"too many (concurrent |simultaneous )?connections",
        factor=0.5,
    ),
    Rule("rate-limited", THROTTLE, 300.0, code="4xx", text=r"rate[- ]limit", factor=0.5),
    # Anyone: "554 5.7.1 Service unavailable; Client host [IP] blocked using zen.spamhaus.org".
    Rule(
        "blocklisted",
        BOUNCE,
        3600.0,
        code="5xx",
        enhanced_code="5.7.",
        text=r"block ?listed|blacklisted|blocked using|spamhaus",
    ),
)

DEFAULT_SITES: tuple[Site, ...] = (
    Site("google", ("*.google.com", "*.googlemail.com")),
    Site("microsoft", ("*.outlook.com", "*.protection.outlook.com", "*.hotmail.com")),
    Site("yahoo", ("*.yahoodns.net",)),
)


@dataclass(frozen=True)
class ShapingTable:
    """What the KV store holds, over the built-in rules and sites."""

    rules: Mapping[str, Rule] = field(default_factory=dict)
    disabled: frozenset[str] = frozenset()
    sites: Mapping[str, Site] = field(default_factory=dict)

    def ordered_rules(self) -> list[Rule]:
        """Stored rules by name, then the built-in ones not replaced or turned off."""
        stored = [self.rules[n] for n in sorted(self.rules)]
        return stored + [r for r in DEFAULT_RULES if r.name not in self.rules and r.name not in self.disabled]

    def all_sites(self) -> list[Site]:
        stored = [self.sites[n] for n in sorted(self.sites)]
        return stored + [s for s in DEFAULT_SITES if s.name not in self.sites]

    def site_named(self, name: str) -> Site:
        """The site's budget: stored or built-in, else no limits."""
        for s in self.all_sites():
            if s.name == name:
                return s
        return Site(name)

    def site_for(self, hosts: Sequence[str]) -> str:
        """The site of a domain whose mail goes to ``hosts`` (MX names, or "host:port" for a route)."""
        names = sorted({h.lower().rstrip(".") for h in hosts})
        for s in self.all_sites():
            if any(s.holds(h) for h in names):
                return s.name
        return ",".join(names)


def match(rules: Iterable[Rule], code: int, enhanced: str, text: str, site: str) -> Rule | None:
    return next((r for r in rules if r.matches(code, enhanced, text, site)), None)


def decode_rule(name: str, raw: bytes | None) -> Rule | None:
    """The rule stored as ``name`` (None: it turns a built-in rule off); ShapingError says why not."""
    p = _parse(shaping_pb2.ShapingRule(), "rule", name, raw)
    if p.disabled:
        return None
    return Rule.from_proto(p, name)


def decode_site(name: str, raw: bytes | None) -> Site:
    return Site.from_proto(_parse(shaping_pb2.ShapingSite(), "site", name, raw), name)


def _parse(proto: Any, kind: str, name: str, raw: bytes | None) -> Any:
    if not _NAME.fullmatch(name):
        raise ShapingError(f"{kind} name {name!r} must be 1-253 letters, digits, '.', '_', ':', ',' or '-'")
    if not raw:
        raise ShapingError(f"{kind} {name!r} is empty")
    try:
        json_format.Parse(raw, proto)
    except json_format.ParseError as e:
        raise ShapingError(f"{kind} {name!r} is not a Shaping{kind.title()} in JSON: {e}") from None
    if proto.name and proto.name != name:
        raise ShapingError(
            f"{kind} {name!r} carries the name {proto.name!r}; leave it out or make them equal"
        )
    return proto


def read_table(
    rule_entries: list[Entry] | None, site_entries: list[Entry] | None, previous: ShapingTable
) -> tuple[ShapingTable, list[str]]:
    """The table from recursive reads of ``RULES`` and ``SITES``, and the problems found. A rule
    or site that became invalid keeps its previous valid version, if any."""
    problems: list[str] = []
    rules: dict[str, Rule] = {}
    disabled: set[str] = set()
    for name, raw in _named(rule_entries, RULES):
        try:
            rule = decode_rule(name, raw)
        except ShapingError as err:
            kept = previous.rules.get(name)
            problems.append(f"{err} ({'keeping the previous version' if kept else 'ignored'})")
            if kept is not None:
                rules[name] = kept
            elif name in previous.disabled:
                disabled.add(name)
            continue
        if rule is None:
            disabled.add(name)
        else:
            rules[name] = rule
    sites: dict[str, Site] = {}
    for name, raw in _named(site_entries, SITES):
        try:
            sites[name] = decode_site(name, raw)
        except ShapingError as err:
            kept_site = previous.sites.get(name)
            problems.append(f"{err} ({'keeping the previous version' if kept_site else 'ignored'})")
            if kept_site is not None:
                sites[name] = kept_site
    return ShapingTable(rules, frozenset(disabled), sites), problems


def _named(entries: list[Entry] | None, prefix: str) -> Iterable[tuple[str, bytes | None]]:
    for e in entries or []:
        name = str(e["Key"]).removeprefix(prefix)
        if name and not name.endswith("/"):
            yield name, e.get("Value")


def encode(p: shaping_pb2.ShapingRule | shaping_pb2.ShapingSite) -> bytes:
    return json_format.MessageToJson(p, indent=None).encode()
