"""Helpers for end-to-end tests that run real ``scrm run`` processes against a fake Telegram.

A config file is written from config.example.toml (the store, a Telegram bot pointing at the fake,
short cluster timings, a send-rate limit and a campaigns folder with one one-off campaign); customers
with Telegram identities are put straight into the store; processes are started with
``python -m scrm -c <config> run``, watched through ``/healthz`` and killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import ClientSession, ClientTimeout, web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from scrm.config_file import parse_config
from scrm.keyring import write_key_file
from scrm.personal import open_keyring
from scrm.store.engine import make_engine, make_sessionmaker
from scrm.store.migrate import upgrade
from scrm.store.models import Campaign, Customer, Identity
from tests.conftest import ROOT, deep_merge, example_config, free_port
from tests.fakes.telegram import FakeTelegram

TOKEN = "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"
SECRET = "e2e-webhook-secret"
ZONE = "Asia/Shanghai"
CAMPAIGN = "e2e-flash"
#: Telegram chat ids of the generated customers start here (customer i has chat FIRST_CHAT + i).
FIRST_CHAT = 700_000_000


# -- TOML out (the project reads TOML with tomllib; nothing here writes it) --------------------------


def _key(key: str) -> str:
    return json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """Plain values first, then sub-tables ``[a.b]`` and arrays of tables ``[[a.b]]``."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, table in tables:
        path = (*prefix, key)
        lines.append(f"\n[{'.'.join(_key(k) for k in path)}]")
        lines.append(dump_toml(table, path))
    for key, items in arrays:
        path = (*prefix, key)
        for item in items:
            lines.append(f"\n[[{'.'.join(_key(k) for k in path)}]]")
            lines.append("\n".join(f"{_key(k)} = {_value(v)}" for k, v in item.items()))
    return "\n".join(line for line in lines if line)


# -- the fake platform ---------------------------------------------------------------------------------


async def start_fake(**limits: Any) -> tuple[FakeTelegram, web.AppRunner]:
    """The fake Bot API on a loopback port of this test's event loop."""
    fake = FakeTelegram(TOKEN, **limits)
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.base_url = f"http://127.0.0.1:{port}/bot"
    return fake, runner


# -- config, campaign and store ------------------------------------------------------------------------


def write_setup(folder: Path, store: dict[str, Any], fake_url: str, *, rate: float, at: datetime,
                overrides: dict[str, Any] | None = None) -> Path:
    """config.toml (from the shipped example) and campaigns/ with the one one-off campaign."""
    campaigns = folder / "campaigns"
    campaigns.mkdir(parents=True, exist_ok=True)
    (campaigns / "flash.toml").write_text(f'''name = "{CAMPAIGN}"
title = "End-to-end flash message"
kind = "lifecycle"

[trigger]
at = "{at:%Y-%m-%dT%H:%M:%S}"
misfire = "run_late"

[audience]
segment = "everyone"

[message]
text = "{{{{ customer.name }}}}, 今晚 8 点限时活动 / flash sale tonight"
''', "utf-8")
    data = deep_merge(example_config(), {
        "service": {"timezone": ZONE},
        "store": store,
        "campaigns": {"path": str(campaigns)},
        "scheduler": {"campaign_check_seconds": 1, "outbox_tick_seconds": 0.2},
        "cluster": {"heartbeat_seconds": 0.5, "lease_seconds": 3},
        "delivery": {"rate_limits": {"telegram:main": rate}},
        "segments": {"everyone": "not opted_out"},
        "privacy": {"key_file": str(folder / "privacy.key")},
        "logging": {"level": "WARNING"},
        "channels": {"telegram": {"main": {"token": TOKEN, "webhook_secret": SECRET, "api_base_url": fake_url,
                                           "overall_per_second": rate}}},
    })
    data = deep_merge(data, overrides or {})
    path = folder / "config.toml"
    path.write_text(dump_toml(data) + "\n", "utf-8")
    return path


def local_in(seconds: float) -> datetime:
    """A naive wall time in the service time zone, ``seconds`` from now (for ``trigger.at``)."""
    return (datetime.now(ZoneInfo(ZONE)) + timedelta(seconds=seconds)).replace(tzinfo=None, microsecond=0)


async def prepare_store(config_path: Path, customers: int) -> None:
    """What an operator does before starting: ``scrm db upgrade``, the privacy key; then ``customers``
    Telegram customers, and the campaign known to the store since a minute ago (as if its file had been
    loaded then), so the one-off run fires at its time however long the processes take to start."""
    import tomllib

    config = parse_config(tomllib.loads(config_path.read_text("utf-8")), config_path.parent, environ={})
    write_key_file(config.resolve(config.privacy.key_file))  # type: ignore[arg-type]
    engine = make_engine(config.store_url, config.store.schema_name)
    try:
        await upgrade(engine)
        sessions = make_sessionmaker(engine)
        now = datetime.now(UTC).replace(tzinfo=None, microsecond=0)  # the store keeps naive UTC
        await open_keyring(config, sessions, now)
        async with sessions() as session, session.begin():
            session.add(Campaign(name=CAMPAIGN, paused=False, definition_hash="", created_at=now - timedelta(minutes=1),
                                 updated_at=now - timedelta(minutes=1)))
            rows = [Customer(display_name=f"客户{i}", first_seen_at=now, last_seen_at=now, last_inbound_at=now,
                             acquisition_source="telegram:main") for i in range(customers)]
            session.add_all(rows)
            await session.flush()
            session.add_all([Identity(customer_id=c.id, channel="telegram", account="main",
                                      external_id=str(FIRST_CHAT + i), created_at=now) for i, c in enumerate(rows)])
    finally:
        await engine.dispose()


def store_engine(config_path: Path) -> AsyncEngine:
    import tomllib

    config = parse_config(tomllib.loads(config_path.read_text("utf-8")), config_path.parent, environ={})
    return make_engine(config.store_url, config.store.schema_name)


async def chat_of_customers(engine: AsyncEngine) -> dict[int, int]:
    """customer id -> Telegram chat id."""
    async with make_sessionmaker(engine)() as session:
        rows = (await session.execute(select(Identity.customer_id, Identity.external_id))).all()
    return {cid: int(ext) for cid, ext in rows}


# -- processes -----------------------------------------------------------------------------------------


class Instance:
    """One ``scrm run`` process; output goes to files (pipes could fill up and block it)."""

    def __init__(self, config: Path, name: str, role: str = "all") -> None:
        self.config, self.name, self.role = config, name, role
        self.port = free_port()
        self.log = config.parent / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCRM_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "scrm", "-c", str(self.config), "run", "--host", "127.0.0.1",
                "--port", str(self.port), "--role", self.role, cwd=self.config.parent, env=env, stdout=out,
                stderr=out)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def health(self) -> dict[str, Any] | None:
        """The /healthz answer, or None while the process does not answer."""
        try:
            async with ClientSession(timeout=ClientTimeout(total=2)) as http, \
                    http.get(f"http://127.0.0.1:{self.port}/healthz") as resp:
                return dict(await resp.json())
        except (TimeoutError, OSError, ValueError):
            return None

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if not self.alive:
                raise AssertionError(f"{self.name} exited with {self.proc and self.proc.returncode}:\n{self.tail()}")
            status = await self.health()
            if status and status.get("status") == "ok":
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} not healthy within {timeout}s:\n{self.tail()}")

    async def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the process."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    def tail(self, chars: int = 4000) -> str:
        """The end of the process's log, without the access log and skipped-tick lines."""
        if not self.log.exists():
            return ""
        lines = [line for line in self.log.read_text("utf-8", errors="replace").splitlines()
                 if "GET /healthz" not in line and "maximum number of running instances" not in line]
        return f"--- {self.name}\n" + "\n".join(lines)[-chars:]


async def kill_all(instances: list[Instance]) -> None:
    for instance in instances:
        await instance.kill()


async def wait_for(check: Any, timeout: float, what: str | Callable[[], str], interval: float = 0.05) -> Any:
    """Poll ``check`` (sync or async) until truthy; ``what`` (or what it returns) explains a timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)
