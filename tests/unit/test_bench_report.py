"""Benchmark report: markdown rendering and the targets' verdicts from a results document."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from bench.report import fmt_latency, markdown_table, render
from bench.targets import evaluate


def stats(rate: float, slow: int = 0, timeouts: int = 0, p99: float | None = 0.004) -> dict:
    return {"lookups": int(rate * 10), "answered": int(rate * 10) - timeouts,
            "timeouts": timeouts, "errors": {}, "duration_seconds": 10.0,
            "lookups_per_second": rate,
            "latency_seconds": {"p50": 0.001, "p99": p99, "p99.9": 0.02, "max": 0.05},
            "at_least_1s": slow, "at_least_5s": timeouts, "queries": 0,
            "generator_cores": 0.5, "pods": 4, "late_start_seconds": 0.0,
            "histogram": {"edges_seconds": [], "counts": []}, "slow": []}


def run(path: str, scenario: str, rate: float, **kw: Any) -> dict:
    return {"path": path, "scenario": scenario, "status": "ok", "stats": stats(rate, **kw),
            "conntrack": {"drop": 0, "early_drop": 5, "insert_failed": 0, "clash_resolve": 0},
            "rcvbuf_errors": {"dnsmasq": 3}}


def doc() -> dict:
    paths = ["iptables", "nftables", "nodelocal-iptables", "nodelocal-nftables", "reference"]
    runs = [run(p, "steady", r) for p, r in zip(paths, [5000, 5200, 9000, 9100, 10000],
                                                strict=True)]
    runs += [run(p, "pressure-4k-quarter", r, slow=s, timeouts=s)
             for p, r, s in zip(paths, [50, 4000, 8900, 9000, 10000], [16, 3, 0, 0, 0],
                                strict=True)]
    runs.append({"path": "nodelocal-iptables", "scenario": "burst", "status": "skipped",
                 "reason": "needs --allow-sysctl"})
    return {
        "date": "2026-01-01", "command": "python -m bench", "profile": "full",
        "machine": {"cpus": 2, "kernel": "6.18"},
        "load": {"description": "x", "answer_ttl": 5, "timeout_seconds": 5.0},
        "paths": [{"name": p, "title": p} for p in paths],
        "scenarios": [{"name": "steady", "conntrack_max": None},
                      {"name": "burst", "conntrack_max": None},
                      {"name": "pressure-4k-quarter", "conntrack_max": 4096}],
        "runs": runs,
        "calibration": [
            {"path": "iptables", "lookups": 300, "entries": 399, "pod_entries": 399,
             "other_entries": 0, "per_lookup": 1.33},
            {"path": "nodelocal-iptables", "lookups": 300, "entries": 4, "pod_entries": 0,
             "other_entries": 4, "per_lookup": 0.0},
            {"path": "nodelocal-nftables", "lookups": 300, "entries": 4, "pod_entries": 0,
             "other_entries": 4, "per_lookup": 0.0},
        ],
        "rule_sync": [
            {"backend": "iptables-nft", "rules": 1000, "dnsguard_apply_seconds": 0.1,
             "dnsguard_noop_sync_seconds": 0.05, "per_rule_exec_seconds": 20.0,
             "per_rule_exec_extrapolated": True, "per_rule_exec_rules_timed": 500,
             "per_rule_exec_seconds_timed": 10.0, "speedup": 200.0},
            {"backend": "iptables-legacy", "rules": 1000, "dnsguard_apply_seconds": 0.5,
             "dnsguard_noop_sync_seconds": 0.05, "per_rule_exec_seconds": 20.0,
             "per_rule_exec_extrapolated": False, "per_rule_exec_rules_timed": 1000,
             "per_rule_exec_seconds_timed": 20.0, "speedup": 40.0},
        ],
        "footprint": {"nodelocal-iptables": {
            "idle": {"seconds": 20, "cpu_percent_of_one_core": 1.0, "rss_mib": 50.0,
                     "max_rss_mib": 50.0, "peak_rss_mib": 51.0},
            "churn": {"seconds": 20, "cpu_percent_of_one_core": 5.0, "rss_mib": 50.0,
                      "max_rss_mib": 50.0, "peak_rss_mib": 52.5},
            "repairs": 19, "unbound_rss_mib": 20.0}},
        "ceiling": {"pods": 1, "concurrency": 64, "lookups_per_second": 15000.0,
                    "generator_cores": 0.9},
    }


def verdicts(d: dict) -> dict[str, bool | None]:
    return {t.name: t.met for t in evaluate(d)}


# ------------------------------------------------------------------ targets


def test_targets_judge_each_goal_from_the_same_run():
    v = verdicts(doc())
    assert v["nodelocal-no-slow"] is True
    assert v["pressure-throughput"] is True  # 8900/9000 and 9000/9100 are >= 0.9
    assert v["ceiling"] is True  # 9000/10000
    assert v["no-conntrack"] is True  # pod entries 0; the cache's upstream is reported apart
    assert v["rule-sync"] is False  # legacy at 40x
    assert v["rss"] is True


def test_one_slow_node_local_lookup_fails_the_slow_target_and_names_the_scenario():
    d = doc()
    d["runs"][2]["stats"]["at_least_1s"] = 1
    t = {t.name: t for t in evaluate(d)}["nodelocal-no-slow"]
    assert t.met is False
    assert "steady 1" in t.measured


def test_pressure_ratio_compares_each_path_with_its_own_steady_rate():
    d = doc()
    d["runs"][7]["stats"]["lookups_per_second"] = 8000  # nodelocal-iptables: 8000/9000
    t = {t.name: t for t in evaluate(d)}["pressure-throughput"]
    assert t.met is False
    assert "0.889x" in t.measured
    assert "baseline iptables: min 0.010x" in t.measured


def test_unmeasured_targets_are_unknown_not_passed():
    d = doc()
    d["runs"] = [r for r in d["runs"] if r["scenario"] == "steady"]
    del d["rule_sync"], d["footprint"]
    v = verdicts(d)
    assert v["pressure-throughput"] is None
    assert v["rule-sync"] is None
    assert v["rss"] is None


def test_ceiling_target_fails_below_ninety_percent_even_when_it_would_print_as_090():
    d = doc()
    d["runs"][3]["stats"]["lookups_per_second"] = 8960  # nodelocal-nftables: 0.896x
    t = {t.name: t for t in evaluate(d)}["ceiling"]
    assert t.met is False and "0.896x" in t.measured


def test_pod_entries_fail_the_conntrack_target():
    d = doc()
    d["calibration"][1]["per_lookup"] = 0.01
    assert verdicts(d)["no-conntrack"] is False


# ------------------------------------------------------------------ rendering


def test_markdown_table_aligns_and_escapes():
    text = markdown_table(["a", "b"], [["x|y", "1"]], "lr")
    assert text.splitlines() == ["| a | b |", "| --- | ---: |", "| x\\|y | 1 |"]
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [["only one"]])


@pytest.mark.parametrize(("value", "text"), [
    (0.00123, "1.23 ms"), (0.25, "250 ms"), (1.5, "1.50 s"), (None, "unanswered"),
])
def test_latency_format(value, text):
    assert fmt_latency(value) == text


def test_render_puts_ratios_against_the_same_run_and_shows_skipped_runs():
    d = doc()
    d["targets"] = [t.to_json() for t in evaluate(d)]
    text = render(d)
    speed, tail = [ln for ln in text.splitlines() if ln.startswith("| steady | nodelocal-ipt")]
    cells = [c.strip() for c in speed.strip("|").split("|")]
    assert cells[2:6] == ["9,000", "1.80x", "0.90x", "-"]  # rate, x iptables, x ref, x steady
    assert "0 / 5 / 0 / 0 / n/a" in tail  # chaintoolong absent: not maintained, not zero
    pressure = next(ln for ln in text.splitlines()
                    if ln.startswith("| pressure-4k-quarter | iptables"))
    assert "| 0.01x |" in pressure  # 50/s under pressure against its own 5000/s steady
    skipped = next(ln for ln in text.splitlines() if ln.startswith("| burst |"))
    assert "skipped" in skipped and "needs --allow-sysctl" in skipped
    assert "| rule sync >= 50x faster" in text and "**not met**" in text
    assert "extrapolated from 500 rules timed in 10 s" in text


def test_render_survives_a_document_with_parts_missing():
    d = copy.deepcopy(doc())
    for key in ("rule_sync", "footprint", "ceiling", "calibration"):
        d.pop(key)
    text = render(d)
    assert "## Rule sync cost" in text and "Not measured" in text
