"""Keyword tagging with jieba: one pass over a message's tokens against an index of all keywords.

Segmentation is jieba's dictionary and algorithm through rjieba (the jieba-rs binding): the same
words as the Python jieba, about 20 times faster per message, which matters on the ingest path.
Every multi-character keyword (and negation word) joins the dictionary when the tagger is built,
so rule terms segment as one token; matching is then a dict lookup per token, whatever the number of
rules. Hits carry a score; a tag is applied when its accumulated score reaches the rule's threshold.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import rjieba
from sqlalchemy import Engine, bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.config import KeywordRule
from scrm.store.models import CustomerTag, Tag, TagScore

_segmenter_lock = threading.Lock()
_segmenter: rjieba.Jieba | None = None
#: How many tokens before a hit are searched for the rule's negation words.
NEGATION_WINDOW = 2
_PUNCT = re.compile(r"^[\W_]+$")
#: jieba-rs keeps ``win-back``, ``2026-01-05`` or ``opted_out`` whole; Python jieba splits them into
#: letter/digit runs and single marks, and keywords were written against that.
_JOINED = re.compile(r"[A-Za-z0-9]+[-._%#&+]|[-._%#&+][A-Za-z0-9]")
_RUNS = re.compile(r"[A-Za-z0-9]*\d\.\d+|[A-Za-z0-9]+|.")


def normalize(text: str) -> str:
    """Full-width to half-width (NFKC) and case folded, so ＣＯＵＰＯＮ matches coupon."""
    return unicodedata.normalize("NFKC", text).casefold()


@dataclass(frozen=True)
class TagHit:
    tag: str
    keyword: str
    score: float
    rule: KeywordRule


def segmenter() -> rjieba.Jieba:
    """The process-wide dictionary (loading one takes ~0.1 s, so taggers share it, as jieba's did)."""
    global _segmenter
    with _segmenter_lock:
        if _segmenter is None:
            _segmenter = rjieba.Jieba()
        return _segmenter


def _cut(text: str) -> list[str]:
    tokens = segmenter().cut(text)
    if not any(_JOINED.search(t) for t in tokens):
        return tokens
    return [part for t in tokens for part in (_RUNS.findall(t) if _JOINED.search(t) else (t,))]


def tokenize(text: str) -> list[str]:
    return [t for t in _cut(normalize(text)) if t.strip() and not _PUNCT.match(t)]


def load_dictionary(path: Path) -> None:
    """A jieba user dictionary: one ``word [freq [tag]]`` per line."""
    for line in path.read_text("utf-8").splitlines():
        parts = line.split()
        if parts:
            freq = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
            segmenter().add_word(parts[0], freq, parts[2] if len(parts) > 2 else None)


class KeywordTagger:
    def __init__(self, rules: Sequence[KeywordRule], dictionary: Path | None = None) -> None:
        self.rules = list(rules)
        #: first token -> (token sequence, rule index, keyword as written)
        self._index: dict[str, list[tuple[tuple[str, ...], int, str]]] = defaultdict(list)
        self._negations: list[frozenset[str]] = []
        self._regex: list[tuple[re.Pattern[str], int]] = []
        if dictionary is not None:
            load_dictionary(dictionary)
        for rule in self.rules:
            for word in [*rule.keywords, *rule.negations]:
                word = normalize(word)
                if len(word) > 1 and " " not in word:
                    segmenter().add_word(word, 100_000, None)
        for i, rule in enumerate(self.rules):
            self._negations.append(frozenset(normalize(w) for w in rule.negations))
            for keyword in rule.keywords:
                tokens = tuple(tokenize(keyword))
                if tokens:
                    self._index[tokens[0]].append((tokens, i, keyword))
            self._regex += [(re.compile(normalize(p)), i) for p in rule.regex]

    def match(self, text: str) -> list[TagHit]:
        tokens = tokenize(text)
        found: dict[int, dict[str, float]] = defaultdict(dict)
        for pos, token in enumerate(tokens):
            for sequence, i, keyword in self._index.get(token, ()):
                if tuple(tokens[pos:pos + len(sequence)]) != sequence:
                    continue
                if self._negations[i] & set(tokens[max(0, pos - NEGATION_WINDOW):pos]):
                    continue
                found[i][keyword] = self.rules[i].weights.get(keyword, 1.0)
        if self._regex:
            folded = normalize(text)
            for pattern, i in self._regex:
                if m := pattern.search(folded):
                    found[i].setdefault(m.group(0), 1.0)
        hits = []
        for i, keywords in found.items():
            rule = self.rules[i]
            if rule.match == "all" and not set(rule.keywords) <= set(keywords):
                continue
            hits.append(TagHit(rule.tag, next(iter(keywords)), sum(keywords.values()), rule))
        return hits


#: Committed tag ids by store: tags are never deleted or renamed, so an id once read stays true.
_known_tags: WeakKeyDictionary[Engine, dict[str, int]] = WeakKeyDictionary()


async def tag_ids(session: AsyncSession, names: set[str]) -> dict[str, int]:
    """Tag ids by name, creating the missing tags."""
    known = _known_tags.setdefault(session.get_bind(), {})
    created_here: set[str] = session.info.setdefault("scrm_created_tags", set())
    found = {name: known[name] for name in names if name in known}
    if len(found) < len(names):
        rows = await session.execute(select(Tag.name, Tag.id).where(Tag.name.in_(names - found.keys())))
        read = {name: tid for name, tid in rows}
        known |= {name: tid for name, tid in read.items() if name not in created_here}  # those may roll back
        found |= read
    missing = sorted(names - found.keys())
    if missing:
        created = await session.scalars(insert(Tag).returning(Tag.id, sort_by_parameter_order=True),
                                        [{"name": name} for name in missing])
        found |= dict(zip(missing, created.all()))
        created_here.update(missing)
    return found


async def tag_id(session: AsyncSession, name: str) -> int:
    return (await tag_ids(session, {name}))[name]


async def add_tag(
    session: AsyncSession, customer_id: int, name: str, source: str, detail: str | None, now: datetime,
    score: float = 1.0, expires_at: datetime | None = None,
) -> bool:
    """Give a customer a tag (refreshing its score and expiry if held); True when it is new."""
    tid = await tag_id(session, name)
    held = await session.scalar(
        select(CustomerTag).where(CustomerTag.customer_id == customer_id, CustomerTag.tag_id == tid)
    )
    if held is not None:
        held.score, held.expires_at = max(held.score, score), expires_at
        return False
    session.add(CustomerTag(customer_id=customer_id, tag_id=tid, source=source, source_detail=detail, score=score,
                            added_at=now, expires_at=expires_at))
    await session.flush()
    return True


async def remove_tag(session: AsyncSession, customer_id: int, name: str) -> bool:
    tid = await session.scalar(select(Tag.id).where(Tag.name == name))
    if tid is None:
        return False
    result = await session.execute(
        delete(CustomerTag).where(CustomerTag.customer_id == customer_id, CustomerTag.tag_id == tid)
    )
    return bool(result.rowcount)


async def apply_hits(session: AsyncSession, hits: Sequence[tuple[int, TagHit]], now: datetime) -> list[tuple[int, TagHit]]:
    """Add keyword hits (customer id, hit), in order, to the customers' interest in their tags and
    apply the tags that reach their thresholds, with a few statements for the whole batch; returns
    the hits that applied a tag the customer did not hold."""
    if not hits:
        return []
    ids = await tag_ids(session, {hit.rule.tag for _, hit in hits})
    customers = {customer_id for customer_id, _ in hits}
    held: dict[tuple[int, int], dict[str, Any]] = {
        (row.customer_id, row.tag_id): {"id": row.id, "score": row.score, "expires_at": row.expires_at}
        for row in await session.execute(select(CustomerTag.id, CustomerTag.customer_id, CustomerTag.tag_id,
                                                CustomerTag.score, CustomerTag.expires_at).where(
            CustomerTag.customer_id.in_(customers), CustomerTag.tag_id.in_(ids.values())))
    }
    scores: dict[tuple[int, int], dict[str, Any]] = {}
    if any(_accumulates(hit) for _, hit in hits):
        scores = {(row.customer_id, row.tag_id): {"id": row.id, "score": row.score}
                  for row in await session.execute(select(TagScore.id, TagScore.customer_id, TagScore.tag_id,
                                                          TagScore.score).where(
                      TagScore.customer_id.in_(customers), TagScore.tag_id.in_(ids.values())))}
    applied: list[tuple[int, TagHit]] = []
    for customer_id, hit in hits:
        rule, key = hit.rule, (customer_id, ids[hit.rule.tag])
        score = hit.score
        if _accumulates(hit):
            row = scores.setdefault(key, {"id": None, "score": 0.0})
            row["score"] = score = row["score"] + hit.score
            if score < rule.threshold:
                continue
        expires = now + timedelta(days=rule.ttl_days) if rule.ttl_days else None
        if key in held:
            row = held[key]
            if (max(row["score"], score), expires) != (row["score"], row["expires_at"]):
                row |= {"score": max(row["score"], score), "expires_at": expires, "dirty": True}
            continue
        held[key] = {"id": None, "score": score, "expires_at": expires, "detail": hit.keyword}
        applied.append((customer_id, hit))
    await _write(session, TagScore, {k: v for k, v in scores.items()},
                 lambda k, v: {"customer_id": k[0], "tag_id": k[1], "score": v["score"], "updated_at": now},
                 lambda v: {"score": v["score"], "updated_at": now})
    await _write(session, CustomerTag, {k: v for k, v in held.items() if v["id"] is None or v.get("dirty")},
                 lambda k, v: {"customer_id": k[0], "tag_id": k[1], "source": "keyword", "source_detail": v["detail"],
                               "score": v["score"], "added_at": now, "expires_at": v["expires_at"]},
                 lambda v: {"score": v["score"], "expires_at": v["expires_at"]})
    return applied


def _accumulates(hit: TagHit) -> bool:
    """Rules with a threshold above one hit's score, or with weights, keep a running score."""
    return hit.rule.threshold > hit.score or bool(hit.rule.weights)


async def _write(session: AsyncSession, model: type[CustomerTag] | type[TagScore],
                 rows: dict[tuple[int, int], dict[str, Any]],
                 new: Callable[[tuple[int, int], dict[str, Any]], dict[str, Any]],
                 changed: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Insert the rows without an id and update the others, one executemany each."""
    inserts = [new(k, v) for k, v in rows.items() if v["id"] is None]
    updates = [{"row_id": v["id"], **{f"new_{c}": x for c, x in changed(v).items()}}
               for v in rows.values() if v["id"] is not None]
    table = model.__table__
    if inserts:
        await session.execute(insert(table), inserts)
    if updates:
        columns = [c.removeprefix("new_") for c in updates[0] if c != "row_id"]
        await session.execute(update(table).where(table.c.id == bindparam("row_id"))
                              .values({c: bindparam(f"new_{c}") for c in columns}), updates)
