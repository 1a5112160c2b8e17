"""The issue's targets, judged from a results document (the JSON the benchmark writes).

Pure: a document in, `Target` values out, so a stored run can be re-judged and every verdict
unit-tested. A target the run could not measure (scenario skipped, VM unavailable) is
``met=None`` with the reason, never a pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.results import Target, ratio
from bench.spec import NODELOCAL_PATHS, REFERENCE

__all__ = ["evaluate", "fmt_seconds", "run_index"]

Doc = Mapping[str, Any]

PRESSURE_MIN = 0.9
CEILING_MIN = 0.9
SYNC_MIN = 50.0
RSS_MAX_MIB = 64.0
#: Services with external IPs the --external-to-cluster targets are set at
EXTERNAL_SERVICES = 10_000


def run_index(doc: Doc) -> dict[tuple[str, str], Mapping[str, Any]]:
    """(path, scenario) -> run entry, for runs that completed."""
    return {(r["path"], r["scenario"]): r for r in doc.get("runs", []) if r.get("status") == "ok"}


def _rate(run: Mapping[str, Any] | None) -> float | None:
    if run is None:
        return None
    v = run["stats"]["lookups_per_second"]
    return float(v) if v is not None else None


def _fmt(x: float | None, digits: int = 3) -> str:
    """Three digits: a verdict against 0.9 must not hinge on a value printed as 0.90."""
    return "n/a" if x is None else f"{x:.{digits}f}x"


def _slow_target(doc: Doc, runs: Mapping[tuple[str, str], Mapping[str, Any]],
                 paths: Sequence[str]) -> Target:
    parts: list[str] = []
    details: dict[str, object] = {}
    total = 0
    measured = False
    for path in paths:
        mine = {sc: r["stats"] for (p, sc), r in runs.items() if p == path}
        if not mine:
            continue
        measured = True
        raw = {sc: s["at_least_1s"] for sc, s in mine.items()}
        gen = {sc: s.get("at_least_1s_generator_starved") or 0 for sc, s in mine.items()}
        dns = {sc: raw[sc] - gen[sc] for sc in mine}
        total += sum(dns.values())
        bad = ", ".join(f"{sc} {n}" for sc, n in dns.items() if n)
        text = f"{path}: {sum(dns.values())}" + (f" ({bad})" if bad else
                                                   f" in {len(mine)} scenarios")
        if sum(gen.values()):
            text += f" [+{sum(gen.values())} while the load generator itself was starved]"
        parts.append(text)
        details[path] = {"at_least_1s": raw, "generator_starved": gen,
                         "unanswered": {sc: s["timeouts"] + sum(s["errors"].values())
                                        for sc, s in mine.items()}}
    return Target("nodelocal-no-slow", "dnsguard node-local: 0 lookups >= 1 s in every scenario",
                  "; ".join(parts) or "not measured", (total == 0) if measured else None, details)


def _pressure_target(doc: Doc, runs: Mapping[tuple[str, str], Mapping[str, Any]],
                     paths: Sequence[str]) -> Target:
    pressure = [s["name"] for s in doc.get("scenarios", []) if s.get("conntrack_max")]
    parts: list[str] = []
    worst: float | None = None
    details: dict[str, object] = {}
    for path in (*paths, "iptables"):
        steady = _rate(runs.get((path, "steady")))
        ratios = {sc: ratio(_rate(runs.get((path, sc))), steady) for sc in pressure
                  if (path, sc) in runs}
        known = [r for r in ratios.values() if r is not None]
        if not known:
            continue
        low = min(known)
        details[path] = {k: None if v is None else round(v, 3) for k, v in ratios.items()}
        if path in paths:
            worst = low if worst is None else min(worst, low)
            parts.append(f"{path}: min {_fmt(low)} of steady")
        else:
            parts.append(f"(baseline {path}: min {_fmt(low)})")
    met = None if worst is None else worst >= PRESSURE_MIN
    return Target("pressure-throughput",
                  f"node-local throughput under conntrack pressure >= {PRESSURE_MIN}x its steady "
                  "rate", "; ".join(parts) or "not measured (needs --allow-sysctl)", met, details)


def _ceiling_target(runs: Mapping[tuple[str, str], Mapping[str, Any]],
                    paths: Sequence[str]) -> Target:
    ref = _rate(runs.get((REFERENCE, "steady")))
    parts: list[str] = []
    values: list[float] = []
    for path in paths:
        r = ratio(_rate(runs.get((path, "steady"))), ref)
        if r is not None:
            values.append(r)
            parts.append(f"{path}: {_fmt(r)}")
    base = ratio(_rate(runs.get(("iptables", "steady"))), ref)
    if base is not None:
        parts.append(f"(baseline iptables: {_fmt(base)})")
    met = None if not values else min(values) >= CEILING_MIN
    return Target("ceiling", f"node-local steady rate >= {CEILING_MIN}x the reference ceiling",
                  "; ".join(parts) or "not measured", met)


def _conntrack_target(doc: Doc, paths: Sequence[str]) -> Target:
    cal = {c["path"]: c for c in doc.get("calibration", [])}
    parts: list[str] = []
    values: list[float] = []
    for path in paths:
        c = cal.get(path)
        if c is None or c.get("per_lookup") is None:
            continue
        values.append(float(c["per_lookup"]))
        parts.append(f"{path}: {c['per_lookup']:.3f} ({c.get('pod_entries', c['entries'])} "
                     f"entries / {c['lookups']} lookups; the cache's own upstream TCP: "
                     f"{c.get('other_entries', 'n/a')})")
    base = cal.get("iptables")
    if base and base.get("per_lookup") is not None:
        parts.append(f"(baseline iptables: {base['per_lookup']:.3f})")
    met = None if not values else max(values) == 0
    return Target("no-conntrack", "node-local: 0 conntrack entries per lookup",
                  "; ".join(parts) or "not measured", met)


def _sync_target(doc: Doc) -> Target:
    rows = doc.get("rule_sync")
    if not isinstance(rows, list):
        return Target("rule-sync", f"rule sync >= {SYNC_MIN:g}x faster than one exec per rule "
                      "at 1k rules", "not measured", None)
    parts: list[str] = []
    values: list[float] = []
    for r in rows:
        if r["rules"] != 1000 or r.get("speedup") is None:
            continue
        values.append(float(r["speedup"]))
        parts.append(f"{r['backend']}: {r['speedup']:.0f}x ({r['dnsguard_apply_seconds']:.3f} s "
                     f"vs {r['per_rule_exec_seconds']:.1f} s"
                     + (", extrapolated" if r["per_rule_exec_extrapolated"] else "") + ")")
    met = None if not values else min(values) >= SYNC_MIN
    return Target("rule-sync", f"rule sync >= {SYNC_MIN:g}x faster than one exec per rule at "
                  "1k rules", "; ".join(parts) or "not measured", met)


def _rss_target(doc: Doc) -> Target:
    fp = doc.get("footprint")
    peaks: list[tuple[str, float]] = []
    if isinstance(fp, dict):
        for path, phases in fp.items():
            if not isinstance(phases, dict):
                continue
            for phase in ("idle", "churn", "api_churn"):
                u = phases.get(phase)
                if isinstance(u, dict):
                    peaks.append((f"{path} {phase}", float(u["peak_rss_mib"])))
    if not peaks:
        return Target("rss", f"agent RSS <= {RSS_MAX_MIB:g} MiB", "not measured", None)
    worst = max(v for _, v in peaks)
    return Target("rss", f"agent RSS <= {RSS_MAX_MIB:g} MiB",
                  f"peak {worst:.1f} MiB (" + ", ".join(f"{k} {v:.1f}" for k, v in peaks) + ")",
                  worst <= RSS_MAX_MIB)


def fmt_seconds(v: float | None) -> str:
    """A duration from milliseconds to hours, at a precision that reads at a glance."""
    if v is None:
        return "-"
    if v < 1:
        return f"{v * 1000:.0f} ms"
    if v < 10:
        return f"{v:.2f} s"
    if v < 120:
        return f"{v:.1f} s"
    return f"{v / 60:.1f} min" if v < 7200 else f"{v / 3600:.1f} h"


def _external(doc: Doc) -> tuple[Mapping[str, Any] | None, str]:
    """The --external-to-cluster section, and what to add when it ran at another size."""
    ext = doc.get("external")
    if not isinstance(ext, Mapping):
        return None, ""
    n = ext.get("services")
    return ext, "" if n == EXTERNAL_SERVICES else (
        f" [at {n:,} Services, not the target's {EXTERNAL_SERVICES:,}: not judged]")


def _external_sync_target(doc: Doc) -> Target:
    goal = (f"kakao-style (one exec per rule) >= {SYNC_MIN:g}x dnsguard's full sync at "
            f"{EXTERNAL_SERVICES // 1000}k Services with external IPs")
    ext, off_size = _external(doc)
    parts: list[str] = []
    values: list[float] = []
    for b in ext.get("backends", []) if ext else []:
        r, kakao = b.get("kakao_over_full"), b.get("kakao")
        if r is None or not isinstance(kakao, Mapping):
            continue
        values.append(float(r))
        parts.append(f"{b['backend']}: {r:,.0f}x ({fmt_seconds(b['full_sync_seconds'])} vs "
                     f"{fmt_seconds(kakao['seconds'])}"
                     + (", extrapolated" if kakao.get("extrapolated") else "") + ")")
    met = None if not values or off_size else min(values) >= SYNC_MIN
    return Target("external-sync", goal, "; ".join(parts) + off_size if parts else
                  "not measured", met)


def _external_rss_target(doc: Doc) -> Target:
    goal = (f"agent RSS with {EXTERNAL_SERVICES // 1000}k Services with external IPs <= "
            f"{RSS_MAX_MIB:g} MiB")
    ext, off_size = _external(doc)
    agent = ext.get("agent") if ext else None
    with_ = agent.get("with") if isinstance(agent, Mapping) else None
    if not isinstance(with_, Mapping) or "synced" not in with_:
        return Target("external-rss", goal, "not measured", None)
    synced = with_["synced"]
    peak = max(float(synced["peak_rss_mib"]),
               float(with_.get("peak_rss_mib_after_change") or 0.0))
    without = agent.get("without") if isinstance(agent, Mapping) else None
    base = (f", {without['synced']['rss_mib']:.1f} MiB with none"
            if isinstance(without, Mapping) and "synced" in without else "")
    return Target("external-rss", goal,
                  f"peak {peak:.1f} MiB (kernel's VmHWM over the first sync and one change; "
                  f"{synced['rss_mib']:.1f} MiB once synced{base})" + off_size,
                  None if off_size else peak <= RSS_MAX_MIB)


def evaluate(doc: Doc) -> list[Target]:
    runs = run_index(doc)
    paths = [p for p in NODELOCAL_PATHS if any(k[0] == p for k in runs)] or list(NODELOCAL_PATHS)
    return [
        _slow_target(doc, runs, paths),
        _pressure_target(doc, runs, paths),
        _ceiling_target(runs, paths),
        _conntrack_target(doc, paths),
        _sync_target(doc),
        _rss_target(doc),
        _external_sync_target(doc),
        _external_rss_target(doc),
    ]
