"""Item-to-item co-purchase recommendations from conversion line items.

A nightly batch computes, in SQL over distinct (customer, SKU) pairs, how many customers bought both
of two SKUs (``together``), support = together / customers, confidence(A->B) = together / buyers(A)
and lift = confidence / (buyers(B) / customers). Each customer's top SKUs they have not bought yet
(best lift from anything they did buy) are stored on their loyalty account, so templates (sync
Jinja) and the 360° card read a list instead of running a query at render time.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Float,
    cast,
    delete,
    distinct,
    func,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.dialect import insert_ignore, insert_select_ignore
from scrm.store.models import (
    Conversion,
    ConversionItem,
    ItemPair,
    LoyaltyAccount,
    Touchpoint,
)


async def items_from_orders(session: AsyncSession, conversions: list[Conversion]) -> int:
    """Line items of API orders (kept by scrm.orders in the order's touchpoint) into conversion_items."""
    added = 0
    for conversion in conversions:
        if not conversion.order_id:
            continue
        payload = await session.scalar(select(Touchpoint.payload).where(
            Touchpoint.customer_id == conversion.customer_id, Touchpoint.kind == "order",
            Touchpoint.platform_msg_id == conversion.order_id).limit(1))
        rows = item_rows(conversion.id, conversion.customer_id, conversion.created_at,
                         (payload or {}).get("items") or [])
        if rows:
            added += await insert_ignore(session, ConversionItem.__table__, rows)
    return added


def item_rows(conversion_id: int, customer_id: int, at: datetime, items: list[Any]) -> list[dict[str, Any]]:
    """Valid items of one order as rows (an item needs a SKU; quantity 1 and price 0 by default)."""
    rows: dict[str, dict[str, Any]] = {}
    for item in items:
        if not isinstance(item, dict) or not str(item.get("sku") or "").strip():
            continue
        sku = str(item["sku"]).strip()[:64]
        rows[sku] = {"conversion_id": conversion_id, "customer_id": customer_id, "sku": sku,
                     "name": (str(item["name"])[:255] if item.get("name") else None),
                     "quantity": float(item.get("quantity") or 1), "price": float(item.get("price") or 0),
                     "created_at": at}
    return list(rows.values())


async def compute_pairs(session: AsyncSession, now: datetime, min_customers: int = 2) -> int:
    """Rebuild item_pairs in one INSERT ... SELECT; returns the number of pairs kept."""
    await session.execute(delete(ItemPair.__table__))
    total = await session.scalar(select(func.count(distinct(ConversionItem.customer_id))))
    if not total:
        return 0
    bought = select(ConversionItem.customer_id.label("cid"), ConversionItem.sku.label("sku")).distinct().subquery()
    a, b = bought.alias("a"), bought.alias("b")
    buyers = (select(bought.c.sku.label("sku"), func.count().label("n")).group_by(bought.c.sku).subquery())
    ba, bb = buyers.alias("ba"), buyers.alias("bb")
    together = func.count().label("together")
    pairs = (select(a.c.sku.label("sku_a"), b.c.sku.label("sku_b"), together)
             .join(b, (a.c.cid == b.c.cid) & (a.c.sku != b.c.sku))
             .group_by(a.c.sku, b.c.sku).having(func.count() >= min_customers).subquery())
    n = literal(float(total), Float)
    t = cast(pairs.c.together, Float)
    query = (select(pairs.c.sku_a, pairs.c.sku_b, pairs.c.together, t / n, t / cast(ba.c.n, Float),
                    (t / cast(ba.c.n, Float)) / (cast(bb.c.n, Float) / n), literal(now))
             .join(ba, ba.c.sku == pairs.c.sku_a).join(bb, bb.c.sku == pairs.c.sku_b).where(true()))
    return await insert_select_ignore(session, ItemPair.__table__, ["sku_a", "sku_b", "together", "support",
                                                                "confidence", "lift", "computed_at"], query)


def _ranked(customer_ids: list[int] | None = None) -> Any:
    """Candidates per customer: SKUs paired with one they bought, not bought themselves, ranked by lift."""
    owned = select(ConversionItem.customer_id.label("cid"), ConversionItem.sku.label("sku")).distinct()
    if customer_ids is not None:
        owned = owned.where(ConversionItem.customer_id.in_(customer_ids))
    owned_q = owned.subquery()
    mine = select(ConversionItem.sku).where(ConversionItem.customer_id == owned_q.c.cid)
    scored = (select(owned_q.c.cid, ItemPair.sku_b.label("sku"), func.max(ItemPair.lift).label("lift"),
                     func.max(ItemPair.confidence).label("confidence"))
              .join(ItemPair, ItemPair.sku_a == owned_q.c.sku)
              .where(ItemPair.sku_b.not_in(mine))
              .group_by(owned_q.c.cid, ItemPair.sku_b).subquery())
    rank = func.row_number().over(partition_by=scored.c.cid,
                                  order_by=(scored.c.lift.desc(), scored.c.confidence.desc(), scored.c.sku))
    return select(scored.c.cid, scored.c.sku, scored.c.lift, scored.c.confidence, rank.label("rank")).subquery()


async def _names(session: AsyncSession, skus: set[str]) -> dict[str, str | None]:
    if not skus:
        return {}
    rows = (await session.execute(select(ConversionItem.sku, func.max(ConversionItem.name))
                                  .where(ConversionItem.sku.in_(sorted(skus))).group_by(ConversionItem.sku))).all()
    return dict(rows)


async def store_recommendations(session: AsyncSession, now: datetime, top: int = 3, tier: str = "") -> int:
    """Each buyer's top ``top`` new SKUs onto their account (one ranked query; rows = results)."""
    await insert_select_ignore(session, LoyaltyAccount.__table__, ["customer_id", "balance", "tier", "updated_at"],
                               select(ConversionItem.customer_id, literal(0), literal(tier), literal(now)).distinct()
                               .where(true()))  # (SQLite needs a WHERE before ON CONFLICT)
    ranked = _ranked()
    rows = (await session.execute(select(ranked.c.cid, ranked.c.sku, ranked.c.lift, ranked.c.confidence)
                                  .where(ranked.c.rank <= top).order_by(ranked.c.cid, ranked.c.rank))).all()
    names = await _names(session, {r[1] for r in rows})
    lists: dict[int, list[dict[str, Any]]] = {}
    for cid, sku, lift, confidence in rows:
        lists.setdefault(cid, []).append({"sku": sku, "name": names.get(sku), "lift": round(float(lift), 3),
                                          "confidence": round(float(confidence), 3)})
    await session.execute(update(LoyaltyAccount).where(LoyaltyAccount.recommendations.is_not(None))
                          .values(recommendations=None))
    if lists:
        await session.execute(update(LoyaltyAccount), [{"customer_id": cid, "recommendations": recs}
                                                      for cid, recs in lists.items()])
    return len(lists)


async def recommend_for(session: AsyncSession, customer_id: int, n: int = 3) -> list[dict[str, Any]]:
    """Live top-``n`` for one customer (from the last computed pairs)."""
    ranked = _ranked([customer_id])
    rows = (await session.execute(select(ranked.c.sku, ranked.c.lift, ranked.c.confidence)
                                  .where(ranked.c.rank <= n).order_by(ranked.c.rank))).all()
    names = await _names(session, {r[0] for r in rows})
    return [{"sku": sku, "name": names.get(sku), "lift": round(float(lift), 3),
             "confidence": round(float(confidence), 3)} for sku, lift, confidence in rows]


def recommend(customer: dict[str, Any], n: int = 3) -> str:
    """Template global ``{{ recommend(customer, 3) }}``: names of the customer's pre-computed
    recommendations (sync: Jinja renders synchronously, so nothing is queried here)."""
    items = customer.get("recommendations") or []
    return "、".join(str(i.get("name") or i.get("sku")) for i in items[:n])
