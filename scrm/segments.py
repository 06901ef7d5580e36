"""Segment expressions: a small, safe boolean language compiled to one SQL condition on customers.

Operators write ``tag('奶粉') and days_silent >= 30 and not opted_out`` or ``rfm.r >= 4``; the text is
parsed with Python's ``ast`` (only the nodes below are accepted) and compiled to SQLAlchemy Core,
so a segment is always one query and customers are never loaded into Python to be filtered.

Names: ``stage``, ``opted_out``, ``source`` (acquisition source), ``locale``, ``timezone``, ``channel``
(has an identity on that channel), ``days_silent`` (days since the last inbound message, or since first
seen), ``days_since_seen``, ``age_days`` (since first seen), ``rfm.r`` / ``rfm.f`` / ``rfm.m`` (1-5),
``attr.<name>`` (custom attributes), ``tier``, ``points``, ``p_alive``, ``clv``, ``churn_risk``,
``expected_purchases`` (scrm.loyalty).
Functions: ``tag(name)``, ``msgs(days)`` / ``msgs(from_days, to_days)`` (inbound messages in that
window), ``conversions([days])``, ``revenue([days])``, ``coupons_received([days])``,
``coupons_redeemed([days])``, ``campaign_messages([days])``, ``replied()`` (wrote to us after the last
campaign message they got), ``clicked(campaign[, days])`` (followed a tracked link of that campaign, in
the last ``days`` or ever), ``segment(name)``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Exists, and_, exists, false, func, not_, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute

from scrm.messages import MESSAGE_KINDS
from scrm.store.models import (
    Conversion,
    CouponCode,
    Customer,
    CustomerTag,
    Identity,
    LoyaltyAccount,
    Redemption,
    Tag,
    Touchpoint,
)


class ExpressionError(ValueError):
    """The expression cannot be compiled; the message says where and why."""


#: The longest expression accepted from a person (the console's box); config files may hold longer ones.
MAX_TYPED = 2000
#: The deepest syntax tree compiled (``tag('a') and not (x or y)`` is 6): SQLAlchemy compiles recursively.
MAX_DEPTH = 60
_TOO_DEEP = f"the expression is nested too deeply (at most {MAX_DEPTH} levels)"


def _about_customer(found: Exists) -> Exists:
    """A subquery correlated to the outer customer only.

    A segment is used inside other queries (the planner's INSERT ... SELECT joins the customer's
    identity, the coupon-expiry planner joins coupon codes): SQLAlchemy's auto-correlation would
    correlate *every* table the outer query shares, leaving e.g. ``channel``'s subquery with no FROM
    at all, or counting only the outer row's coupon. So every subquery names what it correlates to.
    """
    return found.correlate(Customer)


_STRING_FIELDS = {
    "stage": Customer.stage,
    "source": Customer.acquisition_source,
    "locale": Customer.locale,
    "timezone": Customer.timezone,
}
_AGE_FIELDS: dict[str, Callable[[], Any]] = {
    "days_silent": lambda: func.coalesce(Customer.last_inbound_at, Customer.first_seen_at),
    "days_since_seen": lambda: Customer.last_seen_at,
    "age_days": lambda: Customer.first_seen_at,
}

def _loyalty(column: Any, default: Any = None) -> Any:
    value = select(column).where(LoyaltyAccount.customer_id == Customer.id).correlate(Customer).scalar_subquery()
    return value if default is None else func.coalesce(value, default)


#: scrm.loyalty's fields: tier name ('' before any loyalty activity), points balance, nightly scores
#: (NULL until scored, so ``p_alive < 0.3`` never matches an unscored customer).
_LOYALTY: dict[str, Callable[[], Any]] = {
    "tier": lambda: _loyalty(LoyaltyAccount.tier, ""),
    "points": lambda: _loyalty(LoyaltyAccount.balance, 0),
    "p_alive": lambda: _loyalty(LoyaltyAccount.p_alive),
    "clv": lambda: _loyalty(LoyaltyAccount.clv),
    "churn_risk": lambda: _loyalty(LoyaltyAccount.churn_risk),
    "expected_purchases": lambda: _loyalty(LoyaltyAccount.expected_purchases),
}
_RFM = {"r": Customer.rfm_r, "f": Customer.rfm_f, "m": Customer.rfm_m}
_FLIP = {ast.Gt: ast.Lt, ast.GtE: ast.LtE, ast.Lt: ast.Gt, ast.LtE: ast.GtE, ast.Eq: ast.Eq, ast.NotEq: ast.NotEq}


@dataclass(frozen=True)
class _Age:
    """A "days since <timestamp>" field: compared by turning the constant into a timestamp."""

    column: Any


@dataclass(frozen=True)
class _Channel:
    pass


#: Longest window a segment may name: a century, well inside datetime's range for any "now".
MAX_DAYS = 36_500


def _days(value: float, where: str) -> timedelta:
    """A number of days as a timedelta, or a clear error (not an OverflowError in the planner)."""
    if not 0 <= value <= MAX_DAYS:
        raise ExpressionError(f"{where}: days must be between 0 and {MAX_DAYS}, got {value!r}")
    return timedelta(days=value)


def _compare(op: ast.cmpop, left: Any, right: Any) -> ColumnElement[bool]:
    match op:
        case ast.Eq():
            return left == right
        case ast.NotEq():
            return left != right
        case ast.Lt():
            return left < right
        case ast.LtE():
            return left <= right
        case ast.Gt():
            return left > right
        case ast.GtE():
            return left >= right
    raise ExpressionError(f"operator {type(op).__name__} is not supported here")


class Compiler:
    def __init__(self, now: datetime, segments: Mapping[str, str] | None = None) -> None:
        self.now = now
        self.segments = {} if segments is None else segments  # an empty mapping may answer "in" (config checks)
        self._stack: list[str] = []

    def compile(self, text: str) -> ColumnElement[bool]:
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as exc:
            raise ExpressionError(f"syntax error at column {exc.offset}: {text!r}") from None
        except (RecursionError, MemoryError):  # the parser's own limits, e.g. thousands of nested "not"
            raise ExpressionError(_TOO_DEEP) from None
        if _depth(tree) > MAX_DEPTH:  # compiling it to SQL would exhaust the stack
            raise ExpressionError(_TOO_DEEP)
        return self._bool(tree.body)

    # -- boolean level
    def _bool(self, node: ast.expr) -> ColumnElement[bool]:
        match node:
            case ast.BoolOp(op=ast.And(), values=values):
                return and_(*(self._bool(v) for v in values))
            case ast.BoolOp(op=ast.Or(), values=values):
                return or_(*(self._bool(v) for v in values))
            case ast.UnaryOp(op=ast.Not(), operand=operand):
                return not_(self._bool(operand))
            case ast.Compare(left=left, ops=ops, comparators=rights):
                parts, lhs = [], left
                for op, rhs in zip(ops, rights):
                    parts.append(self._comparison(op, lhs, rhs))
                    lhs = rhs
                return and_(*parts)
            case ast.Name(id="opted_out"):
                return Customer.opted_out.is_(True)
            case ast.Constant(value=bool() as flag):
                return true() if flag else false()
            case ast.Call():
                value = self._call(node)
                if isinstance(value, ColumnElement) and value.type.python_type is bool:
                    return value
        raise ExpressionError(f"expected a condition, got {ast.unparse(node)!r}")

    def _comparison(self, op: ast.cmpop, left: ast.expr, right: ast.expr) -> ColumnElement[bool]:
        if isinstance(op, (ast.In, ast.NotIn)):
            values = self._list(right)
            target = self._value(left)
            if isinstance(target, _Channel):
                found = _about_customer(exists().where(Identity.customer_id == Customer.id,
                                                       Identity.channel.in_(values)))
            elif isinstance(target, _Age):
                raise ExpressionError(f"{ast.unparse(left)} cannot be used with 'in'")
            else:
                found = target.in_(values)
            return not_(found) if isinstance(op, ast.NotIn) else found
        lhs, rhs = self._value(left), self._value(right)
        if isinstance(rhs, (_Age, _Channel)) and not isinstance(lhs, (_Age, _Channel)):
            lhs, rhs, op = rhs, lhs, _FLIP[type(op)]()
        if isinstance(lhs, _Channel):
            if not isinstance(op, (ast.Eq, ast.NotEq)) or not isinstance(rhs, str):
                raise ExpressionError("channel is compared with == or != to a channel name")
            found = _about_customer(exists().where(Identity.customer_id == Customer.id, Identity.channel == rhs))
            return found if isinstance(op, ast.Eq) else not_(found)
        if isinstance(lhs, _Age):
            if not isinstance(rhs, (int, float)) or isinstance(op, (ast.Eq, ast.NotEq)):
                raise ExpressionError("days_* fields are compared with <, <=, >, >= to a number of days")
            # "days since t >= N" is "t <= now - N days": compare timestamps, portable across stores.
            threshold = self.now - _days(rhs, "days_* fields")
            return _compare(_FLIP[type(op)](), lhs.column, threshold)
        return _compare(op, lhs, rhs)

    # -- value level
    def _value(self, node: ast.expr) -> Any:
        match node:
            case ast.Constant(value=str() | int() | float() as value) if not isinstance(value, bool):
                return value
            case ast.UnaryOp(op=ast.USub(), operand=ast.Constant(value=int() | float() as value)):
                return -value
            case ast.Name(id=name) if name in _STRING_FIELDS:
                return _STRING_FIELDS[name]
            case ast.Name(id=name) if name in _AGE_FIELDS:
                return _Age(_AGE_FIELDS[name]())
            case ast.Name(id="channel"):
                return _Channel()
            case ast.Name(id=name) if name in _LOYALTY:
                return _LOYALTY[name]()
            case ast.Attribute(value=ast.Name(id="rfm"), attr=attr) if attr in _RFM:
                return _RFM[attr]
            case ast.Attribute(value=ast.Name(id="attr"), attr=attr):
                return Customer.attributes[attr].as_string()
            case ast.BinOp(left=left, op=op, right=right) if isinstance(op, (ast.Add, ast.Sub, ast.Mult)):
                lhs, rhs = self._value(left), self._value(right)
                if isinstance(lhs, (_Age, _Channel)) or isinstance(rhs, (_Age, _Channel)):
                    raise ExpressionError(f"no arithmetic on {ast.unparse(node)!r}")
                return {ast.Add: lambda: lhs + rhs, ast.Sub: lambda: lhs - rhs, ast.Mult: lambda: lhs * rhs}[type(op)]()
            case ast.Call():
                return self._call(node)
        raise ExpressionError(f"unknown name or value {ast.unparse(node)!r}")

    def _list(self, node: ast.expr) -> list[Any]:
        if isinstance(node, (ast.List, ast.Tuple)):
            constants = [e for e in node.elts if isinstance(e, ast.Constant)]
            if len(constants) == len(node.elts):
                return [e.value for e in constants]
        raise ExpressionError(f"'in' needs a list of constants, got {ast.unparse(node)!r}")

    def _args(self, node: ast.Call, kinds: tuple[type, ...], at_most: int) -> list[Any]:
        if node.keywords or len(node.args) > at_most:
            raise ExpressionError(f"{ast.unparse(node)}: takes at most {at_most} argument(s)")
        values = []
        for arg in node.args:
            if not isinstance(arg, ast.Constant) or not isinstance(arg.value, kinds) or isinstance(arg.value, bool):
                raise ExpressionError(f"{ast.unparse(node)}: arguments must be constants")
            values.append(arg.value)
        return values

    def _call(self, node: ast.Call) -> Any:
        if not isinstance(node.func, ast.Name):
            raise ExpressionError(f"unknown function {ast.unparse(node.func)!r}")
        name = node.func.id
        if name == "tag":
            args = self._args(node, (str,), 1)
            if len(args) != 1:
                raise ExpressionError("tag() takes the tag name")
            return _about_customer(exists().where(
                CustomerTag.customer_id == Customer.id, CustomerTag.tag_id == Tag.id, Tag.name == args[0],
                or_(CustomerTag.expires_at.is_(None), CustomerTag.expires_at > self.now),
            ))
        if name == "segment":
            args = self._args(node, (str,), 1)
            if len(args) != 1 or args[0] not in self.segments:
                raise ExpressionError(f"segment(): unknown segment {args[0] if args else ''!r}")
            if args[0] in self._stack:
                raise ExpressionError(f"segment {args[0]!r} refers to itself")
            self._stack.append(args[0])
            try:
                return self.compile(self.segments[args[0]])
            finally:
                self._stack.pop()
        if name == "msgs":
            args = self._args(node, (int, float), 2)
            if not args:
                raise ExpressionError("msgs() takes a number of days, or a window (from_days, to_days)")
            start, end = (0, args[0]) if len(args) == 1 else args
            return (
                select(func.count(Touchpoint.id))
                .where(Touchpoint.customer_id == Customer.id, Touchpoint.direction == "in",
                       Touchpoint.kind.in_(MESSAGE_KINDS),
                       Touchpoint.created_at > self.now - _days(end, ast.unparse(node)),
                       Touchpoint.created_at <= self.now - _days(start, ast.unparse(node)))
                .correlate(Customer).scalar_subquery()
            )
        if name == "replied":
            self._args(node, (), 0)
            last_campaign = (select(func.max(Touchpoint.created_at))
                             .where(Touchpoint.customer_id == Customer.id, Touchpoint.kind == "campaign_message")
                             .correlate(Customer).scalar_subquery())
            return and_(last_campaign.is_not(None), Customer.last_inbound_at > last_campaign)
        if name == "clicked":
            return self._clicked(node)
        #: name: (aggregate, owning customer's id column, time column, extra filter)
        aggregates: dict[str, tuple[ColumnElement[Any], QueryableAttribute[int | None],
                                    QueryableAttribute[datetime | None], ColumnElement[bool]]] = {
            "conversions": (func.count(Conversion.id), Conversion.customer_id, Conversion.created_at, true()),
            "revenue": (func.coalesce(func.sum(Conversion.amount), 0), Conversion.customer_id, Conversion.created_at,
                        true()),
            "coupons_received": (func.count(CouponCode.id), CouponCode.customer_id, CouponCode.granted_at, true()),
            "coupons_redeemed": (func.count(Redemption.id), Redemption.customer_id, Redemption.redeemed_at, true()),
            "campaign_messages": (func.count(Touchpoint.id), Touchpoint.customer_id, Touchpoint.created_at,
                                  Touchpoint.kind == "campaign_message"),
        }
        if name in aggregates:
            agg, owner, when, only = aggregates[name]
            args = self._args(node, (int, float), 1)
            query = select(agg).where(owner == Customer.id, only)
            if args:
                query = query.where(when > self.now - _days(args[0], ast.unparse(node)))
            return query.correlate(Customer).scalar_subquery()
        raise ExpressionError(f"unknown function {name!r}")

    def _clicked(self, node: ast.Call) -> Exists:
        """``clicked('winback', 30)``: a click (not a link preview) on a link the campaign sent, in the last
        30 days; without days, ever."""
        args: list[Any] = [arg.value if isinstance(arg, ast.Constant) else None for arg in node.args]
        if (node.keywords or not 1 <= len(args) <= 2 or not isinstance(args[0], str)
                or any(not isinstance(d, (int, float)) or isinstance(d, bool) for d in args[1:])):
            raise ExpressionError("clicked() takes a campaign name and optionally a number of days: "
                                  "clicked('winback', 30)")
        found = exists().where(Touchpoint.customer_id == Customer.id, Touchpoint.kind == "click",
                               Touchpoint.campaign == args[0])
        if len(args) == 2:
            found = found.where(Touchpoint.created_at > self.now - _days(args[1], ast.unparse(node)))
        return _about_customer(found)


def _depth(tree: ast.AST) -> int:
    """How deeply the syntax tree nests, walked without recursion."""
    deepest, todo = 0, [(tree, 1)]
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        todo.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def check(text: str, segments: Mapping[str, str] | None = None) -> str | None:
    """The problem with an expression, or None (used when validating config)."""
    try:
        Compiler(datetime(2000, 1, 1), segments).compile(text)
    except ExpressionError as exc:
        return str(exc)
    return None


def condition(text: str, now: datetime, segments: Mapping[str, str] | None = None) -> ColumnElement[bool]:
    return Compiler(now, segments).compile(text)


def typed(text: str, now: datetime, segments: Mapping[str, str] | None = None) -> ColumnElement[bool]:
    """:func:`condition` for an expression a person typed (the console's box): empty or over
    :data:`MAX_TYPED` characters is an :class:`ExpressionError` too."""
    if not text.strip():
        raise ExpressionError("enter an expression, e.g. tag('奶粉') and days_silent >= 30")
    if len(text) > MAX_TYPED:
        raise ExpressionError(f"at most {MAX_TYPED} characters, got {len(text)}")
    return condition(text, now, segments)


async def counts(session: AsyncSession, conditions: Mapping[str, ColumnElement[bool]]) -> dict[str, int]:
    """Customers in each segment, counted in one pass over the customers (``COUNT(*) FILTER``)."""
    if not conditions:
        return {}
    row = (await session.execute(select(*(func.count().filter(c) for c in conditions.values()))
                                 .select_from(Customer))).one()
    return {name: int(n) for name, n in zip(conditions, row, strict=True)}


@dataclass(frozen=True)
class Member:
    """A customer as a segment preview lists them: no personal field beyond the display name."""

    id: int
    name: str | None
    stage: str
    last_seen_at: datetime


async def preview(session: AsyncSession, where: ColumnElement[bool], limit: int = 20) -> tuple[int, list[Member]]:
    """How many customers match and the first ``limit`` of them by id (``scrm segments show``, the
    console): one count and one page, both in SQL."""
    total = await session.scalar(select(func.count()).select_from(Customer).where(where))
    return int(total or 0), await members(session, where, limit)


async def members(session: AsyncSession, where: ColumnElement[bool], limit: int = 20) -> list[Member]:
    """The first ``limit`` customers matching by id: :func:`preview`'s list without its count (the
    console counts through :func:`counts`, kept a while, and lists afresh)."""
    rows = (await session.execute(
        select(Customer.id, Customer.display_name, Customer.stage, Customer.last_seen_at)
        .where(where).order_by(Customer.id).limit(limit))).all()
    return [Member(r.id, r.display_name, r.stage, r.last_seen_at) for r in rows]
