"""Real-resolver clients (bench/clients/lookup.c): parsing their JSON, merging pods, report rows.

Pure: hand-made client lines in, numbers and table cells out; no root, no namespaces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.realclients import (
    ClientOutput,
    build,
    compile_argv,
    count_to,
    dnsperf_data,
    dnsperf_rows,
    hist_percentile,
    merge,
    parse_dnsperf,
    render,
    rows,
)


def line(**over: Any) -> str:
    doc: dict[str, Any] = {
        "kind": "musl", "label": "pod0", "threads": 32, "seconds": 8.0, "elapsed": 8.2,
        "lookups": 10, "failed": 1, "ge_1s": 1, "ge_5s": 0, "unfinished": 0, "max_us": 2_500_123,
        "bins_per_decade": 100, "errors": {"-3": 1},
        "hist": [[1000.0, 6], [2000.0, 2], [2_600_000.0, 1]],
    }
    doc.update(over)
    return json.dumps(doc)


def test_parses_a_client_line_into_seconds() -> None:
    out = ClientOutput.from_json(line())
    assert out.kind == "musl" and out.lookups == 10 and out.failed == 1
    assert out.hist == ((0.001, 6), (0.002, 2), (2.6, 1))
    assert out.errors == {-3: 1}
    assert out.max_seconds == pytest.approx(2.500123)


@pytest.mark.parametrize("over", [
    {"kind": "uclibc"},
    {"lookups": 11},                       # answered + failed != lookups
    {"errors": {"-3": 2}},                 # errors do not sum to failed
    {"failed": -1},
    {"threads": True},
    {"hist": [[2000.0, 6], [1000.0, 2], [2_600_000.0, 1]]},  # edges must ascend
    {"hist": [[1000.0, 6, 1]]},
    {"elapsed": float("nan")},
])
def test_rejects_malformed_lines(over: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ClientOutput.from_json(line(**over))


def test_percentile_lands_on_unanswered_as_none() -> None:
    hist = [(0.001, 98), (0.5, 1)]
    assert hist_percentile(hist, 1, 50) == 0.001
    assert hist_percentile(hist, 1, 99) == 0.5
    assert hist_percentile(hist, 1, 100) is None   # the failed lookup sorts last
    assert hist_percentile([], 0, 50) is None
    # exact rank: 99.9 % of 1000 is the 999th, not the 1000th
    assert hist_percentile([(0.001, 999), (0.002, 1)], 0, 99.9) == 0.001


def test_merge_sums_pods_exactly_and_counts_unfinished_as_slow() -> None:
    a = ClientOutput.from_json(line())
    b = ClientOutput.from_json(line(label="pod1", failed=0, errors={}, lookups=9, ge_1s=1,
                                    unfinished=2, hist=[[1000.0, 8], [1_500_000.0, 1]]))
    s = merge([a, b], 8.0)
    assert (s.pods, s.lookups, s.failed, s.unfinished) == (2, 19, 1, 2)
    assert s.ge_1s == 1 + 1 + 2
    assert s.rate == pytest.approx(19 / 8)
    assert s.p50 == 0.001
    assert s.p999 is None  # 3 of 22 ranked lookups are unanswered
    assert s.errors == {-3: 1}
    assert s.max_seconds == pytest.approx(2.500123)


def test_merge_refuses_mixed_kinds() -> None:
    with pytest.raises(ValueError):
        merge([ClientOutput.from_json(line()),
               ClientOutput.from_json(line(kind="glibc"))], 8.0)


def test_count_to_reads_the_original_destination_only() -> None:
    text = (
        "udp      17 29 src=198.18.1.2 dst=198.19.0.10 sport=4000 dport=53 "
        "src=198.18.3.2 dst=198.18.1.2 sport=53 dport=4000 mark=0 use=1\n"
        "udp      17 29 src=198.18.1.3 dst=198.18.3.2 sport=53 dport=4001 "
        "src=198.19.0.10 dst=198.18.1.3 sport=4001 dport=53 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been shown.\n"
    )
    assert count_to(text, "198.19.0.10") == 1


def section() -> dict[str, Any]:
    def run(kind: str, path: str, rate: float, slow: int) -> dict[str, Any]:
        return {"kind": kind, "path": path, "status": "ok", "conntrack_to_cluster_ip": 0,
                "rcvbuf_errors": {"dnsmasq": 2},
                "stats": {"pods": 4, "threads": 32, "lookups_per_second": rate,
                          "failed": 0, "ge_1s": slow, "ge_5s": 0, "unfinished": 0,
                          "p50": 0.001, "p99": 0.01, "p999": None, "max_seconds": 2.5}}
    return {"grace_seconds": 30, "skipped": {"glibc": "gcc not installed"},
            "runs": [run("musl", "iptables", 20000, 100),
                     run("musl", "nodelocal-iptables", 30000, 0),
                     run("musl", "nodelocal-iptables-qps0", 40000, 0),
                     {"kind": "glibc", "path": "iptables", "status": "failed",
                      "reason": "clients failed"}]}


def test_rows_ratio_against_the_same_kind_on_kube_proxy() -> None:
    r = rows(section())
    assert r[0][3] == "1.00x" and r[1][3] == "1.50x"
    assert r[1][5] == "0" and r[0][5] == "100"
    assert r[2][3] == "2.00x" and "--cache-client-qps 0" in r[2][1]
    assert r[0][10] == "unanswered"
    assert r[3][2] == "failed"


def test_render_is_empty_without_the_part_and_names_skips() -> None:
    assert render({}) == ""
    text = render({"clients": section()})
    assert "glibc: skipped, gcc not installed" in text
    assert "| 30,000 | 1.50x |" in text


def test_compile_commands_build_musl_static() -> None:
    out = Path("/x/lookup")
    assert compile_argv("musl", out)[:2] == ["musl-gcc", "-static"]
    assert compile_argv("glibc", out)[0] == "gcc"
    with pytest.raises(ValueError):
        compile_argv("bionic", out)


def test_build_records_a_missing_compiler(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.realclients.shutil.which", lambda name: None)
    built, skipped = build(tmp_path)
    assert built == {}
    assert set(skipped) == {"glibc", "musl"} and "not installed" in skipped["musl"]


DNSPERF_OUT = """\
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         10000
  Queries completed:    9990 (99.90%)
  Queries lost:         10 (0.10%)

  Response codes:       NOERROR 9990 (100.00%)
  Average packet size:  request 49, response 71
  Run time (s):         2.000140
  Queries per second:   4994.650024

  Average Latency (s):  0.000049 (min 0.000012, max 0.003799)
  Latency StdDev (s):   0.000129
"""


def test_parses_dnsperf_statistics() -> None:
    res = parse_dnsperf(DNSPERF_OUT)
    assert (res["sent"], res["completed"], res["lost"]) == (10000, 9990, 10)
    assert res["qps"] == pytest.approx(4994.650024)
    assert res["avg_latency"] == pytest.approx(0.000049)
    assert res["max_latency"] == pytest.approx(0.003799)


@pytest.mark.parametrize("text", [
    "",                                                        # no statistics printed
    DNSPERF_OUT.replace("Queries lost:         10", "Queries lost:         0"),
    DNSPERF_OUT.replace("  Queries per second:   4994.650024\n", ""),
])
def test_dnsperf_output_without_consistent_statistics_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_dnsperf(text)


def test_dnsperf_data_uses_absolute_names_only() -> None:
    data = dnsperf_data(["svc-0", "svc-0.default", "svc-0.default.svc.cluster.local."])
    assert data == ("svc-0.default.svc.cluster.local. A\n"
                    "svc-0.default.svc.cluster.local. AAAA\n")
    with pytest.raises(ValueError):
        dnsperf_data(["svc-0"])


def test_dnsperf_rows_ratio_at_the_same_offered_rate() -> None:
    def res(qps: float, lost: int) -> dict[str, Any]:
        return {"sent": 100_000, "completed": 100_000 - lost, "lost": lost, "qps": qps,
                "avg_latency": 0.001, "max_latency": 0.2}
    sec = {"dnsperf": [
        {"path": "iptables", "rate": 40000, "status": "ok", "result": res(30000, 500),
         "conntrack_to_cluster_ip": 16, "rcvbuf_errors": {"dnsmasq": 500}},
        {"path": "nodelocal-iptables-qps0", "rate": 40000, "status": "ok",
         "result": res(39000, 0), "conntrack_to_cluster_ip": 0},
        {"path": "iptables", "rate": 80000, "status": "failed", "reason": "dnsperf exited 1"},
    ]}
    r = dnsperf_rows(sec)
    assert r[0][3] == "1.00x" and r[0][5] == "5,000" and r[0][8] == "16"
    assert r[0][9] == "dnsmasq 500" and r[1][9] == "n/a"
    assert r[1][3] == "1.30x" and r[1][5] == "0"
    assert r[2][2] == "failed"
    assert "### Capacity: dnsperf" in render({"clients": sec})
