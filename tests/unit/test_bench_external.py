"""The --external-to-cluster scale section of the benchmark: the Services the fake API publishes,
the workload planned from them, the kakao-style extrapolation, its targets and its report."""

from __future__ import annotations

import copy
import ipaddress

import pytest

from bench.external import KakaoSample, _Counting, first_log_time, kakao_json, workload
from bench.fakeapi import CHANGED_IP, MAX_EXTERNAL, changed_service, external_ip, external_service
from bench.report import render
from bench.results import extrapolate_between
from bench.targets import evaluate, fmt_seconds
from dnsguard.kube.extract import service_external
from dnsguard.netfilter import Completed
from dnsguard.plan.external import shard_of

# ------------------------------------------------------------------ what the fake API publishes


def test_external_ips_come_as_spec_external_ips_and_as_load_balancer_ingress():
    even, odd = service_external(external_service(10)), service_external(external_service(11))
    assert even is not None and odd is not None
    assert "externalIPs" in external_service(10)["spec"]
    assert external_service(11)["status"]["loadBalancer"]["ingress"] == [{"ip": "198.19.0.11"}]
    assert even.key == "ns10/svc10" and odd.key == "ns11/svc11"
    assert [str(ip) for ip in even.external_ips] == [external_ip(10)] == ["198.19.0.10"]
    assert [str(ip) for ip in odd.cluster_ips] == ["198.18.128.11"]
    for svc in (even, odd):
        for ip in (*svc.external_ips, *svc.cluster_ips):
            assert ip in ipaddress.ip_network("198.18.0.0/15")


def test_the_changed_service_moves_to_an_address_none_of_the_others_has():
    moved = service_external(changed_service(1000))
    assert moved is not None and moved.key == "ns0/svc500"
    assert [str(ip) for ip in moved.external_ips] == [CHANGED_IP]
    assert CHANGED_IP not in {external_ip(i) for i in range(MAX_EXTERNAL)}


def test_service_indexes_stay_inside_the_ranges():
    external_service(MAX_EXTERNAL - 1)
    with pytest.raises(ValueError, match="out of"):
        external_service(MAX_EXTERNAL)


# ------------------------------------------------------------------ the workload


def test_workload_plans_four_rules_per_service_and_one_change():
    w = workload(120, extras=5)
    assert [s.key for s in w.services] == sorted(s.key for s in w.services)
    shards = {shard_of(ip) for s in w.services for ip in s.external_ips}
    # mark + DNAT in its chain, two dispatch rules in its shards; a jump per shard and hook
    assert w.plan.rule_count == 4 * 120 + 2 * len(shards)
    assert w.to_json()["chains"] == 120 + 2 * len(shards) + 2
    assert w.changed_key == "ns10/svc60"
    assert sum(a != b for a, b in zip(w.services, w.changed, strict=True)) == 1
    assert w.plan != w.changed_plan


def test_extra_services_sort_after_all_others_so_appending_keeps_the_plans_order():
    w = workload(60, extras=3)
    assert min(e.key for e in w.extras) > max(s.key for s in w.services)
    assert not {e.key for e in w.extras} & {s.key for s in w.services}
    ext = {ip for s in (*w.services, *w.extras) for ip in s.external_ips}
    assert len(ext) == 63


# ------------------------------------------------------------------ kakao-style estimate


def test_two_point_extrapolation_is_exact_for_a_cost_linear_in_table_size():
    def cost(size: int) -> float:
        return 0.01 + 0.0003 * size

    def sample(start: int, k: int) -> tuple[float, float]:
        return start + (k - 1) / 2, sum(cost(start + i) for i in range(k)) / k

    total = 10_000
    exact = sum(cost(i) for i in range(total))
    assert extrapolate_between(sample(0, 50), sample(total, 3), total) == pytest.approx(exact)
    assert extrapolate_between(sample(total, 3), sample(0, 50), total) == pytest.approx(exact)


def test_two_point_extrapolation_never_lets_a_table_get_cheaper_as_it_grows():
    assert extrapolate_between((0, 2.0), (100, 1.0), 10) == pytest.approx(15.0)  # the mean
    assert extrapolate_between((5, 1.0), (5, 3.0), 4) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        extrapolate_between((-1, 1.0), (5, 1.0), 4)


def test_kakao_estimate_adds_the_one_off_setup_and_counts_execs_per_service():
    setup = KakaoSample(0, 0, 0.5, 4)
    empty = KakaoSample(0, 50, 5.0, 450)  # 0.1 s per Service around size 24.5
    full = KakaoSample(1000, 2, 2.2, 18)  # 1.1 s per Service around size 1000.5
    assert empty.per_service == pytest.approx(0.1) and full.midpoint == 1000.5
    doc = kakao_json(1000, setup, empty, full)
    slope = (1.1 - 0.1) / (1000.5 - 24.5)
    at_mean = 0.1 + slope * (499.5 - 24.5)
    assert doc["seconds"] == pytest.approx(0.5 + 1000 * at_mean, abs=0.05)
    assert doc["execs"] == 4 + 9 * 1000
    assert doc["extrapolated"] is True
    assert doc["full_table"] == {"table_services": 1000, "services": 2, "seconds": 2.2,
                                 "execs": 18}


def test_the_counting_runner_counts_execs_and_restore_lines():
    class Stub:
        def run(self, argv, *, stdin=None, timeout=30.0):
            return Completed(tuple(argv), 0, "", "")

    rec = _Counting(Stub())
    rec.run(["iptables-save"])
    rec.run(["iptables-restore", "--noflush"], stdin="*nat\n:A - [0:0]\nCOMMIT\n")
    assert rec.take() == (2, 3)
    assert rec.take() == (0, 0)


def test_agent_log_times_pick_the_first_matching_message_after_an_instant():
    text = ("2026-11-22 04:00:00,100 INFO applied ipv4/nat\n"
            "2026-11-22 04:00:05,250 INFO facts changed: new plan with 4 rules\n"
            "2026-11-22 04:00:06,500 INFO applied ipv4/nat\n")
    first = first_log_time(text, "applied", 0.0)
    assert first is not None
    after = first_log_time(text, "applied", first + 1)
    assert after == pytest.approx(first + 6.4)
    assert first_log_time(text, "facts changed", first) == pytest.approx(first + 5.15)
    assert first_log_time(text, "teardown", 0.0) is None


# ------------------------------------------------------------------ targets and report


def section(n: int = 10_000) -> dict:
    kakao = {"seconds": 18000.0, "extrapolated": True, "execs": 90004,
             "setup": {"table_services": 0, "services": 0, "seconds": 0.2, "execs": 4},
             "empty_table": {"table_services": 0, "services": 50, "seconds": 5.0, "execs": 450},
             "full_table": {"table_services": n, "services": 3, "seconds": 10.2, "execs": 27}}
    row = {"full_sync_seconds": 2.0, "full_sync_restore_lines": 50006,
           "noop_sync_seconds": 1.9, "partial_sync_seconds": 3.4,
           "partial_sync_restore_lines": 20004, "cleanup_seconds": 0.5}
    usage = {"seconds": 5.0, "cpu_percent_of_one_core": 0.4, "rss_mib": 51.0, "max_rss_mib": 51.0,
             "peak_rss_mib": 51.0}
    return {
        "services": n, "rules": 4 * n, "chains": n + 2, "plan_seconds": 1.6,
        "changed_service": "ns0/svc5000", "changed_to": CHANGED_IP, "sample_services": 50,
        "sample_seconds_cap": 8.0, "load_before": [0.1, 0.2, 0.3], "load_after": None,
        "backends": [
            {"backend": "iptables-legacy", **row, "kakao": kakao, "kakao_over_full": 9000.0},
            {"backend": "iptables-nft", **row, "kakao": {**kakao, "seconds": 60.0},
             "kakao_over_full": 30.0},
            {"backend": "nftables", **row, "kakao_skipped": "kakao's tools write iptables only"},
        ],
        "agent": {
            "backend": "iptables-legacy",
            "without": {"external_services": 0, "rules": 0, "start_to_applied_seconds": None,
                        "start_to_in_sync_seconds": 1.3, "synced": usage},
            "with": {"external_services": n, "rules": 4 * n, "start_to_applied_seconds": 9.5,
                     "start_to_in_sync_seconds": 11.0,
                     "synced": {**usage, "rss_mib": 60.0, "peak_rss_mib": 62.0},
                     "change": {"replanned_seconds": 0.4, "applied_seconds": 5.0,
                                "in_sync_seconds": 7.5, "kernel_has_new_ip": True,
                                "kernel_has_old_ip": False},
                     "peak_rss_mib_after_change": 63.5},
            "rss_ratio": 1.18,
        },
    }


def targets(doc: dict) -> dict:
    return {t.name: t for t in evaluate(doc)}


def test_external_targets_judge_the_worst_iptables_backend_and_the_peak_rss():
    t = targets({"external": section()})
    assert t["external-sync"].met is False  # iptables-nft at 30x
    assert "iptables-legacy: 9,000x (2.00 s vs 5.0 h, extrapolated)" in t["external-sync"].measured
    assert t["external-rss"].met is True  # 63.5 MiB after the change
    assert t["external-rss"].measured.startswith("peak 63.5 MiB")
    ext = section()
    ext["agent"]["with"]["peak_rss_mib_after_change"] = 64.5
    ext["backends"][1]["kakao_over_full"] = 60.0
    t = targets({"external": ext})
    assert t["external-rss"].met is False and t["external-sync"].met is True


def test_external_targets_are_not_judged_at_another_size_or_without_the_section():
    t = targets({"external": section(1000)})
    assert t["external-sync"].met is None and "not judged" in t["external-sync"].measured
    assert t["external-rss"].met is None
    t = targets({})
    assert t["external-sync"].met is None and t["external-sync"].measured == "not measured"
    ext = section()
    ext["agent"] = {"backend": "iptables-legacy", "failed": "agent exited 1"}
    assert targets({"external": ext})["external-rss"].measured == "not measured"


def test_report_shows_every_backend_the_kakao_estimate_and_the_agent():
    text = render({"external": section()})
    legacy = next(ln for ln in text.splitlines() if ln.startswith("| iptables-legacy |"))
    assert "| 2.00 s | 3.40 s | 1.90 s | 50,006 / 20,004 | 500 ms |" in legacy
    assert "5.0 h, 90,004 execs (extrapolated: 0.100 s per Service on an empty table" in legacy
    assert legacy.endswith("| 9,000x |")
    nft = next(ln for ln in text.splitlines() if ln.startswith("| nftables |"))
    assert "n/a (kakao's tools write iptables only)" in nft
    agent = next(ln for ln in text.splitlines() if ln.startswith("| 10,000 | 40,000 |"))
    assert "| 9.50 s | 11.0 s | 60.0 | 62.0 (63.5 after the change) |" in agent
    assert "1.18x the same agent's" in text
    assert "iptables-save then holds the new IP and not the old one" in text


def test_report_says_what_failed():
    ext = copy.deepcopy(section())
    ext["backends"][1] = {"backend": "iptables-nft", "failed": "restore timed out"}
    ext["agent"] = {"backend": "iptables-legacy", "failed": "agent exited 1: boom"}
    ext["agent"]["with"] = None
    text = render({"external": ext})
    assert "| iptables-nft | failed | restore timed out |" in text
    assert "The agent's measurement failed: agent exited 1: boom" in text
    assert "## Scale: `--external-to-cluster`\n\nNot measured." in render({})


@pytest.mark.parametrize(("value", "text"), [
    (None, "-"), (0.0123, "12 ms"), (2.0, "2.00 s"), (41.19, "41.2 s"), (900.0, "15.0 min"),
    (18000.0, "5.0 h"),
])
def test_durations_read_at_a_glance(value, text):
    assert fmt_seconds(value) == text
