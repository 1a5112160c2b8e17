"""The agent's status file: how a separate ``dnsguard status`` learns what the agent knows.

The agent rewrites ``status.json`` in its state directory (atomically) at every loop turn. A
reader treats a file older than a few loop turns as "no agent": for node-local mode that also
means interception has expired and DNS takes kube-proxy's path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["STATUS_FILE", "read_status", "write_status"]

STATUS_FILE = "status.json"


def write_status(state_dir: Path, doc: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.tmp")
    tmp.write_text(json.dumps({**doc, "updated": time.time()}, default=str))
    tmp.replace(path)


def read_status(state_dir: Path, max_age: float) -> dict[str, Any]:
    """The agent's last status with ``agent: running``, or why there is none."""
    path = state_dir / STATUS_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"agent": "not running", "reason": f"no status in {path}"}
    age = time.time() - float(doc.get("updated", 0.0))
    if age > max_age:
        return {**doc, "agent": "not running",
                "reason": f"status is {age:.0f}s old: the agent is gone"}
    return {**doc, "agent": "running"}
