"""tracking.json: the run folder's record of what was sent to which tracker and registry.

It is read by `grpo inspect` (registered versions), by the sinks (where to continue) and by
re-scorings; it is written by the sinks from the flow's thread and the views' thread, so
every write is a read-modify-write under one lock.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data.store import atomic_write_json

STATE_FILE = "tracking.json"
# Not state of a run: a lock that makes the read-modify-write of any tracking.json atomic
# between the threads of this process (sinks write from the flow's and the views' thread).
_STATE_LOCK = threading.Lock()


def read_state(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def update_state(run_dir: str | Path, key: str, change: Callable[[Any], Any]) -> None:
    """tracking.json[key] = change(tracking.json.get(key)), atomically."""
    with _STATE_LOCK:
        state = read_state(run_dir)
        state[key] = change(state.get(key))
        atomic_write_json(Path(run_dir) / STATE_FILE, state)
