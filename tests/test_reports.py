"""Reports against a generated data set whose true figures are computed here, independently, in
Python: /report (both periods), /funnel (per variant and channel, skips), attribution, stages,
cohorts, top tags; through the functions, the staff chat commands and the CLI — on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from scrm import reports
from scrm.clock import ManualClock
from scrm.commands import OPT_OUT_REPLY
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.models import (
    Conversion,
    Coupon,
    CouponCode,
    Customer,
    CustomerTag,
    Delivery,
    Identity,
    Redemption,
    Tag,
    Touchpoint,
)
from tests.conftest import cli_env

NOW = datetime(2026, 11, 27, 12, 0, 0)  # a Friday; 20:00 in Asia/Shanghai
TZ = "Asia/Shanghai"
ATTRIBUTION = timedelta(days=7)
MESSAGE_KINDS = {"text", "image", "voice", "video", "location", "link", "command"}
STAGES = ["acquisition", "nurture", "retention", "upsell", "winback"]


@dataclass
class World:
    """What was written, kept as plain Python records for the truth computations."""

    customers: list[dict[str, Any]] = field(default_factory=list)
    touchpoints: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    codes: list[dict[str, Any]] = field(default_factory=list)
    conversions: list[dict[str, Any]] = field(default_factory=list)
    tags: list[dict[str, Any]] = field(default_factory=list)


def at(rng: random.Random, start: datetime, end: datetime) -> datetime:
    """A random whole-second moment in (start, end]."""
    span = int((end - start).total_seconds())
    return start + timedelta(seconds=rng.randint(1, max(1, span)))


def generate(seed: int = 11, n: int = 70) -> World:
    rng = random.Random(seed)
    w = World()
    for i in range(n):
        first = at(rng, NOW - timedelta(days=45), NOW - timedelta(hours=1))
        channel = rng.choice(["wechat", "telegram", "console"])
        moves, stage, t = [], "acquisition", first
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            t = at(rng, t, NOW)
            new = rng.choice([s for s in STAGES if s != stage])
            moves.append((t, stage, new))
            stage = new
        w.customers.append({"i": i, "first": first, "channel": channel, "stage": stage, "moves": moves,
                            "source": rng.choice([None, "qr_store", "ad_spring"]),
                            "second_channel": rng.choice([None, None, "wecom"])})
    for c in w.customers:
        for _ in range(rng.randint(0, 6)):
            kind = rng.choice(["text", "text", "image", "command", "subscribe", "menu_click"])
            w.touchpoints.append({"c": c["i"], "direction": "in", "kind": kind, "at": at(rng, c["first"], NOW)})
        for _ in range(rng.randint(0, 3)):
            kind = rng.choice(["reply", "campaign_message", "coupon_granted"])
            w.touchpoints.append({"c": c["i"], "direction": "out" if kind != "coupon_granted" else "internal",
                                  "kind": kind, "at": at(rng, c["first"], NOW)})
        if rng.random() < 0.15:
            w.touchpoints.append({"c": c["i"], "direction": "in", "kind": rng.choice(["unsubscribe", "blocked"]),
                                  "at": at(rng, c["first"], NOW)})
        if rng.random() < 0.15:
            t = at(rng, c["first"], NOW)
            w.touchpoints.append({"c": c["i"], "direction": "in", "kind": "text", "at": t, "text": "退订"})
            w.touchpoints.append({"c": c["i"], "direction": "out", "kind": "reply", "at": t, "text": OPT_OUT_REPLY})
        for t, old, new in c["moves"]:
            w.touchpoints.append({"c": c["i"], "direction": "internal", "kind": "stage_changed", "at": t,
                                  "payload": {"from": old, "to": new}})
    # Campaign deliveries: "spring" has A/B variants and two steps, "welcome" none.
    statuses = (["sent"] * 6 + ["planned", "sending", "skipped", "skipped", "failed", "unknown"])
    reasons = {"skipped": ["opted_out", "frequency_cap", "quiet_hours", "outside_48h_window"],
               "failed": ["api_error", None], "unknown": ["crashed_mid_send"]}
    for c in w.customers:
        for campaign, steps in (("spring", (0, 1)), ("welcome", (0,))):
            for step in steps:
                if rng.random() < 0.35:
                    continue
                status = rng.choice(statuses)
                finished = None if status in ("planned", "sending") else at(rng, max(c["first"], NOW - timedelta(days=20)), NOW)
                w.deliveries.append({
                    "id": len(w.deliveries) + 1, "c": c["i"], "campaign": campaign, "step": step,
                    "variant": rng.choice(["A", "B"]) if campaign == "spring" else None, "channel": c["channel"],
                    "status": status, "reason": rng.choice(reasons[status]) if status in reasons else None,
                    "finished": finished})
    sent = [d for d in w.deliveries if d["status"] == "sent"]
    for d in sent:  # replies near the send, including both sides of the 48 h edge
        offset = rng.choice([None, timedelta(hours=5), timedelta(hours=48), timedelta(hours=48, seconds=1),
                             timedelta(hours=30), -timedelta(hours=2)])
        if offset is not None:
            w.touchpoints.append({"c": d["c"], "direction": "in", "kind": "text", "at": d["finished"] + offset})
    for d in sent:
        if rng.random() < 0.5:
            redeemed = at(rng, d["finished"], d["finished"] + timedelta(days=10)) if rng.random() < 0.5 else None
            w.codes.append({"c": d["c"], "delivery": d["id"], "granted": d["finished"], "redeemed": redeemed,
                            "campaign": d["campaign"]})
    for c in w.customers[:10]:  # codes not granted by a campaign
        w.codes.append({"c": c["i"], "delivery": None, "granted": at(rng, c["first"], NOW),
                        "redeemed": None, "campaign": None})
    for code in w.codes:  # a redemption is a conversion that keeps the granting campaign
        if code["redeemed"] is not None:
            w.conversions.append({"c": code["c"], "amount": 0.0, "at": code["redeemed"], "campaign": code["campaign"],
                                  "kind": "coupon_redemption"})
    for c in w.customers:
        for _ in range(rng.choice([0, 0, 1, 2])):
            w.conversions.append({"c": c["i"], "amount": float(rng.choice([49, 99, 250.5])),
                                  "at": at(rng, max(c["first"], NOW - timedelta(days=25)), NOW), "campaign": None,
                                  "kind": "order"})
    # Exact edges of the 7-day attribution window, and a labelled conversion with no delivery at all.
    edge = next(d for d in sent if d["finished"] < NOW - timedelta(days=8))
    w.conversions.append({"c": edge["c"], "amount": 7.0, "at": edge["finished"] + ATTRIBUTION, "campaign": None, "kind": "order"})
    w.conversions.append({"c": edge["c"], "amount": 8.0, "at": edge["finished"] + ATTRIBUTION + timedelta(seconds=1),
                          "campaign": None, "kind": "order"})
    lonely = next(c for c in w.customers if not any(d["c"] == c["i"] and d["campaign"] == "spring" and d["status"] == "sent"
                                                   for d in w.deliveries))
    w.conversions.append({"c": lonely["i"], "amount": 5.0, "at": NOW - timedelta(days=1), "campaign": "spring",
                          "kind": "manual"})
    for c in w.customers:
        for name in ("奶粉", "vip", "coupon-seeker", "price-sensitive"):
            if rng.random() < 0.4:
                w.tags.append({"c": c["i"], "tag": name, "added": at(rng, c["first"], NOW),
                               "expires": rng.choice([None, None, NOW - timedelta(days=1), NOW + timedelta(days=3)])})
    clicks = random.Random(seed + 1)  # its own draws: the world above stays what it was before links were tracked
    for d in w.deliveries:  # tracked-link visits: clicks (some twice), and link previews, which count nobody
        if d["status"] == "sent" or clicks.random() < 0.1:
            moment = d["finished"] or NOW - timedelta(days=1)
            for kind in clicks.choice([[], [], ["click"], ["click", "click"], ["link_preview"], ["link_preview", "click"]]):
                w.touchpoints.append({"c": d["c"], "direction": "in", "kind": kind, "campaign": d["campaign"],
                                      "delivery": d["id"], "at": at(clicks, moment, moment + timedelta(days=2))})
    return w


async def load(service: Service, w: World) -> dict[int, int]:
    """Write the world; returns generated index -> customer id."""
    ids: dict[int, int] = {}
    async with service.sessions() as s, s.begin():
        for c in w.customers:
            row = Customer(display_name=f"g{c['i']}", stage=c["stage"], acquisition_source=c["source"],
                           first_seen_at=c["first"], last_seen_at=NOW, attributes={})
            s.add(row)
            await s.flush()
            ids[c["i"]] = row.id
            s.add(Identity(customer_id=row.id, channel=c["channel"], account="a", external_id=f"g{c['i']}",
                           created_at=c["first"]))
            await s.flush()
            if c["second_channel"]:
                s.add(Identity(customer_id=row.id, channel=c["second_channel"], account="a", external_id=f"w{c['i']}",
                               created_at=NOW))
        for t in w.touchpoints:
            s.add(Touchpoint(customer_id=ids[t["c"]], channel="wechat", account="a", direction=t["direction"],
                             kind=t["kind"], text=t.get("text"), payload=t.get("payload", {}), created_at=t["at"],
                             campaign=t.get("campaign"), delivery_id=t.get("delivery")))
        for d in w.deliveries:
            s.add(Delivery(id=d["id"], campaign=d["campaign"], step=d["step"], target=f"c{ids[d['c']]}",
                           customer_id=ids[d["c"]], channel=d["channel"], account="a", external_id="x",
                           variant=d["variant"], status=d["status"], reason=d["reason"], due_at=NOW - timedelta(days=30),
                           created_at=NOW - timedelta(days=30), finished_at=d["finished"]))
        coupon = Coupon(name="gen", value=10)
        s.add(coupon)
        await s.flush()
        for n, code in enumerate(w.codes):
            row = CouponCode(coupon_id=coupon.id, code=f"GEN{n:04d}", customer_id=ids[code["c"]],
                             delivery_id=code["delivery"], granted_at=code["granted"], redeemed_at=code["redeemed"])
            s.add(row)
            await s.flush()
            if code["redeemed"]:
                s.add(Redemption(code_id=row.id, customer_id=ids[code["c"]], via="cli", redeemed_at=code["redeemed"]))
        for conv in w.conversions:
            s.add(Conversion(customer_id=ids[conv["c"]], kind=conv["kind"], amount=conv["amount"],
                             campaign=conv["campaign"], created_at=conv["at"]))
        tag_ids: dict[str, int] = {}
        for t in w.tags:
            if t["tag"] not in tag_ids:
                tag = Tag(name=t["tag"])
                s.add(tag)
                await s.flush()
                tag_ids[t["tag"]] = tag.id
            s.add(CustomerTag(customer_id=ids[t["c"]], tag_id=tag_ids[t["tag"]], source="operator", added_at=t["added"],
                              expires_at=t["expires"]))
    return ids


# --- the truth, computed from the records ----------------------------------------------------------

def inside(t: datetime | None, since: datetime, until: datetime) -> bool:
    return t is not None and since < t <= until


def credited_delivery(w: World, conv: dict[str, Any]) -> dict[str, Any] | None:
    sends = [d for d in w.deliveries if d["c"] == conv["c"] and d["status"] == "sent" and d["finished"] <= conv["at"]]
    if conv["campaign"] is not None:
        sends = [d for d in sends if d["campaign"] == conv["campaign"]]
    else:
        sends = [d for d in sends if d["finished"] >= conv["at"] - ATTRIBUTION]
    return max(sends, key=lambda d: (d["finished"], d["id"]), default=None)


def credited_campaign(w: World, conv: dict[str, Any]) -> str | None:
    if conv["campaign"] is not None:
        return conv["campaign"]
    d = credited_delivery(w, conv)
    return d["campaign"] if d else None


def stage_at(c: dict[str, Any], moment: datetime) -> str:
    stage = "acquisition"
    for t, _, new in c["moves"]:
        if t <= moment:
            stage = new
    return stage


def truth(w: World, since: datetime, until: datetime) -> dict[str, Any]:
    new = [c for c in w.customers if inside(c["first"], since, until)]
    tps = [t for t in w.touchpoints if inside(t["at"], since, until)]
    inbound = [t for t in tps if t["direction"] == "in" and t["kind"] in MESSAGE_KINDS]
    sends = [d for d in w.deliveries if d["status"] == "sent" and inside(d["finished"], since, until)]
    convs = [c for c in w.conversions if inside(c["at"], since, until)]
    by_campaign: dict[str, dict[str, float]] = {}
    for conv in convs:
        if (campaign := credited_campaign(w, conv)) is not None:
            entry = by_campaign.setdefault(campaign, {"conversions": 0, "revenue": 0.0})
            entry["conversions"] += 1
            entry["revenue"] += conv["amount"]
    stages = Counter(stage_at(c, until) for c in w.customers if c["first"] <= until)
    return {
        "new_customers": len(new),
        "new_by_channel": dict(Counter(c["channel"] for c in new)),
        "new_by_source": dict(Counter(c["source"] or "-" for c in new)),
        "active_customers": len({t["c"] for t in inbound}),
        "messages_in": len(inbound),
        "messages_out": sum(t["direction"] == "out" and t["kind"] in ("reply", "campaign_message") for t in tps),
        "opt_outs": sum(t["kind"] in ("unsubscribe", "blocked") or (t["kind"] == "reply" and t.get("text") == OPT_OUT_REPLY)
                        for t in tps),
        "campaign_sends": len(sends),
        "coupons_granted": sum(inside(c["granted"], since, until) for c in w.codes),
        "coupon_redemptions": sum(inside(c["redeemed"], since, until) for c in w.codes),
        "conversions": len(convs),
        "revenue": round(sum(c["amount"] for c in convs), 2),
        "attributed_conversions": sum(int(v["conversions"]) for v in by_campaign.values()),
        "attributed_revenue": round(sum(v["revenue"] for v in by_campaign.values()), 2),
        "by_campaign": {k: {"conversions": v["conversions"], "revenue": round(v["revenue"], 2)} for k, v in by_campaign.items()},
        "reached_customers": len({d["c"] for d in sends}),
        "converted_customers": len({c["c"] for c in convs}),
        "stages": {k: v for k, v in sorted(stages.items()) if v},
        "stage_moves": dict(Counter(f"{t['payload']['from']}>{t['payload']['to']}" for t in tps if t["kind"] == "stage_changed")),
    }


def funnel_truth(w: World, campaign: str) -> dict[str, Any]:
    cells: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    revenue: dict[tuple[str, str], float] = defaultdict(float)
    inbound = [t for t in w.touchpoints if t["direction"] == "in" and t["kind"] in MESSAGE_KINDS]
    redeemed_by = {c["delivery"] for c in w.codes if c["delivery"] is not None and c["redeemed"] is not None}
    clicked_by = {t["delivery"] for t in w.touchpoints if t["kind"] == "click"}
    clickers: dict[tuple[str, str], set[int]] = defaultdict(set)  # customers, each once however often they clicked
    credited = [(conv, credited_delivery(w, conv)) for conv in w.conversions
                if conv["campaign"] in (None, campaign)]
    credited = [(conv, d) for conv, d in credited if d is not None and d["campaign"] == campaign]
    for d in w.deliveries:
        if d["campaign"] != campaign:
            continue
        cell = cells[(d["variant"] or "-", d["channel"])]
        cell["audience"] += 1
        cell["sent"] += d["status"] in ("sending", "sent", "failed", "unknown")
        if d["status"] == "sent":
            cell["delivered"] += 1
            cell["replied"] += any(t["c"] == d["c"] and d["finished"] < t["at"] <= d["finished"] + timedelta(hours=48)
                                   for t in inbound)
            cell["redeemed"] += d["id"] in redeemed_by
            if d["id"] in clicked_by:
                clickers[(d["variant"] or "-", d["channel"])].add(d["c"])
            cell["converted"] += any(cd["id"] == d["id"] for _, cd in credited)
    for key, people in clickers.items():
        cells[key]["clicked"] = len(people)
    for conv, d in credited:
        key = (d["variant"] or "-", d["channel"])
        cells[key]["conversions"] += 1
        revenue[key] += conv["amount"]
    unassigned = sum(conv["campaign"] == campaign and credited_delivery(w, conv) is None for conv in w.conversions)
    skips = Counter(d["reason"] or d["status"] for d in w.deliveries
                    if d["campaign"] == campaign and d["status"] in ("skipped", "failed", "unknown"))

    def total(keys: list[tuple[str, str]]) -> dict[str, Any]:
        out = {k: sum(cells[key][k] for key in keys) for k in (*reports.STEPS, "conversions")}
        out["revenue"] = round(sum(revenue[key] for key in keys), 2)
        return out

    everything = total(list(cells))
    everything["conversions"] += unassigned
    return {
        "total": everything,
        "by_variant": {v: total([k for k in cells if k[0] == v]) for v in sorted({k[0] for k in cells})},
        "by_channel": {ch: total([k for k in cells if k[1] == ch]) for ch in sorted({k[1] for k in cells})},
        "skips": dict(skips), "unassigned": unassigned,
    }


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
async def world(make_config):
    config = make_config({"staff": {"console:bob": "manager", "console:olga": "operator"}})
    service = Service(config, ManualClock(NOW))
    await service.start(scheduler=False)
    w = generate()
    ids = await load(service, w)
    yield service, w, ids
    await service.stop()


def comparable(figures: dict[str, Any]) -> dict[str, Any]:
    keys = ("new_customers", "new_by_channel", "new_by_source", "active_customers", "messages_in", "messages_out",
            "opt_outs", "campaign_sends", "coupons_granted", "coupon_redemptions", "conversions", "revenue",
            "attributed_conversions", "attributed_revenue", "by_campaign", "reached_customers", "converted_customers",
            "stages", "stage_moves")
    return {k: figures[k] for k in keys}


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("days", [7, 30])
async def test_report_figures_match_truth_for_both_periods(world, days):
    service, w, _ = world
    async with service.sessions() as s:
        data = (await reports.summary(s, NOW, days)).as_dict()
    since = NOW - timedelta(days=days)
    expected, before = truth(w, since, NOW), truth(w, since - timedelta(days=days), since)
    assert expected["new_customers"] and expected["stage_moves"] and expected["attributed_conversions"]
    assert expected["opt_outs"] and expected != before
    assert comparable(data) == expected
    assert comparable(data["previous"]) == before
    rate = expected["converted_customers"] / expected["reached_customers"]
    assert data["conversion_rate"] == round(rate, 4)


async def test_attribution_window_edges_are_exact(world):
    service, w, ids = world
    edge_7d, edge_7d_1s = w.conversions[-3], w.conversions[-2]
    assert credited_delivery(w, edge_7d) is not None and credited_delivery(w, edge_7d_1s) is None
    async with service.sessions() as s:
        conv = reports.attributed_conversions(s, 7)
        rows = dict((await s.execute(
            __import__("sqlalchemy").select(conv.c.amount, conv.c.delivery_id).where(
                conv.c.customer_id == ids[edge_7d["c"]], conv.c.amount.in_((7.0, 8.0))))).all())
    assert rows == {7.0: credited_delivery(w, edge_7d)["id"], 8.0: None}


async def test_funnel_matches_truth_per_variant_and_channel(world):
    service, w, _ = world
    for campaign in ("spring", "welcome"):
        async with service.sessions() as s:
            result = await reports.funnel(s, campaign)
        assert result is not None
        data, expected = result.as_dict(), funnel_truth(w, campaign)
        steps = (*reports.STEPS, "conversions", "revenue")
        assert {k: data[k] for k in steps} == expected["total"], campaign
        assert {v: {k: row[k] for k in steps} for v, row in data["by_variant"].items()} == expected["by_variant"]
        assert {c: {k: row[k] for k in steps} for c, row in data["by_channel"].items()} == expected["by_channel"]
        assert data["skips"] == expected["skips"]
        assert data["unassigned_conversions"] == expected["unassigned"]
        t = expected["total"]
        assert data["rates"]["delivered"] == round(t["delivered"] / t["sent"], 4)
        assert data["rates"]["replied"] == round(t["replied"] / t["delivered"], 4)
    spring = funnel_truth(w, "spring")
    assert set(spring["by_variant"]) == {"A", "B"} and spring["unassigned"] == 1
    assert {"opted_out", "frequency_cap", "crashed_mid_send"} <= set(spring["skips"])
    assert all(spring["total"][k] for k in reports.STEPS)
    async with service.sessions() as s:
        assert await reports.funnel(s, "nope") is None


async def test_the_grouped_funnels_equal_each_campaigns_funnel(world):
    """The console's campaign list asks for every funnel in one grouped query: each equals the
    campaign's own funnel and the truth, though the two campaigns reach the same customers and an
    unlabelled order goes to whichever of them sent last."""
    service, w, _ = world
    async with service.sessions() as s:
        grouped = await reports.funnels(s, ["welcome", "nope", "spring"])
        alone = {c: await reports.funnel(s, c) for c in ("spring", "welcome")}
        assert await reports.funnels(s, []) == {} and await reports.funnels(s, ["nope"]) == {}
    assert set(grouped) == {"spring", "welcome"}  # one that never planned is left out, as funnel() says None
    steps = (*reports.STEPS, "conversions", "revenue")
    shared = {c["i"] for c in w.customers
              if {d["campaign"] for d in w.deliveries if d["c"] == c["i"] and d["status"] == "sent"} == {"spring", "welcome"}}
    assert shared and sum(1 for conv in w.conversions if conv["c"] in shared and conv["campaign"] is None) > 1
    for campaign in ("spring", "welcome"):
        funnel = alone[campaign]
        assert funnel is not None
        assert grouped[campaign].as_dict() == funnel.as_dict(), campaign
        expected = funnel_truth(w, campaign)
        assert {k: grouped[campaign].as_dict()[k] for k in steps} == expected["total"], campaign
        assert grouped[campaign].skips == expected["skips"] and grouped[campaign].unassigned_conversions == \
            expected["unassigned"]
    assert grouped["spring"].total.converted and grouped["welcome"].total.converted


def staff_event(user: str, text: str, n: list[int] = [0]) -> InboundEvent:  # noqa: B006 - a counter
    n[0] += 1
    return InboundEvent("console", "local", user, "command", text=text, platform_msg_id=f"staff-{user}-{n[0]}")


def values(text: str) -> dict[str, str]:
    """First word of a row -> its value column (rows end with value and change)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.setdefault(parts[0], parts[-2])
    return out


async def test_chat_report_and_funnel_show_the_same_figures(world):
    service, w, _ = world
    reaction = await service.receive(staff_event("bob", "/report 30d"))
    text = reaction.replies[0]
    expected = truth(w, NOW - timedelta(days=30), NOW)
    before = truth(w, NOW - timedelta(days=60), NOW - timedelta(days=30))
    row = values(text)
    assert row["新客户"] == str(expected["new_customers"])
    assert row["活跃客户"] == str(expected["active_customers"])
    assert row["退订"] == str(expected["opt_outs"])
    assert row["收入"] == f"{expected['revenue']:,.2f}"
    new_line = next(line for line in text.splitlines() if line.startswith("新客户"))
    assert new_line.split()[-1] == f"{expected['new_customers'] - before['new_customers']:+d}".replace("+0", "0")
    assert "最后一次活动触达" in text.splitlines()[-2] and "last campaign message" in text.splitlines()[-1]
    # the chart is drawn when the channel sends it, after the commit: the reaction carries it undrawn
    assert len(reaction.images) == 1 and (await reaction.images[0].png()).startswith(b"\x89PNG")

    reaction = await service.receive(staff_event("bob", "/funnel spring"))
    f = funnel_truth(w, "spring")["total"]
    funnel_rows = {line.split()[0]: line.split()[2:] for line in reaction.replies[0].splitlines()[1:8]}
    assert funnel_rows["目标"] == [str(f["audience"])]
    assert funnel_rows["送达"] == [str(f["delivered"]), f"{f['delivered'] / f['sent']:.0%}"]
    assert funnel_rows["点击"] == [str(f["clicked"]), f"{f['clicked'] / f['delivered']:.0%}"]
    assert funnel_rows["转化"] == [str(f["converted"]), f"{f['converted'] / f['delivered']:.0%}"]
    assert len(reaction.images) == 1
    # English-only when the channel tells the staff member's locale
    en = await service.receive(InboundEvent("console", "local", "bob", "command", text="/report 7d",
                                            platform_msg_id="en-1", payload={"language_code": "en"}))
    assert "New customers" in en.replies[0] and "新客户" not in en.replies[0]


async def test_date_range_uses_whole_local_days(world):
    service, w, _ = world
    period = reports.parse_period("2026-11-16..2026-11-22", NOW, TZ)
    zone = ZoneInfo(TZ)
    start = datetime.combine(date(2026, 11, 16), time(), zone).astimezone(ZoneInfo("UTC")).replace(tzinfo=None)
    end = datetime.combine(date(2026, 11, 23), time(), zone).astimezone(ZoneInfo("UTC")).replace(tzinfo=None)
    assert start == datetime(2026, 11, 15, 16, 0)
    tick = timedelta(microseconds=1)
    async with service.sessions() as s:
        data = (await reports.summary(s, period)).as_dict()
    assert comparable(data) == truth(w, start - tick, end - tick)
    assert comparable(data["previous"]) == truth(w, start - tick - timedelta(days=7), start - tick)
    assert reports.parse_period("2026-11-22..2026-11-16", NOW, TZ) is None
    assert reports.parse_period("yesterday", NOW, TZ) is None
    reply = (await service.receive(staff_event("bob", "/report last week"))).replies[0]
    assert reply.startswith("用法 Usage")


async def test_cohorts_and_top_tags(world):
    service, w, _ = world
    async with service.sessions() as s:
        result = await reports.cohorts(s, NOW, TZ, weeks=6)
        tags = await reports.top_tags(s, NOW)
    zone, utc = ZoneInfo(TZ), ZoneInfo("UTC")
    monday = date(2026, 11, 23)  # NOW is Friday 2026-11-27 20:00 local
    starts = [datetime.combine(monday - timedelta(weeks=5 - i), time(), zone).astimezone(utc).replace(tzinfo=None)
              for i in range(7)]
    assert result.weeks == [monday - timedelta(weeks=5 - i) for i in range(6)]

    def bucket(t: datetime) -> int:
        return max(i for i in range(6) if t >= starts[i])

    members = defaultdict(list)
    for c in w.customers:
        if starts[0] <= c["first"] <= NOW:
            members[bucket(c["first"])].append(c)
    assert result.sizes == [len(members[i]) for i in range(6)]
    for i in range(6):
        for n in range(6 - i):
            active = {t["c"] for t in w.touchpoints if t["direction"] == "in" and t["kind"] in MESSAGE_KINDS
                      and t["at"] <= NOW and any(t["c"] == c["i"] and t["at"] >= c["first"] for c in members[i])
                      and bucket(t["at"]) == i + n}
            assert result.active[i][n] == len(active), (i, n)
    assert any(result.active[i][n] for i in range(6) for n in range(1, 6 - i)), "retention after week 0 exercised"

    held = Counter(t["tag"] for t in w.tags if t["expires"] is None or t["expires"] > NOW)
    recent = Counter(t["tag"] for t in w.tags if (t["expires"] is None or t["expires"] > NOW)
                     and t["added"] > NOW - timedelta(days=7))
    assert tags == [(name, n, recent[name]) for name, n in sorted(held.items(), key=lambda kv: (-kv[1], kv[0]))]
    text = (await service.receive(staff_event("bob", "/top tags"))).replies[0]
    assert text.splitlines()[1].split()[:2] == [tags[0][0], str(tags[0][1])]
    reaction = await service.receive(staff_event("olga", "/cohort"))
    assert reaction.replies[0].startswith("周留存") and len(reaction.images) == 1


async def test_customer_card_for_staff(world):
    service, w, ids = world
    c = next(c for c in w.customers if c["second_channel"])
    card = (await service.receive(staff_event("olga", f"/customer #{ids[c['i']]}"))).replies[0]
    assert card.splitlines()[0].startswith(f"#{ids[c['i']]} g{c['i']} [{c['stage']}]")
    assert f"{c['channel']}:g{c['i']}" in card and f"wecom:w{c['i']}" in card
    assert all(len(line) <= 60 for line in card.splitlines())
    by_identity = (await service.receive(staff_event("olga", f"/customer {c['channel']}:g{c['i']}"))).replies[0]
    assert by_identity.splitlines()[0] == card.splitlines()[0]
    assert (await service.receive(staff_event("olga", "/customer #999999"))).replies[0] == "没有找到客户 no customer #999999"


NEW_COMMANDS = ["/report", "/report 30d", "/report 2026-11-01..2026-11-07", "/funnel spring", "/customer #1",
                "/top tags", "/cohort", "/digest daily 09:00", "/digest off"]


@pytest.mark.parametrize("text", NEW_COMMANDS)
async def test_non_staff_get_the_refusal_and_nothing_else(world, text):
    from sqlalchemy import func, select

    from scrm.staff import REFUSAL_REPLY
    from scrm.store.models import ReportDigest

    service, _, _ = world
    reaction = await service.receive(InboundEvent("console", "local", "mallory", "text", text=text,
                                                  platform_msg_id=f"m-{text}"))
    assert reaction.replies == (REFUSAL_REPLY,) and reaction.images == ()
    async with service.sessions() as s:
        recorded = (await s.scalars(select(Touchpoint.text).where(Touchpoint.customer_id == reaction.customer_id)
                                    .order_by(Touchpoint.id))).all()
        assert recorded == [text, REFUSAL_REPLY]  # the attempt is on record
        assert await s.scalar(select(func.count()).select_from(ReportDigest)) == 0
    # an operator may read reports but not subscribe to digests (manager's command)
    if text.startswith("/digest"):
        assert (await service.receive(staff_event("olga", text))).replies == (REFUSAL_REPLY,)


async def test_a_report_that_fails_gets_an_apology_and_its_message_is_kept(world, caplog):
    """A report reads outside the ingest transaction; when it breaks (here: its rollup table is gone),
    the manager is told, the error is logged, and the message and answer are still recorded."""
    from sqlalchemy import select, text

    from scrm.staff import REPORT_FAILED_REPLY

    service, _, _ = world
    async with service.sessions() as s, s.begin():
        await s.execute(text("DROP TABLE report_days"))
    reaction = await service.receive(staff_event("bob", "/report 30d"))
    assert reaction.replies == (REPORT_FAILED_REPLY,) and reaction.images == ()
    assert any("staff command '/report 30d'" in r.getMessage() for r in caplog.records)
    async with service.sessions() as s:
        recorded = (await s.scalars(select(Touchpoint.text).where(Touchpoint.actor == "staff:console:bob")
                                    .order_by(Touchpoint.id))).all()
    assert recorded[-2:] == ["/report 30d", REPORT_FAILED_REPLY]
    # a report that does not read that table still answers
    assert (await service.receive(staff_event("bob", "/top tags"))).replies[0].startswith("热门标签")


def scrm_cli(cwd: Path, store: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scrm", *args], cwd=cwd, env=cli_env(store), capture_output=True, text=True,
                          timeout=120, check=False)


async def test_cli_gives_the_same_numbers_and_png(world, tmp_path, store):
    from PIL import Image

    _, w, _ = world
    assert scrm_cli(tmp_path, store, "init").returncode == 0
    result = scrm_cli(tmp_path, store, "report", "--range", "2026-11-16..2026-11-22", "--json",
                      "--png", str(tmp_path / "trend.png"))
    assert result.returncode == 0, result.stderr
    start = datetime(2026, 11, 15, 16, 0) - timedelta(microseconds=1)
    assert comparable(json.loads(result.stdout)) == truth(w, start, start + timedelta(days=7))
    with Image.open(tmp_path / "trend.png") as image:
        assert (image.format, image.size) == ("PNG", (800, 500))
    funnel = scrm_cli(tmp_path, store, "report", "funnel", "spring", "--json", "--png", str(tmp_path / "f.png"))
    assert funnel.returncode == 0, funnel.stderr
    data, expected = json.loads(funnel.stdout), funnel_truth(w, "spring")
    assert {k: data[k] for k in (*reports.STEPS, "conversions", "revenue")} == expected["total"]
    with Image.open(tmp_path / "f.png") as image:
        assert image.size == (800, 500)
    text = scrm_cli(tmp_path, store, "report", "funnel", "spring")
    assert "漏斗 Funnel: spring" in text.stdout
    missing = scrm_cli(tmp_path, store, "report", "funnel", "nope")
    assert missing.returncode == 1 and "no deliveries" in missing.stderr
    both = scrm_cli(tmp_path, store, "report", "--days", "3", "--range", "2026-11-16..2026-11-22")
    assert both.returncode == 2
