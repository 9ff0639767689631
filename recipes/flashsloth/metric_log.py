"""A JSONL training log that a resumed run continues without duplicate or stale lines."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricLog", "read_metric_log"]


def read_metric_log(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSONL log, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricLog:
    """Appends one JSON object per line (``{"step": ..., ...}``) and flushes each one.

    ``resume_step``: the step the run resumes from. Lines of later steps were written by
    the interrupted run after its last checkpoint; they are dropped, so the log of a
    resumed run reads as that of an uninterrupted one. None starts a new log.
    """

    def __init__(self, path: str | Path, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    # A line cut short by the kill is not JSON: it is dropped too.
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if record.get("step", 0) <= resume_step:
                        kept.append(json.dumps(record) + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MetricLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
