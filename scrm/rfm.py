"""RFM scores: recency, frequency and monetary quintiles (1-5, 5 best) over customers who converted.

Computed in one statement with the cume_dist window function (SQLite >= 3.25 and PostgreSQL alike);
customers without conversions have no scores, so ``rfm.r >= 4`` never matches them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.dialect import rowcount
from scrm.store.models import Conversion, Customer


async def recompute(session: AsyncSession) -> int:
    """Rescore every customer with conversions; returns how many were scored."""
    per_customer = (
        select(Conversion.customer_id.label("cid"), func.max(Conversion.created_at).label("last"),
               func.count(Conversion.id).label("freq"), func.sum(Conversion.amount).label("money"))
        .group_by(Conversion.customer_id)
        .subquery()
    )
    def quintile(column: Any) -> Any:
        # cume_dist gives tied values the same rank, so equal spenders get equal scores; CASE
        # instead of floor() because SQLite builds often lack math functions.
        share = func.cume_dist().over(order_by=column)
        return case(*((share <= q / 5, q) for q in range(1, 5)), else_=5)

    scored = select(
        per_customer.c.cid,
        quintile(per_customer.c.last).label("r"),
        quintile(per_customer.c.freq).label("f"),
        quintile(per_customer.c.money).label("m"),
    ).subquery()
    await session.execute(update(Customer).where(Customer.rfm_r.is_not(None)).values(rfm_r=None, rfm_f=None, rfm_m=None))
    result = await session.execute(
        update(Customer).where(Customer.id == scored.c.cid).values(rfm_r=scored.c.r, rfm_f=scored.c.f, rfm_m=scored.c.m))
    return rowcount(result) or 0
