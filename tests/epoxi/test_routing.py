from __future__ import annotations

import ipaddress

import pytest

from epoxi import placement
from epoxi.envelope import domains, new_email, recipients_in
from epoxi.routing import _PLAIN_IPV4, is_ip, routing_key, split_routing_key, target_problems
from epoxi.v1 import node_pb2


def test_routing_key_is_the_seed_format():
    assert routing_key("gmail.com", "192.168.1.1") == "gmail.com_192_168_1_1"
    assert routing_key("GMail.COM", "127.0.0.2") == "gmail.com_127_0_0_2"


@pytest.mark.parametrize(
    ("domain", "ip"), [("gmail.com", "192.168.1.1"), ("mail.example.org", "2001:db8::1"), ("x.io", "::1")]
)
def test_split_routing_key_inverts_routing_key(domain, ip):
    assert split_routing_key(routing_key(domain, ip)) == (domain, ip)


@pytest.mark.parametrize(
    "key", ["gmail.com", "gmail.com_", "gmail_com_1_2_3_4", "x.org_1_2_3", "_1_2_3_4", ""]
)
def test_split_routing_key_rejects_malformed_keys(key):
    with pytest.raises(ValueError, match="is not <domain>_<source ip>"):
        split_routing_key(key)


def test_recipients_are_grouped_by_domain_case_insensitively():
    e = new_email("a@x.org", to=["A <a@Gmail.com>", "b@yahoo.com"], cc=["c@gmail.com"], bcc=["d@YAHOO.com"])
    assert domains(e) == ["gmail.com", "yahoo.com"]
    # The envelope's recipients: addr-specs, as RCPT TO names them.
    assert recipients_in(e, "gmail.com") == ["a@Gmail.com", "c@gmail.com"]
    assert recipients_in(e, "yahoo.com") == ["b@yahoo.com", "d@YAHOO.com"]


def test_placement_prefers_fewest_pipelines_then_least_load_among_owners():
    nodes = [
        node_pb2.NodeInfo(id="busy", egress_ips=["10.0.0.1"], pipeline_count=3, load=0),
        node_pb2.NodeInfo(id="loaded", egress_ips=["10.0.0.1"], pipeline_count=1, load=50),
        node_pb2.NodeInfo(id="idle", egress_ips=["10.0.0.1"], pipeline_count=1, load=2),
        node_pb2.NodeInfo(id="other", egress_ips=["10.0.0.2"], pipeline_count=0, load=0),
    ]
    assert [n.id for n in placement.candidates(nodes, "10.0.0.1")] == ["idle", "loaded", "busy"]
    assert placement.best_node(nodes, "10.0.0.9") is None


@pytest.mark.parametrize(
    "value",
    [
        "127.0.0.2",
        "0.0.0.0",
        "255.255.255.255",
        "256.1.1.1",
        "1.2.3",
        "1.2.3.4.5",
        "01.2.3.4",
        "1.2.3.04",
        "1.2.3.4\n",
        " 1.2.3.4",
        "1.2.3.4 ",
        "::1",
        "2001:db8::1",
        "::ffff:1.2.3.4",
        "",
        "a.b.c.d",
        "1..2.3",
        "199.249.250.251",
    ],
)
def test_the_ipv4_shortcut_agrees_with_ipaddress(value):
    try:
        ipaddress.ip_address(value)
        expected = True
    except ValueError:
        expected = False
    assert is_ip(value) is expected
    assert (_PLAIN_IPV4.match(value) is not None) <= expected


def test_an_idn_is_routed_by_its_a_label():
    key = "xn--bcher-kva.de_127_0_0_2"
    assert routing_key("bücher.de", "127.0.0.2") == routing_key("xn--bcher-kva.de", "127.0.0.2") == key
    assert routing_key("BÜCHER.de", "127.0.0.2") == key
    e = new_email("a@x.org", to=["user@bücher.de"], cc=["other@xn--bcher-kva.de"])
    assert [routing_key(d, "127.0.0.2") for d in domains(e)] == [key]
    assert split_routing_key("bücher.de_127_0_0_2") == ("xn--bcher-kva.de", "127.0.0.2")
    assert target_problems("bücher.de", "127.0.0.2") == []


def test_an_invalid_idn_names_no_pipeline():
    assert target_problems("bü_cher.de", "127.0.0.2") == ["domain 'bü_cher.de' is not a valid domain name"]
    with pytest.raises(ValueError, match="names an invalid internationalised domain"):
        split_routing_key("bü-.de_127_0_0_2")
    [problem] = target_problems("ü" * 10_000 + ".de", "127.0.0.2")
    assert len(problem) < 200
