"""Import a generated 100,000-row customer CSV twice (the second run must change nothing), measuring
time and peak Python memory (tracemalloc) of each run.

    python bench/import_100k.py [--rows N] [--store URL]

Prints rows/s and peak MiB for the first import (creates everyone) and the re-import (a no-op).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scrm import personal
from scrm.clock import SystemClock
from scrm.config_file import parse_config
from scrm.importer import Importer
from scrm.store.engine import make_engine, make_sessionmaker
from scrm.store.migrate import upgrade


def write_csv(path: Path, rows: int) -> None:
    """Customers with a phone, a console identity on every other row, tags, a birthday and attributes."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "phone", "birthday", "identity", "tags", "consent", "city", "member_level"])
        for i in range(rows):
            w.writerow([f"客户{i}", f"139{i:08d}", f"19{70 + i % 30}-{1 + i % 12:02d}-{1 + i % 28:02d}",
                        f"console:user{i}" if i % 2 else "", "vip;奶粉" if i % 3 == 0 else "新客",
                        "yes" if i % 5 else "no", ["上海", "北京", "深圳"][i % 3], str(i % 4)])


async def run(rows: int, url: str | None, trace: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = {"url": url or f"sqlite+aiosqlite:///{folder / 'bench.db'}"}
        config = parse_config({"store": store, "channels": {"console": {"local": {}}}}, folder, environ={})
        path = folder / "customers.csv"
        write_csv(path, rows)
        engine = make_engine(config.store_url)
        await upgrade(engine)
        sessions = make_sessionmaker(engine)
        keyring = await personal.open_keyring(config, sessions, SystemClock().now())
        for label in ("import", "re-import"):
            importer = Importer(sessions, config, keyring, SystemClock().now())
            if trace:
                tracemalloc.start()
            start = time.perf_counter()
            summary = await importer.run(path)
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else float("nan")
            tracemalloc.stop()
            print(f"{label:9} {rows} rows in {elapsed:6.1f}s = {rows / elapsed:8.0f} rows/s, peak {peak:6.1f} MiB; "
                  f"created {summary.created}, merged {summary.merged}, updated {summary.updated}, "
                  f"rejected {summary.rejected}")
        await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--store", help="store URL (default: a fresh SQLite file)")
    parser.add_argument("--no-trace", action="store_true", help="skip tracemalloc (it slows Python down)")
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.store, not args.no_trace))
