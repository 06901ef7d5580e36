"""Keyword auto-reply rules (关键词自动回复): the files in the replies folder, validated and compiled.

Each ``*.toml`` in the folder (``[replies] path``, default ``replies``) holds ``[[rules]]`` and at most
one file holds the ``[fallback]``. A rule matches a message by keywords (the tagging matcher: jieba
segmentation, synonyms as more keywords, negation words just before a keyword, ``match = "all"``),
``exact`` phrases (the whole message, case, width and surrounding punctuation aside), ``contains``
(a substring of the folded text) or ``regex``. Files are checked like campaign files, each problem
named by file, key and what is wrong, and compiled once at load into a :class:`ReplyBook`: matching a
message is then one pass of the tagging index over its tokens, a dict lookup and the substring scans.
A folder that is not there means no auto-replies (the feature is optional).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, model_validator

from scrm.campaigns import templates
from scrm.campaigns.definitions import (
    NAME_PATTERN,
    ArticleSpec,
    DefinitionError,
    Duration,
    Link,
    Problem,
    _Strict,
    parse_duration,
    read_toml,
)
from scrm.config import _HHMM, Config, KeywordRule, Patterns
from scrm.tagging import KeywordTagger, normalize

#: The fallback's name where rules have theirs (touchpoint payloads, cooldowns): no rule may take it.
FALLBACK = "fallback"
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: What ``exact`` ignores around a phrase: spaces and punctuation (营业时间? is 营业时间).
_EDGES = re.compile(r"^[\W_]+|[\W_]+$")


class ReplyRule(_Strict):
    """One rule: what it matches and what it answers."""

    name: str = Field(pattern=NAME_PATTERN)
    #: Higher first: a message that several rules match gets the answer of the highest (ties: file order).
    priority: int = 0
    #: Words matched after segmentation (synonyms are more keywords); ``negations`` just before one cancel it.
    keywords: list[str] = []
    negations: list[str] = []
    #: ``any``: one keyword is enough; ``all``: every keyword must be in the message.
    match: Literal["any", "all"] = "any"
    #: Phrases that are the whole message.
    exact: list[str] = []
    #: Phrases anywhere in the message, as written (no segmentation).
    contains: list[str] = []
    regex: Patterns = []
    #: Only on these channel types (default: every channel).
    channels: list[str] = []
    #: The rule answers a customer at most once in this long; within it, it holds the message silently.
    cooldown: Duration = "10m"
    #: The answer: a template (``customer``; ``coupon`` with a pool).
    text: str = Field(min_length=1)
    #: A code from this ``[coupons]`` pool for ``{{ coupon.code }}``: a new one while the customer is under
    #: the pool's per-customer limit, else the one they hold unused; none left: ``coupon_gone`` instead.
    coupon: str | None = None
    coupon_gone: str = Field("券已经领完了,感谢关注! The coupons have run out, sorry.", min_length=1)
    #: Link buttons under the answer (Telegram).
    buttons: list[Link] = []
    #: A news card instead of the text (WeChat); ``title`` and ``description`` are templates.
    article: ArticleSpec | None = None

    @model_validator(mode="after")
    def _matches_something(self) -> ReplyRule:
        if not (self.keywords or self.exact or self.contains or self.regex):
            raise ValueError("give keywords, exact, contains or regex")
        if self.name == FALLBACK:
            raise ValueError(f"{FALLBACK!r} names the fallback reply: give the rule another name")
        if self.negations and not self.keywords:
            raise ValueError("negations apply to keywords: give keywords too")
        return self


class WorkingHours(_Strict):
    """When staff answer, each in their own time zone; ``end`` before ``start`` runs past midnight."""

    days: list[Day] = ["mon", "tue", "wed", "thu", "fri"]
    start: str = Field("09:00", pattern=_HHMM)
    end: str = Field("18:00", pattern=_HHMM)

    def contains(self, local: datetime) -> bool:
        """Whether a local wall-clock time is inside the hours (``start == end``: the whole day)."""
        at, day = local.strftime("%H:%M"), _DAYS[local.weekday()]
        if self.start == self.end:
            return day in self.days
        if self.start < self.end:
            return day in self.days and self.start <= at < self.end
        return (day in self.days and at >= self.start) or (_DAYS[local.weekday() - 1] in self.days and at < self.end)


class Fallback(_Strict):
    """The answer to a message nothing else answered: ``text`` within working hours, ``out_of_hours``
    outside them."""

    text: str = Field(min_length=1)
    out_of_hours: str | None = Field(None, min_length=1)
    hours: WorkingHours = WorkingHours()
    cooldown: Duration = "1h"
    channels: list[str] = []


class ReplyFile(_Strict):
    rules: list[ReplyRule] = []
    fallback: Fallback | None = None


class ReplyError(DefinitionError):
    what = "reply rules"


#: What the answers' templates may name, and with a coupon.
_AVAILABLE = frozenset({"customer"})
_WITH_COUPON = _AVAILABLE | {"coupon"}


def _check(spec: ReplyFile, config: Config) -> list[tuple[str, str]]:
    """What the config must agree with (coupon pools, channel types, template variables), as (key, problem)."""
    from scrm.channels import channel_types

    problems: list[tuple[str, str]] = []
    known_channels = set(channel_types())

    def channels(key: str, names: list[str]) -> None:
        problems.extend((f"{key}.{i}", f"unknown channel {name!r} (known: {', '.join(sorted(known_channels))})")
                        for i, name in enumerate(names) if name not in known_channels)

    def sources(key: str, texts: Mapping[str, str | None], available: frozenset[str]) -> None:
        for at, source in texts.items():
            if source is not None and (problem := templates.check(source, set(available))):
                problems.append((f"{key}.{at}", problem))

    for i, rule in enumerate(spec.rules):
        at = f"rules.{i}"
        if rule.coupon is not None and rule.coupon not in config.coupons:
            known = ", ".join(sorted(config.coupons)) or "none configured"
            problems.append((f"{at}.coupon", f"unknown pool {rule.coupon!r} (known: {known})"))
        channels(f"{at}.channels", rule.channels)
        texts = {"text": rule.text}
        if rule.article is not None:
            texts |= {"article.title": rule.article.title, "article.description": rule.article.description}
        sources(at, texts, _WITH_COUPON if rule.coupon else _AVAILABLE)
        sources(at, {"coupon_gone": rule.coupon_gone}, _AVAILABLE)
    if (fallback := spec.fallback) is not None:
        channels("fallback.channels", fallback.channels)
        for zone in sorted(staff_zones(config)):
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                problems.append(("fallback.hours", f"unknown time zone {zone!r} of a staff member "
                                                   "(loyalty.followups.timezones): working hours cannot be told"))
        sources("fallback", {"text": fallback.text, "out_of_hours": fallback.out_of_hours}, _AVAILABLE)
    return problems


def parse_replies(path: Path, raw: bytes, config: Config) -> tuple[ReplyFile | None, list[Problem]]:
    """One file's text on its own: its problems, and its rules unless it could not be read at all."""
    spec, problems = read_toml(path, raw, ReplyFile)
    if spec is None:
        return None, problems
    return spec, [Problem(path.name, key, problem) for key, problem in _check(spec, config)]


@dataclass(frozen=True)
class LoadedRule:
    rule: ReplyRule
    file: str
    cooldown: timedelta
    #: What its templates read of the customer: attribute names, or None for anything (see templates.attributes).
    reads: frozenset[str] | None


@dataclass
class ReplyBook:
    """The folder's rules, compiled, in the order they win (priority, then file and position), and the
    fallback. Built once per load; the service swaps in a new book when the files change."""

    rules: list[LoadedRule] = field(default_factory=list)
    fallback: Fallback | None = None
    #: sha256 over the files' names and texts: a reload that finds the same digest changes nothing.
    digest: str = ""

    def __post_init__(self) -> None:
        self.rules.sort(key=lambda r: -r.rule.priority)  # stable: file order within a priority
        self._by_name = {r.rule.name: i for i, r in enumerate(self.rules)}
        self._exact: dict[str, list[int]] = {}
        self._contains: list[tuple[str, int]] = []
        terms = []
        for i, loaded in enumerate(self.rules):
            r = loaded.rule
            for phrase in r.exact:
                self._exact.setdefault(_folded(phrase), []).append(i)
            self._contains += [(normalize(phrase), i) for phrase in r.contains]
            if r.keywords or r.regex:
                terms.append(KeywordRule(tag=r.name, keywords=r.keywords, negations=r.negations, match=r.match,
                                         regex=r.regex))
        #: The tagging matcher over the rules' keywords and regexes (one tag per rule, named after it).
        self._tagger = KeywordTagger(terms) if terms else None
        fallback = self.fallback
        self.fallback_cooldown = parse_duration(fallback.cooldown) if fallback else timedelta(0)
        self.fallback_reads = _reads([fallback.text, fallback.out_of_hours or ""]) if fallback else frozenset()
        #: How far back a cooldown can reach: answers older than this never hold a message.
        self.horizon = max([self.fallback_cooldown, *(r.cooldown for r in self.rules)])

    @property
    def empty(self) -> bool:
        return not self.rules and self.fallback is None

    def named(self, name: str) -> LoadedRule | None:
        """The rule of that name (a menu click answers with one), or None."""
        i = self._by_name.get(name)
        return None if i is None else self.rules[i]

    def match(self, text: str, tokens: list[str], channel: str) -> LoadedRule | None:
        """The rule that answers ``text`` on ``channel`` (``tokens``: its :func:`scrm.tagging.tokenize`),
        or None when no rule matches it."""
        if not self.rules:
            return None
        found: set[int] = set()
        if self._tagger is not None:
            found.update(self._by_name[hit.tag] for hit in self._tagger.match(text, tokens))
        if self._exact or self._contains:
            folded = normalize(text)
            found.update(self._exact.get(_folded(folded), ()))
            found.update(i for phrase, i in self._contains if phrase in folded)
        for i in sorted(found):
            loaded = self.rules[i]
            if not loaded.rule.channels or channel in loaded.rule.channels:
                return loaded
        return None


def _folded(text: str) -> str:
    return _EDGES.sub("", normalize(text).strip())


def _reads(sources: list[str]) -> frozenset[str] | None:
    """What a rule's templates read of the customer together (None: anything)."""
    reads: set[str] = set()
    for source in sources:
        found = templates.attributes(source, "customer")
        if found is None:
            return None
        reads |= found
    return frozenset(reads)


def replies_folder(config: Config) -> Path:
    return config.resolve(config.replies.path)


def _book(files: list[tuple[Path, bytes]], config: Config) -> tuple[ReplyBook, list[Problem]]:
    """The book the files make, and every problem: each file's own, and across files a rule name used
    twice or a second fallback."""
    problems: list[Problem] = []
    rules: list[LoadedRule] = []
    fallback: tuple[Fallback, str] | None = None
    named: dict[str, str] = {}
    digest = hashlib.sha256()
    for path, raw in files:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(raw).digest())
        spec, found = parse_replies(path, raw, config)
        problems += found
        if spec is None:
            continue
        for i, rule in enumerate(spec.rules):
            if rule.name in named:
                problems.append(Problem(path.name, f"rules.{i}.name", f"{rule.name!r} is already used by "
                                                                      f"{named[rule.name]}"))
            named[rule.name] = path.name
            article = [rule.article.title, rule.article.description] if rule.article else []
            rules.append(LoadedRule(rule, path.name, parse_duration(rule.cooldown),
                                    _reads([rule.text, rule.coupon_gone, *article])))
        if spec.fallback is not None:
            if fallback is not None:
                problems.append(Problem(path.name, "fallback", f"the fallback is already given in {fallback[1]}"))
            fallback = (spec.fallback, path.name)
    return ReplyBook(rules, fallback[0] if fallback else None, digest.hexdigest()), problems


def _folder_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.toml")) if folder.is_dir() else []


def load_replies(config: Config) -> ReplyBook:
    """The replies folder's rules, or :class:`ReplyError` listing all problems."""
    book, problems = _book([(path, path.read_bytes()) for path in _folder_files(replies_folder(config))], config)
    if problems:
        raise ReplyError([str(p) for p in problems])
    return book


def check_file(config: Config, path: Path, raw: bytes) -> list[Problem]:
    """One reply file's text, checked as :func:`load_replies` would check it at ``path`` in the replies
    folder (beside the other files there, instead of a file of that name): its own problems, and its
    names and fallback against the other files'."""
    others = [(p, p.read_bytes()) for p in _folder_files(path.parent) if p.name != path.name]
    _, problems = _book([*others, (path, raw)], config)
    return [p for p in problems if p.file == path.name]


def staff_zone(config: Config, who: str) -> str:
    """A staff member's time zone: their entry in ``[loyalty.followups] timezones``, else the service's."""
    zones = config.loyalty.followups.timezones if config.loyalty else {}
    return zones.get(who, config.service.timezone)


def staff_zones(config: Config) -> set[str]:
    """The time zones staff answer from: each operator's and admin's of ``[staff]``; the service's when
    there are none."""
    return ({staff_zone(config, who) for who, role in config.staff.items() if role in ("operator", "admin")}
            or {config.service.timezone})


def at_work(hours: WorkingHours, zone: str, now: datetime) -> bool:
    """Whether ``now`` (naive UTC) is inside the hours in time zone ``zone``."""
    return hours.contains(now.replace(tzinfo=UTC).astimezone(ZoneInfo(zone)))


def in_working_hours(config: Config, hours: WorkingHours, now: datetime) -> bool:
    """Whether ``now`` (naive UTC) is inside the hours for some staff member, in their own time zone."""
    return any(at_work(hours, zone, now) for zone in staff_zones(config))
