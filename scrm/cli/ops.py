"""Operations: ``scrm doctor`` (what is wrong and how to fix it) and ``scrm db backup``."""

from __future__ import annotations

import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

from scrm.cli.base import EXIT_FAILED, err, main, out, run_async
from scrm.cli.service import db

Status = Literal["ok", "warn", "fail", "skip"]
_MARK = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]", "skip": "[dim]–[/]"}
TIMEOUT = 5.0


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


async def _store_checks(config: Any) -> list[Check]:
    from alembic.script import ScriptDirectory
    from sqlalchemy import text

    from scrm.store.engine import make_engine
    from scrm.store.migrate import alembic_config, current_revision

    checks = []
    engine = make_engine(config.store_url, config.store.schema_name)
    try:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001  (any driver error: the operator needs the message)
            return [Check("store", "fail", f"{config.store.url.split('@')[-1]}: {type(exc).__name__}: "
                                           f"{str(exc).splitlines()[0][:200]}",
                          "check store.url (or SCRM_STORE__URL) and that the database server is running")]
        checks.append(Check("store", "ok", f"reachable ({engine.dialect.name})"))
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        current = await current_revision(engine)
        if current == head:
            checks.append(Check("migrations", "ok", f"at head {head}"))
        else:
            checks.append(Check("migrations", "warn", f"store at {current or 'none (empty)'}, code expects {head}",
                                "run `scrm db upgrade` (or start the service, which upgrades)"))
    finally:
        await engine.dispose()
    return checks


def _privacy_check(config: Any) -> Check:
    from scrm.keyring import Keyring, KeyringError

    try:
        keyring = Keyring.from_config(config)
    except KeyringError as exc:
        return Check("privacy keys", "warn" if "does not exist" in str(exc) else "fail", str(exc),
                     "a new store gets a key file at first start; for a used store restore the key file from backup")
    return Check("privacy keys", "ok", f"{len(keyring.keys)} key(s), current {keyring.current!r}")


async def _channel_checks(config: Any) -> list[Check]:
    import aiohttp

    checks = []
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for kind, accounts in config.channels.items():
            for account, settings in accounts.items():
                name = f"channel {kind}.{account}"
                try:
                    checks.append(await _channel_check(http, name, kind, settings))
                except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
                    checks.append(Check(name, "skip", f"platform not reachable from here ({type(exc).__name__}); "
                                                      "credentials not checked"))
    return checks


async def _channel_check(http: Any, name: str, kind: str, s: dict[str, Any]) -> Check:
    """One credential check per platform, using calls that do not disturb the running service's
    tokens (WeChat's stable_token without force_refresh; WeCom and Telegram tokens are not revoked)."""
    if kind == "console":
        return Check(name, "ok", "local channel, nothing to check")
    if kind == "telegram":
        base = s.get("api_base_url", "https://api.telegram.org/bot")
        async with http.get(f"{base}{s.get('token', '')}/getMe") as resp:
            data = await resp.json(content_type=None)
        if data.get("ok"):
            return Check(name, "ok", f"token accepted (bot @{data['result'].get('username')})")
        return Check(name, "fail", f"Telegram refused the token ({data.get('error_code')})",
                     f"set channels.telegram.{name.split('.')[-1]}.token to the token @BotFather gave")
    if kind == "wechat":
        base = s.get("api_base_url", "https://api.weixin.qq.com/")
        async with http.post(f"{base}cgi-bin/stable_token", json={
                "grant_type": "client_credential", "appid": s.get("app_id"), "secret": s.get("app_secret"),
                "force_refresh": False}) as resp:
            data = await resp.json(content_type=None)
        if data.get("access_token"):
            return Check(name, "ok", "app_id/app_secret accepted")
        return Check(name, "fail", f"WeChat refused: errcode {data.get('errcode')} {data.get('errmsg', '')[:80]}",
                     "check app_id/app_secret, and that this machine's IP is on the account's IP whitelist")
    if kind == "wecom":
        base = s.get("api_base_url", "https://qyapi.weixin.qq.com/")
        async with http.get(f"{base}cgi-bin/gettoken",
                            params={"corpid": s.get("corp_id", ""), "corpsecret": s.get("secret", "")}) as resp:
            data = await resp.json(content_type=None)
        if data.get("errcode") == 0:
            return Check(name, "ok", "corp_id/secret accepted")
        return Check(name, "fail", f"WeCom refused: errcode {data.get('errcode')} {data.get('errmsg', '')[:80]}",
                     "check corp_id and the customer-contact secret, and the trusted IP list")
    return Check(name, "skip", "no credential check for this channel type")


async def _service_check(config: Any) -> Check:
    import aiohttp

    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.service.host, config.service.host)
    url = f"http://{host}:{config.service.port}/healthz"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http, http.get(url) as resp:
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return Check("service", "skip", f"no service answering at {url}: scheduler state unknown",
                     "start it with `scrm run` if it should be running")
    if data.get("scheduler") == "running" and data.get("store") == "ok":
        return Check("service", "ok", f"running at {url}, scheduler running, store ok")
    return Check("service", "fail", f"running at {url} but degraded: scheduler {data.get('scheduler')}, "
                                    f"store {data.get('store')}", "see the service log; restart it after fixing")


def _config_checks(config: Any) -> list[Check]:
    from scrm.campaigns.definitions import CampaignError, load_campaigns
    from scrm.conversations.replies import ReplyError, load_replies

    checks = [Check("config", "ok", "valid")]
    try:
        checks.append(Check("campaigns", "ok", f"{len(load_campaigns(config))} campaign file(s) valid"))
    except CampaignError as exc:
        checks.append(Check("campaigns", "fail", "; ".join(exc.problems[:3]), "run `scrm campaigns validate`"))
    try:
        book = load_replies(config)
        checks.append(Check("replies", "ok", f"{len(book.rules)} rule(s), {'a' if book.fallback else 'no'} fallback"))
    except ReplyError as exc:
        checks.append(Check("replies", "fail", "; ".join(exc.problems[:3]), "run `scrm replies validate`"))
    if not config.channels:
        checks.append(Check("channels", "warn", "none configured", "add a [channels.<type>.<account>] table"))
    if not config.api.keys:
        checks.append(Check("api keys", "skip", "no [api.keys.*]: the /api/v1 integration API refuses every call"))
    else:
        checks.append(Check("api keys", "ok", ", ".join(f"{n} ({len(k.scopes)} scopes)"
                                                       for n, k in config.api.keys.items())))
    return checks


@main.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check config, store and migrations, privacy keys, channel credentials and the running service."""
    from scrm.config import ConfigError
    from scrm.config_file import load_config

    path = ctx.obj["config_path"]
    try:
        config = load_config(path)
    except ConfigError as exc:
        _print([Check("config", "fail", f"{path}: {p}", "edit the file (config.example.toml documents every key)")
                for p in exc.problems])
        sys.exit(EXIT_FAILED)

    async def go() -> list[Check]:
        return [*await _store_checks(config), _privacy_check(config), *await _channel_checks(config),
                await _service_check(config)]

    checks = _config_checks(config) + run_async(go())
    _print(checks)
    sys.exit(EXIT_FAILED if any(c.status == "fail" for c in checks) else 0)


def _print(checks: list[Check]) -> None:
    for c in checks:
        out.print(f"{_MARK[c.status]} {c.name}: ", end="")
        out.print(c.detail, markup=False, highlight=False)
        if c.fix and c.status in ("fail", "warn"):
            out.print("    fix: ", end="", style="bold")
            out.print(c.fix, markup=False, highlight=False)
    failed = sum(c.status == "fail" for c in checks)
    out.print(f"{failed} problem(s) to fix" if failed else "nothing to fix")


@db.command("backup")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def db_backup(ctx: click.Context, file: Path) -> None:
    """Copy the SQLite store to FILE while the service keeps running (SQLite's online backup API).
    For PostgreSQL use its own tools: pg_dump -Fc (and pg_restore)."""
    from scrm.cli.base import load

    config = load(ctx)
    url = config.store_url
    prefix = "sqlite+aiosqlite:///"
    if not url.startswith(prefix):
        err.print("the store is PostgreSQL: back it up with its own tools, e.g. "
                  "`pg_dump -Fc -f scrm.dump <database>` (restore with pg_restore)")
        sys.exit(EXIT_FAILED)
    source = Path(url[len(prefix):])
    if not source.exists():
        err.print(f"no SQLite store at {source}")
        sys.exit(EXIT_FAILED)
    if file.exists() and file.resolve() == source.resolve():
        err.print("the backup file must not be the store itself")
        sys.exit(EXIT_FAILED)
    tmp = file.with_name(file.name + ".partial")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(tmp)
    try:
        # A few pages at a time so the running service's writers are never blocked for long.
        src.backup(dst, pages=1024, sleep=0.005)
        check = dst.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        dst.close()
        src.close()
    if check != "ok":
        tmp.unlink(missing_ok=True)
        err.print(f"the copy failed its integrity check: {check}")
        sys.exit(EXIT_FAILED)
    tmp.replace(file)
    out.print(f"backed up {source} to {file} ({file.stat().st_size} bytes)", highlight=False)
