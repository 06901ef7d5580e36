"""Personal data: privacy keys (init, new, rotate), the audit log, a person's export and erasure."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Coroutine
from datetime import date, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from scrm.cli.base import (
    EXIT_FAILED,
    EXIT_USAGE,
    cli_actor,
    err,
    load,
    main,
    no_customer,
    open_private_store,
    open_store,
    out,
    run_async,
)
from scrm.cli.customers import customers
from scrm.keyring import Keyring, KeyringError

T = TypeVar("T")


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err.print(message, markup=False, highlight=False)
    sys.exit(code)


def _run_private(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's store work; a missing or wrong key is a clear error, not a traceback."""
    try:
        return run_async(coro)
    except KeyringError as exc:
        _fail(f"privacy keys: {exc}")
        raise  # unreachable: _fail exits


@main.group()
def keys() -> None:
    """Privacy keys that encrypt phone numbers and birthdays."""


@keys.command("init")
@click.pass_context
def keys_init(ctx: click.Context) -> None:
    """Write a new key file at privacy.key_file (refuses to overwrite one)."""
    from scrm.keyring import write_key_file

    config = load(ctx)
    if not config.privacy.key_file:
        _fail("privacy.key_file is not set (keys come from SCRM_PRIVACY__KEY)", EXIT_USAGE)
    path = config.resolve(config.privacy.key_file)
    try:
        write_key_file(path)
    except FileExistsError:
        _fail(f"{path} already exists; `scrm keys new` adds a key to it")
    out.print(f"wrote {path}: keep it secret and back it up")


@keys.command("new")
@click.option("--id", "key_id", help="Id of the new key (default: k<next number>).")
@click.pass_context
def keys_new(ctx: click.Context, key_id: str | None) -> None:
    """Add a new encryption key; it encrypts new values at once, `scrm keys rotate` moves old ones."""
    from scrm.keyring import new_key_entry

    config = load(ctx)
    try:
        keyring = Keyring.from_config(config)
    except KeyringError as exc:
        _fail(f"privacy keys: {exc}", EXIT_USAGE)
    if key_id is None:
        numbers = [int(k[1:]) for k in keyring.keys if k[:1] == "k" and k[1:].isdecimal()]
        key_id = f"k{max(numbers, default=0) + 1}"
    if key_id in keyring.keys or key_id == "lookup":
        _fail(f"key {key_id!r} already exists", EXIT_USAGE)
    try:
        entry = new_key_entry(key_id)
    except KeyringError as exc:
        _fail(str(exc), EXIT_USAGE)
    if config.privacy.key or not config.privacy.key_file:
        out.print("keys come from SCRM_PRIVACY__KEY: append this entry to it (last = current), then run "
                  f"`scrm keys rotate`:\n{entry}", highlight=False)
        return
    if config.privacy.current_key:
        err.print(f"note: privacy.current_key = {config.privacy.current_key!r} still selects the current key")
    path = config.resolve(config.privacy.key_file)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(entry + "\n")
    out.print(f"added key {key_id} to {path}; new values use it. Now run: scrm keys rotate")


@keys.command("rotate")
@click.option("--batch", type=click.IntRange(1, 100_000), default=500, show_default=True,
              help="Customers re-encrypted per transaction.")
@click.pass_context
def keys_rotate(ctx: click.Context, batch: int) -> None:
    """Re-encrypt every value under the current key. Safe to interrupt: run again to resume."""
    from scrm.personal import rotate, stale_count

    config = load(ctx)

    async def go() -> tuple[int, int, str]:
        async with open_private_store(config) as (sessions, keyring):
            async with sessions() as session:
                total = await stale_count(session, keyring)
            with Progress(TextColumn("re-encrypting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=out, transient=False) as progress:
                task = progress.add_task("rotate", total=total)
                done = await rotate(sessions, keyring, batch, lambda n: progress.advance(task, n))
            return done, total, keyring.current

    try:
        done, total, current = _run_private(go())
    except KeyboardInterrupt:
        _fail("interrupted: finished batches are saved; run `scrm keys rotate` again to resume")
    out.print(f"{done} customer(s) re-encrypted under key {current}" + ("" if done >= total else
              f" ({total - done} changed meanwhile and were written with the current key already)"))


def _parse_moment(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("use a date (2026-01-31) or date and time (2026-01-31T09:00)",
                                 param_hint=option) from None


@main.command("audit")
@click.option("--customer", "ref", metavar="CUSTOMER",
              help="Only this customer (#id, channel:id or channel:account:id).")
@click.option("--actor", help="Only this staff member, CLI user or API key (olive, console:olive, api:pos).")
@click.option("--since", help="Only entries at or after this date/time (UTC).")
@click.option("--until", help="Only entries before this date/time (UTC).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=200, show_default=True, help="Newest entries shown.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def audit_cmd(ctx: click.Context, ref: str | None, actor: str | None, since: str | None, until: str | None,
              limit: int, as_json: bool) -> None:
    """Who read or changed customers' personal data (append-only)."""
    from scrm import audit
    from scrm.customers import CustomerRefError

    since_at, until_at = _parse_moment(since, "--since"), _parse_moment(until, "--until")
    config = load(ctx)

    async def go() -> list[dict[str, Any]]:
        async with open_store(config) as sessions, sessions() as session:
            customer_id = None if ref is None else await audit.customer_filter(session, ref, config.channels)
            rows = await audit.entries(session, customer_id, since_at, limit, actor=actor, until=until_at)
            return [{"at": e.at.isoformat(timespec="seconds"), "actor": e.actor, "role": e.role, "via": e.via,
                     "customer": e.customer_id, "action": e.action, "detail": e.detail} for e in rows]

    try:
        rows = run_async(go())
    except CustomerRefError as exc:
        no_customer(exc)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    table = Table("at (UTC)", "actor", "role", "via", "customer", "action", "detail", title="Audit log",
                  title_justify="left")
    for r in rows:
        table.add_row(r["at"], r["actor"], r["role"] or "", r["via"] or "", str(r["customer"] or ""), r["action"],
                      r["detail"] or "")
    out.print(table)


def _json_default(value: Any) -> Any:
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


@customers.command("export")
@click.argument("ref", metavar="CUSTOMER")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="File to write (default: customer-<id>.json here).")
@click.option("--by", help="Who asks (recorded in the audit log; default: your OS user).")
@click.pass_context
def customers_export(ctx: click.Context, ref: str, out_path: Path | None, by: str | None) -> None:
    """Write everything stored about one person (decrypted) to a readable JSON file; audited."""
    from scrm.audit import audit
    from scrm.clock import SystemClock
    from scrm.customers import CustomerRefError, find_by_ref
    from scrm.personal import export_data

    config = load(ctx)
    actor = cli_actor(by)

    async def go() -> tuple[int, dict[str, Any], Path]:
        async with open_private_store(config) as (sessions, keyring), sessions() as session, session.begin():
            customer = await find_by_ref(session, ref, config.channels, keyring)
            data = await export_data(session, customer, keyring)
            target = out_path or Path(f"customer-{customer.id}.json")
            await audit(session, actor, "admin", customer.id, "export", f"to {target.name}", via="cli",
                        at=SystemClock().now())
            return customer.id, data, target

    try:
        customer_id, data, target = _run_private(go())
    except CustomerRefError as exc:
        no_customer(exc)
    text = json.dumps(data, ensure_ascii=False, indent=2, default=_json_default)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    except OSError as exc:
        _fail(f"cannot write {target}: {exc.strerror}")
    out.print(f"wrote customer #{customer_id}'s data to {target} (contains personal data: hand it over securely)")


@customers.command("erase")
@click.argument("ref", metavar="CUSTOMER")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--by", help="Who erases (recorded in the audit log; default: your OS user).")
@click.pass_context
def customers_erase(ctx: click.Context, ref: str, yes: bool, by: str | None) -> None:
    """Erase a person's personal data (phone, birthday, name, message texts, channel ids); counts,
    orders and campaign results stay, anonymous, so reports do not change. Audited; cannot be undone."""
    from scrm.audit import audit
    from scrm.clock import SystemClock
    from scrm.customers import CustomerRefError, find_by_ref
    from scrm.personal import erase

    config = load(ctx)
    actor = cli_actor(by)
    if not yes:
        click.confirm(f"Erase the personal data of customer {ref}? This cannot be undone", abort=True)

    async def go() -> tuple[int, dict[str, int]]:
        now = SystemClock().now()
        async with open_private_store(config) as (sessions, keyring), sessions() as session, session.begin():
            customer = await find_by_ref(session, ref, config.channels, keyring)
            counts = await erase(session, customer, now)
            await audit(session, actor, "admin", customer.id, "erase",
                        ", ".join(f"{k}={v}" for k, v in counts.items()), via="cli", at=now)
            return customer.id, counts

    try:
        customer_id, counts = _run_private(go())
    except CustomerRefError as exc:
        no_customer(exc)
    out.print(f"erased customer #{customer_id}: {counts['texts']} message text(s), {counts['identities']} "
              f"channel identit(y/ies), {counts['cancelled']} planned message(s) cancelled")


@customers.command("dedupe")
@click.option("--by", help="Who merges (recorded in the audit log; default: your OS user).")
@click.pass_context
def customers_dedupe(ctx: click.Context, by: str | None) -> None:
    """Merge customers who share a phone number (matched by its keyed hash) into the oldest."""
    from scrm.audit import audit
    from scrm.clock import SystemClock
    from scrm.personal import dedupe_by_phone

    config = load(ctx)
    actor = cli_actor(by)

    async def go() -> list[tuple[int, int]]:
        now = SystemClock().now()
        async with open_private_store(config) as (sessions, _keyring), sessions() as session, session.begin():
            pairs = await dedupe_by_phone(session)
            for keep, merged in pairs:
                await audit(session, actor, "admin", keep, "merge", f"#{merged} merged into #{keep} (same phone)",
                            via="cli", at=now)
            return pairs

    pairs = _run_private(go())
    for keep, merged in pairs:
        out.print(f"#{merged} -> #{keep}")
    out.print(f"{len(pairs)} customer(s) merged")
