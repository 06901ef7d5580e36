"""What the benchmarks share: results folder, JSON output, tables, machine description, free ports."""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def machine() -> dict[str, Any]:
    """Enough about the machine to read the figures against."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def write_results(name: str, figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **figures}, indent=2, ensure_ascii=False,
                               default=str) + "\n", "utf-8")
    return path


def table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, the first row a header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def postgres_url() -> str:
    return os.environ.get("SCRM_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
