"""Loyalty on the command line: ``scrm conversions import``, ``scrm referrals report``,
``scrm analytics fit``, and ``scrm loyalty sweep|nightly`` to run the jobs by hand."""

from __future__ import annotations

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
@click.option("--batch", type=click.IntRange(1, 50_000), default=1000, show_default=True, help="Orders per transaction.")
@click.pass_context
def conversions_import(ctx: click.Context, file: Path, batch: int) -> None:
    """Import order history from JSON Lines or CSV (see scrm.loyalty.history), streamed in batches;
    order ids already stored are skipped, so running it again changes nothing."""
    from scrm.clock import SystemClock
    from scrm.loyalty.history import ImportResult, import_batch, read_orders

    config = load(ctx)
    result = ImportResult()

    async def go() -> None:
        now = SystemClock().now()
        async with open_store(config) as sessions:
            with file.open(encoding="utf-8-sig", newline="") as handle:
                pending: list = []
                for item in read_orders(file, handle):
                    pending.append(item)
                    if len(pending) >= batch:
                        async with sessions() as session, session.begin():
                            await import_batch(session, pending, now, result)
                        pending = []
                if pending:
                    async with sessions() as session, session.begin():
                        await import_batch(session, pending, now, result)

    run_async(go())
    out.print(f"imported {result.orders} orders ({result.items} items), {result.skipped} already present, "
              f"{len(result.rejected)} rejected", highlight=False)
    for line in result.rejected[:50]:
        err.print(f"  {line}", markup=False, highlight=False)
    if result.rejected:
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
              help="Fit on purchases before this date and check predictions after it (default: 90 days ago).")
@click.pass_context
def analytics_fit(ctx: click.Context, calibration_end: datetime | None) -> None:
    """Fit the model on the store's orders, print its parameters and a holdout check."""
    from scrm.clock import SystemClock
    from scrm.loyalty import churn

    if not (churn.HAS_LIFETIMES or churn.HAS_SCIPY):
        err.print("the model needs the analytics extra: pip install 'scrm-bot[analytics]'")
        sys.exit(EXIT_USAGE)
    config = load(ctx)
    now = SystemClock().now()
    end = calibration_end or now - timedelta(days=90)

    async def go() -> churn.HoldoutCheck:
        async with open_store(config) as sessions, sessions() as session:
            return await churn.holdout(session, end, now)

    try:
        check = run_async(go())
    except Exception as exc:  # noqa: BLE001  too few customers or purchases for the optimizer: say so plainly
        err.print(f"cannot fit the model: {type(exc).__name__}: {exc}", markup=False)
        sys.exit(EXIT_FAILED)
    out.print(f"method {check.fit.method}; calibration until {end:%Y-%m-%d}, holdout {check.holdout_days} days",
              highlight=False)
    out.print("BG/NBD " + ", ".join(f"{k}={v:.3f}" for k, v in check.fit.bgnbd.items()), highlight=False)
    if check.fit.gamma_gamma:
        out.print("Gamma-Gamma " + ", ".join(f"{k}={v:.3f}" for k, v in check.fit.gamma_gamma.items()), highlight=False)
    out.print("repeat purchases in calibration | customers | predicted | actual (per customer, holdout)")
    for g in check.groups:
        out.print(f"{g['repeat']:>5} | {g['customers']:>9} | {g['predicted']:>9.3f} | {g['actual']:>6.3f}",
                  highlight=False)


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
