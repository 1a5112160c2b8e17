"""The probe without the network: glibc's search order, reply pairing, the summary, the flags.

The socket loop itself is exercised against real DNS servers in network namespaces
(tests/integration/test_probe.py); here are the parts that decide what gets counted.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import struct
from pathlib import Path

import pytest

from dnsguard.cli_diag import add_commands, probe_config, probe_exit, probe_workers
from dnsguard.config import ConfigError, Settings
from dnsguard.dnswire import QType, encode_name
from dnsguard.node.procnet import ResolvConf
from dnsguard.probe import (
    MAX_SLOW_EVENTS,
    ProbeConfig,
    _Flight,
    _merge,
    _split,
    _summarize,
    _Tally,
)

K8S = ResolvConf(search=("default.svc.cluster.local", "svc.cluster.local", "cluster.local"),
                 ndots=5)


@pytest.mark.parametrize(("conf", "name", "expected"), [
    (K8S, "example.com", ("example.com.default.svc.cluster.local",
                          "example.com.svc.cluster.local", "example.com.cluster.local",
                          "example.com")),
    (K8S, "example.com.", ("example.com",)),  # absolute: no search
    (ResolvConf(search=("corp",), ndots=1), "db.internal", ("db.internal", "db.internal.corp")),
    (ResolvConf(search=("corp",), ndots=1), "db", ("db.corp", "db")),
    (ResolvConf(), "db", ("db",)),
])
def test_search_expansion_follows_res_nsearch(conf: ResolvConf, name: str,
                                              expected: tuple[str, ...]) -> None:
    assert conf.expand(name) == expected


def reply(qid: int, rcode: int = 0, ancount: int = 1, qr: bool = True) -> bytes:
    return struct.pack("!HHHHHH", qid, (0x8180 if qr else 0x0100) | rcode, 1, ancount, 0, 0)


def flight(steps: int = 1) -> _Flight:
    f = _Flight("svc", tuple(encode_name(f"svc{i}") for i in range(steps)), 0.0, 5.0)
    f.pending = {0x1111: QType.A, 0x2222: QType.AAAA}
    return f


def test_a_lookup_completes_only_when_both_queries_have_their_reply() -> None:
    f = flight()
    assert not f.on_reply(reply(0x1111))
    assert not f.on_reply(reply(0x1111))          # duplicate: already answered
    assert not f.on_reply(reply(0x3333))          # an ID we never sent
    assert not f.on_reply(reply(0x2222, qr=False))  # a query, not a reply
    assert not f.on_reply(b"\x22\x22\x81")        # runt
    assert f.on_reply(reply(0x2222, ancount=0))
    assert f.rcodes == ["NOERROR", "NOERROR"]
    assert f.success


def test_search_moves_on_after_nxdomain_and_stops_at_the_first_answer() -> None:
    f = flight(steps=3)
    f.on_reply(reply(0x1111, rcode=3, ancount=0))
    assert f.on_reply(reply(0x2222, rcode=3, ancount=0))
    assert f.next_step() and f.step == 1
    f.pending = {0x4444: QType.A, 0x5555: QType.AAAA}
    f.on_reply(reply(0x4444, ancount=1))
    assert f.on_reply(reply(0x5555, ancount=0))   # NODATA for AAAA, A answered: done
    assert not f.next_step()
    assert f.rcodes == ["NXDOMAIN", "NXDOMAIN", "NOERROR", "NOERROR"]


def test_percentiles_are_observed_values_and_none_without_lookups() -> None:
    tally = _Tally()
    for i in range(1, 101):
        tally.add(float(i), i / 1000, "svc", "ok", rcodes=[], queries=2)
    r = _summarize(_cfg(), "t", tally, elapsed=1.0)
    assert r.percentiles == {"p50": 0.05, "p90": 0.09, "p99": 0.099, "p99.9": 0.1}
    empty = _summarize(_cfg(), "t", _Tally(), elapsed=1.0)
    assert set(empty.percentiles.values()) == {None} and empty.max is None


def _cfg(**kw: object) -> ProbeConfig:
    base: dict[str, object] = {"server": ipaddress.ip_address("198.18.0.101"),
                               "names": ("svc",), "timeout": 5.0}
    return ProbeConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_summary_never_counts_timeouts_or_failures_as_fast() -> None:
    tally = _Tally()
    for i in range(997):
        tally.add(i / 100, 0.002, "svc", "ok", rcodes=["NOERROR", "NOERROR"], queries=2)
    tally.add(3.0, 1.5, "svc", "ok", rcodes=["NOERROR", "NOERROR"], queries=2)
    tally.add(4.0, None, "svc", "timeout", rcodes=["NOERROR"], queries=2)
    tally.add(4.5, 0.0001, "svc", "refused", rcodes=[], queries=2)  # a fast failure
    r = _summarize(_cfg(), "198.18.0.101:53", tally, elapsed=10.0)
    assert r.lookups == 1000 and r.rate == 100.0
    assert r.percentiles["p50"] == 0.002
    assert r.percentiles["p99.9"] is None  # lands on an unanswered lookup: not a latency
    assert r.percentiles["p99"] == 0.002
    assert r.max is None
    assert (r.at_least_1s, r.at_least_5s, r.timeouts) == (2, 1, 1)  # the failure was quick
    assert r.errors == {"refused": 1}
    assert r.answered == 998
    assert [(s.offset, s.latency) for s in r.slow] == [(3.0, 1.5), (4.0, None), (4.5, None)]
    assert r.slow_count == 3  # slow, timed out, failed
    assert probe_exit(r) == 3
    text = r.render()
    assert "timeouts 1 (after 5s)" in text and "refused 1" in text and "3.00s (1.50s)" in text


def test_a_short_timeout_is_not_counted_as_five_seconds() -> None:
    tally = _Tally()
    tally.add(0.0, None, "svc", "timeout", rcodes=[], queries=2)
    r = _summarize(_cfg(timeout=2.0), "t", tally, elapsed=2.0)
    assert (r.at_least_1s, r.at_least_5s) == (1, 0)
    assert probe_exit(r) == 4
    assert math.isclose(r.rate, 0.5)


def test_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        _cfg(names=())
    with pytest.raises(ValueError):
        _cfg(server=None)
    with pytest.raises(ValueError):
        _cfg(concurrency=0)


def test_workers_share_the_load_exactly() -> None:
    parts = _split(_cfg(concurrency=10, count=7, rate=30.0), 3)
    assert [p.concurrency for p in parts] == [4, 3, 3]
    assert [p.count for p in parts] == [3, 2, 2]
    assert [p.rate for p in parts] == [10.0, 10.0, 10.0]
    assert [p.count for p in _split(_cfg(concurrency=4, count=2), 4)] == [1, 1]  # no idle ones


def test_merged_results_keep_every_lookup_and_the_earliest_slow_ones() -> None:
    a, b = _Tally(), _Tally()
    for i in range(MAX_SLOW_EVENTS):
        a.add(10.0 + i, None, "x", "timeout", rcodes=[], queries=2)
    b.add(0.5, 0.001, "x", "ok", rcodes=["NOERROR"] * 2, queries=2)
    b.add(1.0, None, "x", "timeout", rcodes=[], queries=2)
    m = _merge([a, b])
    assert len(m.latencies) == MAX_SLOW_EVENTS + 2
    assert m.slow == MAX_SLOW_EVENTS + 1 and m.queries == 2 * (MAX_SLOW_EVENTS + 2)
    assert m.outcomes == {"timeout": MAX_SLOW_EVENTS + 1, "ok": 1}
    assert len(m.slow_events) == MAX_SLOW_EVENTS and m.slow_events[0].offset == 1.0


# --- flags ------------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    return p.parse_args(["probe", *argv])


def test_flags_become_a_typed_config(tmp_path: Path) -> None:
    cfg = probe_config(parse(["--server", "198.18.1.10", "--names", "3", "--concurrency", "64",
                              "--duration", "2.5", "--count", "1000", "--timeout", "1",
                              "--query-types", "A"]), Settings())
    assert str(cfg.server) == "198.18.1.10"
    assert cfg.names == tuple(f"dnsguard-probe-{i}.default.svc.cluster.local" for i in range(3))
    assert (cfg.concurrency, cfg.duration, cfg.count, cfg.timeout) == (64, 2.5, 1000, 1.0)
    assert cfg.qtypes == (QType.A,)
    assert cfg.resolv is None


def test_server_defaults_to_dns_ip_then_resolv_conf(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search svc.cluster.local\noptions ndots:3\nnameserver 198.18.1.53\n")
    s = Settings(dns_ips=(ipaddress.ip_address("198.18.1.10"),))
    assert str(probe_config(parse([]), s).server) == "198.18.1.10"
    cfg = probe_config(parse(["--resolv-conf", str(resolv), "--search"]), Settings())
    assert str(cfg.server) == "198.18.1.53"
    assert cfg.resolv is not None and cfg.resolv.ndots == 3


@pytest.mark.parametrize("argv", [
    ["--server", "nope"],
    ["--server", "198.18.1.10", "--name", "a", "--names", "2"],
    ["--server", "198.18.1.10", "--names", "2", "--name-pattern", "fixed"],
    ["--server", "198.18.1.10", "--concurrency", "0"],
    ["--server", "198.18.1.10", "--duration", "inf"],
    ["--server", "198.18.1.10", "--query-types", "MX"],
    ["--server", "198.18.1.10", "--port", "70000"],
    ["--server", "198.18.1.10", "--name", "a..b"],
    ["--via", "getaddrinfo", "--server", "198.18.1.10"],
    ["--via", "carrier-pigeon"],
    ["--server", "198.18.1.10", "--workers", "0"],
    ["--server", "198.18.1.10", "--workers", "4", "--concurrency", "2"],
    ["--via", "getaddrinfo", "--workers", "2"],
])
def test_bad_flags_are_config_errors(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        args = parse(argv)
        probe_workers(args, probe_config(args, Settings()))
