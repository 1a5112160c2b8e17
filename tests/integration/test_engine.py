"""The rules engine on the real kernel, in a lab node, for every backend this kernel has.

NOTRACK itself is only allowed in IPVS mode, which this kernel lacks (see test_ipvs_mode.py,
which runs under qemu); here the engine is driven with the node-local plan, which exercises the
same observe -> diff -> restore -> cleanup path on raw, filter and (nft) every hook.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from dnsguard.testing.lab import Lab, LabConfig
from tests.support.lab_helpers import (
    VARIANTS,
    dnsguard,
    nodelocal_args,
    start_agent,
    status,
    stop_agent,
    wait_for,
    without_empty_legacy_tables,
)

pytestmark = pytest.mark.root


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def lab(variant: str):
    mode, flavour, _ = VARIANTS[variant]
    with Lab(LabConfig(proxy_mode=mode, iptables=flavour, ipv6=True)) as lab:  # type: ignore[arg-type]
        yield lab


def test_auto_detects_proxy_mode_and_backend(lab: Lab, variant: str) -> None:
    mode, _, backend = VARIANTS[variant]
    res = dnsguard(lab, "plan", "--mitigation", "nodelocal", "--upstream", "198.18.0.101",
                   "--dns-ip", "198.18.1.10", "--node-resolv-conf", "/dev/null")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"# proxy mode {mode.value}, backend {backend.value},")
    assert f"proxy mode {mode.value} detected:" in res.stderr


def test_notrack_to_the_cluster_ip_is_refused_and_nothing_changes(lab: Lab) -> None:
    before = lab.save_rules()
    args = ["--mitigation", "notrack", "--pod-cidr", "198.18.0.0/24"]
    for ip in lab.dns_ips:
        args += ["--dns-ip", str(ip)]
    for command in ("apply", "plan", "run"):
        res = dnsguard(lab, command, *args, timeout=20)
        assert res.returncode == 2, (command, res.stdout, res.stderr)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("dnsguard: error:")]
        assert len(errors) == 1 and "untracked packets are never NATed" in errors[0]
    assert lab.save_rules() == before
    result = lab.lookup_load(count=10, concurrency=2, duration=10)
    assert result.summary().failed == 0


def test_apply_is_exact_idempotent_and_cleanup_restores_every_table(
        lab: Lab, tmp_path: Path) -> None:
    before = lab.save_rules()
    args = nodelocal_args(lab, tmp_path)
    res = dnsguard(lab, "apply", *args)
    assert res.returncode == 0, res.stderr
    assert "in sync" in res.stdout
    st = status(lab, args)
    assert st["in_sync"] is True and st["drift"] == []
    applied = lab.save_rules()
    assert applied != before
    again = dnsguard(lab, "apply", *args)
    assert again.returncode == 0 and "applied" not in again.stderr  # nothing was written
    assert lab.save_rules() == applied
    # dormant interception: DNS still flows through kube-proxy while no cache is healthy
    assert lab.lookup_load(count=10, concurrency=2, duration=10).summary().failed == 0
    res = dnsguard(lab, "cleanup", "--state-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert without_empty_legacy_tables(lab.save_rules()) == without_empty_legacy_tables(before)
    assert lab.node_run(["ip", "link", "show", "dnsguard0"], check=False).returncode != 0
    again = dnsguard(lab, "cleanup", "--state-dir", str(tmp_path))
    assert "dnsguard owned nothing" in again.stdout


#: A jump real kube-proxy ensures in filter INPUT, a built-in chain dnsguard hooks too (the lab's
#: kube-proxy only jumps from nat chains and filter FORWARD, which dnsguard never hooks).
_KUBE_NODEPORTS_JUMP = ("-m", "comment", "--comment", "kubernetes health check service ports",
                        "-j", "KUBE-NODEPORTS")


def _first_rules(lab: Lab, tool: str) -> dict[str, str]:
    """Built-in chain -> its first rule, for each chain of raw/filter that dnsguard hooks."""
    first: dict[str, str] = {}
    for table, chain in (("raw", "PREROUTING"), ("raw", "OUTPUT"),
                         ("filter", "INPUT"), ("filter", "OUTPUT")):
        rules = lab.node_run([tool, "-w", "-t", table, "-S", chain]).stdout.splitlines()
        first[f"{table} {chain}"] = rules[1] if len(rules) > 1 else ""  # rules[0] is "-P ..."
    return first


#: Netfilter's conntrack hook priority: NOTRACK only works in a chain that runs before it.
_NF_PRI_CONNTRACK = -200


def _hook_prios(lab: Lab) -> dict[tuple[str, str], dict[str, int]]:
    """(family, hook) -> "table/chain" -> priority, for prerouting/output base chains."""
    doc = json.loads(lab.node_run(["nft", "-j", "list", "chains"]).stdout)
    out: dict[tuple[str, str], dict[str, int]] = {}
    for item in doc["nftables"]:
        chain = item.get("chain")
        if chain and chain.get("hook") in ("prerouting", "output"):
            fams = ("ip", "ip6") if chain["family"] == "inet" else (chain["family"],)
            for fam in fams:
                out.setdefault((fam, chain["hook"]), {})[
                    f"{chain['table']}/{chain['name']}"] = int(chain["prio"])
    return out


def test_kube_proxy_resync_keeps_dnsguard_first_in_line(
        lab: Lab, variant: str, tmp_path: Path) -> None:
    """dnsguard's rules run before kube-proxy's wherever both hook the same place.

    iptables: after kube-proxy's resync, and after kube-proxy inserts one of its own jumps at
    rule 1 of a chain dnsguard hooks (as its ensure-rule does when the jump is missing),
    `status` reports the drift and `apply` puts dnsguard's jump first again, leaving
    kube-proxy's jump in place. nftables: the tables are separate, so "first" is the hook
    priority; dnsguard's notrack must run before kube-proxy's DNAT on prerouting and output.
    """
    args = nodelocal_args(lab, tmp_path)
    assert dnsguard(lab, "apply", *args).returncode == 0
    lab.resync_kube_proxy()
    assert status(lab, args)["in_sync"] is True
    if variant == "nftables":
        prios = _hook_prios(lab)
        assert set(prios) == {(f, h) for f in ("ip", "ip6") for h in ("prerouting", "output")}
        for (_, hook), chains in prios.items():
            # the notrack chain (dnsguard's accept chains are filter-*: their order is moot)
            ours = chains[f"dnsguard/raw-{hook}"]
            theirs = [p for name, p in chains.items() if name.startswith("kube-proxy/")]
            assert theirs and ours < _NF_PRI_CONNTRACK < min(theirs), chains
    else:
        tool = "iptables-legacy" if variant.endswith("legacy") else "iptables-nft"
        ours = {f"{t} {c}": f"-A {c} -m comment --comment \"dnsguard: hook DNSGUARD-{c}\" "
                f"-j DNSGUARD-{c}" for t, c in (("raw", "PREROUTING"), ("raw", "OUTPUT"),
                                              ("filter", "INPUT"), ("filter", "OUTPUT"))}
        assert _first_rules(lab, tool) == ours
        lab.node_run([tool, "-w", "-t", "filter", "-N", "KUBE-NODEPORTS"])
        lab.node_run([tool, "-w", "-t", "filter", "-I", "INPUT", "1", *_KUBE_NODEPORTS_JUMP])
        assert _first_rules(lab, tool)["filter INPUT"].endswith("-j KUBE-NODEPORTS")
        st = status(lab, args)
        assert st["in_sync"] is False
        assert "INPUT: dnsguard's jump is rule 2, not first" in json.dumps(st["drift"]), st
        assert dnsguard(lab, "apply", *args).returncode == 0
        assert _first_rules(lab, tool) == ours
        assert lab.node_run([tool, "-w", "-t", "filter", "-C", "INPUT", *_KUBE_NODEPORTS_JUMP],
                            check=False).returncode == 0  # kube-proxy's jump is left alone
        assert status(lab, args)["in_sync"] is True
    assert dnsguard(lab, "cleanup", "--state-dir", str(tmp_path)).returncode == 0


def _log_time(text: str, needle: str, after: float) -> float:
    """Wall time of the first log line containing ``needle`` logged after ``after``."""
    for line in text.splitlines():
        if needle in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if stamp >= after - 0.01:
                return stamp
    raise AssertionError(f"no {needle!r} in the log after the flush")


def _flush_ours(lab: Lab, variant: str) -> None:
    if variant == "nftables":
        lab.node_run(["nft", "flush", "chain", "inet", "dnsguard", "raw-prerouting"])
    else:
        tool = "iptables-legacy" if variant.endswith("legacy") else "iptables-nft"
        lab.node_run([tool, "-t", "raw", "-F"])  # everyone's raw rules, as a careless admin would


def test_agent_restores_outside_flush_within_one_interval_and_sigterm_cleans_up(
        lab: Lab, variant: str, tmp_path: Path) -> None:
    before = lab.save_rules()
    args = nodelocal_args(lab, tmp_path / "state")
    log = tmp_path / "agent.log"
    agent = start_agent(lab, args, log)
    try:
        wait_for(lambda: status(lab, args)["in_sync"] is True, timeout=15)
        flushed_at = time.time()
        _flush_ours(lab, variant)
        wait_for(lambda: "rules changed outside dnsguard" in log.read_text(), timeout=5)
        wait_for(lambda: status(lab, args)["in_sync"] is True, timeout=5)
        # the agent's own log times the repair; polling `status` would add its start-up time
        repaired = _log_time(log.read_text(), "applied ", after=flushed_at)
        took = repaired - flushed_at
        print(f"\n{variant}: outside flush repaired after {took:.2f}s (--sync-interval 1)")
        assert took <= 1.0 + 0.5
    finally:
        rc = stop_agent(agent)
    assert rc == 0, log.read_text()
    assert "received SIGTERM" in log.read_text()
    assert without_empty_legacy_tables(lab.save_rules()) == without_empty_legacy_tables(before)
    assert lab.node_run(["ip", "link", "show", "dnsguard0"], check=False).returncode != 0


def test_sigint_with_skip_teardown_leaves_rules(lab: Lab, tmp_path: Path) -> None:
    args = [*nodelocal_args(lab, tmp_path / "state"), "--skip-teardown", "--drain-seconds", "0"]
    agent = start_agent(lab, args, tmp_path / "agent.log")
    try:
        wait_for(lambda: status(lab, args)["in_sync"] is True, timeout=15)
    finally:
        agent.send_signal(signal.SIGINT)
        assert agent.wait(timeout=20) == 0
    assert status(lab, args)["in_sync"] is True
    dnsguard(lab, "cleanup", "--state-dir", str(tmp_path / "state"))
