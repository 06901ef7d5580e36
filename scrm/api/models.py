"""The integration API's request and response bodies.

These models validate what comes in, shape what goes out, and are the source of the OpenAPI
document (``/api/v1/openapi.json``): one definition, so the document cannot drift from the code.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

#: Store ids are 32-bit integers on PostgreSQL.
MAX_ID = 2**31 - 1
Name = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]
TagName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^\S+$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    pass


class CustomerRef(_In):
    """Who the customer is: a channel identity, a phone number, or the store id. Exactly one."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"channel": "wechat", "external_id": "oAbC123"}, {"phone": "+86 138 1234 5678"}, {"id": 42}]})

    channel: Annotated[str, StringConstraints(min_length=1, max_length=16)] | None = None
    external_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    #: Only needed when the brand has several accounts on the channel and ids differ per account.
    account: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = None
    phone: Annotated[str, StringConstraints(min_length=3, max_length=32)] | None = None
    id: int | None = Field(None, ge=1, le=MAX_ID)

    @model_validator(mode="after")
    def _exactly_one(self) -> CustomerRef:
        identity = self.channel is not None or self.external_id is not None
        if identity and (self.channel is None or self.external_id is None):
            raise ValueError("a channel identity needs both channel and external_id")
        if identity + (self.phone is not None) + (self.id is not None) != 1:
            raise ValueError("give exactly one of: channel + external_id, phone, id")
        if self.account is not None and not identity:
            raise ValueError("account goes with channel + external_id")
        return self


class LineItem(_In):
    sku: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    name: Annotated[str, StringConstraints(max_length=200)] | None = None
    quantity: int = Field(1, ge=1, le=1_000_000)
    price: float = Field(0, ge=0, le=1e9, allow_inf_nan=False)


class OrderIn(_In):
    """An order from the shop or the till; repeating an ``order_id`` returns the first result."""

    order_id: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]
    customer: CustomerRef
    amount: float = Field(ge=0, le=1e10, allow_inf_nan=False)
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] = "CNY"
    coupon_code: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9-]+$")] | None = None
    items: list[LineItem] = Field(default_factory=list, max_length=500)


CouponStatus = Literal["redeemed", "unknown", "expired", "used", "not_yours"]


class CouponUse(_Out):
    code: str
    #: ``redeemed`` now, ``used`` earlier (still attributed), or why it was not honoured.
    status: CouponStatus


class OrderOut(_Out):
    order_id: str
    conversion_id: int
    customer_id: int
    amount: float
    currency: str
    #: The campaign credited with this conversion, if any.
    campaign: str | None
    #: ``coupon``: from the campaign that granted the code; ``last_delivery``: the last campaign
    #: message sent to the customer within 7 days; ``none``.
    attribution: Literal["coupon", "last_delivery", "none"]
    coupon: CouponUse | None
    #: True when this order id was recorded before: nothing was written this time.
    duplicate: bool = False


class RedeemIn(_In):
    code: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9-]+$")]
    #: When given, the code must belong to this customer.
    customer: CustomerRef | None = None


class RedeemOut(_Out):
    status: Literal["redeemed"]
    code: str
    customer_id: int
    value: float
    campaign: str | None


class Identity(_Out):
    channel: str
    account: str
    external_id: str


class TagInfo(_Out):
    name: str
    source: str
    detail: str | None
    score: float
    added_at: str | None
    expires_at: str | None


class CouponInfo(_Out):
    code: str
    pool: str
    granted_at: str | None
    expires_at: str | None
    redeemed_at: str | None


class DeliveryInfo(_Out):
    campaign: str
    step: int
    status: str
    reason: str | None
    due_at: str | None
    finished_at: str | None


class TouchpointInfo(_Out):
    at: str | None
    direction: str
    kind: str
    channel: str
    text: str | None
    campaign: str | None
    payload: dict[str, Any]


class CustomerView(_Out):
    """The 360° view (the same as ``scrm customers show --json``)."""

    model_config = ConfigDict(extra="allow")

    id: int
    display_name: str | None
    stage: str
    opted_out: bool
    acquisition_source: str | None
    first_seen_at: str | None
    last_seen_at: str | None
    last_inbound_at: str | None
    identities: list[Identity]
    tags: list[TagInfo]
    coupons: list[CouponInfo]
    deliveries: list[DeliveryInfo]
    touchpoints: list[TouchpointInfo]


class TagsIn(_In):
    add: list[TagName] = Field(default_factory=list, max_length=50)
    remove: list[TagName] = Field(default_factory=list, max_length=50)

    @model_validator(mode="after")
    def _something(self) -> TagsIn:
        if not self.add and not self.remove:
            raise ValueError("give tags to add and/or remove")
        return self


class TagsOut(_Out):
    customer_id: int
    #: What changed, as ``+tag`` / ``-tag`` (already present / absent tags are not listed).
    changed: list[str]
    tags: list[str]


class TriggerIn(_In):
    customer: CustomerRef


class TriggerOut(_Out):
    campaign: str
    customer_id: int
    #: False when the customer already had this campaign planned or sent (each is sent once).
    planned: bool
    due_at: str | None


class DeliveryCounts(_Out):
    """The campaign's deliveries by status in the outbox (where its sending stands)."""

    planned: int = 0
    sending: int = 0
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    unknown: int = 0


class TriggerInfo(_Out):
    event: str | None
    tag: str | None = None
    stage: str | None = None
    cron: str | None = None
    delay: str | None = None


class CampaignOut(_Out):
    name: str
    title: str
    kind: str
    trigger: TriggerInfo
    paused: bool
    #: Whether ``POST /campaigns/{name}/trigger`` can start it for one customer.
    triggerable: bool
    deliveries: DeliveryCounts
    #: Its funnel over its life, as GET /campaigns/{name}/funnel's total (the reports' own figures).
    funnel: FunnelStep


class CampaignList(_Out):
    campaigns: list[CampaignOut]


class MessageIn(_In):
    """A staff reply into the customer's conversation (at most 2000 characters)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "您好,订单已发货。"}]})

    #: Checked by the conversation rules, not here: empty is 400, too long 413.
    text: str
    #: The channel of the conversation to answer (default: the one the customer wrote in last).
    channel: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,16}$")] | None = None
    #: Outside the channel's reply window (WeChat: 48 hours), send it as the configured notice template.
    as_notice: bool = False


class MessageOut(_Out):
    conversation: int
    #: The outbox delivery that sends it (queued now, sent in order with the customer's other replies).
    delivery: int
    channel: str
    as_notice: bool


class ConversationOut(_Out):
    id: int
    customer_id: int
    name: str | None
    channel: str
    account: str
    #: ``open`` (waiting for staff) or ``pending`` (waiting for the customer).
    state: str
    assignee: str | None
    #: A person has it: auto-replies and marketing are paused for the customer.
    handled: bool
    waiting_since: str | None
    last_customer_at: str | None
    #: The customer's last message on the conversation's account.
    last_text: str | None


class ConversationList(_Out):
    """Unresolved conversations, the longest waiting first, then the pending ones."""

    conversations: list[ConversationOut]
    open: int
    pending: int


class ResolvedOut(_Out):
    conversation: int
    customer_id: int
    channel: str
    state: Literal["resolved"]


# --- pages of customers and touchpoints ----------------------------------------------------------

#: A page's cursor: the id the next page continues below (as the previous answer's ``next_cursor`` gave it).
Cursor = Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,9}$")]


class CustomerListQuery(_In):
    """Filters, all optional and combined with *and*; pages go by ``cursor``, the newest customers first."""

    #: What the console's search box reads: ``#12``, ``wechat:oAbC``, a phone number, ``tag:x``, ``stage:x``,
    #: a segment expression, or (anything else) part of a display name.
    q: Annotated[str, StringConstraints(max_length=2000)] | None = None
    #: A segment expression (``tag('奶粉') and days_silent >= 30``) or a configured segment's name.
    segment: Annotated[str, StringConstraints(min_length=1, max_length=2000)] | None = None
    tag: TagName | None = None
    stage: Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,16}$")] | None = None
    #: Customers with an identity on this channel (``wechat``, ``wecom``, ``telegram``...).
    channel: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,16}$")] | None = None
    #: Customers seen (any touchpoint) at or after this moment (ISO 8601; UTC unless it says otherwise).
    updated_since: datetime | None = None
    limit: int = Field(50, ge=1, le=100)
    cursor: Cursor | None = None


class CustomerRow(_Out):
    id: int
    display_name: str | None
    stage: str
    opted_out: bool
    last_seen_at: str
    #: ``channel:external_id``.
    identities: list[str]
    tags: list[str]


class CustomerPage(_Out):
    customers: list[CustomerRow]
    #: Pass as ``cursor`` for the next page; null on the last page.
    next_cursor: str | None
    #: The search ran out of its time budget before the page was full (a filter few customers match):
    #: the next page goes on from where it stopped.
    partial: bool = False


class PageQuery(_In):
    limit: int = Field(50, ge=1, le=100)
    cursor: Cursor | None = None


class TouchpointOut(_Out):
    id: int
    at: str
    #: ``in`` (from the customer), ``out`` (to them) or ``internal``.
    direction: str
    kind: str
    channel: str
    account: str | None
    text: str | None
    campaign: str | None
    #: Who did it, for staff and API actions (``staff:...``, ``api:<key>``).
    actor: str | None
    payload: dict[str, Any]


class TouchpointPage(_Out):
    customer_id: int
    touchpoints: list[TouchpointOut]
    next_cursor: str | None


# --- channel codes -------------------------------------------------------------------------------

CodeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,30}$")]
Token = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^\S+$")]


class CodeIn(_In):
    """A channel code to make on its platform (the same as ``scrm codes create``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "poster_mall", "channel": "wechat:brand", "expires": "30d", "tags": ["商场海报"], "cost": 500}]})

    #: Also the code's scene: 1-30 letters, digits, _ or -.
    name: CodeName
    #: The account as ``<type>:<account>``, e.g. ``wechat:brand``, ``wecom:acme``, ``telegram:main``.
    channel: Annotated[str, StringConstraints(min_length=3, max_length=50, pattern=r"^[a-z]+:\S+$")]
    permanent: bool = False
    #: A temporary code's lifetime: ``30d`` (the default), ``12h``, ``90m``.
    expires: Annotated[str, StringConstraints(min_length=2, max_length=8)] | None = None
    #: WeCom: staff user ids a contact-me code adds.
    staff: list[Token] = Field(default_factory=list, max_length=100)
    #: WeCom: group chat ids for a group join code.
    groups: list[Token] = Field(default_factory=list, max_length=5)
    tags: list[TagName] = Field(default_factory=list, max_length=20)
    #: Welcome text, a template (``{{ customer.name }}``, ``{{ coupon.code }}``).
    welcome: Annotated[str, StringConstraints(max_length=2000)] | None = None
    campaign: Name | None = None
    coupon: Name | None = None
    cost: float | None = Field(None, ge=0, lt=1e9, allow_inf_nan=False)


class CodeChangeIn(_In):
    """What to change on a code (as ``scrm codes update``): a field left out stays as it is; ``null`` clears
    welcome, campaign, coupon or cost. The channel, kind and lifetime stay: the printed code keeps working."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"tags": ["商场海报", "春季"], "welcome": None, "cost": 800}]})

    #: WeCom: the staff members a contact-me code adds (changed on the platform first).
    staff: list[Token] | None = Field(None, max_length=100)
    #: WeCom: a group join code's group chats (changed on the platform first).
    groups: list[Token] | None = Field(None, max_length=5)
    tags: list[TagName] | None = Field(None, max_length=20)
    welcome: Annotated[str, StringConstraints(max_length=2000)] | None = None
    campaign: Name | None = None
    coupon: Name | None = None
    cost: float | None = Field(None, ge=0, lt=1e9, allow_inf_nan=False)

    @model_validator(mode="after")
    def _something(self) -> CodeChangeIn:
        if not self.model_fields_set:
            raise ValueError("give something to change")
        for field in ("staff", "groups", "tags"):
            if field in self.model_fields_set and getattr(self, field) is None:
                raise ValueError(f"{field}: a list (an empty one for none), not null")
        return self


class CodeOut(_Out):
    name: str
    channel: str
    account: str
    #: qr, qr_permanent, contact_way, join_way or deep_link.
    kind: str
    scene: str
    #: What the printed code encodes.
    url: str
    #: active, expired or disabled.
    state: str
    staff: list[str]
    tags: list[str]
    welcome: str | None
    campaign: str | None
    coupon: str | None
    cost: float | None
    expires_at: str | None
    disabled_at: str | None
    created_at: str
    created_by: str | None


class CodeDay(_Out):
    day: str
    scans: int
    new_customers: int


class CodeFigures(_Out):
    """What a code brought (first touch), beside what the last-touch rule credits it with."""

    name: str
    channel: str
    state: str
    cost: float | None
    scans: int
    new_customers: int
    reengaged: int
    unfollowed_7d: int
    first_messages: int
    converted: int
    conversions: int
    revenue: float
    last_touch_conversions: int
    last_touch_revenue: float
    cost_per_new: float | None
    cost_per_converted: float | None
    days: list[CodeDay]


class CodeDetail(CodeOut):
    #: Its figures since it was made.
    figures: CodeFigures | None


class CodeList(_Out):
    codes: list[CodeOut]


class CodeImageQuery(_In):
    format: Literal["png", "svg"] = "png"
    #: Large enough to print on a poster.
    poster: bool = False


class DaysQuery(_In):
    #: The period: the last N days up to now.
    days: int = Field(30, ge=1, le=3660)


class CodeReport(_Out):
    since: str
    until: str
    days: int
    codes: list[CodeFigures]


# --- tags and segments -------------------------------------------------------------------------------

class LimitQuery(_In):
    limit: int = Field(100, ge=1, le=1000)


class TagCount(_Out):
    name: str
    #: Customers holding it now (unexpired).
    customers: int
    #: Of those, customers it was added to in the last 7 days.
    added_7d: int


class TagList(_Out):
    """Tags, the most held first."""

    tags: list[TagCount]


class SegmentOut(_Out):
    name: str
    expression: str
    #: Customers in it now.
    count: int


class SegmentList(_Out):
    segments: list[SegmentOut]


class PreviewQuery(_In):
    limit: int = Field(20, ge=1, le=100)


class SegmentPreviewIn(_In):
    """A segment expression to count and preview (``tag('奶粉') and days_silent >= 30``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"expression": "tag('奶粉') and days_silent >= 30"}]})

    expression: Annotated[str, StringConstraints(min_length=1, max_length=2000)]
    limit: int = Field(20, ge=1, le=100)


class SegmentMember(_Out):
    """A customer as a preview lists them: nothing personal beyond the display name."""

    id: int
    display_name: str | None
    stage: str
    last_seen_at: str


class SegmentPreview(_Out):
    #: The configured segment's name; null for an expression.
    name: str | None
    expression: str
    count: int
    #: The first customers by id.
    members: list[SegmentMember]


# --- campaigns: funnel, pause, preview ------------------------------------------------------------

class FunnelStep(_Out):
    """Customers at each step of a campaign's funnel, and what the conversions brought."""

    audience: int
    sent: int
    delivered: int
    replied: int
    clicked: int
    redeemed: int
    converted: int
    conversions: int
    revenue: float
    #: Each step against the one it follows (replies, clicks, redemptions, conversions against delivered).
    rates: dict[str, float]


class CampaignFunnel(_Out):
    campaign: str
    total: FunnelStep
    by_variant: dict[str, FunnelStep]
    by_channel: dict[str, FunnelStep]
    #: Deliveries not delivered, by reason.
    skips: dict[str, int]
    unassigned_conversions: int
    #: The attribution rule, in words.
    attribution: str


class PausedOut(_Out):
    campaign: str
    paused: bool


class CampaignPreviewQuery(_In):
    #: Whom to preview as: ``#42`` / ``42`` or a channel identity (``wechat:oAbC``).
    customer: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class CampaignPreview(_Out):
    campaign: str
    customer_id: int
    #: The channel the steps are rendered for (the reference's; the console for a store id).
    channel: str
    #: Every step's message as the customer would read it; nothing was sent or granted.
    steps: list[str]


# --- coupons -------------------------------------------------------------------------------------------

class PoolOut(_Out):
    name: str
    value: float
    #: Given to customers, ever.
    issued: int
    redeemed: int
    #: Past their expiry unredeemed.
    expired: int
    #: Waiting to be given out, unexpired.
    free: int
    #: Whether [coupons.<name>] is in the config (a removed pool keeps its codes).
    configured: bool
    #: Whether the pool makes new codes when no free one is left.
    generate: bool


class PoolList(_Out):
    pools: list[PoolOut]


class ImportIn(_In):
    """A supplier's codes for the pool (up to 10,000 a request; larger files: ``scrm coupons import``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"codes": ["SUP-7Q2M9XA1", "SUP-7Q2M9XA2"], "expires": "2027-01-31"}]})

    codes: list[Annotated[str, StringConstraints(min_length=1, max_length=32)]] = Field(min_length=1,
                                                                                         max_length=10_000)
    #: Valid through this day (the service's time zone); else the pool's valid_days from the grant.
    expires: date | None = None


class ImportOut(_Out):
    pool: str
    #: New codes now waiting in the pool.
    imported: int
    #: Codes the store knew already, or that the request gave more than once.
    duplicates: int


class GrantIn(_In):
    customer: CustomerRef


class GrantOut(_Out):
    pool: str
    code: str
    customer_id: int
    value: float
    expires_at: str | None


# --- reports -----------------------------------------------------------------------------------------

class SummaryQuery(_In):
    #: ``7d``, ``30d`` (up to ``3650d``) or a date range ``2026-11-01..2026-11-07`` (local days).
    period: Annotated[str, StringConstraints(max_length=32)] = "7d"


class ReportFigures(_Out):
    new_customers: int
    new_by_channel: dict[str, int]
    new_by_source: dict[str, int]
    active_customers: int
    messages_in: int
    messages_out: int
    opt_outs: int
    campaign_sends: int
    coupons_granted: int
    coupon_redemptions: int
    conversions: int
    revenue: float
    attributed_conversions: int
    attributed_revenue: float
    #: Attributed conversions and revenue per campaign.
    by_campaign: dict[str, dict[str, float]]
    reached_customers: int
    converted_customers: int
    #: Customers per stage at the end of the period.
    stages: dict[str, int]
    #: ``from>to``: customers moved during the period.
    stage_moves: dict[str, int]
    conversion_rate: float


class PreviousFigures(ReportFigures):
    since: str


class Times(_Out):
    count: int
    p50_seconds: float | None
    p90_seconds: float | None


class StaffTimes(_Out):
    #: A staff identity (``telegram:42``), or an API key's or console account's actor.
    staff: str
    channel: str
    first_response: Times
    resolution: Times


class ConversationFigures(_Out):
    """First-response and resolution times in the period, by staff member and channel, and the
    conversations open and pending now."""

    since: str
    until: str
    first_response: Times
    resolution: Times
    by_staff: list[StaffTimes]
    open: int
    pending: int
    oldest_waiting_since: str | None
    oldest_wait_seconds: float | None


class SurveyScore(_Out):
    answers: int
    #: NPS surveys: % promoters (9-10) - % detractors (0-6).
    nps: float | None = None
    promoters: int | None = None
    detractors: int | None = None
    #: CSAT surveys: % answering 4-5, and the average.
    csat: float | None = None
    average: float | None = None


class SurveySection(_Out):
    total: SurveyScore
    by_week: dict[str, SurveyScore]
    by_channel: dict[str, SurveyScore]
    by_campaign: dict[str, SurveyScore]


class FollowupRate(_Out):
    owner: str | None
    kind: str
    tasks: int
    done: int
    on_time: int
    rate: float


class CareFigures(_Out):
    #: Per survey kind (``csat``, ``nps``).
    surveys: dict[str, SurveySection]
    followups: list[FollowupRate]


class ReportSummary(ReportFigures):
    """The figures of ``/report`` in chat: the period's at the top level, the period before beside them,
    satisfaction and follow-ups, and how conversations were answered."""

    since: str
    until: str
    period: str
    previous: PreviousFigures
    attribution: str
    care: CareFigures
    conversations: ConversationFigures


class CohortQuery(_In):
    weeks: int = Field(6, ge=2, le=12)


class Cohorts(_Out):
    """Weekly acquisition cohorts and the share of each with an inbound message in each week after."""

    #: Cohort week starts (local Mondays), oldest first.
    weeks: list[str]
    sizes: list[int]
    retention: list[list[float]]
    active: list[list[int]]


class ErrorBody(_Out):
    code: str
    message: str
    #: For ``validation_error``: each problem with the field it concerns.
    fields: list[dict[str, str]] | None = None


class Error(_Out):
    error: ErrorBody
