"""Loyalty on the command line: ``scrm conversions import``, ``scrm referrals report``,
``scrm analytics fit``, and ``scrm loyalty sweep|nightly`` to run the jobs by hand."""

from __future__ import annotations

import gc
import json
import sys
from datetime import datetime, timedelta
from pathlib import Path

import click

from scrm.cli.base import (
    EXIT_FAILED,
    EXIT_USAGE,
    err,
    load,
    main,
    open_store,
    out,
    run_async,
)


@main.group()
def conversions() -> None:
    """Orders and other conversions."""


@conversions.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch", type=click.IntRange(1, 1_000_000), default=50_000, show_default=True,
              help="Orders per transaction (on SQLite the service's writers wait for each: ~2-3 s at the default).")
@click.pass_context
def conversions_import(ctx: click.Context, file: Path, batch: int) -> None:
    """Import order history from JSON Lines or CSV (see scrm.loyalty.history), streamed in batches with a
    progress bar; order ids already stored are skipped, so running it again changes nothing."""
    from scrm.cli.io import progress_bar
    from scrm.clock import SystemClock
    from scrm.loyalty.history import ImportResult, import_file

    config = load(ctx)

    async def go() -> ImportResult:
        size = file.stat().st_size
        async with open_store(config) as sessions:
            # Millions of short-lived rows: what start-up built is left out of collection, which runs
            # every 500,000 allocations instead of 700: ~15% of the import's CPU at 700, and still ~5%
            # at `scrm run`'s 50,000 (a chunk's parsed lines live about that long, and each was scanned).
            gc.freeze()
            gc.set_threshold(500_000, 20, 100)
            with progress_bar(size, "bytes") as bar:
                task = bar.add_task(f"importing {file.name}", total=size)
                return await import_file(sessions, file, SystemClock().now(), config.channels, batch,
                                         lambda done: bar.update(task, completed=done))

    try:
        result = run_async(go())
    except UnicodeDecodeError:
        err.print(f"{file}: not UTF-8 text (save it as UTF-8)", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)
    out.print(f"imported {result.orders} orders ({result.items} items), {result.skipped} already present, "
              f"{result.rejected_count} rejected", highlight=False)
    for line in result.rejected[:50]:
        err.print(f"  {line}", markup=False, highlight=False)
    if result.rejected_count > 50:
        err.print(f"  ... and {result.rejected_count - 50} more", highlight=False)
    if result.rejected_count:
        sys.exit(EXIT_FAILED)


@main.group()
def referrals() -> None:
    """Referral programme (推荐有礼)."""


@referrals.command("report")
@click.option("--days", type=click.IntRange(1, 3650), default=None, help="Only referrals captured in the last N days.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def referrals_report(ctx: click.Context, days: int | None, as_json: bool) -> None:
    """Invites, captures, conversions, points paid and the top referrers."""
    from scrm.clock import SystemClock
    from scrm.loyalty.referrals import ReferralReport, report

    config = load(ctx)

    async def go() -> ReferralReport:
        async with open_store(config) as sessions, sessions() as session:
            since = SystemClock().now() - timedelta(days=days) if days else None
            return await report(session, since)

    result = run_async(go())
    if as_json:
        out.print_json(json.dumps(result.__dict__, ensure_ascii=False))
    else:
        out.print(result.text(), markup=False, highlight=False)


@main.group()
def analytics() -> None:
    """Churn and lifetime value models (BG/NBD + Gamma-Gamma)."""


@analytics.command("fit")
@click.option("--calibration-end", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="Fit on purchases before this date and check predictions from it on "
                   "(default: the last 90 days are the holdout).")
@click.option("--holdout-end", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="Last day of the holdout, inclusive (default: the day of the store's last order).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def analytics_fit(ctx: click.Context, calibration_end: datetime | None, holdout_end: datetime | None,
                  as_json: bool) -> None:
    """Fit the model on the store's orders, print its parameters and a holdout check."""
    from scrm.loyalty import churn

    if not (churn.HAS_LIFETIMES or churn.HAS_SCIPY):
        err.print("the model needs the analytics extra: pip install 'scrm-bot[analytics]'")
        sys.exit(EXIT_USAGE)
    config = load(ctx)

    async def go() -> churn.HoldoutCheck:
        async with open_store(config) as sessions, sessions() as session:
            return await churn.holdout(session, calibration_end.date() if calibration_end else None,
                                       holdout_end.date() if holdout_end else None)

    try:
        check = run_async(go())
    except churn.HoldoutError as exc:
        err.print(f"no holdout check: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(EXIT_USAGE)
    except Exception as exc:  # noqa: BLE001  too few customers or purchases for the optimizer: say so plainly
        err.print(f"cannot fit the model: {type(exc).__name__}: {exc}", markup=False)
        sys.exit(EXIT_FAILED)
    if as_json:
        out.print_json(json.dumps(check.as_dict(), ensure_ascii=False))
        return

    def say(line: str) -> None:
        out.print(line, highlight=False, markup=False, soft_wrap=True)  # one line each, whatever the width

    say(f"method {check.fit.method}; calibration: orders before {check.calibration_end:%Y-%m-%d}")
    say(f"holdout {check.calibration_end:%Y-%m-%d} to {check.holdout_end:%Y-%m-%d}: {check.holdout_days} days "
        f"({check.holdout_weeks:.1f} weeks)")
    if check.holdout_end > check.last_order:
        say(f"the last order is on {check.last_order:%Y-%m-%d}: the days after it count as no purchases")
    say("BG/NBD " + ", ".join(f"{k}={v:.3f}" for k, v in check.fit.bgnbd.items()))
    if check.fit.gamma_gamma:
        say("Gamma-Gamma " + ", ".join(f"{k}={v:.3f}" for k, v in check.fit.gamma_gamma.items()))
    say("repeat purchases in the holdout per customer, by repeat purchases in calibration")
    say("repeat | customers | predicted | actual")
    for r in check.rows:
        say(f"{r.repeat:>6} | {r.customers:>9} | {r.predicted:>9.3f} | {r.actual:>6.3f}")
    say(f"mean absolute error {check.mae:.3f}")


@main.group("loyalty")
def loyalty_group() -> None:
    """Run the loyalty jobs by hand (the scheduler runs them in `scrm run`)."""


@loyalty_group.command("nightly")
@click.pass_context
def loyalty_nightly(ctx: click.Context) -> None:
    """Expire points, re-evaluate tiers, rebuild recommendations, score churn/CLV."""
    from scrm.loyalty.jobs import nightly
    from scrm.service import Service

    config = load(ctx)

    async def go() -> str:
        service = Service(config)
        await service.start(scheduler=False)
        try:
            return str(await nightly(service))
        finally:
            await service.stop()

    out.print(run_async(go()), markup=False, highlight=False)
