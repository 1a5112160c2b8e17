"""`dnsguard status --watch` renders rates and the probe's p99 from two scrapes of a live agent
(tests/unit/data/monitoring/metrics.txt, recorded from a lab agent) one second apart."""

from __future__ import annotations

import io
import re
from pathlib import Path

from dnsguard.watch import Scrape, parse, render, run

SCRAPE = parse((Path(__file__).parent / "data/monitoring/metrics.txt").read_text())


def later(base: Scrape, moves: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> Scrape:
    """``base`` with some series moved by the given amounts."""
    return {k: v + moves.get(k, 0.0) for k, v in base.items()}


def test_rates_ratio_and_p99_over_the_last_second() -> None:
    cur = later(SCRAPE, {("dnsguard_cache_queries_total", ()): 100,
                         ("dnsguard_cache_hits_total", ()): 80,
                         ("dnsguard_cache_responses_total", (("rcode", "NXDOMAIN"),)): 10})
    # one probe lookup to the cache: 1 ms; it lands in every bucket from le=0.001 up
    for key in [k for k in cur if k[0] == "dnsguard_probe_duration_seconds_bucket"
                and ("target", "local") in k[1] and float(dict(k[1])["le"]) >= 0.001]:
        cur = {**cur, key: cur[key] + 1}
    text = render(SCRAPE, cur, 2.0)
    assert "cache       50.0 queries/s, hit ratio 80%" in text
    assert "answers     NXDOMAIN 5.0/s, SERVFAIL 0.0/s" in text
    assert "probe p99   local: <= 1 ms (1 lookups)" in text
    assert "rules       in sync" in text and "intercept   yes" in text
    assert re.search(r"conntrack   \d+ / \d+ \(\d+% full\)", text)


def test_a_failed_open_node_and_a_timed_out_probe_say_so() -> None:
    cur = {k: (0.0 if k[0] == "dnsguard_cache_intercepting" else v) for k, v in SCRAPE.items()}
    inf = next(k for k in cur if k[0] == "dnsguard_probe_duration_seconds_bucket"
               and ("target", "cluster") in k[1] and dict(k[1])["le"] == "+Inf")
    cur[inf] += 1
    text = render(SCRAPE, cur, 1.0)
    assert "NO (failed open)" in text
    assert "probe p99   cluster: timeout (1 lookups)" in text


def test_plain_text_when_not_a_tty_and_unreachable_agent_fails() -> None:
    out = io.StringIO()
    assert run(("127.0.0.1", 9), out, scrape=lambda: SCRAPE, iterations=2,
               sleep=lambda s: None) == 0
    assert out.getvalue().count("dnsguard status --watch") == 2
    assert "\x1b[" not in out.getvalue()

    def down() -> Scrape:
        raise ConnectionRefusedError("refused")

    assert run(("127.0.0.1", 9), io.StringIO(), scrape=down, iterations=1,
               sleep=lambda s: None) == 1


def test_rates_span_the_window_not_the_last_second() -> None:
    """The agent's cache counters move once per 5 s poll: a 1 s difference would read zero."""
    key = ("dnsguard_cache_queries_total", ())
    clock = iter(float(i) for i in range(100))
    scrapes = ({**SCRAPE, key: SCRAPE[key] + 50 * (i // 5)} for i in range(100))
    out = io.StringIO()
    run(("127.0.0.1", 9), out, scrape=lambda: next(scrapes), clock=lambda: next(clock),
        iterations=12, sleep=lambda s: None)
    last = out.getvalue().strip().split("\n\n")[-1]
    # 10 s window: two polls of 50 queries each
    assert "rates over 10s" in last and "cache       10.0 queries/s" in last, last
