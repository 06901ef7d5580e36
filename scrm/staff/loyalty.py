"""Staff follow-up and loyalty commands: /tasks, /done, /assign, /followup, /survey, /referrals."""

from __future__ import annotations

from datetime import timedelta

from scrm.config import Role
from scrm.loyalty import followups, referrals, surveys
from scrm.staff import StaffContext, command, customer_arg

ALL_STAFF: set[Role] = {"operator", "manager", "admin"}


def _me(ctx: StaffContext) -> str:
    return ctx.actor.removeprefix("staff:")


def _configured(ctx: StaffContext) -> bool:
    return ctx.service.config.loyalty is not None


_OFF = "积分/跟进功能未启用 Loyalty and follow-ups are not configured ([loyalty])."


@command("tasks", ALL_STAFF, "/tasks [all]   我的跟进任务 my follow-up tasks (due, overdue)", reads_only=True)
async def tasks(ctx: StaffContext, args: str) -> str:
    if not _configured(ctx):
        return _OFF
    everyone = args.strip() == "all" and ctx.role in ("manager", "admin")
    found = await followups.open_tasks(ctx.session, None if everyone else _me(ctx))
    if not found:
        return "没有待办跟进 No open follow-up tasks."
    zone = followups.staff_zone(ctx.service, _me(ctx))
    overdue = sum(1 for t, _ in found if t.due_at < ctx.now)
    return (f"跟进任务 Tasks: {len(found)}, 逾期 overdue {overdue}\n"
            + "\n".join(followups.task_lines(found[:30], ctx.now, zone)) + "\n完成:/done <id>")


@command("done", ALL_STAFF, "/done <id> [note]   完成跟进任务 close a task")
async def done(ctx: StaffContext, args: str) -> str:
    if not _configured(ctx):
        return _OFF
    parts = args.split(maxsplit=1)
    if not parts or not parts[0].lstrip("#").isdecimal():
        return "用法 Usage: /done <id>"
    task = await followups.complete(ctx.session, int(parts[0].lstrip("#")), ctx.actor, ctx.now)
    if task is None:
        return f"任务 {parts[0]} 不存在或已完成 No open task {parts[0]}."
    return f"已完成 Done: [{task.id}] #{task.customer_id} {task.kind}"


@command("assign", {"manager", "admin"}, "/assign <customer> <staff channel:id>   指定负责人 set a customer's owner")
async def assign(ctx: StaffContext, args: str) -> str:
    if not _configured(ctx):
        return _OFF
    parts = args.split()
    if len(parts) != 2 or ":" not in parts[1]:
        return "用法 Usage: /assign <customer> <channel:staff id>"
    customer = await customer_arg(ctx, parts[0])
    await followups.assign(ctx.service, ctx.session, customer.id, parts[1], ctx.now, ctx.actor)
    return f"#{customer.id} 负责人 owner: {parts[1]}"


@command("followup", ALL_STAFF, "/followup <customer> <when: 2h|3d|明天|YYYY-MM-DD [HH:MM]> <note>   新建跟进")
async def followup(ctx: StaffContext, args: str) -> str:
    if not _configured(ctx):
        return _OFF
    parts = args.split(maxsplit=2)
    if len(parts) < 2:
        return "用法 Usage: /followup <customer> <when> <note>"
    customer = await customer_arg(ctx, parts[0])
    rest = parts[1] + (" " + parts[2] if len(parts) > 2 else "")
    zone = followups.staff_zone(ctx.service, _me(ctx))
    # "2026-12-01 15:00 note": a date may carry a time as a second word.
    words = rest.split(maxsplit=2)
    due, note = None, ""
    if len(words) >= 2:
        due = followups.parse_when(f"{words[0]} {words[1]}", ctx.now, zone)
        note = words[2] if len(words) > 2 else ""
    if due is None:
        due = followups.parse_when(words[0], ctx.now, zone)
        note = rest.split(maxsplit=1)[1] if len(rest.split(maxsplit=1)) > 1 else ""
    if due is None:
        return f"看不懂时间 Cannot read when: {words[0]!r} (2h, 3d, 明天, 2026-12-01 15:00)"
    task_id = await followups.create_task(ctx.service, ctx.session, customer.id, "manual", note or "跟进", due,
                                          ctx.now, created_by=ctx.actor, author=_me(ctx))
    return f"已创建跟进 Task [{task_id}] #{customer.id} {note or '跟进'}"


@command("survey", ALL_STAFF, "/survey <customer>   发送满意度调查 ask a satisfaction survey now")
async def survey(ctx: StaffContext, args: str) -> str:
    if not _configured(ctx):
        return _OFF
    if not args.strip():
        return "用法 Usage: /survey <customer>"
    customer = await customer_arg(ctx, args.strip())
    ref = f"{_me(ctx)}@{ctx.now.isoformat(timespec='minutes')}"
    planned = await surveys.plan(ctx.service, ctx.session, customer.id, "staff", ref[:64], ctx.now, ctx.now)
    return f"#{customer.id} 满意度调查已安排 survey planned" if planned else "已安排过 Already planned."


@command("referrals", {"manager", "admin"}, "/referrals [days]   推荐有礼报表 referral report", reads_only=True)
async def referral_report(ctx: StaffContext, args: str) -> str:
    if not _configured(ctx):
        return _OFF
    days = args.strip().rstrip("d")
    since = ctx.now - timedelta(days=int(days)) if days.isdecimal() else None
    return (await referrals.report(ctx.session, since)).text()
