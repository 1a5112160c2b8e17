"""PNG plots from the results document (matplotlib, the optional ``bench`` extra).

* ``latency-<date>.png``: per path, the fraction of lookups slower than x (a complementary
  CDF on log-log axes), steady and burst side by side. A CCDF shows the tail, which is the
  subject here: a path with a few 5 s lookups out of 100k ends in a long flat step at 1e-5
  instead of dropping away.
* ``slow-<date>.png``: lookups >= 1 s (timeouts included) per scenario and path, on a symlog
  axis so that zero stays visible next to thousands; the hatched part of a bar is lookups
  that were slow only because their own load generator was starved (machine noise).
* ``rulesync-<date>.png``: seconds to write N rules, dnsguard's one restore against one exec
  per rule; extrapolated points are drawn hollow.

Small files on purpose (they go in the repository): 100 dpi, no embedded fonts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.results import HIST_EDGES
from bench.spec import PATHS

__all__ = ["available", "write_plots"]

Doc = Mapping[str, Any]
COLORS = {"iptables": "#d62728", "nftables": "#ff7f0e", "nodelocal-iptables": "#1f77b4",
          "nodelocal-nftables": "#17becf", "reference": "#2ca02c"}


def available() -> str | None:
    """None if matplotlib can be imported, else how to get it."""
    try:
        import matplotlib  # noqa: F401, PLC0415 - an optional dependency
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    return None


def _ccdf(counts: list[int], unanswered: int) -> tuple[list[float], list[float]]:
    """Points (x = bin's upper edge, y = fraction of lookups slower than x)."""
    total = sum(counts) + unanswered
    xs: list[float] = []
    ys: list[float] = []
    above = total
    for i, n in enumerate(counts):
        above -= n
        if total and above / total > 0:
            xs.append(HIST_EDGES[i + 1])
            ys.append(above / total)
    return xs, ys


def write_plots(doc: Doc, out_dir: Path, stem: str) -> list[Path]:
    """Write the PNGs; returns their paths."""
    import matplotlib  # noqa: PLC0415 - optional: see available()

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt  # noqa: PLC0415

    written: list[Path] = []
    runs = [r for r in doc.get("runs", []) if r.get("status") == "ok"]
    names = [p.name for p in PATHS]

    panels = [s for s in ("steady", "burst") if any(r["scenario"] == s for r in runs)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), sharey=True,
                                 squeeze=False)
        for ax, scenario in zip(axes[0], panels, strict=True):
            for r in runs:
                if r["scenario"] != scenario:
                    continue
                s = r["stats"]
                unanswered = s["timeouts"] + sum(s["errors"].values())
                xs, ys = _ccdf(list(s["histogram"]["counts"]), unanswered)
                ax.step(xs, ys, where="post", label=r["path"],
                        color=COLORS.get(r["path"]), linewidth=1.4)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{scenario}: lookups slower than x")
            ax.set_xlabel("latency (s)")
            ax.axvline(1.0, color="grey", linewidth=0.6, linestyle=":")
            ax.grid(True, which="major", linewidth=0.3)
        axes[0][0].set_ylabel("fraction of lookups")
        axes[0][-1].legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        path = out_dir / f"latency-{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    scenarios = [s["name"] for s in doc.get("scenarios", [])]
    if runs and scenarios:
        fig, ax = plt.subplots(figsize=(10, 3.8))
        width = 0.8 / len(names)
        top = 1
        for j, path_name in enumerate(names):
            xs, dns, gen = [], [], []
            for i, sc in enumerate(scenarios):
                match = [r for r in runs if r["scenario"] == sc and r["path"] == path_name]
                if match:
                    s = match[0]["stats"]
                    starved = s.get("at_least_1s_generator_starved") or 0
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    dns.append(s["at_least_1s"] - starved)
                    gen.append(starved)
            if xs:
                color = COLORS.get(path_name)
                ax.bar(xs, dns, width=width, label=path_name, color=color)
                ax.bar(xs, gen, width=width, bottom=dns, color="white", edgecolor=color,
                       hatch="////", linewidth=0.5)
                for x, d, g in zip(xs, dns, gen, strict=True):
                    top = max(top, d + g)
                    if d + g:
                        ax.text(x, (d + g) * 1.1, str(d + g), ha="center", va="bottom",
                                fontsize=6)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(0, top * 4)  # room for the counts and the legend above the bars
        ax.set_xticks(range(len(scenarios)))
        ax.set_xticklabels(scenarios, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("lookups >= 1 s (incl. timeouts)")
        ax.set_title("slow lookups per scenario (hatched: load generator starved)")
        ax.legend(fontsize=7, ncols=5, loc="upper center")
        ax.grid(True, axis="y", linewidth=0.3)
        fig.tight_layout()
        path = out_dir / f"slow-{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    sync = doc.get("rule_sync")
    if isinstance(sync, list) and sync:
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        for backend, marker in (("iptables-legacy", "o"), ("iptables-nft", "s")):
            rows = sorted((r for r in sync if r["backend"] == backend), key=lambda r: r["rules"])
            if not rows:
                continue
            n = [r["rules"] for r in rows]
            style = "-" if backend == "iptables-legacy" else "--"
            ax.plot(n, [r["dnsguard_apply_seconds"] for r in rows], marker=marker,
                    linestyle=style, label=f"dnsguard, {backend}", color="#1f77b4")
            ax.plot(n, [r["per_rule_exec_seconds"] for r in rows], marker=marker,
                    linestyle=style, label=f"exec per rule, {backend}", color="#d62728")
            ext = [r for r in rows if r["per_rule_exec_extrapolated"]]
            ax.scatter([r["rules"] for r in ext], [r["per_rule_exec_seconds"] for r in ext],
                       marker=marker, facecolors="white", edgecolors="#d62728", zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rules")
        ax.set_ylabel("seconds to write them")
        ax.set_title("rule sync (hollow: extrapolated)")
        ax.legend(fontsize=7)
        ax.grid(True, which="major", linewidth=0.3)
        fig.tight_layout()
        path = out_dir / f"rulesync-{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
