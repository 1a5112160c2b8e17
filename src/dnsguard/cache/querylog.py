"""The cache's query log, switched on and off at run time without a restart.

One line per answer (unbound's ``log-replies``: client address, name, type, class, rcode, time
taken, whether from the cache, size), written to the cache's log in the state directory, whose
size the supervisor bounds. Replies rather than queries because the answer line carries
everything the query line does plus the rcode, which is what an operator hunting NXDOMAIN
storms or slow names needs, at one line per lookup.

The switch is ``unbound-control set_option``: it lasts until unbound restarts or reloads its
config. `dnsguard run --log-queries` re-applies it after each (the statistics poller sees both);
`dnsguard cache-log on|off` flips it on a running agent's cache for the operator at hand.
"""

from __future__ import annotations

from dnsguard.cache.stats import Control, StatsError

__all__ = ["OPTION", "query_log_enabled", "set_query_log"]

OPTION = "log-replies"


def set_query_log(control: Control, on: bool) -> None:
    """Turn the query log on or off now; StatsError when unbound refuses or is unreachable."""
    out = control(["set_option", f"{OPTION}:", "yes" if on else "no"])
    if out.strip() != "ok":
        raise StatsError(f"unbound refused set_option {OPTION}: {out.strip()[:200]}")


def query_log_enabled(control: Control) -> bool:
    out = control(["get_option", OPTION]).strip()
    if out not in ("yes", "no"):
        raise StatsError(f"unexpected get_option {OPTION} answer: {out[:200]}")
    return out == "yes"
