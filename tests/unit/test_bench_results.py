"""Benchmark aggregation: merging pods, percentiles over unanswered lookups, ratios, deltas,
and the extrapolation of capped per-rule timings."""

from __future__ import annotations

import json
import math

import pytest

from bench.results import (
    HIST_EDGES,
    SlowEvent,
    Stall,
    WorkerOutput,
    counter_deltas,
    extrapolate_total,
    log_histogram,
    ratio,
    starved_within,
    summarize_load,
)
from bench.run import _sum_counts
from bench.worker import decode_latencies, encode_latencies

INF = math.inf


def worker(latencies, *, outcomes=None, started=100.0, cpu=1.0, elapsed=10.0, slow=(),
           timeout=5.0, label="pod0"):
    n_ok = sum(1 for x in latencies if not math.isinf(x))
    return WorkerOutput(label=label, started=started, late=0.0, elapsed=elapsed, duration=10.0,
                        timeout=timeout, lookups=len(latencies), queries=2 * len(latencies),
                        outcomes=outcomes or {"ok": n_ok}, cpu_seconds=cpu,
                        latencies=latencies, slow=tuple(slow))


# ------------------------------------------------------------------ merging pods


def test_percentiles_are_over_all_pods_merged_not_averaged():
    # pod0 is fast, pod1 slow: the merged p50 is an observed value from the merged sample
    a = worker([0.001] * 90, label="pod0")
    b = worker([0.010] * 10, label="pod1")
    s = summarize_load([a, b], duration=10.0)
    assert s.lookups == 100
    assert s.p50 == 0.001
    assert s.p99 == 0.010
    assert s.max == 0.010
    assert s.rate == 10.0  # lookups per second of the launch window


def test_a_percentile_landing_on_an_unanswered_lookup_reads_none():
    lat = [0.001] * 98 + [INF, INF]
    s = summarize_load([worker(lat, outcomes={"ok": 98, "timeout": 2})])
    assert s.p50 == 0.001
    assert s.p99 is None  # rank 99 of 100 is a timeout
    assert s.max is None
    assert s.answered == 98 and s.timeouts == 2 and s.failed == 2


def test_timeouts_count_as_slow_and_very_slow_failures_do_not():
    lat = [0.002, 1.5, 6.0, INF, INF, INF]
    s = summarize_load([worker(lat, outcomes={"ok": 3, "timeout": 2, "refused": 1})])
    # answered >= 1 s: 1.5 and 6.0; timeouts waited the 5 s timeout: both thresholds
    assert s.at_least_1s == 2 + 2
    assert s.at_least_5s == 1 + 2
    assert s.errors == {"refused": 1}
    assert s.failed == 3


def test_short_timeout_does_not_count_in_the_five_second_bucket():
    s = summarize_load([worker([INF], outcomes={"timeout": 1}, timeout=2.0)])
    assert s.at_least_1s == 1 and s.at_least_5s == 0


def test_generator_cores_is_cpu_over_wall_time_of_the_pods_running_together():
    s = summarize_load([worker([0.001], cpu=3.0, elapsed=10.0),
                        worker([0.001], cpu=2.0, label="pod1")])
    assert s.generator_cores == pytest.approx(0.5)
    assert s.pods == 2


def test_rounds_of_the_same_pods_average_their_cores_and_add_their_time():
    rounds = [worker([0.001] * 10, cpu=3.0), worker([0.001] * 30, cpu=1.0)]  # both pod0
    s = summarize_load(rounds, duration=20.0)
    assert s.generator_cores == pytest.approx(0.2)
    assert s.rate == 2.0 and s.pods == 1


def test_slow_events_are_put_on_one_clock_and_sorted():
    a = worker([1.2], started=100.0, slow=[SlowEvent(2.0, 1.2, "ok", "svc-1", "pod0")])
    b = worker([1.3], started=100.5, label="pod1",
               slow=[SlowEvent(1.0, 1.3, "ok", "svc-2", "pod1")])
    s = summarize_load([a, b])
    assert [(e.offset, e.pod) for e in s.slow] == [(1.5, "pod1"), (2.0, "pod0")]


def test_no_workers_is_an_empty_run_not_a_crash():
    s = summarize_load([], duration=10.0)
    assert s.lookups == 0 and s.rate == 0.0 and s.p50 is None


def test_to_json_has_no_infinities():
    s = summarize_load([worker([0.001, INF], outcomes={"ok": 1, "timeout": 1})])
    text = json.dumps(s.to_json(), allow_nan=False)
    assert '"max": null' in text


# ------------------------------------------------------------------ worker wire format


def test_worker_output_round_trips_latencies_including_unanswered():
    lat = [0.0012, 1.5, INF]
    line = json.dumps({
        "label": "pod3", "started": 1.0, "late": 0.0, "elapsed": 10.0, "duration": 10.0,
        "timeout": 5.0, "lookups": 3, "queries": 6, "outcomes": {"ok": 2, "timeout": 1},
        "cpu_seconds": 0.5, "slow": [[1.0, 1.5, "ok", "svc-1"], [2.0, None, "timeout", "x"]],
        "latencies": encode_latencies(lat),
    })
    w = WorkerOutput.from_json(line)
    assert list(w.latencies) == lat
    assert w.slow[1] == SlowEvent(2.0, None, "timeout", "x", "pod3")


def test_worker_output_with_a_truncated_sample_is_rejected():
    line = json.dumps({
        "label": "pod0", "started": 1.0, "late": 0.0, "elapsed": 1.0, "duration": 1.0,
        "timeout": 5.0, "lookups": 3, "queries": 6, "outcomes": {"ok": 3}, "cpu_seconds": 0.1,
        "slow": [], "latencies": encode_latencies([0.1, 0.2]),
    })
    with pytest.raises(ValueError, match="2 latencies for 3 lookups"):
        WorkerOutput.from_json(line)


def test_latency_encoding_is_exact():
    values = [1e-6, 0.123456789, 4.9999, INF]
    assert list(decode_latencies(encode_latencies(values))) == values


# ------------------------------------------------------------------ histogram, deltas, ratios


def test_histogram_clamps_to_end_bins_and_skips_unanswered():
    counts = log_histogram([1e-9, 1e-3, 1e-3, 100.0, INF, math.nan])
    assert len(counts) == len(HIST_EDGES) - 1
    assert counts[0] == 1  # below the first edge
    assert counts[-1] == 1  # above the last edge
    assert sum(counts) == 4
    # 1 ms sits exactly on an edge: it belongs to the bin that starts there
    i = HIST_EDGES.index(min(HIST_EDGES, key=lambda e: abs(e - 1e-3)))
    assert counts[i] == 2


def test_counter_missing_on_this_kernel_is_none_not_zero():
    before = {"drop": 1, "early_drop": 0}
    after = {"drop": 4, "early_drop": 10, "insert_failed": 3}
    assert counter_deltas(before, after, ("drop", "early_drop", "insert_failed")) == {
        "drop": 3, "early_drop": 10, "insert_failed": None}


@pytest.mark.parametrize(("value", "base", "want"), [
    (9.0, 10.0, 0.9), (5.0, 0.0, None), (None, 1.0, None), (1.0, None, None),
    (1.0, math.nan, None),
])
def test_ratio_is_none_when_the_baseline_cannot_judge(value, base, want):
    got = ratio(value, base)
    assert got == pytest.approx(want) if want is not None else got is None


# ------------------------------------------------------------------ extrapolation


def test_extrapolation_follows_a_per_rule_cost_that_grows_with_the_table():
    per_rule = [0.01 + 0.001 * i for i in range(100)]  # a + b*i exactly
    want = sum(0.01 + 0.001 * i for i in range(1000))
    assert extrapolate_total(per_rule, 1000) == pytest.approx(want)


def test_extrapolation_never_assumes_a_table_gets_cheaper_as_it_grows():
    per_rule = [0.05 - 0.0001 * i for i in range(100)]  # noise sloping down
    total = extrapolate_total(per_rule, 1000)
    assert total >= sum(per_rule) + 900 * min(per_rule) * 0.99


def test_extrapolation_uses_measured_values_when_complete():
    assert extrapolate_total([1.0, 2.0, 3.0], 3) == 6.0
    assert extrapolate_total([1.0, 2.0, 3.0], 2) == 3.0
    assert extrapolate_total([0.5], 10) == 5.0
    with pytest.raises(ValueError):
        extrapolate_total([], 10)


# ------------------------------------------------------------------ generator starvation


def test_starved_time_counts_only_the_runnable_part_of_overlapping_gaps():
    stalls = [Stall(1.0, 1.0, 1.0), Stall(5.0, 2.0, 0.0), Stall(8.0, 1.0, 0.5)]
    assert starved_within(stalls, 0.0, 10.0) == pytest.approx(1.0 + 0.0 + 0.5)
    assert starved_within(stalls, 1.5, 1.8) == pytest.approx(0.3)
    assert starved_within(stalls, 2.0, 5.0) == 0.0


def test_a_lookup_slow_only_because_its_worker_was_starved_is_counted_apart():
    # pod0 starved 1.2 s from t=2.0; a lookup started at 1.9 answered after 1.4 s: DNS took
    # 0.2 s. A lookup started at 6 took 1.5 s with the worker running: the DNS path's.
    w = worker([0.001, 1.4, 1.5], started=0.0,
               slow=[SlowEvent(1.9, 1.4, "ok"), SlowEvent(6.0, 1.5, "ok")])
    w = WorkerOutput(**{**w.__dict__, "stalls": (Stall(2.0, 1.2, 1.2),)})
    s = summarize_load([w])
    assert s.at_least_1s == 2
    assert s.at_least_1s_generator == 1
    assert s.at_least_1s_dns == 1
    assert s.generator_stall_max == pytest.approx(1.2)
    assert [e.starved for e in s.slow] == [pytest.approx(1.2), 0.0]


def test_waiting_in_poll_for_a_lost_answer_is_not_starvation():
    # the worker slept 5 s in epoll (no run delay): a real timeout of the DNS path
    w = worker([INF], outcomes={"timeout": 1}, slow=[SlowEvent(1.0, None, "timeout")])
    w = WorkerOutput(**{**w.__dict__, "stalls": (Stall(1.0, 5.0, 0.01),)})
    s = summarize_load([w])
    assert s.at_least_1s == 1 and s.at_least_1s_generator == 0


def test_without_schedstat_starvation_is_unknown_not_zero():
    s = summarize_load([worker([1.5], slow=[SlowEvent(0.0, 1.5, "ok")])])
    assert s.at_least_1s_generator is None and s.generator_stall_max is None
    assert s.at_least_1s_dns == 1


def test_counters_summed_over_rounds_stay_unknown_if_one_round_could_not_read_them():
    got = _sum_counts([{"drop": 1, "early_drop": 2}, {"drop": 3, "early_drop": None}])
    assert got == {"drop": 4, "early_drop": None}
