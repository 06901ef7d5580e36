"""Which inbound events may have an answer that must ride on the platform's acknowledgement.

A WeChat passive reply exists only in the answer to the callback, so a channel waits for such an event
to be applied (``Accepted.applied``) before it answers; every other event is acknowledged once durable
(``Accepted.durable``). Deciding needs no store: it is the stateless part of what the pipeline does with
a message (scrm.pipeline), checked on the webhook's path. Commands (a staff member's, opt-out and
opt-in, a coupon code, loyalty and survey commands, asking for a person), a matching keyword reply rule,
a follow, a scan and a menu click wait; text that no rule matches does not: its only possible answers
are the fallback and a keyword campaign's message, and the channel sends those as messages once the
event is applied (on WeChat, customer-service messages inside the window the message just opened).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scrm import commands, staff
from scrm.consent import is_opt_in
from scrm.conversations import threads
from scrm.loyalty import commands as loyalty_commands
from scrm.messages import MESSAGE_KINDS, InboundEvent
from scrm.tagging import tokenize

if TYPE_CHECKING:
    from scrm.runtime import Runtime

#: Events whose answer (a channel code's welcome, a menu button's text or rule) is known only once applied.
ANSWERED_KINDS = frozenset({"subscribe", "scan", "menu_click"})


def may_answer(service: Runtime, event: InboundEvent) -> bool:
    """Whether applying ``event`` (already cleaned) may give an answer for the acknowledgement to carry."""
    if event.kind in ANSWERED_KINDS:
        return True
    text = event.text.strip()
    if event.kind not in MESSAGE_KINDS or not text:
        return False
    if staff.role_of(service, event) is not None:
        return True
    config = service.config
    if commands.is_opt_out(text) or is_opt_in(text) or staff.parse(text) or commands.redeem_code(text):
        return True
    if config.loyalty is not None and loyalty_commands.is_command(text):
        return True
    if threads.enabled_for(config, event.channel) and threads.wants_person(config, text):
        return True
    return service.replies.match(text, tokenize(text), event.channel) is not None
