"""Shaping rules and MX sites as data: matching, the built-in rules, and the KV layout."""

from __future__ import annotations

import pytest

from epoxi import shaping
from epoxi.shaping import BOUNCE, DEFAULT_RULES, SUSPEND, THROTTLE, Rule, ShapingTable, Site
from services.node.engine.reply import Reply

# Each built-in rule and a reply as the provider documents it; the rule must be the first match.
DOCUMENTED = {
    "gmail-rate-limited": (
        421,
        "4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address."
        " To protect our users from spam, mail sent from your IP address has been temporarily rate limited.",
    ),
    "gmail-unauthenticated": (421, "4.7.26 This mail has been rate limited because it is unauthenticated."),
    "microsoft-ip-reputation": (
        451,
        "4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
    ),
    "microsoft-server-busy": (451, "4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77714)"),
    "microsoft-banned-ip": (550, "5.7.606 Access denied, banned sending IP [192.0.2.1]."),
    "yahoo-deferred": (
        421,
        "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
    ),
    "try-again-later": (421, "4.7.0 Try again later, closing connection."),
    "too-many-connections": (421, "4.7.0 Too many concurrent connections from 192.0.2.1"),
    "rate-limited": (450, "4.7.1 You are being rate-limited, slow down"),
    "blocklisted": (554, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"),
}
ACTIONS = {r.name: r.action for r in DEFAULT_RULES}


def first_match(table: ShapingTable, code: int, line: str, site: str = "any") -> Rule | None:
    r = Reply.parse(code, line)
    return shaping.match(table.ordered_rules(), r.code, r.enhanced, r.text, site)


def test_every_built_in_rule_has_a_documented_reply() -> None:
    assert set(DOCUMENTED) == {r.name for r in DEFAULT_RULES}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_each_built_in_rule_matches_its_providers_reply_first(name: str) -> None:
    code, line = DOCUMENTED[name]
    rule = first_match(ShapingTable(), code, line)
    assert rule is not None and rule.name == name
    assert rule.duration > 0
    if rule.action == THROTTLE:
        assert 0 < rule.factor < 1 and rule.recovery_step > 0


def test_the_built_in_rules_use_every_action() -> None:
    assert set(ACTIONS.values()) == {THROTTLE, SUSPEND, BOUNCE}


@pytest.mark.parametrize(
    ("code", "line"),
    [
        (250, "2.0.0 OK"),
        (450, "4.2.1 The user you are trying to contact is receiving mail too quickly"),
        (550, "5.1.1 The email account that you tried to reach does not exist"),
        (452, "4.2.2 The recipient's inbox is out of storage space"),
        (0, "4.4.1 connection refused"),  # the node's own: says nothing about the provider
    ],
)
def test_ordinary_replies_trigger_nothing(code: int, line: str) -> None:
    assert first_match(ShapingTable(), code, line) is None


def test_matching_on_code_class_enhanced_prefix_text_and_site() -> None:
    rule = Rule("r", SUSPEND, 60, code="4xx", enhanced_code="4.7.", text="slow", site="goo*")
    assert rule.matches(451, "4.7.9", "please SLOW down", "google")
    assert not rule.matches(551, "4.7.9", "slow", "google")
    assert not rule.matches(451, "4.2.9", "slow", "google")
    assert not rule.matches(451, "4.7.9", "fast", "google")
    assert not rule.matches(451, "4.7.9", "slow", "yahoo")
    exact = Rule("e", SUSPEND, 60, code="421", enhanced_code="4.7.0")
    assert exact.matches(421, "4.7.0", "", "s") and not exact.matches(421, "4.7.01", "", "s")


def test_sites_roll_up_mx_hosts() -> None:
    table = ShapingTable(sites={"corp": Site("corp", ("mx*.corp.example",))})
    assert table.site_for(["ASPMX.L.GOOGLE.COM.", "alt1.aspmx.l.google.com"]) == "google"
    assert table.site_for(["mx1.corp.example"]) == "corp"
    # Unknown: the sorted set of host names, so domains sharing MX hosts share a site.
    assert table.site_for(["b.mx.test", "a.mx.test", "b.mx.test"]) == "a.mx.test,b.mx.test"
    assert table.site_named("corp").mx == ("mx*.corp.example",)
    assert table.site_named("nowhere") == Site("nowhere")


def entry(prefix: str, name: str, value: str) -> dict[str, object]:
    return {"Key": prefix + name, "Value": value.encode()}


def test_stored_rules_come_first_replace_or_disable_built_in_ones_and_bad_ones_keep_the_last_good() -> None:
    rules = [
        entry(
            shaping.RULES,
            "a-slow",
            '{"code": "451", "text": "slow", "action": "SHAPING_ACTION_SUSPEND", "duration": "30s"}',
        ),
        entry(
            shaping.RULES,
            "try-again-later",
            '{"code": "421", "action": "SHAPING_ACTION_THROTTLE", "factor": 0.25, "duration": "60s"}',
        ),
        entry(shaping.RULES, "yahoo-deferred", '{"disabled": true}'),
    ]
    sites = [
        entry(
            shaping.SITES,
            "corp",
            '{"mx": ["*.corp.example"], "maxConnections": 3, "allowedMessages": 10, "messageInterval": "1s"}',
        )
    ]
    table, problems = shaping.read_table(rules, sites, ShapingTable())
    assert problems == []
    names = [r.name for r in table.ordered_rules()]
    assert names[:2] == ["a-slow", "try-again-later"] and "yahoo-deferred" not in names
    assert table.rules["try-again-later"].factor == 0.25
    assert table.sites["corp"] == Site("corp", ("*.corp.example",), 3, 10, 1.0)

    bad = [
        entry(
            shaping.RULES, "a-slow", '{"code": "45", "action": "SHAPING_ACTION_SUSPEND", "duration": "30s"}'
        ),
        entry(shaping.RULES, "new", '{"action": "SHAPING_ACTION_THROTTLE", "factor": 2, "duration": "1s"}'),
        entry(shaping.RULES, "regex", '{"text": "(", "action": "SHAPING_ACTION_BOUNCE", "duration": "1s"}'),
        entry(shaping.RULES, "noaction", '{"code": "421", "duration": "1s"}'),
    ]
    again, problems = shaping.read_table(bad, [entry(shaping.SITES, "corp", '{"maxConnections": 1}')], table)
    assert again.rules == {"a-slow": table.rules["a-slow"]} and again.sites == table.sites
    text = " | ".join(problems)
    assert (
        "rule 'a-slow': code '45' must be a 4xx or 5xx reply code" in text
        and "keeping the previous version" in text
    )
    assert "rule 'new': factor 2 must be more than 0 and less than 1" in text
    assert "rule 'regex': text '(' is not a regular expression" in text
    assert "rule 'noaction': action must be" in text
    assert "site 'corp': mx must name at least one MX host glob" in text


def test_a_rule_round_trips_through_its_proto() -> None:
    for rule in DEFAULT_RULES:
        back = Rule.from_proto(rule.to_proto(), rule.name)
        assert back == rule
