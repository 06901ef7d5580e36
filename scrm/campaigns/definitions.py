"""Campaign definitions: one TOML file each, validated with errors naming file, key and problem.

A campaign is a trigger, an audience and one or more steps. ``[message]`` is shorthand for a
single step; ``[[steps]]`` make a journey with waits, conditions and an exit condition.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal

from apscheduler.triggers.cron import CronTrigger
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from scrm.campaigns import templates
from scrm.config import Config, Expression, Stage

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

#: Events the core raises that start a campaign for the customer concerned.
TriggerEvent = Literal["first_message", "tag_added", "stage_changed", "keyword"]
#: Triggers the campaign clock evaluates on a schedule.
TimedTrigger = Literal["inactivity", "birthday", "coupon_expiring"]


def parse_duration(value: str) -> timedelta:
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration like 30s, 5m, 2h, 3d or 1w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _duration(value: str) -> str:
    parse_duration(value)
    return value


Duration = Annotated[str, AfterValidator(_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Trigger(_Strict):
    """Exactly one of ``event``, ``cron`` or ``at``."""

    event: TriggerEvent | TimedTrigger | None = None
    #: Crontab ("0 10 * * mon") in the service time zone: a run for the audience segment.
    cron: str | None = None
    #: One-off run, "YYYY-MM-DD HH:MM" in the service time zone.
    at: datetime | None = None
    tag: str | None = None
    stage: Stage | None = None
    #: For ``keyword``: any of these words in a customer's message.
    keywords: list[str] = []
    #: For ``inactivity``: days without an inbound message; for ``coupon_expiring``: days before expiry.
    days: int | None = Field(None, gt=0)
    #: For ``birthday``: the local hour (customer's time zone) from which the greeting goes out.
    hour: int = Field(10, ge=0, le=23)
    delay: Duration = "0s"
    #: A run missed while the service was down: ``run_late`` within ``grace``, else skipped and recorded.
    misfire: Literal["run_late", "skip"] = "run_late"
    grace: Duration = "6h"

    @field_validator("cron")
    @classmethod
    def _crontab(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                CronTrigger.from_crontab(value)
            except ValueError as exc:
                raise ValueError(f"bad crontab {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Trigger:
        kinds = [k for k in ("event", "cron", "at") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of event, cron or at")
        needs = {"tag_added": "tag", "stage_changed": "stage", "inactivity": "days", "coupon_expiring": "days"}
        if self.event in needs and getattr(self, needs[self.event]) is None:
            raise ValueError(f"event {self.event!r} needs {needs[self.event]}")
        if self.event == "keyword" and not self.keywords:
            raise ValueError("event 'keyword' needs keywords")
        return self

    @property
    def scheduled(self) -> bool:
        """Runs for an audience on a schedule (cron/at), rather than for one customer's event."""
        return self.cron is not None or self.at is not None


class Audience(_Strict):
    #: A named segment from the config; for event triggers an extra filter on the customer.
    segment: str | None = None
    #: Target chat groups (Telegram groups, WeCom customer groups) instead of people.
    groups: bool = False


class Variant(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,16}$")
    weight: int = Field(gt=0)
    text: str = Field(min_length=1)


class Template(_Strict):
    """Notice template (WeChat template message) used outside a channel's reply window."""

    template_id: str = Field(min_length=1)
    url: str | None = None
    #: Template field name -> text (a message template itself, e.g. "{{ customer.name }}").
    fields: dict[str, str] = {}


class Link(_Strict):
    text: str = Field(min_length=1, max_length=64)
    url: str = Field(pattern=r"^https?://")


class ArticleSpec(_Strict):
    """A WeChat news card; ``title`` and ``description`` are templates."""

    title: str = Field(min_length=1)
    description: str = ""
    url: str = Field(pattern=r"^https?://")
    picurl: str | None = None


class Step(_Strict):
    #: Time after the previous step (for the first: after the trigger and its delay).
    wait: Duration = "0s"
    #: Only customers for whom this segment expression holds get this step; others skip it.
    when: Expression | None = None
    text: str = Field(min_length=1)
    #: Texts for particular channels (e.g. shorter for Telegram), by channel type.
    channel_text: dict[str, str] = {}
    #: A/B variants replacing ``text``; each customer keeps one variant for the whole campaign.
    variants: list[Variant] = []
    coupon: str | None = None
    template: Template | None = None
    #: Link buttons under the message (Telegram inline keyboard).
    buttons: list[Link] = []
    #: A news card for WeChat (other channels send the text).
    article: ArticleSpec | None = None


class Message(_Strict):
    """Single-step shorthand."""

    text: str = Field(min_length=1)
    channel_text: dict[str, str] = {}
    variants: list[Variant] = []
    template: Template | None = None
    buttons: list[Link] = []
    article: ArticleSpec | None = None


class CouponSpec(_Strict):
    pool: str


class CampaignDefinition(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    title: str = ""
    #: ``lifecycle`` messages answer what the customer did; ``marketing`` ones respect frequency
    #: caps, quiet hours and (when configured) marketing consent.
    kind: Literal["lifecycle", "marketing"] = "marketing"
    #: Reach customers only on these channel types (default: their first identity).
    channels: list[str] = []
    trigger: Trigger
    audience: Audience = Audience()
    coupon: CouponSpec | None = None
    message: Message | None = None
    steps: list[Step] = []
    #: Stop the journey for a customer once this holds (e.g. "conversions() > 0").
    exit: Expression | None = None

    @model_validator(mode="after")
    def _message_or_steps(self) -> CampaignDefinition:
        if (self.message is None) == (not self.steps):
            raise ValueError("give either [message] or [[steps]]")
        if self.audience.groups and len(self.journey) > 1:
            raise ValueError("group campaigns have a single message")
        if self.trigger.scheduled and self.audience.segment is None and not self.audience.groups:
            raise ValueError("scheduled campaigns need audience.segment (or audience.groups = true)")
        return self

    @property
    def journey(self) -> list[Step]:
        if self.message is not None:
            m = self.message
            coupon = self.coupon.pool if self.coupon else None
            return [Step(text=m.text, channel_text=m.channel_text, variants=m.variants, template=m.template,
                         coupon=coupon, buttons=m.buttons, article=m.article)]
        return self.steps

    @property
    def delay(self) -> timedelta:
        return parse_duration(self.trigger.delay) + parse_duration(self.journey[0].wait)


@dataclass(frozen=True)
class LoadedCampaign:
    definition: CampaignDefinition
    path: Path
    digest: str


class CampaignError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _check(definition: CampaignDefinition, config: Config) -> list[str]:
    problems: list[str] = []
    segment = definition.audience.segment
    if segment is not None and segment not in config.segments:
        known = ", ".join(sorted(config.segments)) or "none configured"
        problems.append(f"audience.segment: unknown segment {segment!r} (known: {known})")
    where = "message" if definition.message is not None else "steps"
    for i, step in enumerate(definition.journey):
        at = "message" if where == "message" else f"steps.{i}"
        available = {"customer", "campaign"}
        if definition.trigger.event == "coupon_expiring" or step.coupon:
            available.add("coupon")
        if definition.audience.groups:
            available = {"group", "campaign"}
        if step.coupon and step.coupon not in config.coupons:
            known = ", ".join(sorted(config.coupons)) or "none configured"
            key = "coupon.pool" if where == "message" else f"{at}.coupon"
            problems.append(f"{key}: unknown pool {step.coupon!r} (known: {known})")
        sources = {f"{at}.text": step.text}
        sources |= {f"{at}.channel_text.{k}": v for k, v in step.channel_text.items()}
        sources |= {f"{at}.variants.{j}.text": v.text for j, v in enumerate(step.variants)}
        if step.template is not None:
            sources |= {f"{at}.template.fields.{k}": v for k, v in step.template.fields.items()}
        if step.article is not None:
            sources |= {f"{at}.article.title": step.article.title, f"{at}.article.description": step.article.description}
        for key, source in sources.items():
            if problem := templates.check(source, available):
                problems.append(f"{key}: {problem}")
    return problems


def parse_campaign(path: Path, raw: bytes, config: Config) -> tuple[LoadedCampaign | None, list[str]]:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
        definition = CampaignDefinition.model_validate(data)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return None, [f"{path.name}: invalid TOML: {exc}"]
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = ("missing" if e["type"] == "missing" else "unknown key" if e["type"] == "extra_forbidden"
                   else e["msg"].removeprefix("Value error, "))
            problems.append(f"{path.name}: {loc}: {msg}")
        return None, problems
    problems = [f"{path.name}: {p}" for p in _check(definition, config)]
    return LoadedCampaign(definition, path, hashlib.sha256(raw).hexdigest()), problems


def load_campaigns(config: Config) -> list[LoadedCampaign]:
    """Every ``*.toml`` in the campaigns folder, or :class:`CampaignError` listing all problems."""
    folder = config.resolve(config.campaigns.path)
    if not folder.is_dir():
        raise CampaignError([f"{folder}: campaigns folder not found (campaigns.path in the config)"])
    loaded: list[LoadedCampaign] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for path in sorted(folder.glob("*.toml")):
        campaign, found = parse_campaign(path, path.read_bytes(), config)
        problems += found
        if campaign is None:
            continue
        name = campaign.definition.name
        if name in seen:
            problems.append(f"{path.name}: name: {name!r} is already used by {seen[name].name}")
        seen[name] = path
        loaded.append(campaign)
    if problems:
        raise CampaignError(problems)
    return loaded
