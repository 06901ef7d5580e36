"""What every ``scrm`` command shares: the group, config loading with clean errors, store access."""

from __future__ import annotations

import asyncio
import getpass
import logging
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from functools import wraps
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm.campaigns.definitions import DefinitionError
from scrm.config import Config, ConfigError
from scrm.config_file import load_config

if TYPE_CHECKING:
    from scrm.customers import CustomerRefError
    from scrm.keyring import Keyring

out = Console()
err = Console(stderr=True)
T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2


def load(ctx: click.Context) -> Config:
    path = ctx.obj["config_path"]
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[bold red]{path}: configuration has {len(exc.problems)} problem(s):[/]", highlight=False)
        for line in exc.problems:
            err.print(f"  {line}", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@asynccontextmanager
async def open_store(config: Config) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    from scrm.store.engine import make_engine, make_sessionmaker
    from scrm.store.migrate import upgrade
    from scrm.webhooks import events as webhook_events

    engine = make_engine(config.store_url, config.store.schema_name)
    try:
        await upgrade(engine)
        sessions = make_sessionmaker(engine)
        await webhook_events.attach_current(sessions)  # a command's changes emit their webhook events too
        yield sessions
    finally:
        await engine.dispose()



@asynccontextmanager
async def open_private_store(config: Config) -> AsyncIterator[tuple[async_sessionmaker[AsyncSession], Keyring]]:
    """The store plus its verified keyring, for commands that read or write personal values."""
    from scrm.clock import SystemClock
    from scrm.personal import open_keyring

    async with open_store(config) as sessions:
        yield sessions, await open_keyring(config, sessions, SystemClock().now())


def cli_actor(by: str | None) -> str:
    """Who is at the prompt, for the audit log: ``cli:<--by or the OS user>``."""
    try:
        user = by or getpass.getuser()
    except OSError:
        user = "unknown"
    return f"cli:{user}"


def no_customer(exc: CustomerRefError) -> NoReturn:
    """Say why a customer reference names no one, in the words chat and the API use too: exit 2 for
    text that is no reference, 1 for one that names nobody (or several people)."""
    from scrm.customers import BadCustomerRef

    err.print(str(exc), markup=False, highlight=False)
    sys.exit(EXIT_USAGE if isinstance(exc, BadCustomerRef) else EXIT_FAILED)


def guard(fn: Callable[..., T]) -> Callable[..., T]:
    """Definition file (campaigns, reply rules) and privacy key problems are user errors: print them, no traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        from scrm.keyring import KeyringError

        try:
            return fn(*args, **kwargs)
        except KeyringError as exc:
            err.print(f"[bold red]privacy keys:[/] {escape(str(exc))}")
            sys.exit(EXIT_USAGE)
        except DefinitionError as exc:
            err.print(f"[bold red]{exc.what} have {len(exc.problems)} problem(s):[/]")
            for line in exc.problems:
                err.print(f"  {line}", markup=False, highlight=False)
            sys.exit(EXIT_USAGE)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", default="config.toml", envvar="SCRM_CONFIG", show_default=True,
              type=click.Path(dir_okay=False), help="Config file (env SCRM_CONFIG).")
@click.pass_context
def main(ctx: click.Context, config_path: str) -> None:
    """SCRM bot service: capture, tag and nurture customers from chat channels."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


