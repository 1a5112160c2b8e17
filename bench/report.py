"""The markdown report, rendered from the results document alone.

Pure (a dict in, text out), so ``python -m bench --render FILE.json`` can redo the table of a
stored run and tests can check the rendering of hand-made documents. Every throughput figure
sits next to its ratio against the same-run baseline (kube-proxy iptables mode) and against the
reference ceiling, because absolute rates on a shared 2-core machine move from run to run while
ratios measured minutes apart mostly do not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from bench.results import CT_COUNTERS, ratio
from bench.spec import BASELINE, REFERENCE
from bench.targets import fmt_seconds, run_index

__all__ = ["fmt_count", "fmt_latency", "fmt_ratio", "markdown_table", "render"]

Doc = Mapping[str, Any]


def fmt_latency(v: float | None) -> str:
    """Seconds -> ``0.84 ms`` / ``1.52 s``; None (a percentile on an unanswered lookup) ->
    ``unanswered``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "unanswered"
    if v < 1.0:
        return f"{v * 1000:.2f} ms" if v < 0.1 else f"{v * 1000:.0f} ms"
    return f"{v:.2f} s"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_count(v: int | None) -> str:
    """Counters: None means the kernel does not maintain it."""
    return "n/a" if v is None else str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                   align: str = "") -> str:
    """A GitHub table; ``align`` has one letter per column (l or r), default all left but the
    numeric-looking ones."""
    if any(len(r) != len(header) for r in rows):
        raise ValueError("every row needs one cell per column")
    marks = [("---:" if (align[i:i + 1] or "l") == "r" else "---") for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(marks), *(line(r) for r in rows)]) + "\n"


def _rate(run: Mapping[str, Any] | None) -> float | None:
    return None if run is None else run["stats"]["lookups_per_second"]


def _rcvbuf(run: Mapping[str, Any]) -> str:
    rb = run.get("rcvbuf_errors") or {}
    return " / ".join(f"{rb[k]}" if k in rb else "-" for k in ("dnsmasq", "unbound"))


SPEED_HEADER = ["scenario", "path", "lookups/s", "x iptables", "x reference", "x own steady",
                "p50", "p99", "p99.9", "max"]
TAIL_HEADER = ["scenario", "path", ">=1 s", "of which generator starved", ">=5 s",
               "unanswered", "longest generator stall", "conntrack " + " / ".join(CT_COUNTERS),
               "RcvbufErrors dnsmasq / unbound", "dnsmasq TCP listen drops"]


def _rows(doc: Doc, tail: bool) -> list[list[str]]:
    """One row per run, scenario by scenario: speed and latency, or the tail and counters."""
    runs = run_index(doc)
    width = len(TAIL_HEADER if tail else SPEED_HEADER)
    rows: list[list[str]] = []
    for sc in doc.get("scenarios", []):
        base = _rate(runs.get((BASELINE, sc["name"])))
        ref = _rate(runs.get((REFERENCE, sc["name"])))
        for entry in doc.get("runs", []):
            if entry["scenario"] != sc["name"]:
                continue
            head = [sc["name"], entry["path"]]
            if entry.get("status") != "ok":
                cells = [*head, str(entry.get("status", "?")), str(entry.get("reason", ""))[:120]]
                rows.append(cells + [""] * (width - len(cells)))
                continue
            s = entry["stats"]
            if tail:
                ct = entry.get("conntrack", {})
                stall = s.get("generator_stall_max_seconds")
                rows.append([
                    *head, str(s["at_least_1s"]),
                    fmt_count(s.get("at_least_1s_generator_starved")), str(s["at_least_5s"]),
                    str(s["timeouts"] + sum(s["errors"].values())),
                    "n/a" if stall is None else fmt_latency(stall),
                    " / ".join(fmt_count(ct.get(k)) for k in CT_COUNTERS),
                    _rcvbuf(entry), fmt_count(entry.get("dnsmasq_tcp_listen_drops")),
                ])
                continue
            lat = s["latency_seconds"]
            rate = s["lookups_per_second"]
            own = None if sc["name"] == "steady" else ratio(
                rate, _rate(runs.get((entry["path"], "steady"))))
            rows.append([
                *head, f"{rate:,.0f}", fmt_ratio(ratio(rate, base)),
                fmt_ratio(ratio(rate, ref)), fmt_ratio(own), fmt_latency(lat["p50"]),
                fmt_latency(lat["p99"]), fmt_latency(lat["p99.9"]), fmt_latency(lat["max"]),
            ])
    return rows


def _rounds(doc: Doc) -> str:
    """The per-round rates behind merged rows: how much this machine moved within the run."""
    lines = [f"{r['path']} {' / '.join(f'{x:,.0f}' for x in r['round_rates'])}"
             for r in doc.get("runs", []) if r.get("round_rates")]
    if not lines:
        return ""
    rounds = max(len(r.get("round_rates") or ()) for r in doc.get("runs", []))
    return (f"Rows merged from {rounds} interleaved rounds; lookups/s per round: "
            + "; ".join(lines) + ".\n")


_EVENT_LABELS = {
    "kill_at_seconds": "bench: kill -9 of unbound",
    "sigterm_at_seconds": "bench: SIGTERM to the agent",
    "agent_exited_at_seconds": "bench: the agent has exited; starting a new one",
    "intercepting_again_at_seconds": "bench: `dnsguard status` confirms interception (the "
                                     "command itself takes 1-3 s here)",
}


def _timelines(doc: Doc) -> str:
    """What happened when, in the runs with an event: our action, then the agent's log."""
    parts = []
    for r in doc.get("runs", []):
        ev = r.get("event")
        if r.get("status") != "ok" or not isinstance(ev, dict):
            continue
        marks = [(float(v), _EVENT_LABELS.get(k, k)) for k, v in ev.items()
                 if k.endswith("_at_seconds")]
        marks += [(float(t), str(msg)) for t, msg in ev.get("agent_log", [])
                  if "detected" not in str(msg) and "differs from plan" not in str(msg)]
        slow = [s for s in r["stats"].get("slow", []) if s[2] != "ok" or (s[1] or 0) >= 1.0]
        if slow:
            first, last = slow[0][0], slow[-1][0]
            marks.append((float(first), f"first of {len(slow)} slow or unanswered lookups "
                          f"starts (last starts at {last:.3f} s)"))
        lines = "".join(f"    {t:7.3f} s  {m}\n" for t, m in sorted(marks))
        parts.append(f"`{r['scenario']}` on {r['path']} (seconds from the start of the load):"
                     f"\n\n{lines}\n")
    if not parts:
        return ""
    return "### Restart timelines\n\n" + "".join(parts)


def _targets(doc: Doc) -> str:
    rows = []
    for t in doc.get("targets", []):
        met = {True: "**met**", False: "**not met**", None: "not measured"}[t["met"]]
        rows.append([t["goal"], t["measured"], met])
    return markdown_table(["target", "measured (same run)", "verdict"], rows)


def _calibration(doc: Doc) -> str:
    rows = [[c["path"], str(c["lookups"]), str(c.get("pod_entries", c["entries"])),
             "n/a" if c["per_lookup"] is None else f"{c['per_lookup']:.3f}",
             fmt_count(c.get("other_entries"))]
            for c in doc.get("calibration", [])]
    return markdown_table(["path", "lookups", "entries of the pods' lookups", "per lookup",
                           "other DNS entries (the cache's upstream TCP)"], rows, "lrrrr")


def _ipvs(doc: Doc) -> str:
    ipvs = doc.get("ipvs")
    if not isinstance(ipvs, dict) or "without" not in ipvs:
        reason = ipvs.get("skipped", "not run") if isinstance(ipvs, dict) else "not run"
        return f"Not measured: {reason}\n"
    rows = []
    for key, label in (("without", "kube-proxy ipvs, ClusterIP"),
                       ("with", "+ dnsguard apply --mitigation notrack")):
        ph = ipvs[key]
        ct = ph.get("conntrack", {})
        rows.append([label, str(ph["lookups"]), f"{ph['conntrack_entries_per_lookup']:.3f}",
                     str(ph["at_least_1s"]), str(ph["at_least_5s"]),
                     str(ph["timeouts"] + sum(ph["errors"].values())),
                     " / ".join(fmt_count(ct.get(k)) for k in CT_COUNTERS)])
    head = (f"Guest kernel {ipvs.get('kernel')} under qemu (software emulation: counts only, no "
            f"rates); {ipvs.get('pods')} pods x {ipvs.get('concurrency')} in flight, kube-proxy "
            f"rules written with iptables-{ipvs.get('iptables')}.\n\n")
    tail = ""
    for step in ("apply", "cleanup"):
        res = ipvs.get(step)
        if isinstance(res, dict):
            last = str(res.get("output", "")).splitlines()[:1]
            tail += f"`dnsguard {step}` exited {res.get('returncode')}" + (
                f" (`{last[0]}`)" if last else "") + ". "
    if ipvs.get("guest_error"):
        tail += "The guest then failed: " + str(ipvs["guest_error"]).splitlines()[-1]
    return head + markdown_table(
        ["path", "lookups", "ct entries per lookup", ">=1 s", ">=5 s", "unanswered",
         "conntrack " + " / ".join(CT_COUNTERS)], rows, "lrrrrrr") + (
            f"\n{tail.strip()}\n" if tail else "")


def _rule_sync(doc: Doc) -> str:
    rows_in = doc.get("rule_sync")
    if not isinstance(rows_in, list):
        reason = rows_in.get("skipped") if isinstance(rows_in, dict) else "not run"
        return f"Not measured: {reason}\n"
    rows = []
    for r in rows_in:
        per = f"{r['per_rule_exec_seconds']:.2f} s"
        if r["per_rule_exec_extrapolated"]:
            per += (f" (extrapolated from {r['per_rule_exec_rules_timed']} rules timed in "
                    f"{r['per_rule_exec_seconds_timed']:.0f} s)")
        apply_ms = r["dnsguard_apply_seconds"] * 1000
        rows.append([r["backend"], f"{r['rules']:,}", f"{apply_ms:.0f} ms",
                     f"{r['dnsguard_noop_sync_seconds'] * 1000:.0f} ms", per,
                     "-" if r["speedup"] is None else f"{r['speedup']:,.0f}x"])
    return markdown_table(["backend", "rules", "dnsguard apply (one restore)",
                           "dnsguard sync, nothing to do", "one exec per rule (-C, -A)",
                           "speed-up"], rows, "lrrrrr")


def _footprint(doc: Doc) -> str:
    fp = doc.get("footprint")
    if not isinstance(fp, dict) or not fp:
        return "Not measured.\n"
    rows = []
    for path, phases in fp.items():
        if not isinstance(phases, dict):
            continue
        if "skipped" in phases:
            rows.append([path, "skipped", str(phases["skipped"]), "", "", ""])
            continue
        for phase in ("idle", "churn", "api_churn"):
            u = phases.get(phase)
            if not isinstance(u, dict):
                continue
            what = {
                "idle": "idle, facts from flags, --sync-interval 10",
                "churn": f"outside flush every 1 s, --sync-interval 1 "
                         f"({phases.get('repairs', '?')} repairs)",
                "api_churn": f"facts from a (fake) Kubernetes API, DNS endpoints changing every "
                             f"1 s ({phases.get('api_reloads', '?')} unbound reloads)",
            }[phase]
            rows.append([path, what, f"{u['rss_mib']:.1f}", f"{u['peak_rss_mib']:.1f}",
                         f"{u['cpu_percent_of_one_core']:.1f} %",
                         f"{phases.get('unbound_rss_mib', float('nan')):.1f}"])
    return markdown_table(["agent", "state", "RSS MiB", "peak RSS MiB",
                           "CPU (agent + tools it runs), % of one core", "unbound RSS MiB"],
                          rows, "llrrrr")


def _kakao_cell(b: Mapping[str, Any]) -> str:
    k = b.get("kakao")
    if not isinstance(k, Mapping):
        return f"n/a ({b.get('kakao_skipped', 'not measured')})"
    empty, full = k["empty_table"], k["full_table"]
    how = (f"{empty['seconds'] / empty['services']:.3f} s per Service on an empty table "
           f"({empty['services']} timed), {full['seconds'] / full['services']:.3f} s on the "
           f"full one ({full['services']} timed)")
    return (f"{fmt_seconds(k['seconds'])}, {k['execs']:,} execs "
            + (f"(extrapolated: {how})" if k.get("extrapolated") else f"({how})"))


def _external_sync(ext: Mapping[str, Any]) -> str:
    rows = []
    for b in ext.get("backends", []):
        if "failed" in b:
            rows.append([b["backend"], "failed", str(b["failed"])[:200], "", "", "", "", ""])
            continue
        r = b.get("kakao_over_full")
        rows.append([b["backend"], fmt_seconds(b["full_sync_seconds"]),
                     fmt_seconds(b["partial_sync_seconds"]), fmt_seconds(b["noop_sync_seconds"]),
                     f"{b['full_sync_restore_lines']:,} / {b['partial_sync_restore_lines']:,}",
                     fmt_seconds(b["cleanup_seconds"]), _kakao_cell(b),
                     "-" if r is None else f"{r:,.0f}x"])
    return markdown_table(["backend", "full sync", "partial sync (1 Service)", "no-op sync",
                           "restore lines full / partial", "cleanup",
                           "kakao-style, one exec per rule", "kakao / full"], rows, "lrrrrrlr")


def _external_agent(agent: Mapping[str, Any]) -> str:
    if "failed" in agent:
        return f"The agent's measurement failed: {agent['failed'][:600]}\n"
    rows = []
    for key in ("without", "with"):
        a = agent.get(key)
        if not isinstance(a, Mapping):
            continue
        u = a["synced"]
        peak = f"{u['peak_rss_mib']:.1f}"
        if a.get("peak_rss_mib_after_change") is not None:
            peak += f" ({a['peak_rss_mib_after_change']:.1f} after the change)"
        rows.append([f"{a['external_services']:,}", f"{a['rules']:,}",
                     fmt_seconds(a.get("start_to_applied_seconds")),
                     fmt_seconds(a.get("start_to_in_sync_seconds")), f"{u['rss_mib']:.1f}",
                     peak, f"{u['cpu_percent_of_one_core']:.1f} %"])
    text = markdown_table(["external Services", "rules", "start -> rules applied (its log)",
                           "start -> in sync (its status)", "RSS MiB once synced",
                           "peak RSS MiB (VmHWM)", "CPU once synced, % of one core"],
                          rows, "rrrrrrr")
    ch = agent.get("with", {}).get("change")
    if agent.get("rss_ratio") is not None:
        text += (f"\nRSS once synced: {agent['rss_ratio']:.2f}x the same agent's with no "
                 "external Service.")
    if isinstance(ch, Mapping):
        kernel = ("iptables-save then holds the new IP and not the old one"
                  if ch["kernel_has_new_ip"] and not ch["kernel_has_old_ip"] else
                  f"**iptables-save disagrees** (new IP there: {ch['kernel_has_new_ip']}, old IP "
                  f"still there: {ch['kernel_has_old_ip']})")
        text += (f" One Service's external IP changed in the API: the agent had re-planned "
                 f"after {fmt_seconds(ch['replanned_seconds'])} and written the rules after "
                 f"{fmt_seconds(ch['applied_seconds'])} (its log), and reported in sync (the "
                 f"kernel read back) after {fmt_seconds(ch['in_sync_seconds'])}; {kernel}.")
    return text + "\n"


def _external(doc: Doc) -> str:
    ext = doc.get("external")
    if not isinstance(ext, Mapping):
        return "Not measured.\n"
    load = " / ".join(f"{x[0]:.1f}" if x else "?" for x in (ext.get("load_before"),
                                                             ext.get("load_after")))
    head = (
        f"{ext['services']:,} Services (one TCP port and one external IP each, half as "
        f"`spec.externalIPs`, half as load-balancer ingress): {ext['rules']:,} nat rules in "
        f"{ext['chains']:,} chains, IPv4, planned in {fmt_seconds(ext['plan_seconds'])}; each "
        "backend in a namespace of its own. Full sync: a node without rules -> all of them, "
        "one restore per table and family (nftables: one `nft -f`). Partial sync: one "
        f"Service's external IP moves (`{ext['changed_service']}`); only the chains it touches "
        "are written: its own chain and the dispatch shards (one per /24 of external IPs) it "
        "leaves and joins, plus the jumps to a shard that comes or goes. No-op: read "
        "and diff. Kakao-style: `iptables -N` per Service chain, then `-C` and `-A` per rule, "
        f"timed on an empty table and on top of the full one (up to {ext['sample_services']} "
        f"Services or {ext['sample_seconds_cap']:g} s each, verified against the plan) and "
        "interpolated linearly in table size. Load average (1 min) before / after the "
        f"section: {load}; section time {fmt_seconds(ext.get('seconds'))}.\n\n")
    agent = ext.get("agent")
    tail = ""
    if isinstance(agent, Mapping):
        tail = ("\nThe agent (`dnsguard run --proxy-mode ipvs --mitigation none "
                f"--external-to-cluster`, {agent.get('backend')}, default sync interval), its "
                "facts from the fake API server in the same namespace:\n\n"
                + _external_agent(agent))
    return head + _external_sync(ext) + tail


def render(doc: Doc) -> str:
    m = doc.get("machine", {})
    load = doc.get("load", {})
    out = [
        f"# dnsguard benchmark, {doc.get('date')}\n",
        f"`{doc.get('command')}` ({doc.get('profile')} profile) on {m.get('cpus')} CPUs, "
        f"kernel {m.get('kernel')}, in {doc.get('seconds', 0) / 60:.1f} min. Every path ran on "
        f"its own simulated node (network namespaces; 2 dnsmasq pods as CoreDNS, answer TTL "
        f"{load.get('answer_ttl')} s) with the same load, interleaved scenario by scenario. "
        "Figures are ratios against the same run; absolute rates belong to this shared "
        "machine, where load generator and DNS servers share the same cores.\n",
        f"Load: {load.get('description')}\n",
        "## Targets\n",
        _targets(doc),
        "## Lookups by scenario and path\n",
        "`unanswered`: lookups that timed out (no answer within "
        f"{load.get('timeout_seconds')} s, where glibc would retry: a >= 5 s lookup) or failed. "
        "`of which generator starved`: lookups >= 1 s that took under a second once the time "
        "their own load-generator process sat runnable but unscheduled is taken out (from its "
        "schedstat run delay; `longest generator stall` is the worst such wait in the run): "
        "this shared machine's noise, not the DNS path. The conntrack column holds deltas of "
        "the node's counters during the run (`n/a`: not maintained by this kernel). "
        "RcvbufErrors: queries dropped because a DNS server's socket buffer was full; TCP "
        "listen drops: the cache's upstream connections dnsmasq could not accept.\n",
        markdown_table(SPEED_HEADER, _rows(doc, tail=False),
                       "ll" + "r" * (len(SPEED_HEADER) - 2)),
        _rounds(doc),
        "Slow and lost lookups, and the counters that explain them:\n",
        markdown_table(TAIL_HEADER, _rows(doc, tail=True), "ll" + "r" * (len(TAIL_HEADER) - 2)),
        _timelines(doc),
        "## Conntrack entries per lookup\n",
        f"Measured apart, with {doc.get('calibration_lookups', '?')} lookups at low "
        "concurrency from one pod so that random source ports (almost) never repeat: at the "
        "scenarios' rates a repeated 5-tuple reuses its entry and would hide new ones. The name "
        "mix makes 4 lookup steps (sockets) per 3 lookups. Entries are told apart by their "
        "original source: a client pod, or the node (the cache querying CoreDNS over TCP on a "
        "miss).\n",
        _calibration(doc),
        "## kube-proxy IPVS mode (qemu)\n",
        _ipvs(doc),
        "## Rule sync cost\n",
        "dnsguard's apply reads the table once, diffs and writes its chain with one "
        "`iptables-restore --noflush`; the alternative is one `iptables -C` plus one "
        "`iptables -A` process per rule (kakao network-node-manager, node-cache). Same "
        "`ip netns exec` prefix on both sides, scratch lab node, IPv4 raw table.\n",
        _rule_sync(doc),
        "## Agent footprint (`dnsguard run`, node-local)\n",
        _footprint(doc),
        "The API-driven agent loads the Kubernetes client (its RSS shows it); the fake API "
        "server (`dnsguard.testing.fake_apiserver`, in the node namespace) speaks list/watch "
        "but none of a real API server's RBAC, TLS or timing.\n",
        "## Scale: `--external-to-cluster`\n",
        _external(doc),
        "## Load generator\n",
        _generator(doc),
    ]
    notes = doc.get("notes") or []
    if notes:
        out += ["## Notes\n", "".join(f"- {n}\n" for n in notes)]
    return "\n".join(out)


def _generator(doc: Doc) -> str:
    c = doc.get("ceiling")
    if not isinstance(c, dict) or "lookups_per_second" not in c:
        return "Not measured.\n"
    busiest = max((r["stats"]["generator_cores"] / max(r["stats"]["pods"], 1), r["path"],
                   r["scenario"]) for r in doc.get("runs", []) if r.get("status") == "ok") \
        if any(r.get("status") == "ok" for r in doc.get("runs", [])) else None
    text = (f"One probe process ({c['concurrency']} lookups in flight, one pod, against the "
            f"reference cache) drove {c['lookups_per_second']:,.0f} lookups/s using "
            f"{c['generator_cores']:.2f} of a core: even alone and with 64 lookups in flight it "
            "waits for answers more than for CPU.")
    if busiest is not None:
        text += (f" In the scenarios no worker process used more than {busiest[0]:.2f} of a core "
                 f"({busiest[2]} on {busiest[1]}), so the load generator was not the bottleneck; "
                 "the limit is the two cores that generator, kernel and DNS servers share.")
    return text + "\n"
