"""Campaign definitions: one TOML file each, validated with errors naming file, key and problem."""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scrm.campaigns import templates
from scrm.config import Config, Stage

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

#: Events the core raises that a campaign can be triggered by.
TriggerEvent = Literal["first_message", "tag_added", "stage_changed"]


def parse_duration(value: str) -> timedelta:
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a duration like 30s, 5m, 2h, 3d or 1w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Trigger(_Strict):
    event: TriggerEvent
    #: For ``tag_added``: which tag.
    tag: str | None = None
    #: For ``stage_changed``: the stage entered.
    stage: Stage | None = None
    delay: str = "0s"

    @field_validator("delay")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


class CouponSpec(_Strict):
    pool: str


class Template(_Strict):
    """Notice template (WeChat template message) used outside a channel's reply window."""

    template_id: str = Field(min_length=1)
    url: str | None = None
    #: Template field name -> text (a message template itself, e.g. "{{ customer.name }}").
    fields: dict[str, str] = {}


class Message(_Strict):
    text: str = Field(min_length=1)
    template: Template | None = None


class CampaignDefinition(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    title: str = ""
    #: ``lifecycle`` messages are service-like; ``marketing`` ones count towards frequency caps.
    kind: Literal["lifecycle", "marketing"] = "marketing"
    trigger: Trigger
    coupon: CouponSpec | None = None
    message: Message

    @property
    def delay(self) -> timedelta:
        return parse_duration(self.trigger.delay)


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
    if definition.trigger.event == "tag_added" and not definition.trigger.tag:
        problems.append("trigger.tag: missing (required for event = \"tag_added\")")
    if definition.trigger.event == "stage_changed" and not definition.trigger.stage:
        problems.append("trigger.stage: missing (required for event = \"stage_changed\")")
    available = {"customer", "campaign"}
    if definition.coupon is not None:
        available.add("coupon")
        if definition.coupon.pool not in config.coupons:
            known = ", ".join(sorted(config.coupons)) or "none configured"
            problems.append(f"coupon.pool: unknown pool {definition.coupon.pool!r} (known: {known})")
    sources = {"message.text": definition.message.text}
    if definition.message.template is not None:
        sources.update({f"message.template.fields.{k}": v for k, v in definition.message.template.fields.items()})
    for key, source in sources.items():
        if problem := templates.check(source, available):
            problems.append(f"{key}: {problem}")
    return problems


def load_campaigns(config: Config) -> list[LoadedCampaign]:
    """Every ``*.toml`` in the campaigns folder, or :class:`CampaignError` listing all problems."""
    folder = config.resolve(config.campaigns.path)
    if not folder.is_dir():
        raise CampaignError([f"{folder}: campaigns folder not found (campaigns.path in the config)"])
    loaded: list[LoadedCampaign] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for path in sorted(folder.glob("*.toml")):
        raw = path.read_bytes()
        try:
            data = tomllib.loads(raw.decode("utf-8"))
            definition = CampaignDefinition.model_validate(data)
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{path.name}: invalid TOML: {exc}")
            continue
        except ValidationError as exc:
            for e in exc.errors():
                loc = ".".join(str(p) for p in e["loc"])
                msg = "missing" if e["type"] == "missing" else "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
                problems.append(f"{path.name}: {loc}: {msg}")
            continue
        problems += [f"{path.name}: {p}" for p in _check(definition, config)]
        if definition.name in seen:
            problems.append(f"{path.name}: name: {definition.name!r} is already used by {seen[definition.name].name}")
        seen[definition.name] = path
        loaded.append(LoadedCampaign(definition, path, hashlib.sha256(raw).hexdigest()))
    if problems:
        raise CampaignError(problems)
    return loaded
