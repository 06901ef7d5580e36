"""Staff chat commands (``/report``, ``/tag`` ...): a registry, role checks and dispatch.

Each command lives in a module of this package and registers itself with :func:`command`; the
pipeline only calls :func:`dispatch`. A command from someone without the role gets a polite refusal
and reveals nothing.

Commands registered with ``reads_only`` (the reports) may read for seconds over a large store, so
they are answered before their event's ingest transaction, beside the writer
(:func:`answer_beside_writer`), and the transaction only records the answer: inside it they would
hold SQLite's writer, and every webhook behind it, for as long as they read.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from scrm import metrics
from scrm.config import Role
from scrm.customers import CustomerRefError, find_by_ref, staff_actor
from scrm.messages import Chart, InboundEvent
from scrm.store.engine import reading
from scrm.store.models import Customer

if TYPE_CHECKING:
    from scrm.runtime import Runtime

log = logging.getLogger(__name__)

REFUSAL_REPLY = "抱歉,这个命令仅限员工使用。Sorry, this command is for staff only."
REPORT_FAILED_REPLY = "抱歉,报表暂时无法生成,请稍后再试。Sorry, the report could not be made; please try again later."
_COMMAND = re.compile(r"^\s*/([a-z_]+)(?:@\S+)?(?:\s+(.*))?$", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class StaffContext:
    service: Runtime
    session: AsyncSession
    event: InboundEvent
    #: ``staff:<channel>:<id>``, recorded on what the command changes.
    actor: str
    role: Role
    now: datetime


@dataclass(frozen=True)
class StaffReply:
    """A command's answer: text, plus charts for channels that can show images."""

    text: str
    images: tuple[Chart, ...] = ()
    #: Deliveries the command queued (a staff reply): the outbox is woken once they are committed.
    planned: int = 0


async def customer_arg(ctx: StaffContext, text: str) -> Customer:
    """The customer a command's argument names, read like the CLI and the API read it; a reference
    that names no one raises CustomerRefError, which :func:`dispatch` answers with its message."""
    return await find_by_ref(ctx.session, text, ctx.service.config.channels)


Handler = Callable[[StaffContext, str], Awaitable[str | StaffReply]]


@dataclass(frozen=True)
class StaffCommand:
    name: str
    roles: frozenset[Role]
    usage: str
    handler: Handler
    reads_only: bool


_COMMANDS: dict[str, StaffCommand] = {}


def command(name: str, roles: set[Role], usage: str, *, reads_only: bool = False) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = StaffCommand(name, frozenset(roles), usage, handler, reads_only)
        return handler

    return register


def parse(text: str) -> tuple[str, str] | None:
    """``/report 30d`` -> ("report", "30d") for registered commands; None for anything else."""
    match = _COMMAND.match(text)
    if not match or match.group(1).lower() not in _COMMANDS:
        return None
    return match.group(1).lower(), (match.group(2) or "").strip()


def help_text(role: Role) -> str:
    usable = [c.usage for c in _COMMANDS.values() if role in c.roles]
    return "员工命令 Staff commands:\n" + "\n".join(usable)


def role_of(service: Runtime, event: InboundEvent) -> Role | None:
    """The sender's staff role, or None for a customer."""
    return service.config.staff.get(f"{event.channel}:{event.external_id}")


def reads_only(text: str, role: Role) -> bool:
    """True for a command this role may run that only reads (the reports)."""
    parsed = parse(text)
    return parsed is not None and role in (spec := _COMMANDS[parsed[0]]).roles and spec.reads_only


async def answer_beside_writer(service: Runtime, event: InboundEvent, role: Role) -> StaffReply:
    """A :func:`reads_only` command's answer, read in a transaction that cannot write and holds no
    write lock (:func:`scrm.store.engine.reading`). A report that fails is logged and answered with
    an apology; the staff member's message is still recorded (and not retried by the platform)."""
    try:
        async with reading(service.sessions) as session:
            actor = staff_actor(event.channel, event.external_id)
            return await dispatch(StaffContext(service, session, event, actor, role, service.clock.now()))
    except Exception:  # whatever broke, the manager gets an answer and the event is kept
        log.exception("staff command %r from %s:%s failed", event.text[:40], event.channel, event.external_id)
        metrics.store_error("report")
        return StaffReply(REPORT_FAILED_REPLY)


async def dispatch(ctx: StaffContext) -> StaffReply:
    parsed = parse(ctx.event.text)
    if parsed is None:
        from scrm.staff.conversations import answer_alert

        return await answer_alert(ctx) or StaffReply(help_text(ctx.role))
    spec = _COMMANDS[parsed[0]]
    if ctx.role not in spec.roles:
        return StaffReply(REFUSAL_REPLY)
    try:
        answer = await spec.handler(ctx, parsed[1])
    except CustomerRefError as exc:
        return StaffReply(f"没有找到客户 {exc}")
    return answer if isinstance(answer, StaffReply) else StaffReply(answer)


for _module in ("campaigns", "console", "conversations", "loyalty", "reports", "tags"):
    importlib.import_module(f"scrm.staff.{_module}")
