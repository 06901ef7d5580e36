"""Keyword tagging with jieba: one pass over a message's tokens against an index of all keywords.

Segmentation is jieba's dictionary and algorithm through rjieba (the jieba-rs binding): the same
words as the Python jieba, about 20 times faster per message, which matters on the ingest path.
Every multi-character keyword (and negation word) joins the dictionary when the tagger is built,
so rule terms segment as one token; matching is then a dict lookup per token, whatever the number of
rules. Hits carry a score; a tag is applied when its accumulated score reaches the rule's threshold.
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import rjieba
from sqlalchemy import (
    JSON,
    ColumnElement,
    Connection,
    Engine,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.config import KeywordRule
from scrm.store.dialect import dialect_of, rowcount, upsert
from scrm.store.models import Customer, CustomerTag, Tag, TagScore, Touchpoint
from scrm.webhooks import events

if TYPE_CHECKING:
    from scrm.runtime import Runtime

_segmenter_lock = threading.Lock()
_segmenter: rjieba.Jieba | None = None
#: How many tokens before a hit are searched for the rule's negation words.
NEGATION_WINDOW = 2
#: Texts whose tokens are kept, and the longest text kept (at most a few MB in all).
TOKENS_CACHED = 4096
CACHED_CHARS = 500
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
    return list(_cached_tokens(text) if len(text) <= CACHED_CHARS else _tokens(text))


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(t for t in _cut(normalize(text)) if t.strip() and not _PUNCT.match(t))


@functools.lru_cache(maxsize=TOKENS_CACHED)
def _cached_tokens(text: str) -> tuple[str, ...]:
    """A message is segmented on the webhook path (does a reply rule answer it?) and again when its event
    is applied, milliseconds later: the second finds the first's tokens here. Cleared whenever the
    dictionary gains words."""
    return _tokens(text)


def _add_word(word: str, freq: int | None, tag: str | None) -> None:
    segmenter().add_word(word, freq, tag)
    _cached_tokens.cache_clear()


def load_dictionary(path: Path) -> None:
    """A jieba user dictionary: one ``word [freq [tag]]`` per line."""
    for line in path.read_text("utf-8").splitlines():
        parts = line.split()
        if parts:
            freq = int(parts[1]) if len(parts) > 1 and parts[1].isascii() and parts[1].isdigit() else None
            _add_word(parts[0], freq, parts[2] if len(parts) > 2 else None)


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
                    _add_word(word, 100_000, None)
        for i, rule in enumerate(self.rules):
            self._negations.append(frozenset(normalize(w) for w in rule.negations))
            for keyword in rule.keywords:
                tokens = tuple(tokenize(keyword))
                if tokens:
                    self._index[tokens[0]].append((tokens, i, keyword))
            self._regex += [(re.compile(normalize(p)), i) for p in rule.regex]

    def match(self, text: str, tokens: list[str] | None = None) -> list[TagHit]:
        """The rules ``text`` hits; ``tokens``: its :func:`tokenize` when the caller has it already (one
        segmentation serves tags, reply rules and keyword campaigns)."""
        tokens = tokenize(text) if tokens is None else tokens
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
_known_tags: WeakKeyDictionary[Engine | Connection, dict[str, int]] = WeakKeyDictionary()


async def tag_ids(session: AsyncSession, names: set[str]) -> dict[str, int]:
    """Tag ids by name, creating the missing tags; a tag another transaction creates meanwhile is
    read, not a conflict (ingest, imports, the API and staff commands may all create one at once)."""
    known = _known_tags.setdefault(session.get_bind(), {})
    created_here: set[str] = session.info.setdefault("scrm_created_tags", set())
    found = {name: known[name] for name in names if name in known}
    if len(found) < len(names):
        rows = await session.execute(select(Tag.name, Tag.id).where(Tag.name.in_(names - found.keys())))
        read = {name: tid for name, tid in rows}
        known |= {name: tid for name, tid in read.items() if name not in created_here}  # those may roll back
        found |= read
    missing = names - found.keys()
    if missing:
        created = dict((await session.execute(
            dialect_of(session).insert(Tag).on_conflict_do_nothing(index_elements=[Tag.name])
            .returning(Tag.name, Tag.id),
            [{"name": name} for name in sorted(missing)])).all())
        found |= created
        created_here.update(created)
        if len(created) < len(missing):  # committed by another transaction since the read above
            rows = await session.execute(select(Tag.name, Tag.id).where(Tag.name.in_(missing - created.keys())))
            read = {name: tid for name, tid in rows}
            known |= read
            found |= read
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
    return bool(rowcount(result))


#: One operator tag change as typed: ``+vip`` or ``-old`` (a tag name is 1 to 64 characters, no spaces).
_TAG_CHANGE = re.compile(r"^([+-])(\S{1,64})$")
#: A tag name an operator may give (the tags table holds 64 characters).
TAG_NAME = re.compile(r"^\S{1,64}$")


def tag_changes(args: str) -> tuple[str, list[tuple[bool, str]]] | None:
    """``console:alice +vip -old`` -> ("console:alice", [(True, "vip"), (False, "old")])."""
    parts = args.split()
    if len(parts) < 2:
        return None
    changes = []
    for part in parts[1:]:
        match = _TAG_CHANGE.match(part)
        if not match:
            return None
        changes.append((match.group(1) == "+", match.group(2)))
    return parts[0], changes


async def change_tags(service: Runtime, session: AsyncSession, customer: Customer, changes: list[tuple[bool, str]],
                      actor: str, now: datetime) -> list[str]:
    """Operator tag edits on one customer (staff chat, CLI, API, console); returns what changed
    (``+vip``, ``-old``). Each goes through :func:`tag_where`, so one customer and a whole search
    result are tagged, recorded and planned for alike."""
    done = []
    for add, name in changes:
        if await tag_where(service, session, Customer.id == customer.id, name, add, actor, now):
            done.append(("+" if add else "-") + name)
    return done


async def tag_where(service: Runtime, session: AsyncSession, where: ColumnElement[bool], name: str, add: bool,
                    actor: str, now: datetime) -> int:
    """Add (or remove) tag ``name`` by hand for every customer matching ``where`` (a condition on
    customers, e.g. a segment's), in a few set-based statements whatever their number: the tag rows
    by INSERT ... SELECT (or one DELETE), a ``tag_added`` / ``tag_removed`` touchpoint for each customer
    that changed by INSERT ... SELECT, and the campaigns the tag triggers planned for those who gained it
    (:func:`scrm.campaigns.planner.plan_where`). A customer who held the tag keeps it, made permanent
    (an expiring keyword tag an operator confirms no longer expires). Returns customers changed."""
    from scrm.campaigns.planner import plan_where

    payload = literal({"tag": name, "by": actor}, JSON)
    columns = ["customer_id", "actor", "channel", "account", "direction", "kind", "payload", "created_at"]

    def event(kind: str) -> dict[str, Any]:  # what scrm.webhooks.events.touchpoint_data makes of the touchpoint
        return {"channel": "system", "account": "-", "touchpoint": kind, "tag": name, "by": actor, "actor": actor}

    def recorded(kind: str) -> list[Any]:
        return [CustomerTag.customer_id, literal(actor), literal("system"), literal("-"), literal("internal"),
                literal(kind), payload, literal(now)]

    if not add:
        tid = await session.scalar(select(Tag.id).where(Tag.name == name))
        if tid is None:
            return 0
        held = and_(CustomerTag.tag_id == tid, CustomerTag.customer_id.in_(select(Customer.id).where(where)))
        removed = rowcount(await session.execute(
            insert(Touchpoint).from_select(columns, select(*recorded("tag_removed")).where(held))))
        if removed:
            await events.emit_select(session, "tag.removed", CustomerTag.customer_id, held, event("tag_removed"), now)
            await session.execute(delete(CustomerTag).where(held).execution_options(synchronize_session=False))
        return removed
    tid = await tag_id(session, name)
    before = await session.scalar(select(func.max(CustomerTag.id))) or 0
    statement = dialect_of(session).insert(CustomerTag.__table__)
    ct = CustomerTag.__table__.c
    await session.execute(statement.from_select(
        ["customer_id", "tag_id", "source", "source_detail", "score", "added_at"],
        select(Customer.id, literal(tid), literal("operator"), literal(actor), literal(1.0), literal(now)).where(where),
    ).on_conflict_do_update(
        index_elements=["customer_id", "tag_id"],
        set_={"expires_at": None, "score": case((ct.score < 1.0, 1.0), else_=ct.score)},
        where=or_(ct.expires_at.is_not(None), ct.score < 1.0)))
    # The rows this statement inserted: after the id read above, stamped with this actor and moment.
    gained = and_(CustomerTag.tag_id == tid, CustomerTag.id > before, CustomerTag.added_at == now,
                  CustomerTag.source == "operator", CustomerTag.source_detail == actor)
    added = rowcount(await session.execute(
        insert(Touchpoint).from_select(columns, select(*recorded("tag_added")).where(gained))))
    if added:
        await events.emit_select(session, "tag.added", CustomerTag.customer_id, gained, event("tag_added"), now)
        await plan_where(service, session, "tag_added", Customer.id.in_(select(CustomerTag.customer_id).where(gained)),
                         now, tag=name)
    return added


async def apply_hits(session: AsyncSession, hits: Sequence[tuple[int, TagHit]], now: datetime) -> list[tuple[int, TagHit]]:
    """Add keyword hits (customer id, hit), in order, to the customers' interest in their tags and
    apply the tags that reach their thresholds: one read and two upserts for the whole batch; returns
    the hits that applied a tag the customer did not hold."""
    if not hits:
        return []
    ids = await tag_ids(session, {hit.rule.tag for _, hit in hits})
    held: dict[tuple[int, int], dict[str, Any]] = {}
    scores: dict[tuple[int, int], float] = {}
    for kind, customer_id, tid, score, expires_at in await session.execute(
            _HELD_AND_SCORES, {"customers": list({c for c, _ in hits}), "tags": list(set(ids.values()))}):
        if kind == "held":
            held[(customer_id, tid)] = {"score": score, "expires_at": expires_at}
        else:
            scores[(customer_id, tid)] = score
    changed_scores: set[tuple[int, int]] = set()
    applied: list[tuple[int, TagHit]] = []
    for customer_id, hit in hits:
        rule, key = hit.rule, (customer_id, ids[hit.rule.tag])
        score = hit.score
        if _accumulates(hit):
            score = scores[key] = scores.get(key, 0.0) + hit.score
            changed_scores.add(key)
            if score < rule.threshold:
                continue
        expires = now + timedelta(days=rule.ttl_days) if rule.ttl_days else None
        if key in held:
            row = held[key]
            if (max(row["score"], score), expires) != (row["score"], row["expires_at"]):
                row |= {"score": max(row["score"], score), "expires_at": expires, "dirty": True}
            continue
        held[key] = {"score": score, "expires_at": expires, "detail": hit.keyword, "dirty": True}
        applied.append((customer_id, hit))
    if changed_scores:
        await upsert(session, TagScore.__table__, ("customer_id", "tag_id"), ("score", "updated_at"), [
            {"customer_id": c, "tag_id": t, "score": scores[(c, t)], "updated_at": now} for c, t in changed_scores])
    # a tag already held keeps its source and added_at: the upsert changes only score and expiry
    if writes := [{"customer_id": c, "tag_id": t, "source": "keyword", "source_detail": v.get("detail"),
                   "score": v["score"], "added_at": now, "expires_at": v["expires_at"]}
                  for (c, t), v in held.items() if v.get("dirty")]:
        await upsert(session, CustomerTag.__table__, ("customer_id", "tag_id"), ("score", "expires_at"), writes)
    return applied


_CT, _TS = CustomerTag.__table__.c, TagScore.__table__.c
#: The customers' held tags and running scores for the batch's tags, in one read.
_HELD_AND_SCORES = union_all(
    select(literal("held"), _CT.customer_id, _CT.tag_id, _CT.score, _CT.expires_at).where(
        _CT.customer_id.in_(bindparam("customers", expanding=True)), _CT.tag_id.in_(bindparam("tags", expanding=True))),
    select(literal("score"), _TS.customer_id, _TS.tag_id, _TS.score, null()).where(
        _TS.customer_id.in_(bindparam("customers", expanding=True)), _TS.tag_id.in_(bindparam("tags", expanding=True))),
)


def _accumulates(hit: TagHit) -> bool:
    """Rules with a threshold above one hit's score, or with weights, keep a running score."""
    return hit.rule.threshold > hit.score or bool(hit.rule.weights)
