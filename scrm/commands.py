"""Customer chat commands: redeem a coupon, opt out. (Staff commands live in scrm.staff.)"""

from __future__ import annotations

import re

OPT_OUT_WORDS = frozenset({"退订", "td", "/stop", "unsubscribe"})
OPT_OUT_REPLY = "您已退订,我们不会再向您推送营销消息。回复任意内容即可继续咨询。"

_REDEEM = re.compile(r"^\s*(?:我要用券|用券|/redeem)\s*[::]?\s*([A-Za-z0-9-]{4,32})\s*$", re.IGNORECASE)


def is_opt_out(text: str) -> bool:
    return text.strip().casefold() in OPT_OUT_WORDS


def redeem_code(text: str) -> str | None:
    match = _REDEEM.match(text)
    return match.group(1) if match else None
