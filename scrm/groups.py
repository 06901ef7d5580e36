"""Customer groups (WeCom customer groups, Telegram groups) and who is in them, for group campaigns."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.dialect import insert_ignore
from scrm.store.models import ChatGroup, GroupMember, Identity


async def upsert_group(session: AsyncSession, channel: str, account: str, external_id: str, now: datetime,
                       title: str | None = None, active: bool = True) -> ChatGroup:
    """The group row, created on first sight; a later event may rename or dismiss it."""
    await insert_ignore(session, ChatGroup.__table__, {
        "channel": channel, "account": account, "external_id": external_id, "title": title, "active": active,
        "created_at": now, "updated_at": now})
    group = await session.scalar(select(ChatGroup).where(
        ChatGroup.channel == channel, ChatGroup.account == account, ChatGroup.external_id == external_id))
    assert group is not None
    if title:
        group.title = title
    group.active, group.updated_at = active, now
    return group


async def set_member(session: AsyncSession, group: ChatGroup, customer_id: int, joined: bool, now: datetime) -> None:
    row = await session.scalar(select(GroupMember).where(
        GroupMember.group_id == group.id, GroupMember.customer_id == customer_id))
    if row is None:
        session.add(GroupMember(group_id=group.id, customer_id=customer_id, joined_at=now,
                                left_at=None if joined else now))
    elif joined:
        row.joined_at, row.left_at = now, None
    else:
        row.left_at = now


async def member_ids(session: AsyncSession, channel: str, account: str, external_id: str) -> set[str]:
    """External ids of the customers currently in a group, on that channel account."""
    rows = await session.scalars(
        select(Identity.external_id)
        .join(GroupMember, GroupMember.customer_id == Identity.customer_id)
        .join(ChatGroup, ChatGroup.id == GroupMember.group_id)
        .where(ChatGroup.channel == channel, ChatGroup.account == account, ChatGroup.external_id == external_id,
               GroupMember.left_at.is_(None), Identity.channel == channel, Identity.account == account))
    return set(rows.all())
