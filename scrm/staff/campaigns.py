"""Operators steer campaigns from chat: /campaigns, /pause, /resume, /preview."""

from __future__ import annotations

from scrm.campaigns.control import set_paused
from scrm.campaigns.outbox import preview
from scrm.campaigns.timed import describe_run, last_runs
from scrm.config import Role
from scrm.customers import customer_of, parse_ref
from scrm.staff import StaffContext, command

OPERATORS: set[Role] = {"operator", "admin"}
ALL: set[Role] = {"manager", "operator", "admin"}


@command("campaigns", ALL, "/campaigns", reads_only=True)
async def campaigns(ctx: StaffContext, args: str) -> str:
    """Each campaign's state and last run: a campaign that failed to plan shows here with its reason."""
    runs = await last_runs(ctx.session)
    lines = []
    for name in sorted(ctx.service.campaigns):
        state = "已暂停 paused" if name in ctx.service.paused else "active"
        lines.append(f"{name} [{state}] {describe_run(runs.get(name))}")
    failed = [name for name in sorted(ctx.service.campaigns) if (run := runs.get(name)) and run.status == "failed"]
    head = f"活动 Campaigns ({len(failed)} 计划失败 failed to plan)" if failed else "活动 Campaigns"
    return "\n".join([head, *lines])


async def _switch(ctx: StaffContext, args: str, paused: bool) -> str:
    name = args.strip()
    if name not in ctx.service.campaigns:
        return f"没有这个活动 No campaign {name!r}"
    await set_paused(ctx.session, name, paused, ctx.now)
    (ctx.service.paused.add if paused else ctx.service.paused.discard)(name)
    return f"{name}: {'已暂停 paused' if paused else '已恢复 resumed'}"


@command("pause", OPERATORS, "/pause <campaign>")
async def pause(ctx: StaffContext, args: str) -> str:
    return await _switch(ctx, args, True)


@command("resume", OPERATORS, "/resume <campaign>")
async def resume(ctx: StaffContext, args: str) -> str:
    return await _switch(ctx, args, False)


@command("preview", OPERATORS, "/preview <campaign> <customer>")
async def preview_command(ctx: StaffContext, args: str) -> str:
    parts = args.split()
    if len(parts) != 2:
        return "用法 Usage: /preview <campaign> <customer>"
    loaded = ctx.service.campaigns.get(parts[0])
    if loaded is None:
        return f"没有这个活动 No campaign {parts[0]!r}"
    wanted = parse_ref(parts[1], ctx.service.config.channels)
    customer = await customer_of(ctx.session, wanted)
    values = {name: pool.value for name, pool in ctx.service.config.coupons.items()}
    texts = await preview(ctx.session, loaded.definition, customer, wanted.channel or "console", values)
    return "\n---\n".join(f"[{i + 1}] {t}" for i, t in enumerate(texts))
