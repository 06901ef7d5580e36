"""Console accounts: ``scrm staff add|passwd|list|disable`` (the core is scrm.console.accounts)."""

from __future__ import annotations

import sys
from typing import NoReturn

import click
from rich.table import Table

from scrm.cli.base import EXIT_FAILED, err, guard, load, main, open_store, out, run_async
from scrm.clock import SystemClock
from scrm.config import Config
from scrm.console import accounts
from scrm.store.engine import writing


@main.group()
def staff() -> None:
    """Console accounts (sign in at /console/)."""


def _fail(message: str) -> NoReturn:
    err.print(message, markup=False, highlight=False)
    sys.exit(EXIT_FAILED)


def _password(stdin: bool) -> str:
    """From standard input (one line, for scripts) or asked twice at the terminal, never echoed."""
    if stdin:
        return sys.stdin.readline().rstrip("\r\n")
    value: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return value


def _change(config: Config, change: accounts.AccountChange) -> None:
    async def go() -> None:
        async with open_store(config) as sessions, writing(sessions) as session:
            await change(session)

    try:
        run_async(go())
    except accounts.AccountError as exc:
        _fail(f"staff: {exc}")


@staff.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(accounts.ROLES), required=True)
@click.option("--identity", help="The person's chat identity <channel>:<id>, for /console sign-in links.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.pass_context
@guard
def staff_add(ctx: click.Context, name: str, role: accounts.Role, identity: str | None, password_stdin: bool) -> None:
    """Create a console account (the password is stored as an argon2id hash)."""
    config, password = load(ctx), _password(password_stdin)
    _change(config, lambda s: accounts.add_account(s, name, role, password, SystemClock().now(), identity))
    out.print(f"account {name} ({role}) created")


@staff.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.pass_context
@guard
def staff_passwd(ctx: click.Context, name: str, password_stdin: bool) -> None:
    """Set a new password; the account's browsers are signed out."""
    config, password = load(ctx), _password(password_stdin)
    _change(config, lambda s: accounts.set_password(s, name, password, SystemClock().now()))
    out.print(f"password of {name} changed; its sessions ended")


@staff.command("disable")
@click.argument("name")
@click.pass_context
@guard
def staff_disable(ctx: click.Context, name: str) -> None:
    """Stop an account from signing in; its browsers are signed out."""
    _change(load(ctx), lambda s: accounts.disable(s, name, SystemClock().now()))
    out.print(f"account {name} disabled")


@staff.command("list")
@click.pass_context
@guard
def staff_list(ctx: click.Context) -> None:
    """Console accounts with role, chat identity and state."""
    config = load(ctx)

    async def go() -> list[tuple[str, str, str, str]]:
        async with open_store(config) as sessions, sessions() as session:
            return [(a.name, a.role, a.identity or "-", "disabled" if a.disabled else "active")
                    for a in await accounts.accounts(session)]

    table = Table("name", "role", "chat identity", "state")
    for row in run_async(go()):
        table.add_row(*row)
    out.print(table)
