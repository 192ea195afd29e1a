"""An observer for poolq's own tests: every event it hears, as a JSON line in ``$POOLQ_TEST_EVENTS``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import poolq


class FileObserver(poolq.Observer):
    """Appends ``{"hook": ..., "pid": ..., **fields}`` per event (one write per line: processes do not interleave)."""

    def __init__(self) -> None:
        self.path = Path(os.environ["POOLQ_TEST_EVENTS"])

    def handle(self, event: poolq.events.Event) -> None:
        line = json.dumps({"hook": event.hook, "pid": os.getpid(), **dataclasses.asdict(event)}) + "\n"
        with self.path.open("a", encoding="utf-8") as out:
            out.write(line)


def read(path: Path, hook: str | None = None) -> list[dict[str, Any]]:
    """The events recorded in ``path`` (those of ``hook`` only, when given)."""
    if not path.exists():
        return []
    found = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [e for e in found if hook is None or e["hook"] == hook]
