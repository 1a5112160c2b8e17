"""The cache's configuration on a real unbound and the real kernel, in a fresh namespace.

* Same answers: with the rendered default config, names outside the cluster domain (and in
  unbound's own default zones such as ``test.``) get the stand-in cluster DNS's answers.
* Upstream changes keep the cache: after the upstream list changes, a name cached before is
  still answered from the cache (the old upstream is stopped, the new one would answer
  differently), where a plain ``unbound-control reload`` (the baseline) answers from the new
  upstream, i.e. had flushed the cache; a change of cache size takes a full reload.
* ``--serve-stale``: an expired entry is served stale while the upstream is down, or, with 0,
  the lookup fails at once (SERVFAIL).
* ``plan`` and ``status`` change nothing: /proc/net/ip_tables_names and ip6_tables_names are
  the same before and after (before the fix, each created a legacy nat table).
* ``run`` failing after the link was made (``--state-dir`` under a file) leaves no link, rule
  or file, and says so in one line.

Each test gets its own namespace ``dgcfg-<hex>`` whose lo holds 198.18.200.0/24 addresses; processes are ended by PID and the namespace deleted, pass or fail. unbound runs in
the namespace through wrapper scripts, so the real `Unbound` class starts and reloads it; its
control socket is a file, reachable from this process.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path

import pytest

from dnsguard.cache.unbound import Unbound
from dnsguard.config import ForwardZone
from dnsguard.plan.cache import CacheSpec, render_unbound
from tests.support.lab_helpers import wait_for

pytestmark = pytest.mark.root

CACHE, OLD, NEW = "198.18.200.10", "198.18.200.1", "198.18.200.2"
TTL = 300


class Netns:
    def __init__(self, tmp: Path) -> None:
        self.name = f"dgcfg-{secrets.token_hex(3)}"
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, timeout=60, check=check)

    def dnsmasq(self, ip: str, records: dict[str, str]) -> None:
        """A stand-in DNS server on ``ip`` (UDP and TCP) answering ``records`` with TTL."""
        argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--bind-interfaces", f"--listen-address={ip}", "--port=53",
                f"--local-ttl={TTL}", "--pid-file=", "--user=root", "--group=root",
                *(f"--host-record={n},{a}" for n, a in records.items())]
        self.procs[ip] = subprocess.Popen(["ip", "netns", "exec", self.name, *argv],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = next(iter(records))
        wait_for(lambda: self.dig(ip, first) == records[first], timeout=10)

    def stop(self, ip: str) -> None:
        proc = self.procs.pop(ip)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)

    def dig(self, server: str, name: str, tcp: bool = False) -> str:
        res = self.run("dig", "+short", "+time=2", "+tries=1", *(["+tcp"] if tcp else []),
                       f"@{server}", name, "A", check=False)
        return res.stdout.strip()


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Netns]:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "dnsmasq", "dig",
                                                              "unbound", "unbound-control")):
        pytest.skip("needs root, ip, dnsmasq, dig and unbound")
    n = Netns(tmp_path)
    subprocess.run(["ip", "netns", "add", n.name], check=True)
    try:
        n.run("ip", "link", "set", "lo", "up")
        for ip in (CACHE, OLD, NEW):  # on lo: this kernel may have no dummy links
            n.run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
        yield n
    finally:
        for proc in n.procs.values():
            proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", n.name], check=False)


def _unbound(ns: Netns) -> Unbound:
    """The real `Unbound`, whose unbound runs in the namespace (wrappers named like the tools)."""
    bin_dir = ns.tmp / "bin"
    bin_dir.mkdir()
    for tool in ("unbound", "unbound-checkconf", "unbound-control"):
        wrapper = bin_dir / tool
        wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {ns.name} {shutil.which(tool)} "
                           '"$@"\n')
        wrapper.chmod(0o755)
    return Unbound(ns.tmp / "state", str(bin_dir / "unbound"))


def _spec(upstream: str, **kw: object) -> CacheSpec:
    return replace(CacheSpec(listen=(ip_address(CACHE),), health_port=53053,
                             cluster_domain="cluster.local",
                             cluster_upstreams=((ip_address(upstream), 53),),
                             external_upstreams=(), ipv6=False), **kw)  # type: ignore[arg-type]


@pytest.fixture
def cache(ns: Netns) -> Iterator[Unbound]:
    ub = _unbound(ns)
    yield ub
    ub.stop()


def _start(ns: Netns, ub: Unbound, spec: CacheSpec) -> None:
    ub.write_config(render_unbound(spec, ub.state_dir))
    ub.start()
    wait_for(lambda: '"dnsguard-ok"' in ns.run(
        "dig", "+short", "+time=1", "+tries=1", "@127.0.0.1", "-p", "53053",
        "health.dnsguard.invalid", "TXT", check=False).stdout, timeout=20)


OLD_RECORDS = {"www.example.com": "198.18.5.6", "web.default.svc.cluster.local": "198.18.5.5",
               "b.test": "198.18.5.7", "only.old.example": "198.18.5.8"}
NEW_RECORDS = {"www.example.com": "198.18.6.6", "web.default.svc.cluster.local": "198.18.6.5",
               "only.new.example": "198.18.6.9", "x.corp.example": "198.18.6.10"}


def test_default_config_gives_the_cluster_dns_answers_for_every_name(ns: Netns,
                                                                      cache: Unbound) -> None:
    ns.dnsmasq(OLD, OLD_RECORDS)
    ns.dnsmasq(NEW, NEW_RECORDS)
    zone = ForwardZone("corp.example", ((ip_address(NEW), 53),))
    _start(ns, cache, _spec(OLD, forward_zones=(zone,)))
    # outside the cluster domain (a Corefile hosts/rewrite would be here), and in unbound's
    # own default zone test., which it would otherwise answer NXDOMAIN itself
    for name, want in OLD_RECORDS.items():
        assert ns.dig(CACHE, name) == want == ns.dig(OLD, name), name
    assert ns.dig(CACHE, "x.corp.example") == "198.18.6.10"  # the forward zone, over UDP


def test_upstream_change_keeps_the_cache_where_a_plain_reload_flushes_it(
        ns: Netns, cache: Unbound) -> None:
    ns.dnsmasq(OLD, OLD_RECORDS)
    ns.dnsmasq(NEW, NEW_RECORDS)
    _start(ns, cache, _spec(OLD))
    for name in ("www.example.com", "web.default.svc.cluster.local"):
        assert ns.dig(CACHE, name) == OLD_RECORDS[name]
    pid = cache.pid
    ns.stop(OLD)  # the old upstream is gone: only the cache can still give its answers

    assert cache.write_config(render_unbound(_spec(NEW), cache.state_dir))
    assert cache.reload() == "kept the cache"
    assert cache.pid == pid and cache.running()
    for name in ("www.example.com", "web.default.svc.cluster.local"):
        assert ns.dig(CACHE, name) == OLD_RECORDS[name], f"{name} not served from the cache"
    assert ns.dig(CACHE, "only.new.example") == "198.18.6.9"  # the new upstream is in use

    # baseline: what the agent ran before, `unbound-control reload`, empties the cache
    subprocess.run([f"{cache.binary}-control", "-c", str(cache.conf), "reload"], check=True,
                   capture_output=True)
    assert ns.dig(CACHE, "www.example.com") == NEW_RECORDS["www.example.com"]

    # a new cache size cannot keep the cache: full reload, saying why
    ns.dnsmasq(OLD, OLD_RECORDS)
    assert cache.write_config(render_unbound(_spec(OLD, cache_size=64 << 20), cache.state_dir))
    how = cache.reload()
    assert how.startswith("full reload (cache size or threads changed"), how
    assert ns.dig(CACHE, "www.example.com") == OLD_RECORDS["www.example.com"]


def _tables(ns: Netns) -> tuple[str, str, str]:
    """Legacy IPv4 and IPv6 table names, and nft's tables, as the namespace has them."""
    return (ns.run("cat", "/proc/net/ip_tables_names").stdout,
            ns.run("cat", "/proc/net/ip6_tables_names").stdout,
            ns.run("nft", "list", "tables").stdout)


@pytest.mark.parametrize("command", ["plan", "status"])
def test_plan_and_status_leave_a_fresh_node_unchanged(ns: Netns, command: str) -> None:
    before = _tables(ns)
    assert before[:2] == ("", ""), "a fresh namespace holds no legacy table"
    state = ns.tmp / "state"
    state.mkdir()
    resolv = state / "resolv.conf"
    resolv.write_text(f"nameserver {NEW}\n")
    args = ["--state-dir", str(state), "--node-resolv-conf", str(resolv)]
    for extra in ([], ["--mitigation", "nodelocal", "--proxy-mode", "iptables",
                       "--dns-ip", "198.18.1.10", "--upstream", OLD]):
        res = ns.run(sys.executable, "-m", "dnsguard", command, *args, *extra, check=False)
        # auto finds no kube-proxy (exit 2); status of a plan nothing applied is drift (1)
        assert res.returncode in (0, 1, 2), res.stderr
        assert "Traceback" not in res.stderr
        assert _tables(ns) == before, f"{command} {' '.join(extra)} changed the node"


@pytest.mark.parametrize("backend", ["iptables-nft", "nftables"])
def test_run_that_cannot_write_its_state_dir_leaves_nothing_behind(ns: Netns,
                                                                    backend: str) -> None:
    """The link is made before the config is written: a failure there must take it away."""
    blocker = ns.tmp / "not-a-dir"
    blocker.write_text("a file where --state-dir should be\n")
    before = (ns.run("ip", "-o", "addr", "show").stdout, ns.run("nft", "list", "ruleset").stdout,
              _tables(ns))
    res = ns.run(sys.executable, "-m", "dnsguard", "run", "--mitigation", "nodelocal",
                 "--proxy-mode", "iptables", "--backend", backend, "--dns-ip", "198.18.1.10",
                 "--upstream", OLD, "--state-dir", str(blocker / "state"),
                 "--node-resolv-conf", str(blocker), check=False)
    assert res.returncode == 1, res.stderr
    # the log's INFO lines, then one error line
    errors = [ln for ln in res.stderr.splitlines() if " INFO " not in ln]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert errors[0] == ("dnsguard: error: cannot write the cache's config in "
                         f"--state-dir {blocker / 'state'}: Not a directory"), res.stderr
    assert ns.run("ip", "link", "show", "dnsguard0", check=False).returncode != 0
    after = (ns.run("ip", "-o", "addr", "show").stdout, ns.run("nft", "list", "ruleset").stdout,
             _tables(ns))
    assert after == before
    assert sorted(p.name for p in ns.tmp.iterdir()) == ["not-a-dir"]


def _ask(ns: Netns, name: str) -> tuple[str, int | None, str | None]:
    """(rcode, TTL, address) of the cache's answer."""
    out = ns.run("dig", "+time=4", "+tries=1", f"@{CACHE}", name, "A", check=False).stdout
    status = re.search(r"status: (\w+)", out)
    ans = re.search(rf"^{re.escape(name)}\.\s+(\d+)\s+IN\s+A\s+(\S+)$", out, re.M)
    return (status[1] if status else "no answer", int(ans[1]) if ans else None,
            ans[2] if ans else None)


@pytest.mark.parametrize("serve_stale", [300, 0])
def test_serve_stale_flag_decides_what_an_expired_entry_gives_when_upstreams_fail(
        ns: Netns, cache: Unbound, serve_stale: int) -> None:
    """--cache-max-ttl 1 makes entries expire at once; the upstream is then stopped."""
    ns.dnsmasq(OLD, OLD_RECORDS)
    _start(ns, cache, _spec(OLD, cache_max_ttl=1, serve_stale=serve_stale))
    rcode, ttl, addr = _ask(ns, "www.example.com")
    assert (rcode, addr) == ("NOERROR", "198.18.5.6") and ttl is not None and ttl <= 1
    ns.stop(OLD)
    if serve_stale:
        # expired and the upstream gone: the stale answer, with unbound's 30 s reply TTL
        wait_for(lambda: _ask(ns, "www.example.com") == ("NOERROR", 30, "198.18.5.6"),
                 timeout=15)
    else:
        wait_for(lambda: _ask(ns, "www.example.com")[0] == "SERVFAIL", timeout=15)
