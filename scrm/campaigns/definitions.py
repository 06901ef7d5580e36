"""Campaign definitions: one TOML file each, validated with errors naming file, key and problem.

A campaign is a trigger, an audience and one or more steps. ``[message]`` is shorthand for a
single step; ``[[steps]]`` make a journey with waits, conditions and an exit condition.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal, TypeVar

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

#: Events the core raises that start a campaign for the customer concerned (``menu_click``: a menu button
#: whose click names the campaign, scrm.acquisition.menus).
TriggerEvent = Literal["first_message", "tag_added", "stage_changed", "keyword", "menu_click"]
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


_M = TypeVar("_M", bound=BaseModel)


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


#: A campaign's name; it names its file in the campaigns folder too (``<name>.toml``).
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class CampaignDefinition(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
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


class DefinitionError(Exception):
    """Definition files that cannot be used as a whole (campaigns, reply rules): one line per problem."""

    #: What the files define, for the line above the problems.
    what = "definitions"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class CampaignError(DefinitionError):
    what = "campaign definitions"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a campaign file: the file, the key (a dotted path such as ``trigger.days``;
    empty for the file as a whole, e.g. broken TOML) and what is wrong, in words an operator can act on."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, self.key, self.message) if part)


def _check(definition: CampaignDefinition, config: Config) -> list[tuple[str, str]]:
    """What the config must agree with (segments, coupon pools, template variables), as (key, problem)."""
    problems: list[tuple[str, str]] = []
    segment = definition.audience.segment
    if segment is not None and segment not in config.segments:
        known = ", ".join(sorted(config.segments)) or "none configured"
        problems.append(("audience.segment", f"unknown segment {segment!r} (known: {known})"))
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
            problems.append((key, f"unknown pool {step.coupon!r} (known: {known})"))
        sources = {f"{at}.text": step.text}
        sources |= {f"{at}.channel_text.{k}": v for k, v in step.channel_text.items()}
        sources |= {f"{at}.variants.{j}.text": v.text for j, v in enumerate(step.variants)}
        if step.template is not None:
            sources |= {f"{at}.template.fields.{k}": v for k, v in step.template.fields.items()}
        if step.article is not None:
            sources |= {f"{at}.article.title": step.article.title, f"{at}.article.description": step.article.description}
        for key, source in sources.items():
            if problem := templates.check(source, available):
                problems.append((key, problem))
    return problems


def read_toml(path: Path, raw: bytes, model: type[_M]) -> tuple[_M | None, list[Problem]]:
    """A definition file's text as ``model``, or None and its problems (broken TOML, or each key
    the model refuses), named by file and key; the checks against the config come after."""
    try:
        return model.model_validate(tomllib.loads(raw.decode("utf-8"))), []
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return None, [Problem(path.name, "", f"invalid TOML: {exc}")]
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = ("missing" if e["type"] == "missing" else "unknown key" if e["type"] == "extra_forbidden"
                   else e["msg"].removeprefix("Value error, "))
            problems.append(Problem(path.name, loc, msg))
        return None, problems


def parse_campaign(path: Path, raw: bytes, config: Config) -> tuple[LoadedCampaign | None, list[Problem]]:
    """One file's text on its own: its problems, and the campaign unless it could not be read at all."""
    definition, problems = read_toml(path, raw, CampaignDefinition)
    if definition is None:
        return None, problems
    problems = [Problem(path.name, key, problem) for key, problem in _check(definition, config)]
    return LoadedCampaign(definition, path, hashlib.sha256(raw).hexdigest()), problems


def campaigns_folder(config: Config) -> Path:
    return config.resolve(config.campaigns.path)


def _campaign_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.toml"))


def load_campaigns(config: Config) -> list[LoadedCampaign]:
    """Every ``*.toml`` in the campaigns folder, or :class:`CampaignError` listing all problems."""
    folder = campaigns_folder(config)
    if not folder.is_dir():
        raise CampaignError([f"{folder}: campaigns folder not found (campaigns.path in the config)"])
    loaded: list[LoadedCampaign] = []
    problems: list[Problem] = []
    seen: dict[str, Path] = {}
    for path in _campaign_files(folder):
        campaign, found = parse_campaign(path, path.read_bytes(), config)
        problems += found
        if campaign is None:
            continue
        name = campaign.definition.name
        if name in seen:
            problems.append(Problem(path.name, "name", f"{name!r} is already used by {seen[name].name}"))
        seen[name] = path
        loaded.append(campaign)
    if problems:
        raise CampaignError([str(p) for p in problems])
    return loaded


def check_file(config: Config, path: Path, raw: bytes) -> tuple[LoadedCampaign | None, list[Problem]]:
    """One campaign file's text, checked as :func:`load_campaigns` would check it at ``path`` in the
    campaigns folder, before it is written there: its own problems, and its name against the other
    files of the folder (the folder refuses a name two files use). A face that writes campaign files
    (the console's editor) saves only text with no problems; ``scrm campaigns validate FILE`` says the same.
    """
    campaign, problems = parse_campaign(path, raw, config)
    if campaign is None:
        return None, problems
    name = campaign.definition.name
    for other in _campaign_files(path.parent) if path.parent.is_dir() else []:
        if other.name == path.name:
            continue
        found, _ = parse_campaign(other, other.read_bytes(), config)
        if found is not None and found.definition.name == name:
            problems.append(Problem(path.name, "name", f"{name!r} is already used by {other.name}"))
    return campaign, problems


def check_new_file(config: Config, raw: bytes) -> tuple[Path, LoadedCampaign | None, list[Problem]]:
    """A new campaign file's text: the file is named after the campaign (``<name>.toml`` in the
    campaigns folder) and must not be there yet; then :func:`check_file`. Returns where it would go."""
    folder = campaigns_folder(config)
    try:
        declared = tomllib.loads(raw.decode("utf-8")).get("name")
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        declared = None
    valid = isinstance(declared, str) and re.fullmatch(NAME_PATTERN, declared) is not None
    path = folder / (f"{declared}.toml" if valid else "new.toml")
    campaign, problems = check_file(config, path, raw)
    if valid and path.exists():
        problems.append(Problem(path.name, "name", f"there is already a file {path.name} in {folder.name}/: "
                                                   "a new campaign needs a name of its own"))
    return path, campaign, problems


def write_file(path: Path, text: str) -> None:
    """Replace (or create) a campaign file whole: the text goes to a temporary file beside it, which is
    then renamed over it, so the reload job (and anyone reading) sees the old text or the new, never part
    of it. The temporary name does not end in ``.toml``: the folder's glob never loads it."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def describe_trigger(d: CampaignDefinition) -> str:
    """The trigger in a few words (``cron 0 10 * * mon``, ``tag_added:奶粉 +1h``), for lists."""
    t = d.trigger
    if t.cron:
        return f"cron {t.cron}"
    if t.at:
        return f"at {t.at:%Y-%m-%d %H:%M}"
    detail = t.tag or t.stage or (",".join(t.keywords) if t.keywords else "") or (f"{t.days}d" if t.days else "")
    return f"{t.event}{':' + detail if detail else ''}" + (f" +{t.delay}" if t.delay != "0s" else "")
