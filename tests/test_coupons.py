"""Coupon grants on both stores: imported codes go out oldest first, one customer each, then generated
ones; the lookup for the next imported code reads only codes not yet given out."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text

from scrm import coupons
from scrm.config import CouponPool
from scrm.store.engine import make_engine, make_sessionmaker
from scrm.store.migrate import upgrade
from scrm.store.models import Coupon, CouponCode, Customer

NOW = datetime(2026, 11, 28, 9, 0)
POOL = CouponPool(prefix="W", value=10, per_customer=1)


async def test_imported_codes_go_first_then_generated_ones(store: dict[str, Any]):
    engine = make_engine(store["url"], store.get("schema_name"))
    try:
        await upgrade(engine)
        async with make_sessionmaker(engine)() as s, s.begin():
            pool = await coupons.pool_row(s, "welcome", POOL)
            s.add_all([CouponCode(coupon_id=pool.id, code=f"IMP{i}") for i in range(3)])
            s.add_all([Customer(first_seen_at=NOW, last_seen_at=NOW, attributes={}) for _ in range(5)])
            await s.flush()
            ids = list((await s.scalars(select(Customer.id).order_by(Customer.id))).all())
            granted = [await coupons.grant(s, "welcome", POOL, cid, NOW, delivery_id=100 + n)
                       for n, cid in enumerate(ids)]
            assert [g.code for g in granted[:3]] == ["IMP0", "IMP1", "IMP2"]
            assert all(g.code.startswith("W") and len(g.code) == 9 for g in granted[3:])
            assert await coupons.grant(s, "welcome", POOL, ids[0], NOW) is None  # one per customer
            given = await coupons.granted_for(s, [99, 100])
            assert given[100].code == "IMP0" and 99 not in given
            assert await s.scalar(select(func.count()).select_from(CouponCode)
                                  .where(CouponCode.customer_id.is_(None))) == 0
            if engine.dialect.name == "sqlite":
                plan = (await s.execute(text(
                    "EXPLAIN QUERY PLAN SELECT id FROM coupon_codes WHERE coupon_id = :c AND customer_id IS NULL "
                    "ORDER BY id LIMIT 1"), {"c": pool.id})).all()
                assert "ix_coupon_codes_unassigned" in " ".join(str(row[-1]) for row in plan)
            assert await s.scalar(select(func.count()).select_from(Coupon)) == 1
    finally:
        await engine.dispose()
