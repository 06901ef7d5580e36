"""Shared fixtures: a real store (SQLite file, and PostgreSQL when SCRM_TEST_POSTGRES_URL is set),
configs built from the shipped example, and the real aiohttp app driven by pytest-aiohttp's client."""

from __future__ import annotations

import asyncio
import os
import socket
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from scrm.clock import ManualClock, SystemClock
from scrm.config import Config
from scrm.config_file import parse_config

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get("SCRM_TEST_POSTGRES_URL")


def example_config() -> dict[str, Any]:
    return tomllib.loads((ROOT / "config.example.toml").read_text("utf-8"))


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def free_port() -> int:
    """A loopback port nothing listens on: the OS picks an unused one, and it is released again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_env(store: dict[str, Any], **extra: str) -> dict[str, str]:
    """The environment for a ``python -m scrm`` subprocess on the test's store.

    The service port is pinned to a free loopback port: ``scrm chat`` talks to whatever service
    answers on the configured host and port (``scrm doctor`` reports on it), so without this a
    service someone left running on the default 8080 would decide these tests' outcome."""
    env = {**os.environ, "SCRM_STORE__URL": store["url"], "SCRM_SERVICE__HOST": "127.0.0.1",
           "SCRM_SERVICE__PORT": str(free_port()), **extra}
    if "schema_name" in store:
        env["SCRM_STORE__SCHEMA_NAME"] = store["schema_name"]
    else:
        env.pop("SCRM_STORE__SCHEMA_NAME", None)
    env.pop("SCRM_CONFIG", None)
    return env


@pytest.fixture(scope="session")
def pg_schemas() -> Iterator[list[str]]:
    """Schemas created by PostgreSQL tests, dropped when the run ends (after every app has closed)."""
    schemas: list[str] = []
    yield schemas
    if schemas and POSTGRES_URL:
        asyncio.run(_drop_schemas(schemas))


async def _drop_schemas(schemas: list[str]) -> None:
    admin = create_async_engine(POSTGRES_URL)
    for schema in schemas:  # one transaction each: dropping them all at once exhausts the lock table
        async with admin.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    await admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, pg_schemas: list[str]) -> dict[str, Any]:
    """Store settings for one test: a fresh SQLite file, or a fresh schema on the test PostgreSQL."""
    if request.param == "sqlite":
        return {"url": f"sqlite+aiosqlite:///{tmp_path / 'scrm.db'}"}
    if not POSTGRES_URL:
        pytest.skip("PostgreSQL store tests need SCRM_TEST_POSTGRES_URL (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(POSTGRES_URL)
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA {schema}"))
    await admin.dispose()
    pg_schemas.append(schema)
    return {"url": POSTGRES_URL, "schema_name": schema}


@pytest.fixture
def make_config(tmp_path: Path, store: dict[str, Any]) -> Callable[..., Config]:
    """The shipped example config on the test's store, with overrides merged in."""

    def build(overrides: dict[str, Any] | None = None) -> Config:
        data = deep_merge(example_config(), {"store": store, "campaigns": {"path": str(ROOT / "campaigns")}})
        return parse_config(deep_merge(data, overrides or {}), tmp_path, environ={})

    return build


@pytest.fixture
def clock() -> ManualClock:
    """Today at 11:00 in Asia/Shanghai (the demo time zone): outside marketing quiet hours, so a
    test's outcome never depends on the hour it runs at."""
    return ManualClock(SystemClock().now().replace(hour=3, minute=0, second=0, microsecond=0))


async def eventually(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05) -> Any:
    """Poll an async check until it returns something truthy; the scheduler runs for real.

    ``timeout`` only bounds a hang: a passing check returns as soon as it holds, and a slow machine
    (a cold matplotlib font cache, a loaded CI runner) must not turn a correct outcome into a failure."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)


async def applied(service: Any) -> None:
    """Wait until the journal holds no event still to apply: a channel acknowledges most events once they
    are durable, and their effects follow (scrm.ingest)."""
    from sqlalchemy import func, select

    from scrm.store.models import InboundJournal

    async def none_left() -> bool:
        async with service.sessions() as session:
            return not await session.scalar(select(func.count()).select_from(InboundJournal)
                                            .where(InboundJournal.applied_at.is_(None)))

    await eventually(none_left)
