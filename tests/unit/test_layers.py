"""The layers the package docstrings promise, checked on the source: an import contract.

Why an AST test and not import-linter: the three rules below need no new dependency, and reading
the source (never importing it) sees imports inside functions and under ``TYPE_CHECKING`` too, so
a lazy import cannot slip past. Each rule is a pure function over a ``{module: source}`` map; the
tests run it on ``src/`` and, to prove it can fail, on a small tree with one violation planted.

Rules:
1. ``dnsguard.plan`` and ``dnsguard.model`` stay pure: they never reach (directly or through
   another dnsguard module) ``dnsguard.netfilter``, ``dnsguard.kube``, ``dnsguard.node`` or the
   node-local cache's runtime (``dnsguard.cache``; the cache's *config* is ``dnsguard.plan.cache``).
2. Only ``dnsguard.kube`` imports the Kubernetes client library (``kubernetes``).
3. Only the modules in ``PROCESS_STARTERS`` start processes (import ``subprocess`` or call the
   ``os``/``asyncio`` process functions); a new one must be added there with its reason.
4. In tests/, no module imports a test module (shared helpers live in tests/support) and none
   edits ``sys.path`` (pytest puts the repository root there).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
TESTS = Path(__file__).resolve().parents[1]

PURE = ("dnsguard.plan", "dnsguard.model")
PURE_MUST_NOT_REACH = ("dnsguard.netfilter", "dnsguard.kube", "dnsguard.node", "dnsguard.cache")

KUBE_CLIENT = "kubernetes"
KUBE_LAYER = "dnsguard.kube"

#: Today's modules that start processes, each with why it may. A new entry is a design decision:
#: prefer going through `dnsguard.netfilter.runner.Runner` (issue 16 point 2 plans `exec.py`).
PROCESS_STARTERS: Mapping[str, str] = {
    "dnsguard.netfilter.runner": "the Runner seam: iptables/nft/ip/conntrack, with timeouts",
    "dnsguard.cache.unbound": "supervises the unbound daemon (Popen) and runs unbound-checkconf/-control",
    "dnsguard.cache.stats": "runs unbound-control stats_noreset for the cache metrics",
    "dnsguard.testing.lab": "test harness: runs commands and pods in lab network namespaces",
    "dnsguard.testing.vm": "test harness: boots the qemu guest",
    "dnsguard.testing.lab_cli": "test harness: runs the dnsguard CLI and agent inside the lab",
}

#: Functions that start a process without the subprocess module.
_OS_PROCESS_CALLS = frozenset({
    "system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp",
    "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
})
_ASYNCIO_PROCESS_CALLS = frozenset({"create_subprocess_exec", "create_subprocess_shell"})


def read_tree(root: Path) -> dict[str, str]:
    """Map every module under ``root`` (a src/ directory) to its source text."""
    sources: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        sources[".".join(parts)] = path.read_text()
    return sources


def _is_package(module: str, sources: Mapping[str, str]) -> bool:
    prefix = module + "."
    return any(m.startswith(prefix) for m in sources)


def imports_of(module: str, sources: Mapping[str, str]) -> Iterator[tuple[int, str]]:
    """Yield ``(line, module)`` for every import in ``module``, wherever it sits in the file.

    ``from a import b`` yields ``a.b`` when that is a module in ``sources`` (a submodule import),
    else ``a``; relative imports are resolved against ``module``.
    """
    tree = ast.parse(sources[module], filename=module)
    package = module if _is_package(module, sources) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if sub in sources else base


def _within(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def pure_layer_violations(sources: Mapping[str, str]) -> list[str]:
    """Paths from a pure module to a forbidden layer, as ``a -> b -> c``, following dnsguard imports.

    Transitive on purpose: plan importing config is fine only as long as config stays pure too.
    """
    found: list[str] = []
    for start in sorted(m for m in sources if any(_within(m, p) for p in PURE)):
        seen = {start}
        queue: list[tuple[str, ...]] = [(start,)]
        while queue:
            path = queue.pop(0)
            for _, imported in imports_of(path[-1], sources):
                if any(_within(imported, bad) for bad in PURE_MUST_NOT_REACH):
                    found.append(" -> ".join([*path, imported]))
                elif imported in sources and imported not in seen:
                    seen.add(imported)
                    queue.append((*path, imported))
    return found


def kube_client_violations(sources: Mapping[str, str]) -> list[str]:
    """``module:line`` of every import of the Kubernetes client outside ``dnsguard.kube``."""
    return [f"{m}:{line} imports {imported}"
            for m in sorted(sources) if not _within(m, KUBE_LAYER)
            for line, imported in imports_of(m, sources)
            if _within(imported, KUBE_CLIENT)]


def process_violations(sources: Mapping[str, str],
                       allowed: Mapping[str, str] = PROCESS_STARTERS) -> list[str]:
    """``module:line`` of every process start (subprocess import, os/asyncio call) not allowed."""
    found: list[str] = []
    for m in sorted(set(sources) - set(allowed)):
        found += [f"{m}:{line} imports {imported}"
                  for line, imported in imports_of(m, sources)
                  if _within(imported, "subprocess")]
        for node in ast.walk(ast.parse(sources[m], filename=m)):
            if isinstance(node, ast.ImportFrom) and node.module in ("os", "asyncio"):
                names = {a.name for a in node.names} & (_OS_PROCESS_CALLS | _ASYNCIO_PROCESS_CALLS)
                found += [f"{m}:{node.lineno} imports {node.module}.{n}" for n in sorted(names)]
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and ((node.value.id == "os" and node.attr in _OS_PROCESS_CALLS)
                       or (node.value.id == "asyncio" and node.attr in _ASYNCIO_PROCESS_CALLS))):
                found.append(f"{m}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def hygiene_violations(sources: Mapping[str, str]) -> list[str]:
    """``module:line`` of imports of a ``test_*`` module and of edits to ``sys.path``."""
    found: list[str] = []
    for m in sorted(sources):
        found += [f"{m}:{line} imports {imported}" for line, imported in imports_of(m, sources)
                  if imported.rpartition(".")[2].startswith("test_")]
        for node in ast.walk(ast.parse(sources[m], filename=m)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                target: ast.expr = node.func.value  # sys.path.insert(...), .append(...), ...
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            else:
                continue
            if (isinstance(target, ast.Attribute) and target.attr == "path"
                    and isinstance(target.value, ast.Name) and target.value.id == "sys"):
                found.append(f"{m}:{node.lineno} edits sys.path")
    return list(dict.fromkeys(found))  # one line per import statement, not per name


@pytest.fixture(scope="module")
def src() -> dict[str, str]:
    sources = read_tree(SRC)
    assert "dnsguard.plan" in sources and "dnsguard.model" in sources  # the walk found the package
    return sources


# --- the contract, on the real source ---------------------------------------------------------

def test_plan_and_model_never_reach_io_layers(src: dict[str, str]) -> None:
    assert pure_layer_violations(src) == []


def test_only_kube_imports_the_kubernetes_client(src: dict[str, str]) -> None:
    assert kube_client_violations(src) == []


def test_only_listed_modules_start_processes(src: dict[str, str]) -> None:
    assert process_violations(src) == []


def test_no_test_imports_a_test_module_or_edits_sys_path() -> None:
    assert hygiene_violations(read_tree(TESTS)) == []


def test_every_listed_process_starter_exists_and_still_starts_processes(
        src: dict[str, str]) -> None:
    # a stale entry would let a future module of that name in silently
    stale = [m for m in PROCESS_STARTERS if m not in src or not process_violations({m: src[m]}, {})]
    assert stale == []


# --- each rule fails when violated ------------------------------------------------------------

def _plant(tmp_path: Path, files: Mapping[str, str]) -> dict[str, str]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_tree(tmp_path)


_BASE = {
    "dnsguard/__init__.py": "",
    "dnsguard/model.py": "import enum\n",
    "dnsguard/config.py": "from dnsguard.model import X\n",
    "dnsguard/plan/__init__.py": "from dnsguard.config import Settings\nfrom . import render\n",
    "dnsguard/plan/render.py": "from dnsguard.model import Rule\n",
    "dnsguard/node/__init__.py": "",
    "dnsguard/node/links.py": "",
    "dnsguard/kube/__init__.py": "",
    "dnsguard/kube/client.py": "from kubernetes.client import ApiClient\n",
    "dnsguard/netfilter/__init__.py": "",
    "dnsguard/netfilter/runner.py": "import subprocess\n",
    "dnsguard/cache/__init__.py": "",
    "dnsguard/cache/unbound.py": "",
}


def test_planted_tree_without_violations_passes(tmp_path: Path) -> None:
    tree = _plant(tmp_path, _BASE)
    assert pure_layer_violations(tree) == []
    assert kube_client_violations(tree) == []
    assert process_violations(tree, {"dnsguard.netfilter.runner": "seam"}) == []


@pytest.mark.parametrize(("rel", "text", "expected"), [
    ("dnsguard/plan/render.py", "from dnsguard.netfilter.runner import Runner\n",
     "dnsguard.plan.render -> dnsguard.netfilter.runner"),
    ("dnsguard/model.py", "def f():\n    import dnsguard.kube.client\n",
     "dnsguard.model -> dnsguard.kube.client"),
    ("dnsguard/plan/render.py", "from ..node import links\n",
     "dnsguard.plan.render -> dnsguard.node.links"),
    ("dnsguard/plan/render.py", "from dnsguard import cache\n",
     "dnsguard.plan.render -> dnsguard.cache"),
    # through a module that is itself allowed: config turning impure taints plan
    ("dnsguard/config.py", "from dnsguard.cache.unbound import Unbound\n",
     "dnsguard.plan -> dnsguard.config -> dnsguard.cache.unbound"),
])
def test_pure_layer_rule_fails_when_violated(tmp_path: Path, rel: str, text: str,
                                             expected: str) -> None:
    tree = _plant(tmp_path, {**_BASE, rel: text})
    assert expected in pure_layer_violations(tree)


@pytest.mark.parametrize("text", [
    "import kubernetes\n",
    "from kubernetes.client.exceptions import ApiException\n",
    "def f():\n    from kubernetes import config\n",
])
def test_kube_client_rule_fails_when_violated(tmp_path: Path, text: str) -> None:
    tree = _plant(tmp_path, {**_BASE, "dnsguard/agent.py": text})
    assert [v.split(":")[0] for v in kube_client_violations(tree)] == ["dnsguard.agent"]


def test_kube_client_rule_is_not_fooled_by_a_similar_name(tmp_path: Path) -> None:
    tree = _plant(tmp_path, {**_BASE, "dnsguard/deploy.py": "import kubernetes_validate\n"})
    assert kube_client_violations(tree) == []


@pytest.mark.parametrize("text", [
    "import subprocess\n",
    "from subprocess import run\n",
    "def f():\n    import subprocess as sp\n",
    "import os\nos.system('true')\n",
    "from os import execvp\n",
    "import asyncio\nasyncio.create_subprocess_exec('true')\n",
])
def test_process_rule_fails_when_violated(tmp_path: Path, text: str) -> None:
    tree = _plant(tmp_path, {**_BASE, "dnsguard/node/detect.py": text})
    violations = process_violations(tree, {"dnsguard.netfilter.runner": "seam"})
    assert [v.split(":")[0] for v in violations] == ["dnsguard.node.detect"]


@pytest.mark.parametrize("text", [
    "from test_nodelocal import Timeline\n",
    "from tests.unit.test_kube_source import wait_facts\n",
    "import test_metrics\n",
    "import sys\nsys.path.insert(0, 'integration')\n",
    "import sys\nsys.path.append('x')\n",
    "import sys\nsys.path += ['x']\n",
    "import sys\nsys.path = ['x']\n",
])
def test_test_hygiene_rule_fails_when_violated(tmp_path: Path, text: str) -> None:
    tree = _plant(tmp_path, {"support/kube.py": "import time\n", "unit/test_ok.py": text})
    assert [v.split(":")[0] for v in hygiene_violations(tree)] == ["unit.test_ok"]


def test_test_hygiene_rule_allows_support_and_reading_sys_path(tmp_path: Path) -> None:
    tree = _plant(tmp_path, {"unit/test_ok.py": "import sys\nfrom tests.support.kube import w\n"
                                                "print(sys.path)\nx = [*sys.path]\n"})
    assert hygiene_violations(tree) == []


def duplicate_test_basenames(tests: Path) -> list[str]:
    """Test modules sharing a basename: without packages, pytest (rootdir-relative module
    names) refuses the second one at collection and the whole run stops with an error."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted(tests.rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(tests)} ~ {path.relative_to(tests)}")
        seen.setdefault(path.name, path)
    return clashes


def test_no_two_test_modules_share_a_basename() -> None:
    assert duplicate_test_basenames(TESTS) == []


def test_basename_rule_fails_when_violated(tmp_path: Path) -> None:
    for d in ("unit", "integration"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "test_same.py").write_text("")
    assert duplicate_test_basenames(tmp_path) == ["integration/test_same.py ~ unit/test_same.py"]
