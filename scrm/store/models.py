"""The customer store's tables (SQLAlchemy 2 typed ORM).

All timestamps are naive UTC: SQLite keeps no zone, so one convention serves both stores.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: DateTime(), str: String(255)}

    if TYPE_CHECKING:
        #: Every model here is declared with ``__tablename__``, so it is mapped to a Table (SQLAlchemy
        #: annotates the attribute with the wider FromClause, which covers other kinds of mapping).
        __table__: ClassVar[Table]


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    display_name: Mapped[str | None]
    #: Personal values live encrypted (see scrm.personal, the only writer): ciphertext and key id,
    #: a keyed hash for look-ups/de-duplication, and the last 4 digits for staff screens.
    phone_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    phone_key: Mapped[str | None] = mapped_column(String(16))
    phone_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    phone_last4: Mapped[str | None] = mapped_column(String(4))
    birthday_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    birthday_key: Mapped[str | None] = mapped_column(String(16))
    #: "MM-DD" of the birthday: all a birthday campaign needs, and indexable.
    birthday_md: Mapped[str | None] = mapped_column(String(5), index=True)
    timezone: Mapped[str | None] = mapped_column(String(64))
    locale: Mapped[str | None] = mapped_column(String(16))
    #: Indexed by ix_customers_stage_first_seen (stage, first_seen_at), below.
    stage: Mapped[str] = mapped_column(String(16), default="acquisition")
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False)
    acquisition_source: Mapped[str | None] = mapped_column(String(128))
    first_seen_at: Mapped[datetime] = mapped_column(index=True)
    last_seen_at: Mapped[datetime]
    last_inbound_at: Mapped[datetime | None]
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: RFM quintiles (5 = best), recomputed on a schedule over customers with conversions.
    rfm_r: Mapped[int | None] = mapped_column(SmallInteger)
    rfm_f: Mapped[int | None] = mapped_column(SmallInteger)
    rfm_m: Mapped[int | None] = mapped_column(SmallInteger)

    identities: Mapped[list[Identity]] = relationship(back_populates="customer")


class Identity(Base):
    """A customer's id on one account of one channel; one person may have several."""

    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("channel", "account", "external_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    account: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]

    customer: Mapped[Customer] = relationship(back_populates="identities")


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)


class CustomerTag(Base):
    __tablename__ = "customer_tags"
    #: The unique (customer_id, tag_id) index also serves lookups by customer: no index of its own.
    __table_args__ = (UniqueConstraint("customer_id", "tag_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    tag_id: Mapped[int] = mapped_column(ForeignKey("tags.id"), index=True)
    #: Which rule set it: ``keyword`` / ``behaviour`` / ``operator`` / ``campaign``.
    source: Mapped[str] = mapped_column(String(16))
    #: What exactly: the keyword hit, the rule name, the operator's identity.
    source_detail: Mapped[str | None]
    score: Mapped[float] = mapped_column(Float, default=1.0)
    added_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]

    tag: Mapped[Tag] = relationship()


class TagScore(Base):
    """Accumulated interest per customer and tag; the tag is applied once the rule's threshold is passed."""

    __tablename__ = "tag_scores"
    #: The unique (customer_id, tag_id) index also serves lookups by customer: no index of its own.
    __table_args__ = (UniqueConstraint("customer_id", "tag_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    tag_id: Mapped[int] = mapped_column(ForeignKey("tags.id"))
    score: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime]


class Touchpoint(Base):
    """Append-only record of every interaction; staff interactions carry ``actor`` and no customer."""

    __tablename__ = "touchpoints"
    __table_args__ = (
        UniqueConstraint("channel", "account", "platform_msg_id", name="uq_touchpoints_platform_msg"),
        Index("ix_touchpoints_customer_created", "customer_id", "created_at"),
        Index("ix_touchpoints_created_kind", "created_at", "kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"))
    actor: Mapped[str | None] = mapped_column(String(160))
    channel: Mapped[str] = mapped_column(String(16))
    account: Mapped[str] = mapped_column(String(32))
    #: ``in`` (from the person), ``out`` (to the person), ``internal`` (grants, stage changes...).
    direction: Mapped[str] = mapped_column(String(8))
    kind: Mapped[str] = mapped_column(String(32))
    platform_msg_id: Mapped[str | None] = mapped_column(String(128))
    text: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    campaign: Mapped[str | None] = mapped_column(String(64))
    delivery_id: Mapped[int | None]
    created_at: Mapped[datetime]
    #: On a reply: the ``platform_msg_id`` of the message it answers, so that the platform's retry of
    #: that message (WeChat's, when the passive reply was lost) is answered with it again.
    reply_to: Mapped[str | None] = mapped_column(String(128))


class Campaign(Base):
    """Runtime state of a campaign whose definition lives in a file under ``campaigns/``."""

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    definition_hash: Mapped[str | None] = mapped_column(String(64))
    #: When the service first saw the file: scheduled runs before it are not "missed".
    created_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class ChatGroup(Base):
    """A customer group (WeCom customer group, Telegram group) that group campaigns can target."""

    __tablename__ = "chat_groups"
    __table_args__ = (UniqueConstraint("channel", "account", "external_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    account: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(128))
    title: Mapped[str | None]
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class GroupMember(Base):
    __tablename__ = "group_members"
    __table_args__ = (UniqueConstraint("group_id", "customer_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("chat_groups.id"), index=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    joined_at: Mapped[datetime]
    left_at: Mapped[datetime | None]


#: ``Delivery.campaign`` of staff replies (scrm.conversations): sent by the outbox, no campaign's.
STAFF_REPLY = "@reply"


class Delivery(Base):
    """The outbox: one planned message per (campaign, step, target, occurrence), ever.

    ``target`` is ``c<customer id>`` or ``g<group id>``; ``occurrence`` tells repeated runs apart
    (a birthday's year, a weekly run's date, a coupon's code) and is empty for once-ever messages.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("campaign", "step", "target", "occurrence", name="uq_deliveries_once"),
        Index("ix_deliveries_status_due", "status", "due_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign: Mapped[str] = mapped_column(String(64), index=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    target: Mapped[str] = mapped_column(String(24))
    occurrence: Mapped[str] = mapped_column(String(64), default="")
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    group_id: Mapped[int | None] = mapped_column(ForeignKey("chat_groups.id"))
    channel: Mapped[str] = mapped_column(String(16))
    account: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(128))
    #: A/B variant name, when the campaign has variants.
    variant: Mapped[str | None] = mapped_column(String(16))
    #: planned -> claimed -> sending -> sent | skipped | failed | unknown (crashed mid-send, never resent);
    #: a stopped instance's ``claimed`` rows (never handed to the platform) go back to planned.
    status: Mapped[str] = mapped_column(String(16), default="planned")
    reason: Mapped[str | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    text: Mapped[str | None] = mapped_column(Text)
    platform_msg_id: Mapped[str | None] = mapped_column(String(128))
    #: The instance sending it: a ``sending`` row whose instance stopped heartbeating is ``unknown``.
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None]
    #: When a send of it first found the platform unreachable (nothing went out): it is tried again until
    #: ``delivery.unreachable_retry_hours`` after this, and fails only then.
    unreachable_since: Mapped[datetime | None]
    #: The staff member a reply is from (``@reply`` deliveries: scrm.conversations); None for campaigns.
    actor: Mapped[str | None] = mapped_column(String(160))
    due_at: Mapped[datetime]
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class CampaignRun(Base):
    """One scheduled run of a cron/date campaign: what makes misfires, failures and double runs visible.

    Timed campaigns (inactivity, birthday, coupon expiry) plan on every clock tick and have no
    occurrences; their row ``occurrence = 'clock'`` says how the last tick that changed something went.
    """

    __tablename__ = "campaign_runs"
    __table_args__ = (UniqueConstraint("campaign", "occurrence"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign: Mapped[str] = mapped_column(String(64))
    occurrence: Mapped[str] = mapped_column(String(64))
    #: ran | skipped_misfire | failed (retried while the misfire policy would still run it late)
    status: Mapped[str] = mapped_column(String(16))
    scheduled_at: Mapped[datetime]
    ran_at: Mapped[datetime]
    planned: Mapped[int] = mapped_column(Integer, default=0)
    #: Why planning failed (exception type and message), for status 'failed'.
    error: Mapped[str | None] = mapped_column(Text)


class Coupon(Base):
    """A coupon pool; its terms come from config and are mirrored here for reports."""

    __tablename__ = "coupons"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    value: Mapped[float] = mapped_column(Float, default=0)


class CouponCode(Base):
    __tablename__ = "coupon_codes"

    id: Mapped[int] = mapped_column(primary_key=True)
    coupon_id: Mapped[int] = mapped_column(ForeignKey("coupons.id"), index=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    #: None until granted (imported codes wait in the pool).
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    delivery_id: Mapped[int | None] = mapped_column(unique=True)
    granted_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None] = mapped_column(index=True)
    redeemed_at: Mapped[datetime | None]

    coupon: Mapped[Coupon] = relationship()


class Redemption(Base):
    __tablename__ = "redemptions"

    id: Mapped[int] = mapped_column(primary_key=True)
    code_id: Mapped[int] = mapped_column(ForeignKey("coupon_codes.id"), unique=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    #: Who recorded it: ``chat`` (the customer) or ``cli`` / ``api`` (the till).
    via: Mapped[str] = mapped_column(String(16))
    redeemed_at: Mapped[datetime] = mapped_column(index=True)


class Conversion(Base):
    """An order or goal event; a coupon redemption is one too."""

    __tablename__ = "conversions"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    order_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    amount: Mapped[float] = mapped_column(Float, default=0)
    currency: Mapped[str] = mapped_column(String(3), default="CNY")
    coupon_code: Mapped[str | None] = mapped_column(String(32))
    campaign: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(index=True)


class ReportDigest(Base):
    """A staff member's subscription to a scheduled report digest (``/digest weekly 09:00``).

    ``next_at`` (naive UTC) is when it is due next; the scheduler advances it before sending, so a
    crash mid-send skips one digest rather than sending it twice.
    """

    __tablename__ = "report_digests"
    __table_args__ = (UniqueConstraint("channel", "account", "external_id", name="uq_report_digests_staff"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    account: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(128))
    #: ``daily`` or ``weekly`` (weekly digests go out on Mondays).
    frequency: Mapped[str] = mapped_column(String(8))
    #: "HH:MM" in the service time zone.
    at: Mapped[str] = mapped_column(String(5))
    locale: Mapped[str | None] = mapped_column(String(16))
    next_at: Mapped[datetime] = mapped_column(index=True)
    last_sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


# Report indexes on earlier tables, declared here so the tables above stay as their owners wrote them.
#: Last campaign touch before a conversion (attribution) and replies after a send.
Index("ix_deliveries_customer_finished", Delivery.customer_id, Delivery.finished_at)
# Staff touchpoints only (customers' have no actor): when a staff member last wrote, for the channels
# whose reply window counts from it (WeChat's 48 hours).
Index("ix_touchpoints_staff", Touchpoint.actor, Touchpoint.created_at,
      sqlite_where=Touchpoint.actor.is_not(None), postgresql_where=Touchpoint.actor.is_not(None))
# Replies to a platform message, by its id (retries answered again); other touchpoints are left out.
Index("ix_touchpoints_reply_to", Touchpoint.channel, Touchpoint.account, Touchpoint.reply_to,
      sqlite_where=Touchpoint.reply_to.is_not(None), postgresql_where=Touchpoint.reply_to.is_not(None))
# Tracked-link clicks by campaign: who clicked which campaign's links (funnels, the API, segments).
Index("ix_touchpoints_clicks", Touchpoint.campaign, Touchpoint.customer_id,
      sqlite_where=Touchpoint.kind == "click", postgresql_where=Touchpoint.kind == "click")
#: Conversions credited to a campaign (funnel) and coupons granted in a period (report).
Index("ix_conversions_campaign_created", Conversion.campaign, Conversion.created_at)
Index("ix_coupon_codes_granted_at", CouponCode.granted_at)
# Imported codes not yet given out: a grant takes the pool's oldest from here instead of reading past
# every code the pool has granted (the index on coupon_id alone), which grew with each grant.
Index("ix_coupon_codes_unassigned", CouponCode.coupon_id, CouponCode.id,
      sqlite_where=CouponCode.customer_id.is_(None), postgresql_where=CouponCode.customer_id.is_(None))
#: Customers per stage at a moment (stages_at): counted from the index alone.
Index("ix_customers_stage_first_seen", Customer.stage, Customer.first_seen_at)


class ReportDay(Base):
    """One closed local day of the additive report figures, built by scrm.rollups.

    A row is deleted when a later change makes it stale; reports compute that day from the raw
    tables until the rollup job builds it again.
    """

    __tablename__ = "report_days"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    #: The time zone whose local day this is (the service's when it was built).
    timezone: Mapped[str] = mapped_column(String(64))
    #: The local midnights opening and closing the day, naive UTC: the day is [starts_at, ends_at).
    starts_at: Mapped[datetime]
    ends_at: Mapped[datetime]
    new_customers: Mapped[int] = mapped_column(Integer)
    new_by_channel: Mapped[dict[str, Any]]
    new_by_source: Mapped[dict[str, Any]]
    messages_in: Mapped[int] = mapped_column(Integer)
    messages_out: Mapped[int] = mapped_column(Integer)
    opt_outs: Mapped[int] = mapped_column(Integer)
    #: ``"from>to"`` -> stage moves that day.
    stage_moves: Mapped[dict[str, Any]]
    #: Customers with an inbound message that day: a zlib-compressed bitmap of their ids, so that
    #: a period's active customers are the exact union of its days (distinct counts do not add up).
    active: Mapped[bytes] = mapped_column(LargeBinary)
    built_at: Mapped[datetime]


class ReportRollupState(Base):
    """One row: a counter every invalidation of built days bumps in its own transaction; a build
    stores its day only if the counter has not moved since it began reading (scrm.rollups)."""

    __tablename__ = "report_rollup_state"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(Integer, default=0)


class PrivacyKey(Base):
    """A check value per privacy key id: a wrong key fails to open it at start (see scrm.personal)."""

    __tablename__ = "privacy_keys"

    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    check_value: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime]


class Consent(Base):
    """Marketing consent history per customer and channel; the latest row is the answer."""

    __tablename__ = "consents"
    __table_args__ = (Index("ix_consents_customer_channel", "customer_id", "channel", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    channel: Mapped[str] = mapped_column(String(16))
    purpose: Mapped[str] = mapped_column(String(16), default="marketing")
    granted: Mapped[bool] = mapped_column(Boolean)
    #: subscribed | message | import | opt_out | unsubscribed | operator
    source: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None]
    created_at: Mapped[datetime]


class AuditEntry(Base):
    """Who read or changed whose personal data; append-only (a store trigger refuses UPDATE/DELETE)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(160))
    role: Mapped[str | None] = mapped_column(String(16))
    #: How they came: a chat channel, ``cli``, or ``api:<key name>``.
    via: Mapped[str | None] = mapped_column(String(64))
    customer_id: Mapped[int | None] = mapped_column(Integer, index=True)
    action: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)


class PersonalPlaintextPending(Base):
    """Plaintext values left by the pre-encryption schema, sealed and deleted when the keyring opens."""

    __tablename__ = "personal_plaintext_pending"

    customer_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    phone: Mapped[str | None] = mapped_column(String(32))
    birthday: Mapped[date | None] = mapped_column(Date)


class Instance(Base):
    """A running ``scrm run`` process, heartbeating: how others know it is alive."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]


class Lease(Base):
    """A named lease (e.g. ``planner``): one instance holds it until it stops renewing."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[datetime]


class RateBucket(Base):
    """A token bucket shared by every instance sending on one channel account."""

    __tablename__ = "rate_buckets"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime]


# -- Loyalty: points, tiers, referrals, surveys, follow-ups, recommendations, churn (scrm.loyalty).


class LoyaltyAccount(Base):
    """A customer's loyalty state in one row: the balance that redemptions decrement with a
    conditional UPDATE (never below zero), the tier, the owning staff member and the nightly scores."""

    __tablename__ = "loyalty_accounts"

    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), primary_key=True, autoincrement=False)
    balance: Mapped[int] = mapped_column(Integer, default=0)
    tier: Mapped[str] = mapped_column(String(16), default="", index=True)
    tier_at: Mapped[datetime | None]
    #: Staff identity "<channel>:<external id>" (a key of ``[staff]`` or a WeCom UserID).
    owner: Mapped[str | None] = mapped_column(String(160), index=True)
    referral_code: Mapped[str | None] = mapped_column(String(16), unique=True)
    #: Last high-intent message (价格 / 多少钱) not yet followed by a conversion or a task.
    intent_at: Mapped[datetime | None]
    p_alive: Mapped[float | None] = mapped_column(Float)
    expected_purchases: Mapped[float | None] = mapped_column(Float)
    clv: Mapped[float | None] = mapped_column(Float)
    churn_risk: Mapped[float | None] = mapped_column(Float)
    #: ``bgnbd`` (lifetimes), ``bgnbd-scipy`` (built-in fit) or ``rules``.
    churn_method: Mapped[str | None] = mapped_column(String(16))
    scored_at: Mapped[datetime | None]
    #: Pre-computed co-purchase recommendations ([{sku, name, lift}]), for templates and the 360° card.
    recommendations: Mapped[list[Any] | None] = mapped_column(JSON)
    updated_at: Mapped[datetime]


class PointsLedger(Base):
    """Every points change; (customer, reason, ref) is unique, which makes each earn happen once."""

    __tablename__ = "points_ledger"
    __table_args__ = (
        UniqueConstraint("customer_id", "reason", "ref", name="uq_points_ledger_once"),
        Index("ix_points_ledger_customer_created", "customer_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    delta: Mapped[int] = mapped_column(Integer)
    #: order | checkin | survey | referral | redeem | refund | expire | adjust
    reason: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str | None] = mapped_column(String(64))
    balance_after: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime | None] = mapped_column(index=True)
    created_at: Mapped[datetime]


class LoyaltySeenConversion(Base):
    """Conversions the loyalty sweep has handled (points, referral credit, survey): each once."""

    __tablename__ = "loyalty_seen_conversions"

    conversion_id: Mapped[int] = mapped_column(ForeignKey("conversions.id"), primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(Integer, index=True)
    seen_at: Mapped[datetime]


class Referral(Base):
    """A referee captured through a referrer's code; one referrer per referee, credited once."""

    __tablename__ = "referrals"

    id: Mapped[int] = mapped_column(primary_key=True)
    referrer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    referee_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), unique=True)
    code: Mapped[str] = mapped_column(String(16))
    #: ``link`` (deep link / QR scene at first contact) or ``code`` (typed).
    via: Mapped[str] = mapped_column(String(8))
    captured_at: Mapped[datetime]
    converted_at: Mapped[datetime | None]
    points_paid: Mapped[int] = mapped_column(Integer, default=0)


class Survey(Base):
    """One CSAT/NPS question to one customer: planned -> asked -> answered | expired."""

    __tablename__ = "surveys"
    __table_args__ = (
        UniqueConstraint("customer_id", "trigger", "ref", name="uq_surveys_once"),
        Index("ix_surveys_status_due", "status", "due_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    #: csat (1-5) | nps (0-10)
    kind: Mapped[str] = mapped_column(String(8))
    #: conversion | staff
    trigger: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    account: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(128))
    campaign: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="planned")
    due_at: Mapped[datetime]
    asked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    score: Mapped[int | None] = mapped_column(SmallInteger)
    reason: Mapped[str | None] = mapped_column(Text)
    answered_at: Mapped[datetime | None] = mapped_column(index=True)
    created_at: Mapped[datetime]


class FollowupTask(Base):
    """A follow-up for a staff member; rule tasks are unique per (customer, kind, rule key)."""

    __tablename__ = "followup_tasks"
    __table_args__ = (
        UniqueConstraint("customer_id", "kind", "rule_key", name="uq_followup_tasks_rule"),
        Index("ix_followup_tasks_owner_done", "owner", "done_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    owner: Mapped[str | None] = mapped_column(String(160))
    #: manual | intent | detractor | waiting | <rule kind from config>
    kind: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    rule_key: Mapped[str | None] = mapped_column(String(64))
    due_at: Mapped[datetime]
    created_at: Mapped[datetime]
    created_by: Mapped[str | None] = mapped_column(String(160))
    done_at: Mapped[datetime | None]
    done_by: Mapped[str | None] = mapped_column(String(160))
    #: When the owner was alerted in chat; set before sending, so an alert goes out at most once.
    notified_at: Mapped[datetime | None]


class Conversation(Base):
    """A customer's conversation with staff on one channel account: opened when they write and no rule
    answers (or they ask for a person), ``open`` -> ``pending`` (staff answered, waiting for the customer)
    -> ``resolved``; the customer's next message reopens it. One row per customer and account, ever: the
    episodes' figures go into touchpoints (``conversation_first_response``, ``conversation_resolved``)."""

    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("customer_id", "channel", "account", name="uq_conversations_customer_account"),
        Index("ix_conversations_state_waiting", "state", "waiting_since"),
        Index("ix_conversations_assignee_state", "assignee", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    channel: Mapped[str] = mapped_column(String(16))
    account: Mapped[str] = mapped_column(String(32))
    #: open | pending | resolved
    state: Mapped[str] = mapped_column(String(16))
    #: A staff identity ``<channel>:<id>`` (as the keys of ``[staff]``).
    assignee: Mapped[str | None] = mapped_column(String(160))
    assigned_at: Mapped[datetime | None]
    #: A person has it (the customer asked for one, or staff answered): auto-replies and marketing pause.
    handled: Mapped[bool] = mapped_column(Boolean, default=False)
    #: When this episode began (the first message since it was last resolved).
    opened_at: Mapped[datetime]
    #: The customer's oldest message staff have not answered yet (None once they have).
    waiting_since: Mapped[datetime | None]
    last_customer_at: Mapped[datetime | None]
    last_staff_at: Mapped[datetime | None]
    first_response_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]
    resolved_by: Mapped[str | None] = mapped_column(String(160))
    #: When the assignee was told of this episode (set before the send: at most once).
    alerted_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]


class FollowupDigest(Base):
    """The local date each staff member last got their task digest (at most one a day)."""

    __tablename__ = "followup_digests"

    staff: Mapped[str] = mapped_column(String(160), primary_key=True)
    last_date: Mapped[str] = mapped_column(String(10))


class ConversionItem(Base):
    """A line item of a conversion (SKU, name, quantity, price): what recommendations learn from."""

    __tablename__ = "conversion_items"
    __table_args__ = (UniqueConstraint("conversion_id", "sku", name="uq_conversion_items_sku"),
                      Index("ix_conversion_items_sku_customer", "sku", "customer_id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    conversion_id: Mapped[int] = mapped_column(ForeignKey("conversions.id"), index=True)
    customer_id: Mapped[int] = mapped_column(Integer, index=True)
    sku: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None]
    quantity: Mapped[float] = mapped_column(Float, default=1)
    price: Mapped[float] = mapped_column(Float, default=0)
    created_at: Mapped[datetime]


class ItemPair(Base):
    """Co-purchase statistics of two SKUs over customers (batch job): support, confidence, lift."""

    __tablename__ = "item_pairs"

    sku_a: Mapped[str] = mapped_column(String(64), primary_key=True)
    sku_b: Mapped[str] = mapped_column(String(64), primary_key=True)
    together: Mapped[int] = mapped_column(Integer)
    support: Mapped[float] = mapped_column(Float)
    confidence: Mapped[float] = mapped_column(Float)
    lift: Mapped[float] = mapped_column(Float)
    computed_at: Mapped[datetime]


class StaffAccount(Base):
    """A console sign-in (``scrm staff add``): name, role, argon2id password hash, and the chat identity
    that may ask for a sign-in link with ``/console``."""

    __tablename__ = "staff_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    #: manager | operator | admin
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(256))
    #: ``<channel>:<external id>`` of the person in staff chat, if linked.
    identity: Mapped[str | None] = mapped_column(String(160), unique=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class ConsoleSession(Base):
    """A signed-in browser: the cookie holds a random token, the store only its SHA-256."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("staff_accounts.id"), index=True)
    #: The session's CSRF token, sent back with every state-changing request.
    csrf: Mapped[str] = mapped_column(String(64))
    address: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]


class SignInLink(Base):
    """A single-use sign-in link sent in staff chat (``/console``); the store keeps the token's SHA-256."""

    __tablename__ = "console_sign_in_links"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("staff_accounts.id"), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]


class SignInFailure(Base):
    """A failed console sign-in, counted per account name and per address for throttling (in the store,
    so every instance of a cluster throttles alike)."""

    __tablename__ = "console_sign_in_failures"
    __table_args__ = (Index("ix_console_sign_in_failures_name_at", "name", "at"),
                      Index("ix_console_sign_in_failures_address_at", "address", "at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime]


class ApiIdempotencyKey(Base):
    """A POST's ``Idempotency-Key`` and its first answer, kept 24 hours: a retry with the same key gets
    that answer again instead of doing the work twice. ``status`` is empty while the first request runs."""

    __tablename__ = "api_idempotency_keys"
    __table_args__ = (UniqueConstraint("key_name", "idempotency_key", name="uq_api_idempotency_keys_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    #: The API key's name: keys are per caller, one caller's key never answers another's request.
    key_name: Mapped[str] = mapped_column(String(32))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    #: SHA-256 of the method, path and body: the same key with another request is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)
    body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(index=True)


class AcquisitionCode(Base):
    """A channel code (渠道活码): a WeChat parametric QR code, a WeCom contact-me or group join way, or a
    Telegram deep link. ``scene`` is what the platform hands back when someone comes through it (the
    QR scene string, the contact way's ``state``, the ``/start`` payload)."""

    __tablename__ = "acquisition_codes"
    __table_args__ = (UniqueConstraint("channel", "account", "scene", name="uq_acquisition_codes_scene"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    channel: Mapped[str] = mapped_column(String(16))
    account: Mapped[str] = mapped_column(String(32))
    #: qr (temporary QR), qr_permanent, contact_way, join_way, deep_link
    kind: Mapped[str] = mapped_column(String(16))
    scene: Mapped[str] = mapped_column(String(64))
    #: What the printed code encodes.
    url: Mapped[str] = mapped_column(Text)
    #: The platform's handle to update or delete it (WeChat ticket, WeCom config_id).
    platform_ref: Mapped[str | None] = mapped_column(String(128))
    staff: Mapped[list[str]] = mapped_column(JSON, default=list)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    welcome: Mapped[str | None] = mapped_column(Text)
    campaign: Mapped[str | None] = mapped_column(String(64))
    coupon_pool: Mapped[str | None] = mapped_column(String(64))
    cost: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    created_by: Mapped[str | None] = mapped_column(String(160))


class CodeScan(Base):
    """One arrival through a code: a follow, scan, add or ``/start``; ``new_customer`` when it created
    the customer (first touch), else a re-engagement."""

    __tablename__ = "code_scans"
    __table_args__ = (
        Index("ix_code_scans_code_scanned", "code_id", "scanned_at"),
        Index("ix_code_scans_customer_scanned", "customer_id", "scanned_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    code_id: Mapped[int] = mapped_column(ForeignKey("acquisition_codes.id"))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    new_customer: Mapped[bool] = mapped_column(Boolean)
    scanned_at: Mapped[datetime]


class TrackedLink(Base):
    """A short link (``/l/<token>``) a template wrote with ``track()``: where it leads and what it was sent
    in (a campaign delivery, or a reply rule's answer), so that a click is counted for them."""

    __tablename__ = "tracked_links"

    #: Unguessable; for a delivery derived from its id and the target, so rendering it again gives the same.
    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(Text)
    campaign: Mapped[str | None] = mapped_column(String(64))
    step: Mapped[int | None] = mapped_column(Integer)
    variant: Mapped[str | None] = mapped_column(String(16))
    #: The reply rule whose answer carried it.
    rule: Mapped[str | None] = mapped_column(String(64))
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id"), index=True)
    delivery_id: Mapped[int | None]
    created_at: Mapped[datetime]


class WebhookSubscription(Base):
    """An integrator's endpoint and the event kinds it wants (scrm.webhooks): from the config's
    ``[webhooks.<name>]`` (mirrored here at start) or made through the API."""

    __tablename__ = "webhook_subscriptions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    url: Mapped[str] = mapped_column(Text)
    #: ``whsec_`` and base64: the key the Standard Webhooks signature is made with.
    secret: Mapped[str] = mapped_column(String(128))
    #: The event kinds it receives; empty: every kind.
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: ``config`` or ``api``: a config subscription is changed by editing the config only.
    source: Mapped[str] = mapped_column(String(8))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Failed attempts in a row; a success resets it, too many disable the subscription.
    failures: Mapped[int] = mapped_column(Integer, default=0)
    #: When the current run of failures began (None while the endpoint answers).
    failing_since: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class WebhookDelivery(Base):
    """The webhook outbox: one event for one subscription, written in the transaction of the change it
    tells of. pending -> claimed -> delivered, or back to pending (backing off) until it is ``dead``."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_due", "status", "due_at"),
        #: A customer's later event waits while an earlier one to the same subscription is undelivered.
        Index("ix_webhook_deliveries_order", "subscription_id", "customer_id", "id"),
        Index("ix_webhook_deliveries_subscription_created", "subscription_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("webhook_subscriptions.id"))
    #: The ``webhook-id`` header: the same for every subscription the event went to, and for every try.
    event_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    #: Not a foreign key: the event outlives a customer merged away.
    customer_id: Mapped[int | None] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None]
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None]
    due_at: Mapped[datetime]
    #: Tried until then (``webhook_delivery.retry_hours`` after the event, or after a replay of it).
    retry_until: Mapped[datetime | None]
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class WebhookAttempt(Base):
    """The delivery log: every request made to a subscription's endpoint, its answer and how long it took."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_subscription_at", "subscription_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(Integer, index=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("webhook_subscriptions.id"))
    at: Mapped[datetime]
    #: ``delivered`` (a 2xx answer) or ``failed``.
    status: Mapped[str] = mapped_column(String(16))
    http_status: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    error: Mapped[str | None]


class InboundJournal(Base):
    """The inbound journal (scrm.ingest.journal): every event a channel hands over, made durable before
    the platform is answered, and applied later by the consumer (scrm.ingest.consumer), which sets
    ``applied_at`` and the recorded ``reaction`` in the transaction that writes the event's effects.

    ``dedup_key`` is the platform's message id, so the platform's retry of an event already here is
    recognised at append; an event without one gets a key of its own (never a duplicate, as before).
    ``event`` is the rest of the event as JSON, a shared phone number sealed with the privacy keys.
    Applied rows are deleted after ``ingest.retention_days``."""

    __tablename__ = "inbound_events"
    __table_args__ = (
        UniqueConstraint("channel", "account", "dedup_key", name="uq_inbound_events_dedup"),
        # The consumer's next batch and the backlog figures read only the unapplied rows.
        Index("ix_inbound_events_unapplied", "id", sqlite_where=text("applied_at IS NULL"),
              postgresql_where=text("applied_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    account: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(128))
    dedup_key: Mapped[str] = mapped_column(String(128))
    event: Mapped[dict[str, Any]]
    received_at: Mapped[datetime]
    #: Pruning reads it (applied before the retention).
    applied_at: Mapped[datetime | None] = mapped_column(index=True)
    #: Failed tries to apply it alone; past ``ingest.max_attempts`` it is set aside (reaction ``failed``).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reaction: Mapped[dict[str, Any] | None] = mapped_column(JSON)
