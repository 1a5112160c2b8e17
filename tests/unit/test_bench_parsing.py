"""Small parsers the benchmark relies on: conntrack listings split by source, agent log times,
process usage, the synthetic rule plan and the scenario plan."""

from __future__ import annotations

import datetime as dt

import pytest

from bench.footprint import ProcSample, usage_between
from bench.node import count_by_source, parse_log_times
from bench.rulesync import RULE_NET, synthetic_plan
from bench.spec import NODELOCAL_PATHS, profile
from bench.worker import StallClock

CONNTRACK_L = """\
udp      17 28 src=198.18.0.11 dst=198.18.1.10 sport=40001 dport=53 src=198.18.0.101 dst=198.18.0.11 sport=53 dport=40001 mark=0 use=1
udp      17 28 src=198.18.0.12 dst=198.18.1.10 sport=40002 dport=53 [UNREPLIED] src=198.18.0.102 dst=198.18.0.12 sport=53 dport=40002 mark=0 use=1
tcp      6 118 TIME_WAIT src=198.18.0.1 dst=198.18.0.101 sport=51000 dport=53 src=198.18.0.101 dst=198.18.0.1 sport=53 dport=51000 [ASSURED] mark=0 use=1
tcp      6 118 ESTABLISHED src=198.18.0.11 dst=198.18.0.200 sport=51000 dport=80 src=198.18.0.200 dst=198.18.0.11 sport=80 dport=51000 mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.
"""


def test_conntrack_entries_split_into_pods_lookups_and_the_rest():
    assert count_by_source(CONNTRACK_L, ["198.18.0.11", "198.18.0.12"]) == (2, 1)
    assert count_by_source(CONNTRACK_L, []) == (0, 3)  # port 80 is never counted


def test_agent_log_lines_get_their_wall_clock_time():
    text = ("2026-11-22 01:16:59,305 INFO agent started\n"
            "Traceback (most recent call last):\n"
            "2026-11-22 01:17:00,005 WARNING unbound exited\n")
    lines = parse_log_times(text)
    assert [m for _, m in lines] == ["INFO agent started", "WARNING unbound exited"]
    assert lines[1][0] - lines[0][0] == pytest.approx(0.7)
    assert lines[0][0] == dt.datetime(2026, 11, 22, 1, 16, 59, 305000).timestamp()


def test_usage_is_cpu_over_time_and_the_highest_rss():
    mib = 1024 * 1024
    samples = [ProcSample(10.0, 1.0, 40 * mib, 45 * mib), ProcSample(12.0, 1.1, 50 * mib,
                                                                       50 * mib),
               ProcSample(20.0, 1.5, 42 * mib, 50 * mib)]
    u = usage_between(samples)
    assert u.cpu_percent == pytest.approx(5.0)
    assert (u.rss_mib, u.max_rss_mib, u.hwm_mib) == (42.0, 50.0, 50.0)
    with pytest.raises(ValueError):
        usage_between(samples[:1])


def test_synthetic_plan_has_n_distinct_rules_inside_the_lab_range():
    plan = synthetic_plan(1000)
    rules = plan.rulesets[0].chains[0].rules
    assert plan.rule_count == 1000
    assert len({r.match.dst for r in rules}) == 1000
    assert all(r.match.dst.subnet_of(RULE_NET) for r in rules)  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        synthetic_plan(RULE_NET.num_addresses + 1)


@pytest.mark.parametrize("quick", [False, True])
def test_every_profile_runs_the_issue_scenarios(quick):
    prof = profile(quick)
    names = [s.name for s in prof.scenarios]
    assert {"steady", "burst", "kill-cache", "restart-agent"} <= set(names)
    assert any(s.conntrack_max for s in prof.scenarios)
    for s in prof.scenarios:
        if s.event != "none":
            assert s.paths == NODELOCAL_PATHS  # only node-local paths have a cache to restart
            assert s.event_at < s.load.duration
    assert 1000 in prof.rule_counts


def test_quarter_buckets_follow_kube_proxys_ratio_and_default_keeps_the_machines():
    prof = profile(False)
    by = {s.name: s for s in prof.scenarios}
    assert by["pressure-16k-quarter"].bucket_count(262144) == 4096
    assert by["pressure-4k-quarter"].bucket_count(262144) == 1024
    assert by["pressure-4k-default"].bucket_count(262144) == 262144
    assert by["steady"].bucket_count(262144) is None


def test_stall_clock_records_gaps_with_the_run_delay_across_them(tmp_path):
    stat = tmp_path / "schedstat"
    now = [100.0]
    stat.write_text("5000000 0 10\n")
    clock = StallClock(str(stat), monotonic=lambda: now[0])
    clock.start(100.0)
    for step in (0.01, 0.01, 0.06):  # quick turns; the last one re-reads the run delay
        now[0] += step
        clock()
    stat.write_text("5000000 900000000 11\n")  # 0.9 s runnable-but-waiting since then
    now[0] += 1.0  # a 1 s gap between two turns
    assert clock() == now[0]
    now[0] += 0.3  # a gap spent sleeping in epoll: no new run delay
    clock()
    clock.close()
    assert clock.stalls == [(pytest.approx(0.08), pytest.approx(1.0), pytest.approx(0.9)),
                            (pytest.approx(1.08), pytest.approx(0.3), 0.0)]


def test_stall_clock_without_schedstat_still_tells_time(tmp_path):
    clock = StallClock(str(tmp_path / "missing"))
    assert not clock.available
    assert clock() > 0
