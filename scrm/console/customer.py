"""One customer: the 360° view (:func:`scrm.profile.customer_view`, the loyalty section of
:mod:`scrm.loyalty.view`) and their message thread, a page at a time by touchpoint id, newest first.

Operators and admins change tags (:func:`scrm.tagging.change_tags`, as ``/tag`` and ``scrm customers
tag`` do), merge a duplicate into the customer (:func:`scrm.identity.merge_customers`, after a page
that shows both) and write and close follow-up tasks (:mod:`scrm.loyalty.followups`). Admins export
everything stored about the person (:func:`scrm.personal.export_data`, decrypted, as ``scrm
customers export``) and erase it (:func:`scrm.personal.erase`, as ``scrm customers erase``), each
after a confirmation page. Managers read: no form here is theirs, and the routes refuse them.

Every page and thread page read is an audit entry (``view``, via ``console``) committed before the
page is sent; exports, erasures and merges are audited as the CLI audits them. Phone numbers show as
their last four digits and birthdays as month-day, to every role, as on staff screens; the decrypted
values leave only in an admin's export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import aiohttp_jinja2
from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.audit import audit
from scrm.console.app import Pages, error_page, service, staff
from scrm.console.customers import cursor
from scrm.customer_search import search
from scrm.customers import MAX_ID
from scrm.identity import merge_customers
from scrm.loyalty import followups
from scrm.messages import MESSAGE_KINDS
from scrm.personal import erase, export_data, masked_phone
from scrm.profile import customer_view, touchpoint_page
from scrm.service import Service
from scrm.store.engine import reading, writing
from scrm.store.models import Customer, FollowupTask, StaffAccount, Touchpoint
from scrm.tagging import TAG_NAME, change_tags

pages = Pages()
CUSTOMER = "/customers/{id:[0-9]{1,10}}"
#: Notices shown after a change, by the code its redirect carries (the words are fixed here).
NOTICES = {
    "tag_added": "Tag added. 已添加标签。",
    "tag_removed": "Tag removed. 已移除标签。",
    "tag_unchanged": "No change: the customer already had (or did not have) that tag. 没有变化。",
    "merged": "Merged. 已合并。",
    "task_created": "Follow-up task created. 已创建跟进任务。",
    "task_done": "Task closed. 任务已完成。",
    "erased": "Personal data erased. 个人数据已删除。",
}


def _id(request: web.Request) -> int:
    return int(request.match_info["id"])


def _back(customer_id: int, done: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"/console/customers/{customer_id}?{urlencode({'done': done})}")


async def _customer(session: AsyncSession, customer_id: int) -> Customer | None:
    return await session.get(Customer, customer_id) if customer_id <= MAX_ID else None


async def _missing(request: web.Request, customer_id: int) -> web.Response:
    return await error_page(request, 404, f"no customer #{customer_id}")


@dataclass(frozen=True)
class Entry:
    """One touchpoint of the thread, as the page shows it."""

    id: int
    at: str
    direction: str
    kind: str
    channel: str
    text: str | None
    detail: str
    message: bool


def touchpoint_detail(tp: Touchpoint) -> str:
    """What an internal or non-text touchpoint says, in a line (its payload's values, the campaign)."""
    parts = [f"{k}={json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v}"
             for k, v in sorted((tp.payload or {}).items()) if v not in (None, "", [], {})]
    if tp.campaign:
        parts.insert(0, f"campaign={tp.campaign}")
    line = " ".join(parts)
    return line if len(line) <= 200 else line[:199] + "…"


async def thread_page(session: AsyncSession, customer_id: int, size: int, before: int | None,
                      zone: str) -> tuple[list[Entry], int | None]:
    """The customer's touchpoints below id ``before``, newest first (:func:`scrm.profile.touchpoint_page`),
    and the cursor of the next page (None on the last)."""
    rows, next_before = await touchpoint_page(session, customer_id, size, before)
    tz = ZoneInfo(zone)
    entries = [Entry(t.id, t.created_at.replace(tzinfo=UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S"),
                     t.direction, t.kind, t.channel, t.text, touchpoint_detail(t), t.kind in MESSAGE_KINDS or t.text is not None)
               for t in rows]
    return entries, next_before


def _local(zone: str) -> Any:
    tz = ZoneInfo(zone)

    def local(iso: str | None) -> str:
        if not iso:
            return ""
        return datetime.fromisoformat(iso).replace(tzinfo=UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M")

    return local


async def _viewed(svc: Service, request: web.Request, detail: str, *customer_ids: int) -> None:
    """The audit entries for a read, committed before the page is sent (no entry, no page)."""
    who = staff(request)
    async with writing(svc.sessions) as session:
        for customer_id in customer_ids:
            await audit(session, who.actor, who.role, customer_id, "view", detail, via="console",
                        at=svc.clock.now())


@pages.get(CUSTOMER, "manager")
async def customer_page(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    customer_id, before = _id(request), cursor(request, "before")
    zone = svc.config.service.timezone
    async with reading(svc.sessions) as session:
        customer = await _customer(session, customer_id)
        if customer is None:
            return await _missing(request, customer_id)
        view = await customer_view(session, customer, touchpoints=0)
        thread, older = await thread_page(session, customer_id, svc.config.console.page_size, before, zone)
    await _viewed(svc, request, "console customer page", customer_id)
    done = request.query.get("done", "")
    return aiohttp_jinja2.render_template("customer.html", request, {
        "c": view, "phone": masked_phone(customer), "birthday_md": customer.birthday_md,
        "attributes": customer.attributes or {}, "thread": thread, "older": older, "paged": before is not None,
        "loyalty_on": svc.config.loyalty is not None, "notice": NOTICES.get(done), "timezone": zone,
        "local": _local(zone), "customer_id": customer_id})


@pages.get(CUSTOMER + "/thread", "manager")
async def thread_more(request: web.Request) -> web.StreamResponse:
    """The next page of the thread, for the page's "older" button (htmx swaps it in)."""
    svc = service(request)
    customer_id = _id(request)
    async with reading(svc.sessions) as session:
        if await _customer(session, customer_id) is None:
            return await _missing(request, customer_id)
        thread, older = await thread_page(session, customer_id, svc.config.console.page_size, cursor(request, "before"),
                                          svc.config.service.timezone)
    await _viewed(svc, request, "console message thread", customer_id)
    return aiohttp_jinja2.render_template("customer_thread.html", request, {
        "thread": thread, "older": older, "customer_id": customer_id})


@pages.post(CUSTOMER + "/tags", "operator")
async def tags(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    customer_id = _id(request)
    form = await request.post()
    tag, op = str(form.get("tag", "")).strip(), str(form.get("op", ""))
    if op not in ("add", "remove") or not TAG_NAME.match(tag):
        return await error_page(request, 400, "A tag is 1 to 64 characters without spaces. 标签为 1-64 个非空白字符。")
    async with writing(svc.sessions) as session:
        customer = await _customer(session, customer_id)
        if customer is None:
            return await _missing(request, customer_id)
        done = await change_tags(svc, session, customer, [(op == "add", tag)], staff(request).actor, svc.clock.now())
    if done and op == "add":
        svc.wake_outbox()  # a tag_added campaign may have been planned
    raise _back(customer_id, ("tag_added" if op == "add" else "tag_removed") if done else "tag_unchanged")


@pages.get(CUSTOMER + "/merge", "operator")
async def merge_confirm(request: web.Request) -> web.StreamResponse:
    """Both customers side by side before the merge: who stays, who is folded in."""
    svc = service(request)
    customer_id = _id(request)
    ref = request.query.get("other", "").strip()
    problem, other = None, None
    async with reading(svc.sessions) as session:
        keep = await _customer(session, customer_id)
        if keep is None:
            return await _missing(request, customer_id)
        found = await search(session, svc, ref, svc.clock.now())  # read as the Customers box reads it
        if found.kind not in ("id", "identity", "phone"):
            problem = "Enter the other customer: #id, channel:id or a phone number."
        elif not found.ok:
            problem = found.error or found.nobody
        else:
            dup = (await session.scalars(select(Customer).where(found.where))).one()
            if dup.id == customer_id:
                problem = "Both name the same customer."
            else:
                other = await customer_view(session, dup, touchpoints=0)
        keeping = await customer_view(session, keep, touchpoints=0)
    await _viewed(svc, request, "console merge preview", customer_id, *([other["id"]] if other else []))
    return aiohttp_jinja2.render_template("customer_merge.html", request, {
        "keep": keeping, "other": other, "ref": ref, "problem": problem}, status=400 if problem else 200)


@pages.post(CUSTOMER + "/merge", "operator")
async def merge(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    customer_id = _id(request)
    other_text = str((await request.post()).get("other_id", ""))
    if not (other_text.isascii() and other_text.isdigit() and len(other_text) <= 10):
        return await error_page(request, 400, "Choose the customer to merge in from the merge page.")
    who = staff(request)
    now = svc.clock.now()
    async with writing(svc.sessions) as session:
        keep, dup = await _customer(session, customer_id), await _customer(session, int(other_text))
        if keep is None or dup is None:
            return await _missing(request, customer_id if keep is None else int(other_text))
        if keep.id == dup.id:
            return await error_page(request, 400, "Both name the same customer.")
        await merge_customers(session, keep, dup, who.actor, now)
        await audit(session, who.actor, who.role, keep.id, "merge", f"#{dup.id} merged into #{keep.id}",
                    via="console", at=now)
    svc.touch({keep.id})  # stages and behaviour tags are refreshed for the merged history
    raise _back(customer_id, "merged")


async def _author(session: AsyncSession, request: web.Request) -> str | None:
    """The staff identity (``<channel>:<id>``) of the signed-in account, if it has one."""
    return await session.scalar(select(StaffAccount.identity).where(StaffAccount.id == staff(request).account_id))


@pages.post(CUSTOMER + "/tasks", "operator")
async def create_task(request: web.Request) -> web.StreamResponse:
    """A follow-up task, due when ``/followup`` reads it (``3d``, ``明天``, ``2026-12-01 15:00``)."""
    svc = service(request)
    customer_id = _id(request)
    if svc.config.loyalty is None:
        return await error_page(request, 400, "Follow-ups are not configured ([loyalty] in the config).")
    form = await request.post()
    when, note = str(form.get("when", "")).strip(), str(form.get("note", "")).strip()[:500]
    now = svc.clock.now()
    async with writing(svc.sessions) as session:
        if await _customer(session, customer_id) is None:
            return await _missing(request, customer_id)
        author = await _author(session, request)
        zone = followups.staff_zone(svc, author) if author else svc.config.service.timezone
        due = followups.parse_when(when, now, zone)
        if due is None:
            return await error_page(request, 400, f"Cannot read when: {when[:40]!r} (2h, 3d, 明天, 2026-12-01 15:00)")
        await followups.create_task(svc, session, customer_id, "manual", note or "跟进", due, now,
                                    created_by=staff(request).actor, author=author)
    raise _back(customer_id, "task_created")


@pages.post(CUSTOMER + "/tasks/{task:[0-9]{1,10}}/done", "operator")
async def close_task(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    customer_id, task_id = _id(request), int(request.match_info["task"])
    async with writing(svc.sessions) as session:
        owner = await session.scalar(select(FollowupTask.customer_id).where(FollowupTask.id == task_id)) \
            if task_id <= MAX_ID else None
        if owner != customer_id:
            return await error_page(request, 404, f"no task {task_id} for customer #{customer_id}")
        await followups.complete(session, task_id, staff(request).actor, svc.clock.now())
    raise _back(customer_id, "task_done")


@pages.get(CUSTOMER + "/export", "admin")
async def export_confirm(request: web.Request) -> web.StreamResponse:
    return await _confirm(request, "export")


@pages.get(CUSTOMER + "/erase", "admin")
async def erase_confirm(request: web.Request) -> web.StreamResponse:
    return await _confirm(request, "erase")


async def _confirm(request: web.Request, action: str) -> web.StreamResponse:
    svc = service(request)
    customer_id = _id(request)
    async with reading(svc.sessions) as session:
        customer = await _customer(session, customer_id)
    if customer is None:
        return await _missing(request, customer_id)
    return aiohttp_jinja2.render_template("customer_confirm.html", request, {
        "action": action, "id": customer_id, "name": customer.display_name,
        "erased": "erased_at" in (customer.attributes or {})})


@pages.post(CUSTOMER + "/export", "admin")
async def export(request: web.Request) -> web.StreamResponse:
    """Everything stored about the person, decrypted, as the JSON ``scrm customers export`` writes; audited."""
    svc = service(request)
    customer_id = _id(request)
    who = staff(request)
    now = svc.clock.now()
    name = f"customer-{customer_id}.json"
    async with writing(svc.sessions) as session:
        customer = await _customer(session, customer_id)
        if customer is None:
            return await _missing(request, customer_id)
        data = await export_data(session, customer, svc.keyring)
        await audit(session, who.actor, who.role, customer_id, "export", f"console download {name}",
                    via="console", at=now)
    body = json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n"
    return web.Response(text=body, content_type="application/json", headers={
        "Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})


@pages.post(CUSTOMER + "/erase", "admin")
async def erase_customer(request: web.Request) -> web.StreamResponse:
    """Erase the person's personal data, as ``scrm customers erase`` does; audited with its counts."""
    svc = service(request)
    customer_id = _id(request)
    who = staff(request)
    now = svc.clock.now()
    async with writing(svc.sessions) as session:
        customer = await _customer(session, customer_id)
        if customer is None:
            return await _missing(request, customer_id)
        counts = await erase(session, customer, now)
        await audit(session, who.actor, who.role, customer_id, "erase",
                    ", ".join(f"{k}={v}" for k, v in counts.items()), via="console", at=now)
    raise _back(customer_id, "erased")
