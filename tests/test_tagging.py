"""Keyword tagging: synonyms, negation, mixed Chinese/English, width and case folding, all-words,
regex, weighted interest with thresholds, tag expiry — through the tagger and through the real app."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from scrm.config import KeywordRule
from scrm.messages import InboundEvent
from scrm.store.models import CustomerTag, Tag, TagScore
from scrm.tagging import KeywordTagger, tokenize
from scrm.web import SERVICE, create_app

RULES = [
    KeywordRule(tag="奶粉", keywords=["奶粉", "配方奶", "formula", "milk powder"], negations=["不要", "不想要", "no"]),
    KeywordRule(tag="coupon-seeker", keywords=["优惠券", "coupon"]),
    KeywordRule(tag="stroller-buyer", keywords=["婴儿车", "购买"], match="all"),
    KeywordRule(tag="order-number", regex=[r"\bso\d{8}\b"]),
    KeywordRule(tag="high-intent", keywords=["下单", "买"], weights={"下单": 2, "买": 1}, threshold=3),
]


@pytest.fixture(scope="module")
def tagger() -> KeywordTagger:
    return KeywordTagger(RULES)


def tags(tagger: KeywordTagger, text: str) -> set[str]:
    return {hit.tag for hit in tagger.match(text)}


@pytest.mark.parametrize(("text", "expected"), [
    ("我想买奶粉", {"奶粉"}),
    ("有配方奶吗", {"奶粉"}),                     # synonym
    ("Do you sell FORMULA?", {"奶粉"}),           # English, case folded
    ("ｆｏｒｍｕｌａ 有优惠券吗", {"奶粉", "coupon-seeker"}),  # full-width folded, mixed
    ("looking for milk powder, any Coupon", {"奶粉", "coupon-seeker"}),  # English phrase keyword
    ("我不要奶粉", set()),                        # negation cancels
    ("不想要奶粉,只要优惠券", {"coupon-seeker"}),
    ("no formula please", set()),
    ("奶粉不要了", {"奶粉"}),                      # the negation must come before the hit
    ("婴儿车怎么样", set()),                      # all-words rule needs both
    ("我想购买婴儿车", {"stroller-buyer"}),
    ("订单号 SO20261127 到了吗", {"order-number"}),
    ("hello", set()),
])
def test_keyword_rules(tagger, text, expected):
    assert tags(tagger, text) - {"high-intent"} == expected


def test_rule_terms_segment_as_one_token(tagger):
    assert "配方奶" in tokenize("我要配方奶")
    assert "优惠券" in tokenize("有优惠券吗")


def test_latin_words_split_as_jieba_splits_them():
    """jieba-rs keeps "win-back" or a date whole; keywords were written against Python jieba's runs."""
    assert tokenize("Win-back 2026-01-05 opted_out coupon. v1.5") == [
        "win", "back", "2026", "01", "05", "opted", "out", "coupon", "v1.5"]


def test_user_dictionary_joins_words(tmp_path):
    text = "蓝莓味酸奶棒"
    assert "蓝莓味酸奶棒" not in tokenize(text)
    (tmp_path / "userdict.txt").write_text("蓝莓味酸奶棒 50000 n\n", "utf-8")
    KeywordTagger([], tmp_path / "userdict.txt")
    assert "蓝莓味酸奶棒" in tokenize(text)


def test_weights_score_each_distinct_keyword(tagger):
    [hit] = [h for h in tagger.match("我想下单买两罐") if h.tag == "high-intent"]
    assert hit.score == 3


async def test_interest_accumulates_to_threshold_and_tags_expire(aiohttp_client, make_config, clock):
    config = make_config({"tagging": {"rules": [
        {"tag": "high-intent", "keywords": ["下单", "买"], "weights": {"下单": 2, "买": 1}, "threshold": 3},
        {"tag": "price-sensitive", "keywords": ["多少钱"], "ttl_days": 30},
    ], "behaviour": [], "activity_drop": None}, "lifecycle": {"transitions": []}})
    client = await aiohttp_client(create_app(config, clock))
    service = client.app[SERVICE]

    async def customer_tags() -> dict[str, CustomerTag]:
        async with service.sessions() as s:
            rows = (await s.execute(select(Tag.name, CustomerTag).join(CustomerTag))).all()
            return {name: ct for name, ct in rows}

    async def score() -> float:
        async with service.sessions() as s:
            return await s.scalar(select(TagScore.score))

    async def say(text: str, n: int) -> None:
        await service.receive(InboundEvent("console", "local", "hana", "text", text=text, platform_msg_id=f"h{n}"))

    await say("买", 1)  # (the process-wide jieba dictionary may know 想买 from other tests' rules)
    assert "high-intent" not in await customer_tags() and await score() == 1
    await say("下单怎么弄", 2)
    held = await customer_tags()
    assert held["high-intent"].source == "keyword" and held["high-intent"].score == 3

    await say("这个多少钱", 3)
    price = (await customer_tags())["price-sensitive"]
    assert price.expires_at == clock.now() + timedelta(days=30)
    clock.advance(timedelta(days=20))
    await say("那个多少钱", 4)  # a new hit pushes the expiry out
    assert (await customer_tags())["price-sensitive"].expires_at == clock.now() + timedelta(days=30)
    clock.advance(timedelta(days=31))
    result = await service.refresh_all()
    assert result.tags_expired == 1
    assert "price-sensitive" not in await customer_tags()
    assert "high-intent" in await customer_tags()  # no ttl: kept


async def test_a_tag_created_by_two_transactions_at_once_gets_one_id(make_config, clock):
    """Ingest, an import and a staff command may create the same new tag at the same moment: the
    later transaction waits for the earlier one and reads its tag instead of failing on the name."""
    import asyncio

    from scrm.service import Service
    from scrm.tagging import tag_ids

    service = Service(make_config(), clock)
    await service.start(scheduler=False)
    try:
        async with service.sessions() as first:
            await first.begin()
            mine = await tag_ids(first, {"新标签", "vip"})
            second = asyncio.ensure_future(_tag_ids_in_own_transaction(service, {"新标签", "其他"}))
            await asyncio.sleep(0.3)  # the second is now waiting for the first's uncommitted tag
            await first.commit()
        theirs = await asyncio.wait_for(second, 30)
        assert theirs["新标签"] == mine["新标签"]
        async with service.sessions() as s:
            names = (await s.scalars(select(Tag.name).where(Tag.name.in_(["新标签", "vip", "其他"])))).all()
        assert sorted(names) == sorted(["新标签", "vip", "其他"])
    finally:
        await service.stop()


async def _tag_ids_in_own_transaction(service, names: set[str]) -> dict[str, int]:
    from scrm.tagging import tag_ids

    async with service.sessions() as session, session.begin():
        return await tag_ids(session, names)
