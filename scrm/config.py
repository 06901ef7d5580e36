"""Configuration: the models of the TOML file (reading one: :mod:`scrm.config_file`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

from scrm.webhooks.events import EventKind

Role = Literal["operator", "manager", "admin"]


class ConfigError(Exception):
    """A config file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServiceConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    timezone: str = "Asia/Shanghai"
    max_body_bytes: int = Field(1_048_576, gt=0)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


class StoreConfig(_Strict):
    url: str = "sqlite+aiosqlite:///scrm.db"
    #: PostgreSQL only: keep the tables in this schema (it must exist) instead of ``public``.
    schema_name: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    #: After a group commit of several events, the ingest writer waits this long before the next.
    commit_linger_ms: float = Field(1.0, ge=0, le=100)

    @field_validator("url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value


class SchedulerConfig(_Strict):
    outbox_tick_seconds: float = Field(1.0, gt=0)
    outbox_batch: int = Field(100, gt=0)
    #: How often scheduled and timed campaigns (cron, birthdays, inactivity, coupon expiry) are checked.
    campaign_check_seconds: float = Field(30.0, gt=0)


_HHMM = r"^([01]\d|2[0-3]):[0-5]\d$"


class DeliveryConfig(_Strict):
    """Respect for the customer, applied to marketing campaigns."""

    #: At most ``frequency_cap`` marketing messages per customer in ``frequency_cap_days``.
    frequency_cap: int = Field(2, ge=0)
    frequency_cap_days: int = Field(7, gt=0)
    #: Quiet hours in the customer's own time zone; marketing sends are deferred to the end.
    quiet_hours_start: str = Field("21:00", pattern=_HHMM)
    quiet_hours_end: str = Field("09:00", pattern=_HHMM)
    #: Sends per second per "<channel>:<account>", shared by all campaigns (default: unlimited).
    rate_limits: dict[str, float] = {}
    #: Outbound platform calls in flight at once per tick.
    concurrency: int = Field(8, gt=0)
    #: A send that never reached the platform (refused, DNS failure, connect timeout) is tried again,
    #: backing off, until this long after its first such try; only then does it fail.
    unreachable_retry_hours: float = Field(6.0, gt=0)


class ClusterConfig(_Strict):
    """Several instances on one PostgreSQL store (on SQLite there is one instance; these still apply)."""

    #: How often an instance says it is alive and renews the planner lease.
    heartbeat_seconds: float = Field(3.0, gt=0)
    #: An instance silent this long is dead: its lease can be taken and its in-flight sends are unknown.
    lease_seconds: float = Field(15.0, gt=0)


class IngestConfig(_Strict):
    """The inbound journal and its consumer (scrm.ingest): events are acknowledged once durable, their
    effects applied behind them by worker instances."""

    #: How often a worker looks for events appended by ``--role web`` instances (its own wake it at
    #: once), and how often an instance answering a webhook looks whether another applied its event.
    poll_seconds: float = Field(0.2, gt=0, le=10)
    #: Events applied together in one transaction at most.
    batch: int = Field(500, gt=0, le=5000)
    #: Under load (the last round applied at least a few dozen events), a worker woken by an append waits
    #: this long for more before applying: bigger batches cost less per event (scrm.ingest.consumer).
    apply_linger_ms: float = Field(50.0, ge=0, le=1000)
    #: Applied events stay in the journal this long (a platform retry within it gets the first answer).
    retention_days: float = Field(7.0, gt=0)
    #: Tries an event that fails alone gets before it is set aside (logged, counted, reaction ``failed``)
    #: so that the events behind it are applied.
    max_attempts: int = Field(5, ge=1)


class CampaignsConfig(_Strict):
    path: str = "campaigns"


class RepliesConfig(_Strict):
    #: Folder of keyword auto-reply files (*.toml: rules and the fallback); none there = no auto-replies.
    path: str = "replies"


def _expression(value: str) -> str:
    from scrm.segments import check

    if problem := check(value, _SEGMENT_NAMES_ONLY):
        raise ValueError(problem)
    return value


class _AnySegment(dict[str, str]):
    """During field validation segment names are not known yet; cross-checks run in Config."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return "True"


_SEGMENT_NAMES_ONLY = _AnySegment()
Expression = Annotated[str, AfterValidator(_expression)]


def _compiles(values: list[str]) -> list[str]:
    for value in values:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"bad regular expression {value!r}: {exc}") from None
    return values


#: Regular expressions, refused at load when one does not compile.
Patterns = Annotated[list[str], AfterValidator(_compiles)]


class KeywordRule(_Strict):
    """A tag and the words that give it; synonyms are simply more keywords."""

    tag: str = Field(min_length=1, max_length=64)
    keywords: list[str] = []
    #: Regular expressions matched against the normalized text (each costs a scan; prefer keywords).
    regex: Patterns = []
    #: ``any``: one keyword is enough; ``all``: every keyword must appear in the message.
    match: Literal["any", "all"] = "any"
    #: Words that cancel a hit when they come just before it (不要奶粉 does not tag 奶粉).
    negations: list[str] = []
    #: Score per keyword hit (default 1) accumulating per customer; the tag is applied at ``threshold``.
    weights: dict[str, float] = {}
    threshold: float = Field(1.0, gt=0)
    #: The tag expires this many days after the last hit; none = kept until removed.
    ttl_days: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _has_terms(self) -> KeywordRule:
        if not self.keywords and not self.regex:
            raise ValueError("needs keywords or regex")
        unknown = set(self.weights) - set(self.keywords)
        if unknown:
            raise ValueError(f"weights for words that are not keywords: {', '.join(sorted(unknown))}")
        return self


class BehaviourRule(_Strict):
    """A tag held by customers matching a segment expression, e.g. ``msgs(7) >= 5``."""

    tag: str = Field(min_length=1, max_length=64)
    when: Expression
    #: Sticky tags stay when the condition stops holding; others are removed.
    sticky: bool = False


class ActivityDrop(_Strict):
    """Tag customers whose inbound messages in the last ``days`` fell by ``drop_percent`` against
    their own previous ``days`` (the churn-warning pattern)."""

    tag: str = "activity-drop"
    days: int = Field(7, gt=0)
    drop_percent: float = Field(50, gt=0, le=100)


class TaggingConfig(_Strict):
    rules: list[KeywordRule] = []
    behaviour: list[BehaviourRule] = []
    activity_drop: ActivityDrop | None = None
    #: Extra jieba dictionary file (one "word [freq [tag]]" per line), relative to the config file.
    dictionary: str | None = None


Stage = Literal["acquisition", "nurture", "retention", "upsell", "winback", "lost"]
STAGES: tuple[Stage, ...] = ("acquisition", "nurture", "retention", "upsell", "winback", "lost")


class Transition(_Strict):
    """Move customers in one of ``from`` stages to ``to`` when ``when`` holds; checked in file order."""

    from_: list[Stage] = Field(alias="from", min_length=1)
    to: Stage
    when: Expression


class LifecycleConfig(_Strict):
    transitions: list[Transition] = []


class ProfilesConfig(_Strict):
    #: Full re-evaluation of behaviour tags, stages and expiries (touched customers are done at once).
    refresh_minutes: float = Field(15, gt=0)
    #: Daily RFM recomputation, "HH:MM" in the service time zone.
    rfm_at: str = Field("03:00", pattern=_HHMM)


class PrivacyConfig(_Strict):
    """Personal data: where the encryption keys come from, consent and retention (see scrm.personal)."""

    #: Key file (``id:base64`` entries, see scrm.personal), relative to the config file; written on the
    #: first start of an empty store, required ever after.
    key_file: str | None = "privacy.key"
    #: The key entries themselves, normally from the environment (SCRM_PRIVACY__KEY); wins over key_file.
    key: str | None = Field(None, repr=False)
    #: Key id that encrypts new values (default: the last encryption key listed).
    current_key: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,16}$")
    #: Marketing campaigns reach only customers who gave explicit consent on the channel.
    require_consent_for_marketing: bool = False
    #: Message texts older than this many days are redacted nightly (none = kept forever).
    message_retention_days: int | None = Field(180, gt=0)
    #: When the nightly retention job runs, "HH:MM" in the service time zone.
    retention_at: str = Field("04:30", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")


class CouponPool(_Strict):
    prefix: str = Field("C", pattern=r"^[A-Z0-9]{1,8}$")
    value: float = Field(0, ge=0)
    valid_days: int = Field(30, gt=0)
    per_customer: int = Field(1, gt=0)
    #: Generate codes when no imported code is left (``scrm coupons import``); false = imported only.
    generate: bool = True


ApiScope = Literal["conversions:write", "customers:read", "customers:write", "coupons:redeem", "campaigns:read",
                   "campaigns:trigger", "conversations:read", "messages:write", "webhooks:read", "webhooks:write",
                   "campaigns:write", "codes:read", "codes:write", "coupons:read", "coupons:write", "reports:read",
                   "segments:read", "tags:read"]


class ApiKey(_Strict):
    """One integration's key (an order system, the POS) and what it may do."""

    #: Long random string; from the environment as ``SCRM_API__KEYS__<NAME>__KEY`` preferably.
    key: SecretStr = Field(min_length=16)
    scopes: list[ApiScope] = Field(min_length=1)


class ApiConfig(_Strict):
    """The ``/api/v1/`` integration API; no keys configured means every call is answered 401."""

    keys: dict[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")], ApiKey] = {}


def _webhook_secret(secret: SecretStr) -> SecretStr:
    from scrm.webhooks.subscriptions import check_secret

    if problem := check_secret(secret.get_secret_value()):
        raise ValueError(problem)
    return secret


class WebhookSubscriptionConfig(_Strict):
    """``[webhooks.<name>]``: an endpoint that is sent the events it names, signed per Standard Webhooks."""

    url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$")
    #: ``whsec_`` and the base64 of 24 to 64 random bytes (``scrm webhooks secret`` makes one); preferably
    #: from the environment as ``SCRM_WEBHOOKS__<NAME>__SECRET``.
    secret: Annotated[SecretStr, AfterValidator(_webhook_secret)]
    #: The event kinds to send (scrm.webhooks.events); empty: all of them.
    events: list[EventKind] = []
    enabled: bool = True


class WebhookDeliveryConfig(_Strict):
    """How webhook events are delivered (scrm.webhooks.delivery)."""

    #: Requests in flight at once, per instance.
    concurrency: int = Field(32, gt=0, le=1024)
    #: Seconds an endpoint has to answer (connecting included).
    timeout_seconds: float = Field(10.0, gt=0, le=120)
    #: An event is tried, backing off exponentially, for this long after it was written; then it is dead.
    retry_hours: float = Field(24.0, gt=0)
    #: A subscription is disabled (and admins told) once every attempt failed for this long, at least
    #: ``disable_after_failures`` of them; its events then wait, still pending, until it is enabled.
    disable_after_hours: float = Field(12.0, gt=0)
    disable_after_failures: int = Field(10, gt=0)
    #: Delivered events and the delivery log are kept this many days (``scrm webhooks replay`` reaches back as far).
    retention_days: int = Field(30, gt=0)


class ConsoleConfig(_Strict):
    """The operators' browser console at ``/console/`` (accounts: ``scrm staff add``)."""

    enabled: bool = True
    #: Where people reach the service, for the sign-in links ``/console`` sends in chat
    #: (default: ``http://<service.host>:<service.port>``).
    base_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/.*)?$")
    #: ``auto``: the Secure cookie flag when the request came over HTTPS (or ``X-Forwarded-Proto: https``).
    secure_cookies: Literal["auto", "always", "never"] = "auto"
    #: A session ends after this long without a request, and after ``absolute_hours`` in any case.
    idle_minutes: float = Field(30, gt=0)
    absolute_hours: float = Field(12, gt=0)
    #: Sign-in is refused for 15 minutes after this many failures for one account, or from one address.
    max_failures_per_account: int = Field(5, gt=0)
    max_failures_per_address: int = Field(20, gt=0)
    #: Rows per page in the customer list and message threads.
    page_size: int = Field(50, gt=0, le=500)


class LinksConfig(_Strict):
    """Tracked links (``{{ track('https://…') }}`` in templates, served at ``/l/<token>``)."""

    #: Where people reach the service's ``/l/`` links (default: ``console.base_url``, else
    #: ``http://<service.host>:<service.port>``).
    base_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/.*)?$")
    #: A link sent to a customer answers 404 this many days after it was sent, so old messages stop
    #: counting clicks (a menu's links, shared by every follower, last as long as the menu).
    expiry_days: int = Field(90, gt=0)


class ReplyNotice(_Strict):
    """The notice template (WeChat template message) offered for a staff reply outside a channel's reply
    window; field texts may use ``{{ text }}`` (the reply) and ``{{ customer.name }}``."""

    template_id: str = Field(min_length=1)
    url: str | None = Field(None, pattern=r"^https?://")
    fields: dict[str, str] = Field(min_length=1)


class ConversationsConfig(_Strict):
    """Staff answering customers through the bot (scrm.conversations): a conversation per customer and
    channel account opens when they write and nothing answered them, or when they ask for a person."""

    enabled: bool = True
    #: Channel types where the bot is the only way in (on WeCom, staff talk inside WeCom itself).
    channels: list[str] = ["wechat", "telegram", "console"]
    #: A message that is exactly one of these (case and surrounding spaces aside) asks for a person.
    person_words: list[str] = Field(["转人工", "人工", "人工客服", "/human"], min_length=1)
    person_reply: str = Field("已为您转接人工客服，请稍候。A person will answer you here shortly.", min_length=1)
    #: A handled conversation pauses auto-replies and marketing for its customer until it is resolved,
    #: or until nobody has written in it for this long.
    handoff_idle_minutes: float = Field(30, gt=0)
    #: Staff identities who take new conversations in turn (customers with an owner go to their owner);
    #: empty: every operator and admin of ``[staff]``.
    agents: list[str] = []
    #: Offered when a reply falls outside the channel's window (WeChat: 48 hours after the customer's
    #: last message); without it such replies are refused.
    notice: ReplyNotice | None = None


class LoggingConfig(_Strict):
    #: ``text`` is for people at a terminal; ``json`` (one object per line) for log collectors.
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: One line per HTTP request (aiohttp's access log). Off by default: at webhook rates it drowns
    #: the service's own lines and costs about a tenth of ingest's CPU; request ids tie those to requests.
    access_log: bool = False


class ReportsConfig(_Strict):
    #: A conversion without a campaign is credited to the last campaign message sent to the
    #: customer at most this many days before it.
    attribution_days: int = Field(7, gt=0, le=365)
    #: How often the job summing closed days for reports runs (scrm.rollups): days that closed or
    #: were invalidated since are built then; until then reports count them from the raw tables.
    rollup_minutes: int = Field(15, gt=0, le=1440)


class LoyaltyTier(_Strict):
    """A member tier, reached with ``min_points`` earned or ``min_spend`` spent in the last 12 months."""

    name: str = Field(min_length=1, max_length=16)
    min_points: int | None = Field(None, ge=0)
    min_spend: float | None = Field(None, ge=0)


class LoyaltyReward(_Strict):
    """A coupon from a pool of ``[coupons]`` at a price in points (``积分兑换``)."""

    title: str = Field(min_length=1)
    points: int = Field(gt=0)
    pool: str


class ReferralConfig(_Strict):
    #: Points for the referrer when a referee first converts (once per referee).
    points: int = Field(0, ge=0)
    #: Telegram bot username: /invite then shows https://t.me/<bot>?start=ref_<code>.
    telegram_bot: str | None = None
    #: A typed code (``邀请码 CODE``) counts only within this many hours of the referee's first contact.
    code_window_hours: int = Field(24, gt=0)


class SurveyConfig(_Strict):
    kind: Literal["csat", "nps"] = "csat"
    #: Ask after each customer's conversion (at most one per conversion), ``delay`` later.
    after_conversion: bool = True
    delay_hours: float = Field(24, ge=0)
    #: Answers later than this are politely refused.
    answer_hours: float = Field(72, gt=0)
    #: Scores at or below this are detractors (default: CSAT 2, NPS 6).
    low_score: int | None = Field(None, ge=0, le=10)
    points: int = Field(0, ge=0)


class FollowupRule(_Strict):
    """A follow-up task for each customer matching ``when`` (a segment expression), once while open."""

    kind: str = Field(pattern=r"^[a-z0-9_-]{1,16}$")
    when: Expression
    note: str = ""


class FollowupConfig(_Strict):
    #: Owner for customers no one added or assigned ("<channel>:<id>", like ``[staff]`` keys).
    default_owner: str | None = None
    #: A message with one of these, without a conversion within ``intent_days``, makes a task.
    intent_keywords: list[str] = ["价格", "多少钱"]
    intent_days: int = Field(3, gt=0)
    rules: list[FollowupRule] = []
    #: Daily task digest, "HH:MM" in each staff member's time zone (``timezones``, else the service's).
    digest_at: str = Field("09:00", pattern=_HHMM)
    timezones: dict[str, str] = {}
    #: Channels where staff answer customers; a customer message unanswered this long alerts the owner.
    staffed_channels: list[str] = []
    waiting_minutes: int = Field(30, gt=0)


class ChurnConfig(_Strict):
    #: ``auto``: BG/NBD + Gamma-Gamma when the ``analytics`` extra is installed, else rules.
    method: Literal["auto", "rules"] = "auto"
    #: Customers with fewer repeat purchases get the rule-based risk.
    min_repeat: int = Field(1, ge=0)
    horizon_days: int = Field(90, gt=0)


class LoyaltyConfig(_Strict):
    """Points, tiers, referrals, surveys, follow-ups and scores (see scrm.loyalty)."""

    #: Points per currency unit of an order (rounded down).
    points_per_amount: float = Field(1.0, ge=0)
    #: Points for ``签到`` (once per local day).
    checkin_points: int = Field(0, ge=0)
    #: Points expire at the end of the Nth month after the month they were earned (none = never).
    expiry_months: int | None = Field(12, gt=0)
    #: Ascending; the first is the base tier everyone starts in.
    tiers: list[LoyaltyTier] = []
    rewards: dict[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")], LoyaltyReward] = {}
    referral: ReferralConfig = ReferralConfig()
    surveys: SurveyConfig | None = None
    followups: FollowupConfig = FollowupConfig()
    churn: ChurnConfig = ChurnConfig()
    #: Co-purchase pairs need at least this many customers who bought both.
    min_pair_customers: int = Field(2, gt=0)
    #: How often conversions, referrals, surveys and tasks are swept; nightly jobs' time (service zone).
    sweep_seconds: float = Field(30, gt=0)
    nightly_at: str = Field("02:30", pattern=_HHMM)


class Config(_Strict):
    service: ServiceConfig = ServiceConfig()
    store: StoreConfig = StoreConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    cluster: ClusterConfig = ClusterConfig()
    ingest: IngestConfig = IngestConfig()
    campaigns: CampaignsConfig = CampaignsConfig()
    replies: RepliesConfig = RepliesConfig()
    tagging: TaggingConfig = TaggingConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    #: Named segments: ``name = "expression"`` (see scrm.segments for the language).
    segments: dict[str, Expression] = {}
    profiles: ProfilesConfig = ProfilesConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    coupons: dict[str, CouponPool] = {}
    privacy: PrivacyConfig = PrivacyConfig()
    #: ``"<channel>:<external id>" = role`` for staff who may run staff chat commands.
    staff: dict[str, Role] = {}
    reports: ReportsConfig = ReportsConfig()
    #: Raw per-channel account settings, validated by each channel's own model (see handlers).
    channels: dict[str, dict[str, dict[str, Any]]] = {}
    api: ApiConfig = ApiConfig()
    console: ConsoleConfig = ConsoleConfig()
    links: LinksConfig = LinksConfig()
    #: Outbound webhook subscriptions by name (more can be made through the API).
    webhooks: dict[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$")], WebhookSubscriptionConfig] = {}
    webhook_delivery: WebhookDeliveryConfig = WebhookDeliveryConfig()
    conversations: ConversationsConfig = ConversationsConfig()
    logging: LoggingConfig = LoggingConfig()
    #: Points, tiers, referrals, surveys and follow-ups; absent = off (see scrm.loyalty).
    loyalty: LoyaltyConfig | None = None
    #: Folder the config file lives in; relative paths in the file are relative to it.
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _segment_references(self) -> Config:
        from scrm.segments import check

        problems = []
        for name, text in self.segments.items():
            if problem := check(text, self.segments):
                problems.append(f"segments.{name}: {problem}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _conversation_agents(self) -> Config:
        problems = [f"conversations.agents.{i}: {agent!r} is not an operator or admin in [staff]"
                    for i, agent in enumerate(self.conversations.agents)
                    if self.staff.get(agent) not in ("operator", "admin")]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.base_dir / p

    @property
    def store_url(self) -> str:
        """The store URL with a relative SQLite path resolved against the config's folder."""
        url = self.store.url
        prefix = "sqlite+aiosqlite:///"
        if url.startswith(prefix) and not url[len(prefix):].startswith(("/", ":memory:")):
            return prefix + str(self.resolve(url[len(prefix):]))
        return url
