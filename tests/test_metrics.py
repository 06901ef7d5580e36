"""/metrics scraped from the running app while messages flow; outbox gauges from the store; scheduler
runs and misfires from APScheduler events; the platform latency helper; JSON logs without secrets or
phone numbers; scrm doctor and scrm db backup."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from prometheus_client.parser import text_string_to_metric_families

from scrm import logs, metrics
from scrm.store.models import Delivery
from scrm.web import SERVICE, create_app
from tests.conftest import eventually
from tests.test_cli import scrm
from tests.test_foundation_flow import _sent, say


async def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(await resp.text()) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_move_as_messages_flow(aiohttp_client, make_config, clock):
    client = await aiohttp_client(create_app(make_config(), clock))
    before = await scrape(client)
    await say(client, "alice", "你好")
    await say(client, "alice", "我想买奶粉", msg_id="m-2")
    await say(client, "alice", "我想买奶粉", msg_id="m-2")  # a platform retry
    await eventually(lambda: _sent(client))
    await eventually(lambda: _job_ran(client, "outbox"))
    after = await scrape(client)
    inbound = "scrm_inbound_events_total"
    assert value(after, inbound, channel="console", kind="text") - value(before, inbound, channel="console",
                                                                         kind="text") == 2
    assert value(after, "scrm_inbound_duplicates_total", channel="console") \
        - value(before, "scrm_inbound_duplicates_total", channel="console") == 1
    written = "scrm_touchpoints_written_total"
    assert value(after, written, channel="console", direction="in") - value(before, written, channel="console",
                                                                           direction="in") == 2
    assert value(after, written, channel="console", direction="out") > value(before, written, channel="console",
                                                                            direction="out")
    assert value(after, "scrm_outbox_due") == 0 and value(after, "scrm_outbox_sending") == 0

    # the API counts its requests by route and status
    await client.get("/api/v1/campaigns")
    later = await scrape(client)
    assert value(later, "scrm_api_requests_total", route="/api/v1/campaigns", status="401") >= 1


async def _job_ran(client, job: str) -> bool:
    return value(await scrape(client), "scrm_scheduler_job_runs_total", job=job, outcome="ok") > 0


async def test_outbox_gauges_come_from_the_store(aiohttp_client, make_config, clock):
    client = await aiohttp_client(create_app(make_config(), clock))
    service = client.app[SERVICE]
    service.scheduler.pause()  # keep the worker from sending what is planned below
    now = clock.now()
    async with service.sessions() as s, s.begin():
        for i, (status, due) in enumerate([("planned", now - timedelta(minutes=5)), ("planned", now),
                                           ("planned", now + timedelta(days=1)), ("sending", now)]):
            s.add(Delivery(campaign="welcome", step=0, target=f"c{900 + i}", occurrence="", channel="console",
                           account="local", external_id=f"x{i}", status=status, attempts=0, due_at=due,
                           created_at=now))
    samples = await scrape(client)
    assert value(samples, "scrm_outbox_due") == 2
    assert value(samples, "scrm_outbox_planned") == 3
    assert value(samples, "scrm_outbox_sending") == 1
    assert value(samples, "scrm_outbox_oldest_due_seconds") == 300


async def test_scheduler_misfires_and_platform_latency():
    scheduler = AsyncIOScheduler(timezone=UTC)
    metrics.watch_scheduler(scheduler)
    ran = asyncio.Event()

    async def job() -> None:
        ran.set()

    def count(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    missed = count("scrm_scheduler_misfires_total", job="test:late", kind="missed")
    scheduler.add_job(job, "date", id="test:late", run_date=datetime.now(UTC) - timedelta(hours=1),
                      misfire_grace_time=1)
    scheduler.add_job(job, "date", id="test:now", run_date=datetime.now(UTC) + timedelta(milliseconds=50))
    scheduler.start()
    try:
        await asyncio.wait_for(ran.wait(), 60)
        await eventually(lambda: _gt(count("scrm_scheduler_job_runs_total", job="test:now", outcome="ok"), 0))
        assert count("scrm_scheduler_misfires_total", job="test:late", kind="missed") == missed + 1
    finally:
        scheduler.shutdown(wait=False)

    ok = count("scrm_platform_api_seconds_count", channel="wechat", method="message_custom_send", outcome="ok")
    with metrics.platform_call("wechat", "message/custom/send"):
        await asyncio.sleep(0.01)
    try:
        with metrics.platform_call("wechat", "message/custom/send"):
            raise ConnectionError
    except ConnectionError:
        pass
    assert count("scrm_platform_api_seconds_count", channel="wechat", method="message_custom_send",
                 outcome="ok") == ok + 1
    assert count("scrm_platform_api_seconds_count", channel="wechat", method="message_custom_send",
                 outcome="error") >= 1
    assert count("scrm_platform_api_seconds_sum", channel="wechat", method="message_custom_send",
                 outcome="ok") >= 0.01
    before = count("scrm_deliveries_total", channel="telegram", status="failed", reason="forbidden")
    metrics.delivery_finished("telegram", "failed", "Forbidden: bot was blocked by the user")
    assert count("scrm_deliveries_total", channel="telegram", status="failed", reason="forbidden") == before + 1


async def _gt(a: float, b: float) -> bool:
    return a > b


def test_json_logs_carry_ids_and_mask_secrets_and_phones(make_config):
    config = make_config({"logging": {"format": "json"}, "api": {"keys": {"shop": {
        "key": "super-secret-api-key-123", "scopes": ["customers:read"]}}}})
    stream = io.StringIO()
    handler = logs.setup(config, stream)
    try:
        log = logging.getLogger("scrm.test")
        with logs.request_context("req-7"), logs.delivery_context(42):
            log.info("calling with %s for 13812345678 and +44 20 7946 0958", "super-secret-api-key-123")
        log.debug("debug lines are not masked: 13812345678")
        log.info("plain line")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    first = lines[0]
    assert (first["request_id"], first["delivery_id"], first["level"], first["logger"]) == ("req-7", 42, "info",
                                                                                            "scrm.test")
    assert "super-secret" not in first["msg"] and "13812345678" not in first["msg"] and "7946" not in first["msg"]
    assert first["msg"].startswith("calling with *** for ***78")
    assert len(lines) == 2 and "request_id" not in lines[1]  # DEBUG is below the configured INFO


def test_text_logs_by_default(make_config):
    stream = io.StringIO()
    handler = logs.setup(make_config(), stream)
    try:
        with logs.request_context(None) as rid:
            logging.getLogger("scrm.test").warning("careful")
    finally:
        logging.getLogger().removeHandler(handler)
    assert f"WARNING scrm.test: careful [request_id={rid}]" in stream.getvalue()


def test_doctor_and_backup(tmp_path, store):
    assert scrm(tmp_path, store, "init").returncode == 0
    doctor = scrm(tmp_path, store, "doctor")
    assert "store: reachable" in doctor.stdout
    assert "migrations: store at none (empty)" in doctor.stdout and "scrm db upgrade" in doctor.stdout
    assert "service: no service answering" in doctor.stdout
    assert "channel console.local: local channel" in doctor.stdout
    assert doctor.returncode == 0, doctor.stdout  # warnings only
    assert scrm(tmp_path, store, "db", "upgrade").returncode == 0
    assert "migrations: at head" in scrm(tmp_path, store, "doctor").stdout

    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text() + "\n[nonsense]\n")
    broken = scrm(tmp_path, store, "doctor")
    assert broken.returncode == 1 and "nonsense: unknown key" in broken.stdout

    assert scrm(tmp_path, store, "db", "backup", str(tmp_path / "copy.db")).returncode == 2  # nothing touched
    (tmp_path / "config.toml").write_text((tmp_path / "config.toml").read_text().replace("\n[nonsense]\n", ""))
    backup = scrm(tmp_path, store, "db", "backup", str(tmp_path / "copy.db"))
    if store["url"].startswith("postgresql"):
        assert backup.returncode == 1 and "pg_dump" in backup.stderr
        return
    assert backup.returncode == 0, backup.stderr
    with sqlite3.connect(tmp_path / "copy.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone()[0]
