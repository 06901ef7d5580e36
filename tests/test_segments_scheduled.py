"""Every field and function of the segment language as the audience of a scheduled campaign, on both
stores, and campaigns isolated from each other on the campaign clock.

A segment is compiled into the planner's INSERT ... SELECT, which joins the customer's identity (and,
for coupon reminders, the coupon codes): a subquery that let SQLAlchemy auto-correlate those tables
either failed to compile (``channel``: "returned no FROM clauses due to auto-correlation") or counted
the wrong rows. Each expression here is checked against the customers it must select, written out by
hand from the data below, not against the compiler's own answer.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import select, text

from scrm import api
from scrm.clock import ManualClock
from scrm.service import Service
from scrm.store.models import (
    CampaignRun,
    Conversion,
    Coupon,
    CouponCode,
    Customer,
    CustomerTag,
    Delivery,
    Identity,
    LoyaltyAccount,
    Redemption,
    Tag,
    Touchpoint,
)
from scrm.messages import InboundEvent
from tests.conftest import ROOT, cli_env, deep_merge, example_config

# Friday 11:00 in Asia/Shanghai: outside quiet hours; the campaigns below fire at this minute.
NOW = datetime(2026, 11, 27, 3, 0)

#: expression -> the customers it selects among ann, bob, cat and dan (eve is opted out: never planned).
CASES: dict[str, set[str]] = {
    "stage == 'nurture'": {"ann"},
    "stage != 'nurture'": {"bob", "cat", "dan"},
    "stage in ['retention', 'win-back']": {"bob", "dan"},
    "stage not in ['retention', 'win-back']": {"ann", "cat"},
    "source == 'store_a'": {"ann"},
    "locale == 'en'": {"bob"},
    "timezone == 'Europe/Berlin'": {"bob"},
    "channel == 'wechat'": {"ann", "cat"},
    "'telegram' == channel": {"bob"},
    "channel != 'wechat'": {"bob", "dan"},
    "channel in ['telegram', 'wechat']": {"ann", "bob", "cat"},
    "channel not in ['console']": {"bob", "cat"},
    "days_silent >= 30": {"ann", "dan"},
    "days_since_seen < 3": {"ann", "bob"},
    "age_days <= 7": {"bob", "cat"},
    "channel == 'wechat' and age_days <= 7": {"cat"},  # the demo's wechat_new
    "rfm.r >= 4": {"ann"},
    "rfm.f == 1": {"bob", "dan"},
    "rfm.m < 3": {"bob", "dan"},
    "attr.city == 'sh'": {"ann"},
    "tier == '金卡'": {"ann"},
    "tier == ''": {"cat", "dan"},
    "points >= 100": {"ann", "bob"},
    "points + 100 >= 600": {"ann"},
    "p_alive < 0.5": {"ann"},
    "clv > 100": {"ann"},
    "churn_risk >= 0.5": {"ann"},
    "expected_purchases > 1": {"bob"},
    "tag('奶粉')": {"ann"},  # cat's expired
    "tag('coupon-seeker')": {"dan"},
    "msgs(7) >= 2": {"bob"},
    "msgs(10, 30) >= 1": {"bob"},
    "conversions() >= 1": {"ann", "cat"},
    "conversions(30) >= 1": {"ann"},
    "revenue() > 200": {"cat"},
    "revenue(90) >= 100": {"ann"},
    "coupons_received() == 1": {"bob"},
    "coupons_received(7) >= 1": {"ann", "bob"},
    "coupons_redeemed() >= 1": {"ann"},
    "campaign_messages() >= 1": {"ann", "bob"},
    "campaign_messages(30) >= 1": {"bob"},
    "replied()": {"ann"},
    "not replied()": {"bob", "cat", "dan"},
    "clicked('winback')": {"ann", "bob"},  # cat's was a link preview
    "clicked('winback', 30)": {"bob"},
    "clicked('nurture', 7) or clicked('winback', 7)": {"bob", "dan"},
    "not clicked('winback')": {"cat", "dan"},
    "segment('shanghai')": {"ann"},
    "not opted_out": {"ann", "bob", "cat", "dan"},
    "msgs(30) >= 1 or channel == 'console'": {"ann", "bob", "dan"},
    "channel == 'wechat' and tag('奶粉') and conversions(30) >= 1 and rfm.r >= 4": {"ann"},
}


def _campaign(name: str, trigger: str, segment: str | None) -> str:
    audience = f'\n[audience]\nsegment = "{segment}"\n' if segment else ""
    return f'name = "{name}"\ntitle = "{name}"\nkind = "lifecycle"\n\n[trigger]\n{trigger}\n{audience}\n' \
           f'[message]\ntext = "hi {{{{ customer.name }}}}"\n'


def _config(make_config: Any, tmp_path: Path, campaigns: dict[str, str], segments: dict[str, str],
            overrides: dict[str, Any] | None = None) -> Any:
    folder = tmp_path / "campaigns"
    folder.mkdir(exist_ok=True)
    for name, body in campaigns.items():
        (folder / f"{name}.toml").write_text(body, "utf-8")
    # the example's own segments stay (the loyalty config names some); ours are added
    merged = deep_merge(example_config()["segments"], segments)
    return make_config(deep_merge({"campaigns": {"path": str(folder)}, "segments": merged}, overrides or {}))


async def _world(service: Service) -> dict[str, int]:
    """Five customers whose every segment field and function is set by hand (see CASES)."""
    day = timedelta(days=1)
    ids: dict[str, int] = {}
    async with service.sessions() as s, s.begin():
        people: dict[str, dict[str, Any]] = {
            "ann": dict(stage="nurture", acquisition_source="store_a", locale="zh_CN", timezone="Asia/Shanghai",
                        first_seen_at=NOW - 100 * day, last_seen_at=NOW - 2 * day, last_inbound_at=NOW - 40 * day,
                        rfm_r=5, rfm_f=4, rfm_m=3, attributes={"city": "sh"}),
            "bob": dict(stage="retention", acquisition_source="ad", locale="en", timezone="Europe/Berlin",
                        first_seen_at=NOW - 3 * day, last_seen_at=NOW - day, last_inbound_at=NOW - day,
                        rfm_r=2, rfm_f=1, rfm_m=1, attributes={"city": "bj"}),
            "cat": dict(stage="acquisition", first_seen_at=NOW - 5 * day, last_seen_at=NOW - 5 * day),
            "dan": dict(stage="win-back", first_seen_at=NOW - 400 * day, last_seen_at=NOW - 200 * day,
                        last_inbound_at=NOW - 200 * day, rfm_r=1, rfm_f=1, rfm_m=1),
            "eve": dict(stage="nurture", opted_out=True, first_seen_at=NOW - 3 * day, last_seen_at=NOW - day,
                        last_inbound_at=NOW - day, attributes={"city": "sh"}),
        }
        for name, fields in people.items():
            customer = Customer(display_name=name, **fields)
            s.add(customer)
            await s.flush()
            ids[name] = customer.id
        channels = {"ann": ["console", "wechat"], "bob": ["telegram"], "cat": ["wechat"], "dan": ["console"],
                    "eve": ["wechat", "console"]}
        accounts = {"console": "local", "wechat": "brand", "telegram": "main"}
        for name, kinds in channels.items():
            for kind in kinds:
                s.add(Identity(customer_id=ids[name], channel=kind, account=accounts[kind], external_id=f"{name}-{kind}",
                               created_at=NOW - 5 * day))
        tags = {}
        for tag in ("奶粉", "coupon-seeker"):
            row = Tag(name=tag)
            s.add(row)
            await s.flush()
            tags[tag] = row.id
        for name, tag, expires in (("ann", "奶粉", None), ("cat", "奶粉", NOW - day), ("dan", "coupon-seeker", None),
                                   ("eve", "奶粉", None)):
            s.add(CustomerTag(customer_id=ids[name], tag_id=tags[tag], source="keyword", added_at=NOW - 10 * day,
                              expires_at=expires))
        for name, tier, balance, p_alive, clv, churn, expected in (
                ("ann", "金卡", 500, 0.2, 900.0, 0.8, 0.5), ("bob", "银卡", 100, 0.9, 50.0, 0.1, 2.0),
                ("dan", "", 0, None, None, None, None)):
            s.add(LoyaltyAccount(customer_id=ids[name], tier=tier, balance=balance, p_alive=p_alive, clv=clv,
                                 churn_risk=churn, expected_purchases=expected, updated_at=NOW))
        for name, ago, amount in (("ann", 10, 100.0), ("ann", 60, 50.0), ("cat", 100, 300.0)):
            s.add(Conversion(customer_id=ids[name], kind="order", order_id=f"{name}-{ago}", amount=amount,
                             created_at=NOW - ago * day))
        pool = await s.scalar(select(Coupon).where(Coupon.name == "segment-test"))
        if pool is None:
            pool = Coupon(name="segment-test", value=10)
            s.add(pool)
            await s.flush()
        codes = [("ann", "ANN1", NOW - 5 * day, NOW + 20 * day), ("ann", "ANN2", NOW - 5 * day, NOW + 2 * day),
                 ("bob", "BOB1", NOW - day, NOW + 2 * day)]
        for name, code, granted, expires in codes:
            row = CouponCode(coupon_id=pool.id, code=code, customer_id=ids[name], granted_at=granted,
                             expires_at=expires)
            s.add(row)
            await s.flush()
            if code == "ANN1":
                row.redeemed_at = NOW - 4 * day
                s.add(Redemption(code_id=row.id, customer_id=ids[name], via="test", redeemed_at=NOW - 4 * day))

        def touch(name: str, direction: str, kind: str, ago: timedelta) -> None:
            s.add(Touchpoint(customer_id=ids[name], channel="console", account="local", direction=direction,
                             kind=kind, text="x", payload={}, created_at=NOW - ago))

        touch("ann", "in", "text", 40 * day)
        touch("ann", "out", "campaign_message", 45 * day)  # before her last message: she replied
        for ago in (1, 2, 20):
            touch("bob", "in", "text", ago * day)
        touch("bob", "out", "campaign_message", day / 2)  # after his last message
        touch("dan", "in", "text", 200 * day)
        for name, campaign, kind, ago in (("ann", "winback", "click", 40 * day), ("bob", "winback", "click", day),
                                          ("cat", "winback", "link_preview", day), ("dan", "nurture", "click", day)):
            s.add(Touchpoint(customer_id=ids[name], channel="web", account="-", direction="in", kind=kind,
                             campaign=campaign, payload={"target": "https://shop.example.com/"},
                             created_at=NOW - ago))
    return ids


async def _planned(service: Service, campaign: str) -> set[int]:
    async with service.sessions() as s:
        return set((await s.scalars(select(Delivery.customer_id).where(Delivery.campaign == campaign))).all())


async def test_every_segment_field_and_function_plans_a_scheduled_campaign(make_config, tmp_path, caplog):
    names = {f"seg{i}": expression for i, expression in enumerate(CASES)}
    campaigns = {name: _campaign(name, 'at = "2026-11-27T11:00:00"', name) for name in names}
    cron = _campaign("cron-wechat", 'cron = "0 11 * * fri"', "wechat_only")
    config = _config(make_config, tmp_path, {**campaigns, "cron-wechat": cron},
                     {"shanghai": "attr.city == 'sh'", "wechat_only": "channel == 'wechat'", **names})
    service = Service(config, ManualClock(NOW - timedelta(minutes=5)))
    await service.start(scheduler=False)
    try:
        ids = await _world(service)
        by_id = {v: k for k, v in ids.items()}
        service.clock.set(NOW)  # type: ignore[attr-defined]
        result = await service.run_campaign_clock()
        assert result.failed == {}
        wrong = {}
        for name, expression in names.items():
            got = {by_id[i] for i in await _planned(service, name)}
            if got != CASES[expression]:
                wrong[expression] = (sorted(got), sorted(CASES[expression]))
        assert wrong == {}, wrong
        assert {by_id[i] for i in await _planned(service, "cron-wechat")} == {"ann", "cat"}
        async with service.sessions() as s:
            runs = {r.campaign: (r.status, r.planned) for r in (await s.scalars(select(CampaignRun))).all()}
        assert runs == {name: ("ran", len(CASES[names[name]])) for name in names} | {"cron-wechat": ("ran", 2)}
        assert "auto-correlation" not in caplog.text
    finally:
        await service.stop()


async def test_segments_in_the_timed_campaigns_queries(make_config, tmp_path):
    """Inactivity plans through the planner's identity join; coupon expiry selects from coupon codes,
    where an auto-correlated coupons_received() counted only the code in hand (1 for everybody)."""
    campaigns = {
        "silent-wechat": _campaign("silent-wechat", "event = \"inactivity\"\ndays = 30", "wechat_only"),
        "expiring-first": _campaign("expiring-first", "event = \"coupon_expiring\"\ndays = 3", "one_code"),
        "expiring-console": _campaign("expiring-console", "event = \"coupon_expiring\"\ndays = 3", "on_console"),
    }
    config = _config(make_config, tmp_path, campaigns, {
        "wechat_only": "channel == 'wechat'", "one_code": "coupons_received() == 1",
        "on_console": "channel == 'console' and tag('奶粉')"})
    service = Service(config, ManualClock(NOW))
    await service.start(scheduler=False)
    try:
        ids = await _world(service)
        result = await service.run_campaign_clock()
        assert result.failed == {}
        assert await _planned(service, "silent-wechat") == {ids["ann"]}  # dan is silent too, but not on WeChat
        assert await _planned(service, "expiring-first") == {ids["bob"]}  # ann has received two codes
        assert await _planned(service, "expiring-console") == {ids["ann"]}
    finally:
        await service.stop()


async def _break_planning(service: Service, campaign: str) -> None:
    """Make the store refuse one campaign's deliveries, as a broken segment or a bug would fail it."""
    async with service.sessions() as s, s.begin():
        if service.engine.dialect.name == "sqlite":
            await s.execute(text(
                f"CREATE TRIGGER refuse BEFORE INSERT ON deliveries WHEN NEW.campaign = '{campaign}' "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
        else:
            await s.execute(text(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.campaign = '{campaign}' THEN RAISE EXCEPTION 'refused by the test'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"))
            await s.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON deliveries "
                                 "FOR EACH ROW EXECUTE FUNCTION refuse()"))


async def _mend_planning(service: Service) -> None:
    async with service.sessions() as s, s.begin():
        await s.execute(text("DROP TRIGGER refuse" if service.engine.dialect.name == "sqlite"
                             else "DROP TRIGGER refuse ON deliveries"))


@pytest.mark.parametrize("trigger", ['at = "2026-11-27T11:00:00"\nmisfire = "run_late"\ngrace = "1h"',
                                     'event = "inactivity"\ndays = 30'])
async def test_a_campaign_that_fails_to_plan_fails_alone_and_is_seen(make_config, tmp_path, aiohttp_client, trigger):
    campaigns = {"broken": _campaign("broken", trigger, "everyone"),
                 **{f"fine{i}": _campaign(f"fine{i}", 'at = "2026-11-27T11:00:00"', "everyone") for i in range(3)}}
    config = _config(make_config, tmp_path, campaigns, {"everyone": "not opted_out"})
    service = Service(config, ManualClock(NOW - timedelta(minutes=5)))
    await service.start(scheduler=False)
    try:
        app = web.Application()
        api.mount(app, service)  # the service's own /metrics, on the service this test drives
        client = await aiohttp_client(app)
        ids = await _world(service)
        await _break_planning(service, "broken")
        service.clock.set(NOW)  # type: ignore[attr-defined]
        result = await service.run_campaign_clock()

        assert set(result.failed) == {"broken"} and "refused by the test" in result.failed["broken"]
        everyone = {ids[n] for n in ("ann", "bob", "cat", "dan")}
        for i in range(3):
            assert await _planned(service, f"fine{i}") == everyone  # the others went out
        assert await _planned(service, "broken") == set()
        async with service.sessions() as s:
            [run] = (await s.scalars(select(CampaignRun).where(CampaignRun.campaign == "broken"))).all()
        assert run.status == "failed" and "refused by the test" in (run.error or "")

        # operators and admins are told in chat, once a streak; managers are not
        console = service.channel("console", "local")
        alerts = list(console._mailboxes.pop("olive", ()))  # type: ignore[attr-defined]
        assert len(alerts) == 1 and "broken" in alerts[0] and "refused by the test" in alerts[0]
        assert not console._mailboxes.get("bob")  # type: ignore[attr-defined]
        metrics_text = await (await client.get("/metrics")).text()
        assert 'scrm_campaign_failing{campaign="broken"} 1.0' in metrics_text
        assert 'scrm_campaign_failing{campaign="fine0"} 0.0' in metrics_text
        assert 'scrm_campaign_plan_failures_total{campaign="broken"}' in metrics_text

        service.clock.advance(timedelta(seconds=30))  # still broken: failed again, no second alert
        assert set((await service.run_campaign_clock()).failed) == {"broken"}
        assert not console._mailboxes.get("olive")  # type: ignore[attr-defined]

        await _mend_planning(service)  # fixed within the grace: the failed run is planned after all
        service.clock.advance(timedelta(seconds=30))
        result = await service.run_campaign_clock()
        assert result.failed == {} and await _planned(service, "broken") == (
            everyone if trigger.startswith("at") else {ids["ann"], ids["dan"]})
        async with service.sessions() as s:
            [run] = (await s.scalars(select(CampaignRun).where(CampaignRun.campaign == "broken"))).all()
        assert run.status == "ran" and run.error is None
        metrics_text = await (await client.get("/metrics")).text()
        assert 'scrm_campaign_failing{campaign="broken"} 0.0' in metrics_text
    finally:
        await service.stop()


async def test_a_failed_run_shows_in_campaigns_list_and_to_staff_in_chat(make_config, tmp_path, store):
    """`scrm campaigns list` and /campaigns name the failed run and why (a separate process reads the store)."""
    campaigns = {"broken": _campaign("broken", 'at = "2026-11-27T11:00:00"', "formula_fans"),
                 "fine": _campaign("fine", 'at = "2026-11-27T11:00:00"', "formula_fans")}  # the demo's segment
    config = _config(make_config, tmp_path, campaigns, {})
    service = Service(config, ManualClock(NOW - timedelta(minutes=5)))
    await service.start(scheduler=False)
    try:
        await _world(service)
        await _break_planning(service, "broken")
        service.clock.set(NOW)  # type: ignore[attr-defined]
        await service.run_campaign_clock()
        reaction = await service.receive(InboundEvent("console", "local", "bob", "text", text="/campaigns",
                                                      platform_msg_id="staff-1"))
        answer = "\n".join(reaction.replies)
        assert "1 计划失败 failed to plan" in answer
        assert any(line.startswith("broken ") and "FAILED" in line and "refused by the test" in line
                   for line in answer.splitlines())
        assert any(line.startswith("fine ") and "ran" in line and "1 planned" in line for line in answer.splitlines())
    finally:
        await service.stop()
    home = tmp_path / "cli"
    home.mkdir()
    env = cli_env(store, SCRM_CAMPAIGNS__PATH=str(tmp_path / "campaigns"), COLUMNS="250", PYTHONPATH=str(ROOT))
    def scrm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "scrm", *args], cwd=home, env=env, capture_output=True, text=True,
                              timeout=120, check=False)
    assert scrm("init").returncode == 0
    listing = scrm("campaigns", "list")
    assert listing.returncode == 0, listing.stderr
    assert "FAILED" in listing.stdout and "refused by the test" in listing.stdout
    assert "1 campaign(s) failed to plan: broken" in listing.stderr


@pytest.mark.parametrize("expression", ["msgs(1e308) >= 1", "days_silent >= 1e12", "conversions(99999999) > 0",
                                        "msgs(1, 40000) > 0"])
def test_a_window_beyond_a_century_is_a_config_problem_not_a_crash(tmp_path, expression):
    from scrm.config import ConfigError
    from scrm.config_file import parse_config

    with pytest.raises(ConfigError) as caught:  # was an OverflowError with a traceback
        parse_config(deep_merge(example_config(), {"segments": {"huge": expression}}), tmp_path, environ={})
    assert "segments.huge: " in str(caught.value) and "days must be between 0 and 36500" in str(caught.value)
