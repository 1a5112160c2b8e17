"""Which reload `Unbound.reload` runs: keep the cache when unbound can, else a full one, logged."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from dnsguard.cache import unbound as unbound_mod
from dnsguard.cache.unbound import CacheError, Unbound

CONF = "server:\n    num-threads: 2\n    msg-cache-size: 16m\n    rrset-cache-size: 32m\n"


class Control:
    """Stands in for unbound-control: records commands, answers from a script."""

    def __init__(self, answers: dict[str, tuple[int, str]]) -> None:
        self.answers = answers
        self.commands: list[str] = []

    def __call__(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        self.commands.append(argv[-1])
        rc, out = self.answers.get(argv[-1], (0, "ok\n"))
        return subprocess.CompletedProcess(argv, rc, out, "")


@pytest.fixture
def ub(tmp_path: Path) -> Unbound:
    u = Unbound(tmp_path)
    u.conf.write_text(CONF)
    u._loaded_shape = unbound_mod._cache_shape(CONF)  # as start() records it
    return u


def test_upstream_change_keeps_the_cache(ub: Unbound, monkeypatch) -> None:
    control = Control({})
    monkeypatch.setattr(subprocess, "run", control)
    ub.conf.write_text(CONF + "forward-zone:\n    forward-addr: 198.18.0.102@53\n")
    assert ub.reload() == "kept the cache"
    assert control.commands == ["reload_keep_cache"]


def test_new_cache_size_takes_a_full_reload_and_says_why(ub: Unbound, monkeypatch,
                                                          caplog) -> None:
    control = Control({})
    monkeypatch.setattr(subprocess, "run", control)
    ub.conf.write_text(CONF.replace("16m", "32m"))
    with caplog.at_level(logging.WARNING, "dnsguard.cache"):
        how = ub.reload()
    assert control.commands == ["reload"]
    assert how == "full reload (cache size or threads changed, which reload_keep_cache " \
                  "cannot keep)"
    assert "flushed its cache: cache size or threads changed" in caplog.text
    # the new shape is what runs now: the next upstream change keeps the cache again
    assert ub.reload() == "kept the cache"


def test_refused_reload_keep_cache_falls_back_to_a_full_reload(ub: Unbound, monkeypatch,
                                                               caplog) -> None:
    control = Control({"reload_keep_cache": (1, "error unknown command 'reload_keep_cache'\n")})
    monkeypatch.setattr(subprocess, "run", control)
    with caplog.at_level(logging.WARNING, "dnsguard.cache"):
        how = ub.reload()
    assert control.commands == ["reload_keep_cache", "reload"]
    assert how == "full reload (reload_keep_cache failed: error unknown command " \
                  "'reload_keep_cache')"
    assert "reload_keep_cache failed" in caplog.text


def test_failed_full_reload_is_a_cache_error(ub: Unbound, monkeypatch) -> None:
    monkeypatch.setattr(subprocess, "run", Control({"reload_keep_cache": (1, "error x"),
                                                    "reload": (1, "error y")}))
    with pytest.raises(CacheError, match="unbound-control reload failed: error y"):
        ub.reload()
