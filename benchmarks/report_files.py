"""A benchmark's three result files: its JSON, the Markdown table rendered from it, its picture."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_report_files"]


def write_report_files(
    data: dict[str, Any], markdown: str, plot: Callable[[Path], None], out_dir: str | Path, stem: str
) -> list[Path]:
    """Write `<stem>.json` (`data`), `<stem>.md` (`markdown`) and `<stem>.png` (`plot(path)`)
    to `out_dir` (created if needed); return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{suffix}" for suffix in ("json", "md", "png")]
    paths[0].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(markdown, encoding="utf-8")
    plot(paths[2])
    return paths
