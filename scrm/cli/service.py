"""Getting started and running: init, run, chat, db."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from scrm import logs
from scrm.cli.base import (
    EXIT_FAILED,
    err,
    guard,
    load,
    main,
    out,
    run_async,
)
from scrm.config_file import demo_file

if TYPE_CHECKING:
    from scrm.web import Role


@main.command()
@click.option("--force", is_flag=True, help="Overwrite an existing config.toml.")
@click.pass_context
def init(ctx: click.Context, force: bool) -> None:
    """Write a working config.toml (SQLite, console channel, demo campaigns and auto-replies) here."""
    target = Path(ctx.obj["config_path"])
    if target.exists() and not force:
        err.print(f"{target} already exists; use --force to overwrite it")
        sys.exit(EXIT_FAILED)
    shutil.copyfile(demo_file("config.example.toml"), target)
    if not (key_file := target.parent / "privacy.key").exists():
        from scrm.keyring import write_key_file

        write_key_file(key_file)  # encrypts customers' phone numbers and birthdays: back it up
    folders = [target.parent / name for name in ("campaigns", "replies")]
    for folder in folders:
        if not folder.exists():
            shutil.copytree(demo_file(folder.name), folder)
    out.print(f"wrote {target}, {folders[0]}/ and {folders[1]}/ — start with: scrm run")


@main.command()
@click.option("--host", help="Override service.host.")
@click.option("--port", type=int, help="Override service.port.")
@click.option("--role", type=click.Choice(["all", "web", "worker"]), default="all", show_default=True,
              help="web: serve webhooks; worker: send and plan; all: both (several instances may share a PostgreSQL store).")
@click.option("--loop", "loop_kind", type=click.Choice(["auto", "uvloop", "asyncio"]), default="auto",
              show_default=True, help="Event loop: uvloop when installed (pip install \".[fast]\"), else asyncio's.")
@click.pass_context
@guard
def run(ctx: click.Context, host: str | None, port: int | None, role: Role,  # click.Choice: one of Role
        loop_kind: str) -> None:
    """Serve webhooks and run the scheduler until SIGINT/SIGTERM."""
    from aiohttp import web

    from scrm.web import create_app

    config = load(ctx)
    logs.setup(config)
    host, port = host or config.service.host, config.service.port if port is None else port
    from scrm.personal import check_store

    run_async(check_store(config))  # a missing or wrong privacy key stops here, with a clear message
    app = create_app(config, role=role)
    app.on_startup.append(_tune_gc)  # after the service's own start-up (its cleanup context runs first)
    loop, loop_name = _event_loop(loop_kind)
    web.run_app(app, host=host, port=port, loop=loop,
                access_log=web.access_logger if config.logging.access_log else None,
                print=lambda _: out.print(f"scrm ({role}) serving on http://{host}:{port} "
                                          f"(store: {config.store.url}, loop: {loop_name})"))


def _event_loop(kind: str) -> tuple[asyncio.AbstractEventLoop, str]:
    """uvloop's loop when installed and not declined: the webhook path spends much of its time in the
    loop's own I/O and callbacks, which uvloop runs in C (bench.ingest measures both side by side)."""
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise click.UsageError('--loop uvloop: uvloop is not installed (pip install ".[fast]")') from None
        else:
            return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


async def _tune_gc(_app: object) -> None:
    """Fewer, cheaper garbage collections for a long-running service: what start-up built (modules,
    config, the segmenter's dictionary, compiled statements) lives as long as the process, so it is
    frozen out of every collection, and the youngest generation is collected every 50,000 allocations
    instead of 700. Measured with ``python -m bench.ingest --no-campaigns``: p99 60 -> 16-25 ms."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@main.command()
@click.option("--as", "who", required=True, metavar="ROLE:NAME",
              help="Who you are in the chat: customer:alice or manager:bob.")
@click.option("--url", help="Service URL (default: the configured host/port, else an in-process service).")
@click.pass_context
@guard
def chat(ctx: click.Context, who: str, url: str | None) -> None:
    """Chat with the bot from the terminal; reads one message per line when stdin is not a terminal."""
    from scrm.chat import run_chat, stdin_lines

    role, sep, name = who.partition(":")
    if not sep or role not in ("customer", "manager", "operator", "admin", "staff") or not name:
        raise click.BadParameter("use customer:<name> or manager:<name>", param_hint="--as")
    config = load(ctx)
    logging.getLogger().setLevel(logging.WARNING)
    lines = None if sys.stdin.isatty() else stdin_lines()
    sys.exit(run_async(run_chat(config, name, url, lines, out=click.echo)))


@main.group()
def db() -> None:
    """The customer store's schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the shipped migrations (scrm run also does this at start)."""
    from scrm.store.engine import make_engine
    from scrm.store.migrate import current_revision, upgrade

    config = load(ctx)

    async def go() -> str | None:
        engine = make_engine(config.store_url, config.store.schema_name)
        try:
            await upgrade(engine)
            return await current_revision(engine)
        finally:
            await engine.dispose()

    out.print(f"store at revision {run_async(go())}")


