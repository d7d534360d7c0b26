"""The KV record that keeps one MX site's keys on one node: readable for host names and ports,
one level below the source IP whatever the site's name holds."""

from __future__ import annotations

from epoxi.registry.ownership import site_record_key

IP = "192.0.2.1"


def test_a_site_of_mx_hosts_or_a_route_is_its_own_name_under_the_ip() -> None:
    assert site_record_key("alt1.aspmx.l.google.com,aspmx.l.google.com", IP) == (
        "epoxi/site-placement/192.0.2.1/alt1.aspmx.l.google.com,aspmx.l.google.com"
    )
    assert site_record_key("127.0.0.1:2525", IP) == "epoxi/site-placement/192.0.2.1/127.0.0.1:2525"


def test_a_slash_or_space_in_a_stored_sites_name_does_not_make_another_level() -> None:
    assert site_record_key("big/provider", IP) == "epoxi/site-placement/192.0.2.1/big%2Fprovider"
    assert site_record_key("my site", IP) == "epoxi/site-placement/192.0.2.1/my%20site"
