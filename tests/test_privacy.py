"""Personal data at rest, look-ups and merges on encrypted data, key rotation, consent, retention,
erasure and the append-only audit log — on SQLite and PostgreSQL, through the real service."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from scrm import consent, personal, reports
from scrm.audit import audit, entries
from scrm.clock import ManualClock
from scrm.keyring import Keyring, KeyringError, new_key_entry
from scrm.messages import InboundEvent
from scrm.personal import PersonalDataError
from scrm.service import Service
from scrm.store.models import (
    AuditEntry,
    Consent,
    Customer,
    Identity,
    PrivacyKey,
    Touchpoint,
)

PHONE = "13812345678"
BIRTHDAY = date(1990, 5, 17)
#: Every form the number or date could take if written in plain anywhere.
SECRETS = ("13812345678", "8613812345678", "138 1234 5678", "1990-05-17", "19900517", "1990/05/17")


@pytest.fixture
async def service(make_config, clock) -> AsyncIterator[Service]:
    svc = Service(make_config(), clock)
    await svc.start(scheduler=False)
    try:
        yield svc
    finally:
        await svc.stop()


def event(user: str, kind: str = "text", text: str = "", msg_id: str | None = None, channel: str = "console",
          **payload: Any) -> InboundEvent:
    return InboundEvent(channel, "local", user, kind, text=text, payload=payload,
                        platform_msg_id=msg_id or f"{user}-{kind}-{text}-{sorted(payload.items())}")


async def customer_of(service: Service, user: str, channel: str = "console") -> Customer:
    async with service.sessions() as s:
        found = await s.scalar(select(Customer).join(Identity).where(Identity.channel == channel,
                                                                     Identity.external_id == user))
        assert found is not None
        return found


async def capture_amy(service: Service) -> Customer:
    """Amy shares her phone in chat and has her birthday recorded (as an import or the API would)."""
    await service.receive(event("amy", "contact_shared", msg_id="p1", phone=PHONE))
    amy = await customer_of(service, "amy")
    async with service.sessions() as s, s.begin():
        row = await s.get(Customer, amy.id)
        assert row is not None
        await personal.set_birthday(s, row, BIRTHDAY, service.keyring)
    return amy


async def all_rows_as_text(service: Service) -> str:
    """PostgreSQL: every row of every table in the test's schema, as JSON text."""
    schema = service.config.store.schema_name
    async with service.engine.connect() as conn:
        tables = (await conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": schema})).scalars().all()
        assert "customers" in tables and "touchpoints" in tables
        dumps = []
        for table in tables:
            rows = (await conn.execute(text(f'SELECT row_to_json(t)::text FROM "{schema}"."{table}" t'))).scalars()
            dumps += list(rows)
    return "\n".join(dumps)


async def test_no_plaintext_phone_or_birth_date_at_rest(service, caplog):
    caplog.set_level(logging.DEBUG)
    amy = await capture_amy(service)
    await service.receive(event("amy", text="你好,我想买奶粉"))

    async with service.sessions() as s:
        row = await s.get(Customer, amy.id)
        assert row is not None
        assert personal.reveal(row, service.keyring) == {"phone": "+86" + PHONE, "birthday": BIRTHDAY}
        assert (row.phone_last4, row.birthday_md) == ("5678", "05-17")
        shared = await s.scalar(select(Touchpoint.payload).where(Touchpoint.kind == "contact_shared"))
        assert shared == {"phone_last4": "5678"}
        kept = await consent.latest(s, amy.id, "console", consent.PHONE)
        assert kept is not None and (kept.granted, kept.source) == (True, "contact_shared")

    if service.engine.dialect.name == "sqlite":
        await service.engine.dispose()  # checkpoint: everything is in the file itself
        db = Path(service.config.store_url.removeprefix("sqlite+aiosqlite:///"))
        files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
        raw = b"".join(p.read_bytes() for p in files)
        assert b"05-17" in raw and "奶粉".encode() in raw  # the reading is real: plain values are found
        for secret in SECRETS:
            assert secret.encode() not in raw, secret
            assert secret.encode("utf-16-le") not in raw, secret
    else:
        dump = await all_rows_as_text(service)
        assert "05-17" in dump and "奶粉" in dump
        for secret in SECRETS:
            assert secret not in dump, secret
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in SECRETS:
        assert secret not in logged, secret


async def test_lookup_and_merge_by_phone_hash(service):
    await service.receive(event("amy", "contact_shared", phone=PHONE))
    await service.receive(event("amy", text="第一条消息"))
    await service.receive(event("ben", "contact_shared", phone="13900001111"))
    await service.receive(event("cai", "contact_shared", phone="not a phone"))  # dropped, not stored
    await service.receive(event("dora", text="hi"))
    amy, ben, cai, dora = [await customer_of(service, u) for u in ("amy", "ben", "cai", "dora")]
    assert cai.phone_hash is None and cai.phone_enc is None

    async with service.sessions() as s, s.begin():
        found = await personal.find_by_phone(s, "0086 138 1234 5678", service.keyring)
        assert found is not None and found.id == amy.id
        assert (await personal.find_by_phone(s, "139-0000-1111", service.keyring)).id == ben.id  # type: ignore[union-attr]
        assert await personal.find_by_phone(s, "13700000000", service.keyring) is None
        with pytest.raises(PersonalDataError):
            await personal.find_by_phone(s, "call me maybe", service.keyring)
        # a duplicate written without a merge (as a careless import would): found by its hash, merged
        row = await s.get(Customer, dora.id)
        assert row is not None
        await personal.set_phone(s, row, "+86 139 0000 1111", service.keyring)
        assert await personal.phone_duplicates(s) == [[ben.id, dora.id]]
        assert await personal.dedupe_by_phone(s) == [(ben.id, dora.id)]
        assert await personal.phone_duplicates(s) == []

    async with service.sessions() as s:
        assert sorted((await s.scalars(select(Identity.external_id).where(Identity.customer_id == ben.id))).all()) \
            == ["ben", "dora"]
        merged = await s.get(Customer, dora.id)
        assert merged is not None and merged.attributes == {"merged_into": ben.id} and merged.phone_hash is None

    # the same person on another channel verifies the same number: one customer, both histories
    await service.receive(event("amy-tg", "contact_shared", channel="telegram", phone="+86 138-1234-5678"))
    await service.receive(event("amy-tg", text="second", channel="telegram"))
    assert (await customer_of(service, "amy-tg", "telegram")).id == amy.id
    async with service.sessions() as s:
        texts = set((await s.scalars(select(Touchpoint.text).where(Touchpoint.customer_id == amy.id,
                                                                   Touchpoint.text.is_not(None)))).all())
        assert {"第一条消息", "second"} <= texts


async def test_key_rotation_interrupted_midway_then_resumed(service):
    values = {}
    for n in range(7):
        await service.receive(event(f"u{n}", text="hi"))
    async with service.sessions() as s, s.begin():
        for n, customer in enumerate((await s.scalars(select(Customer).order_by(Customer.id))).all()):
            await personal.set_phone(s, customer, f"1390000{n:04d}", service.keyring)
            await personal.set_birthday(s, customer, date(1980 + n, 1 + n, 10 + n), service.keyring)
            values[customer.id] = personal.reveal(customer, service.keyring)
    old = service.keyring
    key_text = "\n".join(f"{k}:{b64(v)}" for k, v in [("lookup", old.lookup), *old.keys.items()])
    rotated = Keyring.parse(key_text + "\n" + new_key_entry("k2"))
    assert rotated.current == "k2"

    async def keys_in_use() -> dict[str, int]:
        async with service.sessions() as s:
            rows = (await s.execute(select(Customer.phone_key, func.count()).group_by(Customer.phone_key))).all()
            return {k: n for k, n in rows}

    batches: list[int] = []
    async with service.sessions() as s:
        assert await personal.stale_count(s, rotated) == 7
    done = await personal.rotate(service.sessions, rotated, batch=2, on_batch=batches.append, max_batches=2)
    assert (done, batches) == (4, [2, 2])  # stopped after two committed batches
    assert await keys_in_use() == {"k2": 4, "k1": 3}

    resumed = Keyring.parse(key_text + "\n" + rotated_entry(rotated, "k2"))  # a fresh process, same keys
    async with service.sessions() as s, s.begin():
        await resumed.verify(s, service.clock.now())  # k2's check value recorded
    assert await personal.rotate(service.sessions, resumed, batch=2) == 3
    assert await keys_in_use() == {"k2": 7}

    only_new = Keyring.parse(f"lookup:{b64(old.lookup)}\nk2:{b64(rotated.keys['k2'])}")
    async with service.sessions() as s, s.begin():
        await only_new.verify(s, service.clock.now())  # k1 is no longer needed by any row
        for customer in (await s.scalars(select(Customer))).all():
            assert personal.reveal(customer, only_new) == values[customer.id]
        found = await personal.find_by_phone(s, "13900000003", only_new)
        assert found is not None and personal.reveal(found, only_new)["phone"] == "+8613900000003"

    without_k2 = Keyring.parse(key_text)
    async with service.sessions() as s:
        with pytest.raises(KeyringError, match="k2"):
            await without_k2.verify(s, service.clock.now())


def b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode()


def rotated_entry(keyring: Keyring, key_id: str) -> str:
    return f"{key_id}:{b64(keyring.keys[key_id])}"


async def test_wrong_or_missing_key_stops_the_service(make_config, clock, tmp_path):
    first = Service(make_config(), clock)
    await first.start(scheduler=False)
    await first.receive(event("amy", "contact_shared", phone=PHONE))
    await first.stop()
    key_file = tmp_path / "privacy.key"
    good = key_file.read_text()

    lines = [ln for ln in good.splitlines() if ln.startswith("lookup:")] + [new_key_entry("k1")]
    key_file.write_text("\n".join(lines) + "\n")  # right lookup key, wrong k1
    with pytest.raises(KeyringError, match="k1.*not the one"):
        svc = Service(make_config(), clock)
        try:
            await svc.start(scheduler=False)
        finally:
            await svc.stop()

    key_file.unlink()
    svc = Service(make_config(), clock)
    try:
        with pytest.raises(KeyringError, match="does not exist"):
            await svc.start(scheduler=False)
    finally:
        await svc.stop()
    assert not key_file.exists()  # a used store never gets a fresh key written behind its back

    key_file.write_text(good)
    svc = Service(make_config(), clock)
    await svc.start(scheduler=False)
    try:
        amy = await customer_of(svc, "amy")
        assert personal.reveal(amy, svc.keyring)["phone"] == "+86" + PHONE
    finally:
        await svc.stop()

    with pytest.raises(KeyringError, match="32 bytes"):
        Keyring.parse("lookup:AAAA\nk1:AAAA")
    with pytest.raises(KeyringError, match="lookup"):
        Keyring.parse(new_key_entry("k1"))


async def test_consent_gates_marketing(make_config, clock):
    svc = Service(make_config({"privacy": {"require_consent_for_marketing": True}}), clock)
    await svc.start(scheduler=False)
    try:
        await svc.receive(event("silent", text="你好"))
        await svc.receive(event("follower", "subscribe"))
        opt_in = await svc.receive(event("keen", text="订阅"))
        assert opt_in.replies == (consent.OPT_IN_REPLY,)
        await svc.receive(event("leaver", text="订阅"))
        await svc.receive(event("leaver", text="TD"))
        await svc.receive(event("imported", text="hi"))
        imported = await customer_of(svc, "imported")
        async with svc.sessions() as s, s.begin():
            consent.record(s, imported.id, "console", True, "import", clock.now(), detail="consent column")

        async def reason(user: str, channel: str = "console") -> str | None:
            async with svc.sessions() as s:
                return await consent.may_market(s, await customer_of(svc, user), channel, svc.config)

        assert await reason("silent") == "no_consent"
        assert await reason("follower") is None
        assert await reason("keen") is None
        assert await reason("keen", "telegram") == "no_consent"  # consent is per channel
        assert await reason("leaver") == "opted_out"
        assert await reason("imported") is None
        async with svc.sessions() as s:
            leaver = await customer_of(svc, "leaver")
            assert [(c.granted, c.source) for c in await consent.history(s, leaver.id)] == [(True, "message"),
                                                                                           (False, "opt_out")]
            # the switch off: no consent needed, but a withdrawal still counts
            off = make_config({"privacy": {"require_consent_for_marketing": False}})
            assert await consent.may_market(s, await customer_of(svc, "silent"), "console", off) is None
            leaver.opted_out = False  # even with the global flag cleared, the channel's withdrawal wins
            assert await consent.may_market(s, leaver, "console", off) == "consent_withdrawn"
        with pytest.raises(ValueError, match="unknown consent source"):
            consent.record(None, 1, "console", True, "guess", clock.now())  # type: ignore[arg-type]
    finally:
        await svc.stop()


async def test_retention_redacts_old_texts_and_reports_do_not_change(service, clock: ManualClock):
    start = clock.now()
    await service.receive(event("amy", text="我想买奶粉"))
    await service.receive(event("ben", text="有优惠券吗"))
    clock.advance(timedelta(days=100))
    await service.receive(event("amy", text="还有货吗"))
    clock.advance(timedelta(days=90))  # the first two are now 190 days old, the third 90
    await service.receive(event("cai", text="新消息"))

    async def figures() -> list[Any]:
        async with service.sessions() as s:
            return [await reports.summary(s, start + timedelta(days=d), days=30) for d in (1, 101, 191)]

    before = await figures()
    assert before[0].current.messages_in == 2 and before[2].current.messages_in == 1  # real numbers
    job = personal.retention_job(service)
    assert await job() == 2
    assert await job() == 0  # idempotent
    assert await figures() == before
    async with service.sessions() as s:
        rows = (await s.execute(select(Touchpoint.text, Touchpoint.payload, Touchpoint.kind)
                                .where(Touchpoint.direction == "in").order_by(Touchpoint.id))).all()
    assert [(r.text, r.payload.get("redacted"), r.kind) for r in rows] == [
        (None, True, "text"), (None, True, "text"), ("还有货吗", None, "text"), ("新消息", None, "text")]
    assert service.scheduler.get_job("privacy:retention") is not None


async def test_export_then_erase_keeps_aggregates(service, clock, tmp_path):
    amy = await capture_amy(service)
    await service.receive(event("amy", text="我想买奶粉,有优惠券吗"))
    await service.receive(event("ben", text="hello"))
    now = clock.now()
    async with service.sessions() as s:
        before = await reports.summary(s, now, days=7)
    async with service.sessions() as s, s.begin():
        row = await s.get(Customer, amy.id)
        assert row is not None
        data = await personal.export_data(s, row, service.keyring)
        assert data["personal"]["phone"] == "+86" + PHONE and data["personal"]["birthday"] == "1990-05-17"
        assert any(t["text"] == "我想买奶粉,有优惠券吗" for t in data["customer"]["touchpoints"])
        assert {c["source"] for c in data["consents"]} == {"contact_shared"}
        json.dumps(data, ensure_ascii=False)  # readable as is
        counts = await personal.erase(s, row, now)
        await audit(s, "cli:test", "admin", row.id, "erase", str(counts), via="cli", at=now)
    assert counts["identities"] == 1 and counts["texts"] >= 1
    async with service.sessions() as s:
        row = await s.get(Customer, amy.id)
        assert row is not None
        assert (row.display_name, row.phone_enc, row.phone_hash, row.phone_last4, row.birthday_enc,
                row.birthday_md) == (None, None, None, None, None, None)
        assert personal.reveal(row, service.keyring) == {"phone": None, "birthday": None}
        texts = (await s.scalars(select(Touchpoint.text).where(Touchpoint.customer_id == amy.id))).all()
        assert texts and set(texts) == {None}
        assert await personal.find_by_phone(s, PHONE, service.keyring) is None
        assert await reports.summary(s, now, days=7) == before
        assert [e.action for e in await entries(s, customer_id=amy.id)] == ["erase"]


async def test_audit_log_is_append_only(service, clock):
    amy = await capture_amy(service)
    async with service.sessions() as s, s.begin():
        await audit(s, "staff:console:boss", "manager", amy.id, "view", "/customer", at=clock.now())
    for statement in ("UPDATE audit_log SET actor = 'someone else'", "DELETE FROM audit_log"):
        async with service.sessions() as s:
            with pytest.raises((DBAPIError, IntegrityError), match="append-only"):
                async with s.begin():
                    await s.execute(text(statement))
    async with service.sessions() as s:
        rows = (await s.scalars(select(AuditEntry))).all()
        assert [(r.actor, r.via, r.role, r.action) for r in rows] == [("staff:console:boss", "console", "manager",
                                                                      "view")]
        with pytest.raises(ValueError, match="unknown audit action"):
            await audit(s, "x", None, None, "peek")
        assert await s.scalar(select(func.count()).select_from(PrivacyKey)) == 2  # lookup + k1 check values
        assert await s.scalar(select(func.count()).select_from(Consent)) == 1


async def test_upgrade_seals_plaintext_left_by_the_old_schema(make_config, clock):
    """A populated store from before encryption (0004): the migration runs with foreign keys enforced
    and data referencing customers, and the first start seals the old plaintext values."""
    from scrm.store import migrate

    svc = Service(make_config(), clock)
    try:
        await migrate.upgrade(svc.engine, "0004")
        now = clock.now()
        async with svc.engine.begin() as conn:
            for cid, phone, birthday in ((1, "138 1234 5678", date(1990, 5, 17)), (2, "bogus", None),
                                         (3, None, None)):
                await conn.execute(text(
                    "INSERT INTO customers (id, display_name, phone, birthday, stage, opted_out, first_seen_at,"
                    " last_seen_at, attributes) VALUES (:id, 'x', :phone, :birthday, 'acquisition', false, :now,"
                    " :now, '{}')"), {"id": cid, "phone": phone, "birthday": birthday, "now": now})
                await conn.execute(text(
                    "INSERT INTO touchpoints (customer_id, channel, account, direction, kind, text, payload,"
                    " created_at) VALUES (:id, 'console', 'local', 'in', 'text', 'hi', '{}', :now)"),
                    {"id": cid, "now": now})
            if svc.engine.dialect.name == "postgresql":
                await conn.execute(text("SELECT setval(pg_get_serial_sequence('customers', 'id'), 3)"))
        if svc.engine.dialect.name == "sqlite":
            async with svc.engine.connect() as conn:  # the plaintext now sits in the database file itself
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        await migrate.upgrade(svc.engine, "0005")
        keyring = await personal.open_keyring(svc.config, svc.sessions, now)  # what start() does after migrating
        async with svc.sessions() as s:
            first, second = await s.get(Customer, 1), await s.get(Customer, 2)
            assert first is not None and second is not None
            assert personal.reveal(first, keyring) == {"phone": "+8613812345678", "birthday": BIRTHDAY}
            assert (first.birthday_md, first.phone_last4) == ("05-17", "5678")
            assert second.phone_enc is None  # not a phone number: dropped rather than kept in plain
            assert (await personal.find_by_phone(s, PHONE, keyring)).id == 1  # type: ignore[union-attr]
            assert await s.scalar(text("SELECT count(*) FROM personal_plaintext_pending")) == 0
        if svc.engine.dialect.name == "postgresql":
            dump = await all_rows_as_text(svc)
            for secret in SECRETS:
                assert secret not in dump, secret
    finally:
        await svc.stop()
    if svc.engine.dialect.name == "sqlite":
        db = Path(svc.config.store_url.removeprefix("sqlite+aiosqlite:///"))
        raw = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
        for secret in ("138 1234 5678", "8613812345678", "1990-05-17"):
            assert secret.encode() not in raw, secret
