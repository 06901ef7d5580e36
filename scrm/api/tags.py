"""``/tags``: the tags customers hold, with how many hold each (:func:`scrm.reports.top_tags`, as chat's
``/top tags`` and the console's dashboard count them)."""

from __future__ import annotations

from scrm import reports
from scrm.api import models as m
from scrm.api.framework import Call, Endpoint
from scrm.store.engine import reading


async def list_tags(call: Call) -> m.TagList:
    query: m.LimitQuery = call.query
    svc = call.service
    async with reading(svc.sessions) as session:
        rows = await reports.top_tags(session, svc.clock.now(), query.limit)
    return m.TagList(tags=[m.TagCount(name=name, customers=held, added_7d=recent) for name, held, recent in rows])


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/tags", list_tags, "tags:read", "Tags with the customers holding each, the most held first",
             m.TagList, query=m.LimitQuery),
]
