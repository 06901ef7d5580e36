"""What a chat menu's button does when a customer taps it, as the core sees it.

A platform with a menu of its own (the WeChat Official Account's custom menu) keeps the buttons in its
channel settings and sends a tap as an ``InboundEvent`` of kind ``menu_click`` whose ``payload["key"]``
is the button's key; the channel's :meth:`~scrm.channels.Channel.menu_action` gives the
:class:`MenuClick` configured for that key, and scrm.pipeline does it: tags, one answer (a reply
rule's or plain text), a campaign started. Nothing here knows any platform's menu shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from scrm.campaigns.definitions import LoadedCampaign
    from scrm.conversations.replies import ReplyBook

#: The event kind of a tap on a button that has a key (a tap on a link button is recorded as ``menu_view``).
MENU_CLICK: Final = "menu_click"
#: The ``source`` of the tags a click adds (``source_detail``: the button's key).
TAG_SOURCE = "menu"


class MenuClick(BaseModel):
    """One click key's actions: any of ``tags``, one answer (``reply`` names a reply rule, or plain
    ``text``) and ``campaign`` (a campaign whose trigger is ``event = "menu_click"``)."""

    model_config = ConfigDict(extra="forbid")

    tags: list[str] = Field([], max_length=20)
    reply: str | None = Field(None, min_length=1)
    text: str | None = Field(None, min_length=1)
    campaign: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _does_something(self) -> MenuClick:
        if self.reply is not None and self.text is not None:
            raise ValueError("give reply (a reply rule's name) or text, not both")
        if not (self.tags or self.reply or self.text or self.campaign):
            raise ValueError("give tags, reply, text or campaign: a click that does nothing needs no entry")
        if bad := [t for t in self.tags if not t or len(t) > 64 or any(c.isspace() for c in t)]:
            raise ValueError(f"tag names are 1-64 characters without spaces: {bad[0]!r}")
        return self


def check_clicks(clicks: Mapping[str, MenuClick], book: ReplyBook,
                 campaigns: Mapping[str, LoadedCampaign]) -> list[tuple[str, str]]:
    """What the clicks name that the reply rules and campaigns do not have, as (key path under the
    clicks, problem): checked before a menu is pushed, since the rules and campaigns live in their own
    files and change apart from the config."""
    problems: list[tuple[str, str]] = []
    for key, click in clicks.items():
        if click.reply is not None and book.named(click.reply) is None:
            known = ", ".join(sorted(r.rule.name for r in book.rules)) or "none"
            problems.append((f"{key}.reply", f"no reply rule {click.reply!r} (known: {known})"))
        if click.campaign is not None:
            loaded = campaigns.get(click.campaign)
            if loaded is None:
                problems.append((f"{key}.campaign", f"no campaign {click.campaign!r}"))
            elif loaded.definition.trigger.event != MENU_CLICK:
                problems.append((f"{key}.campaign", f"campaign {click.campaign!r} is not started by menu clicks: "
                                                    f'give it [trigger] event = "{MENU_CLICK}"'))
    return problems
