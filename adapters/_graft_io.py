"""The grafts' JSON records, written and read one way (only JSON is read: no pickle, no code).

Every record has a `format` and a `format_version`; each reader checks the format with
its own message, naming what it expected, and the version with `check_format_version`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_record", "read_record", "check_format_version"]


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_record(path: Path, missing: str) -> Any:
    """The JSON in `path`; FileNotFoundError(`missing`) if there is no such file."""
    if not path.is_file():
        raise FileNotFoundError(missing)
    return json.loads(path.read_text(encoding="utf-8"))


def check_format_version(record: dict[str, Any], path: Path, version: int) -> dict[str, Any]:
    """`record` (read from `path`), if it has `format_version` `version`."""
    if record.get("format_version") != version:
        raise ValueError(
            f"{path} has format_version {record.get('format_version')!r}; this version of "
            f"tokencompress reads {version}"
        )
    return record
