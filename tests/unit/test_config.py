"""Settings from flags and DNSGUARD_* env: typed values, and one-line errors naming the value."""

from __future__ import annotations

import ipaddress

import pytest

from dnsguard.cli import build_parser
from dnsguard.config import ConfigError, settings_from
from dnsguard.facts import observe
from dnsguard.model import Backend, ProxyMode
from dnsguard.testing.fakes import FakeRunner


def parse(argv: list[str], env: dict[str, str] | None = None):
    return settings_from(build_parser().parse_args(["plan", *argv]), env or {})


def test_flags_are_typed_and_deduplicated() -> None:
    s = parse(["--proxy-mode", "ipvs", "--dns-ip", "198.18.1.10", "--dns-ip", "198.18.1.10",
               "--dns-ip", "fd00:198:18:1::a", "--pod-cidr", "198.18.0.0/24",
               "--backend", "iptables-legacy", "--sync-interval", "2.5"])
    assert s.proxy_mode is ProxyMode.IPVS
    assert s.backend is Backend.IPTABLES_LEGACY
    assert s.dns_ips == (ipaddress.ip_address("198.18.1.10"),
                         ipaddress.ip_address("fd00:198:18:1::a"))
    assert s.sync_interval == 2.5


def test_env_fills_in_and_flag_wins() -> None:
    env = {"DNSGUARD_DNS_IP": "198.18.1.10, 198.18.1.11", "DNSGUARD_PROXY_MODE": "ipvs",
           "DNSGUARD_SKIP_TEARDOWN": "true"}
    s = parse(["--proxy-mode", "nftables"], env)
    assert s.proxy_mode is ProxyMode.NFTABLES
    assert [str(ip) for ip in s.dns_ips] == ["198.18.1.10", "198.18.1.11"]
    assert s.skip_teardown is True


@pytest.mark.parametrize(("argv", "env", "needle"), [
    (["--dns-ip", "198.18.1.300"], {}, "invalid --dns-ip '198.18.1.300'"),
    (["--pod-cidr", "198.18.0.1/24"], {}, "invalid --pod-cidr '198.18.0.1/24'"),
    (["--pod-cidr", "banana"], {}, "invalid --pod-cidr 'banana'"),
    (["--proxy-mode", "userspace"], {}, "invalid --proxy-mode 'userspace'"),
    (["--backend", "ipfw"], {}, "invalid --backend 'ipfw'"),
    (["--sync-interval", "0"], {}, "invalid --sync-interval '0'"),
    (["--sync-interval", "nan"], {}, "invalid --sync-interval 'nan'"),
    ([], {"DNSGUARD_MITIGATION": "magic"}, "invalid --mitigation 'magic'"),
    ([], {"DNSGUARD_SKIP_TEARDOWN": "maybe"}, "invalid DNSGUARD_SKIP_TEARDOWN 'maybe'"),
])
def test_bad_values_give_one_line_naming_the_value(argv, env, needle) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(argv, env)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_ipv6_dns_ip_on_a_node_without_ipv6_is_a_config_error(tmp_path) -> None:
    (tmp_path / "net").mkdir()  # a /proc without net/if_inet6: IPv6 disabled
    s = parse(["--proxy-mode", "ipvs", "--backend", "iptables-nft",
               "--dns-ip", "fd00:198:18:1::a"])
    with pytest.raises(ConfigError) as exc:
        observe(s, FakeRunner(), tmp_path)
    assert str(exc.value).startswith("invalid --dns-ip fd00:198:18:1::a: IPv6 is disabled")
    (tmp_path / "net/if_inet6").write_text("")
    assert observe(s, FakeRunner(), tmp_path).facts.dns_ips == s.dns_ips


def test_cache_flags_default_to_todays_values() -> None:
    s = parse([])
    assert (s.cache_size, s.cache_max_ttl, s.cache_negative_ttl, s.serve_stale) == \
        (48 << 20, 86400.0, 5.0, 300.0)
    assert s.external_via == "cluster" and s.forward_zones == ()


@pytest.mark.parametrize(("raw", "seconds"), [("300", 300.0), ("300s", 300.0), ("5m", 300.0),
                                              ("1h", 3600.0), ("0", 0.0)])
def test_serve_stale_takes_seconds_or_a_unit(raw: str, seconds: float) -> None:
    assert parse(["--serve-stale", raw]).serve_stale == seconds


def test_cache_flags_and_env() -> None:
    s = parse(["--cache-size", "96m", "--cache-max-ttl", "600", "--cache-negative-ttl", "0"],
              {"DNSGUARD_SERVE_STALE": "1h", "DNSGUARD_CACHE_SIZE": "1g",
               "DNSGUARD_EXTERNAL_VIA": "node"})
    assert (s.cache_size, s.cache_max_ttl, s.cache_negative_ttl, s.serve_stale) == \
        (96 << 20, 600.0, 0.0, 3600.0)
    assert s.external_via == "node"


def test_forward_zones_from_flags_and_env_are_typed_and_sorted() -> None:
    s = parse(["--forward-zone", "Corp.Example.=tcp:198.18.7.1,[fd00:198:18::7]:5353",
               "--forward-zone", "a.example=198.18.7.2:5353"])
    assert [(z.name, z.tcp) for z in s.forward_zones] == [("a.example", False),
                                                          ("corp.example", True)]
    assert s.forward_zones[1].addrs == ((ipaddress.ip_address("198.18.7.1"), 53),
                                        (ipaddress.ip_address("fd00:198:18::7"), 5353))
    # env: the usual comma list; an item without '=' is one more server of the zone before it
    env = {"DNSGUARD_FORWARD_ZONE": "b.example=198.18.7.1,198.18.7.2, a.example=tcp:198.18.7.3"}
    s = parse([], env)
    assert [(z.name, len(z.addrs), z.tcp) for z in s.forward_zones] == [
        ("a.example", 1, True), ("b.example", 2, False)]


@pytest.mark.parametrize(("argv", "env", "needle"), [
    (["--cache-size", "48x"], {}, "invalid --cache-size '48x'"),
    (["--cache-size", "512k"], {}, "invalid --cache-size '512k': must be 1m-64g"),
    (["--cache-size", "65g"], {}, "invalid --cache-size '65g'"),
    (["--cache-size=-1m"], {}, "invalid --cache-size '-1m'"),
    ([], {"DNSGUARD_CACHE_SIZE": ""}, "invalid --cache-size ''"),
    (["--cache-max-ttl", "0"], {}, "invalid --cache-max-ttl '0': must be 1-604800 seconds"),
    (["--cache-max-ttl", "1.5"], {}, "invalid --cache-max-ttl '1.5'"),
    (["--cache-max-ttl", "8d"], {}, "invalid --cache-max-ttl '8d'"),
    (["--cache-negative-ttl=-5"], {}, "invalid --cache-negative-ttl '-5'"),
    (["--cache-negative-ttl", "nan"], {}, "invalid --cache-negative-ttl 'nan'"),
    (["--serve-stale", "5 minutes"], {}, "invalid --serve-stale '5 minutes'"),
    (["--serve-stale", "2d"], {}, "invalid --serve-stale '2d': must be 0-86400 seconds"),
    (["--serve-stale", "inf"], {}, "invalid --serve-stale 'inf'"),
    ([], {"DNSGUARD_SERVE_STALE": "5y"}, "invalid --serve-stale '5y'"),
    (["--external-via", "dns"], {}, "invalid --external-via 'dns'"),
    (["--forward-zone", "corp.example"], {}, "invalid --forward-zone 'corp.example': expected"),
    (["--forward-zone", "corp..example=198.18.7.1"], {},
     "invalid --forward-zone 'corp..example=198.18.7.1': 'corp..example' is not a DNS domain"),
    (["--forward-zone", ".=198.18.7.1"], {}, "invalid --forward-zone '.=198.18.7.1'"),
    (["--forward-zone", "a_b.example=198.18.7.1"], {}, "invalid --forward-zone 'a_b.example"),
    (["--forward-zone", "corp.example="], {}, "no server address after '='"),
    (["--forward-zone", "corp.example=tcp:"], {}, "no server address after '='"),
    (["--forward-zone", "corp.example=198.18.7.300"], {},
     "invalid --forward-zone '198.18.7.300'"),
    (["--forward-zone", "corp.example=ftp:198.18.7.1"], {},
     "invalid --forward-zone 'ftp:198.18.7.1'"),
    (["--forward-zone", "corp.example=198.18.7.1:0"], {},
     "invalid --forward-zone '198.18.7.1:0': not a port number"),
    (["--forward-zone", "corp.example=198.18.7.1:65536"], {}, "not a port number"),
    (["--forward-zone", "corp.example=198.18.7.1", "--forward-zone", "CORP.example=198.18.7.2"],
     {}, "invalid --forward-zone 'CORP.example=198.18.7.2': zone corp.example given twice"),
    ([], {"DNSGUARD_FORWARD_ZONE": "198.18.7.1,a.example=198.18.7.2"},
     "invalid --forward-zone '198.18.7.1': expected"),
])
def test_bad_cache_values_give_one_line_naming_flag_and_value(argv, env, needle) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(argv, env)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)
def test_metrics_address_is_loopback_by_default_and_can_be_turned_off() -> None:
    assert parse([]).metrics_address == ("127.0.0.1", 9254)
    assert parse(["--metrics-address", "0.0.0.0:9254"]).metrics_address == ("0.0.0.0", 9254)
    assert parse(["--metrics-address", "[::1]:9254"]).metrics_address == ("::1", 9254)
    assert parse(["--metrics-address", "off"]).metrics_address is None
    assert parse([], {"DNSGUARD_METRICS_ADDRESS": ""}).metrics_address is None
    with pytest.raises(ConfigError, match="invalid --metrics-address 'somehost:1'"):
        parse(["--metrics-address", "somehost:1"])


@pytest.mark.parametrize("raw", ["-1", "1.5", "²", "1000001", "many"])
def test_cache_client_qps_is_a_whole_number(raw: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid --cache-client-qps '{raw}'"):
        parse(["--cache-client-qps", raw])


def test_cache_client_qps_defaults_to_a_generous_limit() -> None:
    assert parse([]).cache_client_qps == 100000
    assert parse([], {"DNSGUARD_CACHE_CLIENT_QPS": "0"}).cache_client_qps == 0
