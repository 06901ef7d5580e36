"""Data in and out: ``scrm customers import|export`` and ``scrm touchpoints export``."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

# The one-person export (scrm.cli.privacy) registers first; the command below replaces it and keeps its
# behaviour for ``scrm customers export CUSTOMER``.
from scrm.cli.base import (
    EXIT_FAILED,
    EXIT_USAGE,
    cli_actor,
    err,
    load,
    main,
    open_store,
    out,
    run_async,
)
from scrm.cli.customers import customers
from scrm.cli.privacy import customers_export as _subject_export

if TYPE_CHECKING:
    from scrm.exporter import Format


def progress_bar(total: int | None, unit: str) -> Any:
    """A rich progress bar on stderr: bytes (speed, time left) or a count of ``total``; the imports' bar.
    Off when stderr is not a terminal: a script or a log gets the command's summary, not a drawn bar."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn()]
    columns += [TransferSpeedColumn(), TimeRemainingColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    return Progress(*columns, TimeElapsedColumn(), console=err, transient=False, disable=not err.is_terminal)


@customers.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch", type=click.IntRange(1, 50_000), default=1000, show_default=True,
              help="Rows per transaction.")
@click.pass_context
def customers_import(ctx: click.Context, file: Path, batch: int) -> None:
    """Import customers from a CSV file (columns by header: name, phone, birthday, identity, tags, consent;
    other columns become custom attributes). Rows merge with customers of the same identity or phone;
    rejected rows go to FILE.rejects.csv with their line and reason. Running it again changes nothing."""
    from scrm import personal
    from scrm.clock import SystemClock
    from scrm.importer import Importer, ImportError_

    config = load(ctx)

    async def go() -> Any:
        now = SystemClock().now()
        async with open_store(config) as sessions:
            keyring = await personal.open_keyring(config, sessions, now)
            importer = Importer(sessions, config, keyring, now, batch_size=batch)
            with progress_bar(file.stat().st_size, "bytes") as bar:
                task = bar.add_task(f"importing {file.name}", total=file.stat().st_size)
                return await importer.run(file, lambda done: bar.update(task, completed=done))

    try:
        summary = run_async(go())
    except ImportError_ as exc:
        err.print(f"{file}: {exc}", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)
    except UnicodeDecodeError:
        err.print(f"{file}: not UTF-8 text (save the CSV as UTF-8)")
        sys.exit(EXIT_USAGE)
    out.print(f"{summary.rows} row(s): [green]{summary.created} imported[/], {summary.merged} merged with existing "
              f"customers ({summary.updated} updated, {summary.unchanged} unchanged), "
              f"[{'red' if summary.rejected else 'green'}]{summary.rejected} rejected[/]")
    if summary.rejects_file is not None:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.reasons.items()))
        out.print(f"rejected rows with line numbers and reasons: {summary.rejects_file} ({reasons})",
                  highlight=False)


def _output(stack: ExitStack, path: Path | None) -> TextIO:
    if path is None or str(path) == "-":
        return sys.stdout
    return stack.enter_context(path.open("w", encoding="utf-8", newline=""))


@customers.command("export")
@click.argument("ref", required=False, metavar="[CUSTOMER]")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--segment", help="Only customers in this named segment.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="File to write (default: stdout; for one CUSTOMER: customer-<id>.json).")
@click.option("--personal", "with_personal", is_flag=True,
              help="Decrypt phone numbers and birthdays (audited; otherwise last 4 digits and MM-DD only).")
@click.option("--by", help="Who asks (recorded in the audit log; default: your OS user).")
@click.pass_context
def customers_export(ctx: click.Context, ref: str | None, fmt: Format, segment: str | None, out_path: Path | None,
                     with_personal: bool, by: str | None) -> None:
    """Export all customers (or a segment's) with identities, tags and attributes, streamed in bounded
    memory; or, given one CUSTOMER, everything stored about that person as JSON (a data-subject request)."""
    from scrm import personal
    from scrm.audit import audit
    from scrm.clock import SystemClock
    from scrm.exporter import export_customers

    if ref is not None:
        ctx.invoke(_subject_export, ref=ref, out_path=out_path, by=by)
        return
    config = load(ctx)
    if segment is not None and segment not in config.segments:
        err.print(f"no segment {segment!r} (configured: {', '.join(sorted(config.segments)) or 'none'})")
        sys.exit(EXIT_FAILED)

    async def go() -> int:
        now = SystemClock().now()
        async with open_store(config) as sessions:
            keyring = None
            if with_personal:
                keyring = await personal.open_keyring(config, sessions, now)
                async with sessions() as session, session.begin():
                    await audit(session, cli_actor(by), "admin", None, "export",
                                f"all customers{f' of segment {segment}' if segment else ''} with personal data",
                                via="cli", at=now)
            with ExitStack() as stack:
                return await export_customers(sessions, config, _output(stack, out_path), fmt,
                                              segment, now, keyring)

    n = run_async(go())
    err.print(f"exported {n} customer(s)" + (f" to {out_path}" if out_path else ""))


@main.group()
def touchpoints() -> None:
    """The interaction log."""


@touchpoints.command("export")
@click.option("--since", required=True, type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"]),
              help="From this date/time (UTC).")
@click.option("--until", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"]),
              help="Up to (not including) this date/time (UTC).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("--out", "output", type=click.Path(dir_okay=False, path_type=Path), help="File (default: stdout).")
@click.option("--no-text", is_flag=True, help="Leave message text out.")
@click.pass_context
def touchpoints_export(ctx: click.Context, since: datetime, until: datetime | None, fmt: Format,
                       output: Path | None, no_text: bool) -> None:
    """Export touchpoints since a date, oldest first, streamed."""
    from scrm.exporter import export_touchpoints

    config = load(ctx)

    async def go() -> int:
        async with open_store(config) as sessions:
            with ExitStack() as stack:
                return await export_touchpoints(sessions, _output(stack, output), since, until, fmt,
                                                text=not no_text)

    n = run_async(go())
    err.print(f"exported {n} touchpoint(s)" + (f" to {output}" if output else ""))
