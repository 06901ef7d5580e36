"""``/segments``: the configured segments with their counts, a preview of one, and a count and preview of
any expression (:mod:`scrm.segments`, as ``scrm segments`` and the console's segments page).

A preview lists id, display name, stage and when last seen, as the console's does; the API records it
in the audit log with the key that read it, as it records every read of customers it answers.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement

from scrm import segments
from scrm.api import models as m
from scrm.api.framework import ApiError, Call, Endpoint
from scrm.audit import audit
from scrm.store.engine import reading, writing


async def list_segments(call: Call) -> m.SegmentList:
    svc = call.service
    configured, now = svc.config.segments, svc.clock.now()
    async with reading(svc.sessions) as session:
        counted = await segments.counts(session, {n: segments.condition(t, now, configured)
                                                  for n, t in configured.items()})
    return m.SegmentList(segments=[m.SegmentOut(name=n, expression=configured[n], count=counted[n])
                                   for n in sorted(configured)])


async def _preview(call: Call, name: str | None, expression: str, where: ColumnElement[bool],
                   limit: int) -> m.SegmentPreview:
    svc = call.service
    async with reading(svc.sessions) as session:
        total, members = await segments.preview(session, where, limit)
    if members:
        async with writing(svc.sessions) as session:
            await audit(session, call.actor, None, None, "view",
                        f"api segment preview {name or expression[:200]!r}: {len(members)} customers",
                        via=call.actor, at=svc.clock.now())
    return m.SegmentPreview(name=name, expression=expression, count=total, members=[
        m.SegmentMember(id=r.id, display_name=r.name, stage=r.stage,
                        last_seen_at=r.last_seen_at.isoformat(timespec="seconds")) for r in members])


async def get_segment(call: Call) -> m.SegmentPreview:
    query: m.PreviewQuery = call.query
    configured = call.service.config.segments
    name = call.params["name"]
    if name not in configured:
        raise ApiError(404, "segment_not_found", f"no segment {name[:64]!r} in the config")
    where = segments.condition(configured[name], call.service.clock.now(), configured)
    return await _preview(call, name, configured[name], where, query.limit)


async def preview_expression(call: Call) -> m.SegmentPreview:
    body: m.SegmentPreviewIn = call.body
    configured = call.service.config.segments
    try:
        where = segments.typed(body.expression, call.service.clock.now(), configured)
    except segments.ExpressionError as exc:
        raise ApiError(422, "validation_error", f"body.expression: {exc}",
                       [{"field": "body.expression", "problem": str(exc)}]) from None
    return await _preview(call, None, body.expression, where, body.limit)


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/segments", list_segments, "segments:read", "The configured segments with their counts",
             m.SegmentList, description="Each count is a pass over the customers, read now."),
    Endpoint("GET", "/segments/{name}", get_segment, "segments:read",
             "A configured segment's count and its first customers", m.SegmentPreview,
             params={"name": "The segment's name in [segments]"}, query=m.PreviewQuery, errors=(404,)),
    Endpoint("POST", "/segments/preview", preview_expression, "segments:read",
             "Count and preview any segment expression", m.SegmentPreview, body=m.SegmentPreviewIn,
             description="Writes nothing; an expression that does not compile is 422 naming body.expression."),
]
