"""Keyword tagging with jieba: one pass over a message's tokens against an index of all keywords."""

from __future__ import annotations

import logging
import threading
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import jieba
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.config import KeywordRule
from scrm.store.models import CustomerTag, Tag

_jieba_lock = threading.Lock()
jieba.setLogLevel(logging.WARNING)


def normalize(text: str) -> str:
    """Full-width to half-width (NFKC) and case folded, so ＣＯＵＰＯＮ matches coupon."""
    return unicodedata.normalize("NFKC", text).casefold()


@dataclass(frozen=True)
class TagHit:
    tag: str
    keyword: str


class KeywordTagger:
    """Matches messages against keyword rules; the dictionary is loaded when this is built."""

    def __init__(self, rules: Iterable[KeywordRule]) -> None:
        self._index: dict[str, list[str]] = defaultdict(list)
        with _jieba_lock:
            jieba.initialize()
            for rule in rules:
                for keyword in rule.keywords:
                    word = normalize(keyword)
                    if rule.tag not in self._index[word]:
                        self._index[word].append(rule.tag)
                    if len(word) > 1:
                        jieba.add_word(word, freq=100_000)

    def tokens(self, text: str) -> list[str]:
        return [t for t in jieba.lcut(normalize(text)) if t.strip()]

    def match(self, text: str) -> list[TagHit]:
        hits: dict[str, TagHit] = {}
        for token in self.tokens(text):
            for tag in self._index.get(token, ()):
                hits.setdefault(tag, TagHit(tag, token))
        return list(hits.values())


async def tag_id(session: AsyncSession, name: str) -> int:
    found = await session.scalar(select(Tag.id).where(Tag.name == name))
    if found is not None:
        return found
    tag = Tag(name=name)
    session.add(tag)
    await session.flush()
    return tag.id


async def add_tag(
    session: AsyncSession, customer_id: int, name: str, source: str, detail: str | None, now: datetime
) -> bool:
    """Give a customer a tag; False when they already had it."""
    tid = await tag_id(session, name)
    exists = await session.scalar(
        select(CustomerTag.id).where(CustomerTag.customer_id == customer_id, CustomerTag.tag_id == tid)
    )
    if exists is not None:
        return False
    session.add(CustomerTag(customer_id=customer_id, tag_id=tid, source=source, source_detail=detail, added_at=now))
    await session.flush()
    return True
