"""Chat commands: what customers may type (redeem, opt out) and what staff may ask (reports)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from scrm.config import Role

OPT_OUT_WORDS = frozenset({"退订", "td", "/stop", "unsubscribe"})
OPT_OUT_REPLY = "您已退订,我们不会再向您推送营销消息。回复任意内容即可继续咨询。"
REFUSAL_REPLY = "抱歉,这个命令仅限员工使用。Sorry, this command is for staff only."

_REDEEM = re.compile(r"^\s*(?:我要用券|用券|/redeem)\s*[::]?\s*([A-Za-z0-9-]{4,32})\s*$", re.IGNORECASE)
_STAFF = re.compile(r"^\s*/(report|tag)(?:@\S+)?(?:\s+(.*))?$", re.IGNORECASE | re.DOTALL)
_TAG_CHANGE = re.compile(r"^([+-])(\S{1,64})$")
_PERIOD = re.compile(r"^(\d{1,3})d$")

#: Which roles may run which staff command.
STAFF_ROLES: dict[str, frozenset[Role]] = {
    "report": frozenset({"manager", "admin", "operator"}),
    "tag": frozenset({"operator", "admin"}),
}
STAFF_HELP = "员工命令 Staff commands: /report [7d|30d] · /tag <customer> +tag -tag"


def is_opt_out(text: str) -> bool:
    return text.strip().casefold() in OPT_OUT_WORDS


def redeem_code(text: str) -> str | None:
    match = _REDEEM.match(text)
    return match.group(1) if match else None


@dataclass(frozen=True)
class StaffCommand:
    name: str
    args: str


def staff_command(text: str) -> StaffCommand | None:
    match = _STAFF.match(text)
    return StaffCommand(match.group(1).lower(), (match.group(2) or "").strip()) if match else None


def report_days(args: str) -> int | None:
    """``/report`` takes ``7d`` or ``30d`` style periods; None for anything else."""
    if not args:
        return 7
    match = _PERIOD.match(args)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


def tag_changes(args: str) -> tuple[str, list[tuple[bool, str]]] | None:
    """``/tag console:alice +vip -old`` -> ("console:alice", [(True, "vip"), (False, "old")])."""
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
