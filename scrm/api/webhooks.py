"""``/webhooks``: outbound webhook subscriptions made, read, changed and removed, their delivery log, test
events and replays; through :mod:`scrm.webhooks` as ``scrm webhooks`` does."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from scrm.api.framework import ApiError, Call, Endpoint
from scrm.webhooks import log, subscriptions
from scrm.webhooks.events import EventKind

_NAME = {"name": "The subscription's name"}
SubscriptionName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$")]
Url = Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=2000)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubscriptionIn(_In):
    name: SubscriptionName
    url: Url
    #: The event kinds to send; empty: every kind.
    events: list[EventKind] = []


class SubscriptionPatch(_In):
    url: Url | None = None
    events: list[EventKind] | None = None
    #: true turns a subscription disabled after failures on again (and clears its run of failures).
    enabled: bool | None = None


class SubscriptionOut(BaseModel):
    name: str
    url: str
    events: list[str]
    source: str
    enabled: bool
    failures: int
    disabled_reason: str | None
    #: Events still to deliver.
    pending: int


class SubscriptionCreated(SubscriptionOut):
    #: The signing secret (Standard Webhooks, ``whsec_...``): shown this once.
    secret: str


class SubscriptionList(BaseModel):
    webhooks: list[SubscriptionOut]


class AttemptOut(BaseModel):
    at: str
    webhook_id: str
    type: str
    customer_id: int | None
    status: str
    http_status: int | None
    latency_ms: float
    error: str | None


class AttemptList(BaseModel):
    attempts: list[AttemptOut]


class LogQuery(_In):
    #: Only attempts at or after this moment (ISO 8601; UTC when no offset is given).
    since: datetime | None = None
    limit: int = Field(50, ge=1, le=1000)


class ReplayIn(_In):
    #: Events written at or after this moment (ISO 8601; UTC when no offset is given).
    since: datetime


class Queued(BaseModel):
    queued: int


class TestQueued(BaseModel):
    webhook_id: str


def _out(view: subscriptions.SubscriptionView) -> SubscriptionOut:
    return SubscriptionOut(name=view.name, url=view.url, events=view.events, source=view.source, enabled=view.enabled,
                           failures=view.failures, disabled_reason=view.disabled_reason, pending=view.pending)


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def _not_found(exc: LookupError) -> ApiError:
    return ApiError(404, "webhook_not_found", str(exc.args[0]))


def _refused(exc: subscriptions.SubscriptionError) -> ApiError:
    return ApiError(409, "webhook_conflict", str(exc))


async def list_webhooks(call: Call) -> SubscriptionList:
    from sqlalchemy import select

    from scrm.store.models import WebhookSubscription

    async with call.service.sessions() as session:
        pending = await log.pending_counts(session)
        rows = (await session.scalars(select(WebhookSubscription).order_by(WebhookSubscription.name))).all()
        return SubscriptionList(webhooks=[_out(subscriptions.SubscriptionView.of(r, pending.get(r.id, 0))) for r in rows])


async def create_webhook(call: Call) -> tuple[int, SubscriptionCreated]:
    body: SubscriptionIn = call.body
    svc = call.service
    try:
        async with svc.sessions() as session, session.begin():
            row, secret = await subscriptions.create(session, body.name, body.url, list(body.events), svc.clock.now())
            view = subscriptions.SubscriptionView.of(row)
    except subscriptions.SubscriptionError as exc:
        raise _refused(exc) from None
    await svc.webhook_worker.refresh()
    return 201, SubscriptionCreated(**_out(view).model_dump(), secret=secret)


async def get_webhook(call: Call) -> SubscriptionOut:
    async with call.service.sessions() as session:
        try:
            row = await subscriptions.named(session, call.params["name"])
        except LookupError as exc:
            raise _not_found(exc) from None
        return _out(subscriptions.SubscriptionView.of(row, (await log.pending_counts(session)).get(row.id, 0)))


async def update_webhook(call: Call) -> SubscriptionOut:
    body: SubscriptionPatch = call.body
    svc = call.service
    try:
        async with svc.sessions() as session, session.begin():
            row = await subscriptions.update_api(
                session, call.params["name"], svc.clock.now(), url=body.url,
                events=list(body.events) if body.events is not None else None, enabled=body.enabled)
            view = subscriptions.SubscriptionView.of(row)
    except LookupError as exc:
        raise _not_found(exc) from None
    except subscriptions.SubscriptionError as exc:
        raise _refused(exc) from None
    await svc.webhook_worker.refresh()
    return _out(view)


async def delete_webhook(call: Call) -> SubscriptionOut:
    svc = call.service
    try:
        async with svc.sessions() as session, session.begin():
            view = subscriptions.SubscriptionView.of(await subscriptions.named(session, call.params["name"]))
            await subscriptions.remove(session, call.params["name"])
    except LookupError as exc:
        raise _not_found(exc) from None
    except subscriptions.SubscriptionError as exc:
        raise _refused(exc) from None
    await svc.webhook_worker.refresh()
    return _out(view)


async def webhook_attempts(call: Call) -> AttemptList:
    query: LogQuery = call.query
    async with call.service.sessions() as session:
        try:
            await subscriptions.named(session, call.params["name"])
        except LookupError as exc:
            raise _not_found(exc) from None
        found = await log.attempts(session, call.params["name"], _utc(query.since) if query.since else None,
                                   query.limit)
    return AttemptList(attempts=[AttemptOut(
        at=a.at.isoformat(timespec="milliseconds") + "Z", webhook_id=a.event_id, type=a.kind, customer_id=a.customer_id,
        status=a.status, http_status=a.http_status, latency_ms=a.latency_ms, error=a.error) for a in found])


async def test_webhook(call: Call) -> tuple[int, TestQueued]:
    svc = call.service
    try:
        async with svc.sessions() as session, session.begin():
            event_id = await log.send_test(session, call.params["name"], svc.clock.now())
    except LookupError as exc:
        raise _not_found(exc) from None
    svc.webhook_worker.wake()
    return 202, TestQueued(webhook_id=event_id)


async def replay_webhook(call: Call) -> tuple[int, Queued]:
    body: ReplayIn = call.body
    svc = call.service
    try:
        async with svc.sessions() as session, session.begin():
            queued = await log.replay(session, call.params["name"], _utc(body.since), svc.clock.now(),
                                      svc.config.webhook_delivery.retry_hours)
    except LookupError as exc:
        raise _not_found(exc) from None
    svc.webhook_worker.wake()
    return 202, Queued(queued=queued)


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/webhooks", list_webhooks, "webhooks:read", "Webhook subscriptions", SubscriptionList,
             description="From the config ([webhooks.<name>]) and made here, with the events each still has to deliver."),
    Endpoint("POST", "/webhooks", create_webhook, "webhooks:write", "Subscribe an endpoint to events",
             SubscriptionCreated, body=SubscriptionIn, status=201, errors=(409,),
             description="Events are signed per Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature) "
                         "with the secret in the answer, shown only here. A name in use is 409 webhook_conflict."),
    Endpoint("GET", "/webhooks/{name}", get_webhook, "webhooks:read", "A webhook subscription", SubscriptionOut,
             params=_NAME, errors=(404,)),
    Endpoint("PATCH", "/webhooks/{name}", update_webhook, "webhooks:write", "Change a webhook subscription",
             SubscriptionOut, body=SubscriptionPatch, params=_NAME, errors=(404, 409),
             description="URL and events of one made here (a config one is changed in the config: 409); enabled "
                         "for either (a subscription disabled after failures resumes with its waiting events)."),
    Endpoint("DELETE", "/webhooks/{name}", delete_webhook, "webhooks:write", "Remove a webhook subscription",
             SubscriptionOut, params=_NAME, errors=(404, 409),
             description="With its undelivered events and its log; a config subscription is removed in the config."),
    Endpoint("GET", "/webhooks/{name}/attempts", webhook_attempts, "webhooks:read", "A subscription's delivery log",
             AttemptList, params=_NAME, query=LogQuery, errors=(404,),
             description="Every request made to the endpoint, newest first, with its HTTP status and latency."),
    Endpoint("POST", "/webhooks/{name}/test", test_webhook, "webhooks:write", "Send a webhook.test event",
             TestQueued, params=_NAME, status=202, errors=(404,)),
    Endpoint("POST", "/webhooks/{name}/replay", replay_webhook, "webhooks:write",
             "Send a subscription's events since a moment again", Queued, body=ReplayIn, params=_NAME, status=202,
             errors=(404,), description="In the order they were written, with their webhook-ids."),
]
