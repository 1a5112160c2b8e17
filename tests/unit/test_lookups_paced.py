"""The open-loop lookup worker (dnsguard.testing.lookups.run_paced) without a resolver.

The fault suite lines each lookup up with the moment a fault was injected, so what matters
here: every started lookup is a sample, a lookup stuck past the grace is a failed sample (not a
missing one), and samples survive the JSON hop from the pod's worker to the test.
"""

from __future__ import annotations

import threading

import pytest

from dnsguard.testing import lookups
from dnsguard.testing.lookups import WorkerResult, merge, run_paced


def test_every_lookup_is_a_sample_and_a_stuck_one_fails_when_abandoned(
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def resolve(name: str) -> tuple[float, str | None]:
        if name == "stuck":
            release.wait(5)
            return 5.0, None
        return (0.001, None) if name == "ok" else (0.001, "Name or service not known")

    monkeypatch.setattr(lookups, "_resolve", resolve)
    try:
        res = run_paced(["ok", "bad", "stuck"], interval=0.01, duration=0.06, max_in_flight=50,
                        grace=0.2)
    finally:
        release.set()
    by_name = {n: [s for s in res.samples if s.name == n] for n in ("ok", "bad", "stuck")}
    assert by_name["ok"] and all(s.ok for s in by_name["ok"])
    assert by_name["bad"] and not any(s.ok for s in by_name["bad"])
    assert by_name["stuck"] and not any(s.ok for s in by_name["stuck"])
    assert res.unfinished == len(by_name["stuck"])
    # all abandoned at one moment, the end of the grace, whenever they started
    assert len({s.end for s in by_name["stuck"]}) == 1
    assert all(s.end > max(x.start for x in res.samples) for s in by_name["stuck"])
    assert [s.start for s in res.samples] == sorted(s.start for s in res.samples)
    assert len(res.latencies) == len(by_name["ok"])
    assert len(res.failures) == len(by_name["bad"])  # stuck ones are counted as unfinished


def test_a_full_pipeline_skips_slots_instead_of_queueing(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    monkeypatch.setattr(lookups, "_resolve", lambda name: (release.wait(5), (0.0, None))[1])
    try:
        res = run_paced(["a"], interval=0.005, duration=0.1, max_in_flight=3, grace=0.05)
    finally:
        release.set()
    assert len(res.samples) == 3 and res.unfinished == 3


def test_samples_survive_json_and_merge_in_start_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookups, "_resolve", lambda name: (0.001, None))
    a = run_paced(["x"], interval=0.01, duration=0.05, max_in_flight=5, label="pod0")
    b = run_paced(["y"], interval=0.01, duration=0.05, max_in_flight=5, label="pod1")
    back = [WorkerResult.from_json(r.to_json()) for r in (a, b)]
    assert back[0].samples == a.samples and back[1].samples == b.samples
    merged = merge(back)
    assert len(merged.samples) == len(a.samples) + len(b.samples)
    assert [s.start for s in merged.samples] == sorted(s.start for s in merged.samples)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        run_paced([], interval=0.01, duration=1, max_in_flight=1)
    with pytest.raises(ValueError):
        run_paced(["a"], interval=0, duration=1, max_in_flight=1)
