"""Customer import and export on SQLite and PostgreSQL: matching by identity and phone hash, rejects
with line numbers, a second import that changes nothing, bounded memory, the CLI's progress bar and
summary, and streamed exports."""

from __future__ import annotations

import csv
import io
import json
import tracemalloc
from pathlib import Path

from sqlalchemy import func, select

from scrm import personal
from scrm.customers import find_customer
from scrm.exporter import export_customers, export_touchpoints
from scrm.importer import Importer
from scrm.messages import InboundEvent
from scrm.store.models import Customer, CustomerTag, Identity, Tag
from tests.test_cli import scrm


async def started(make_config, clock):
    from scrm.service import Service

    service = Service(make_config(), clock)
    await service.start(scheduler=False)
    return service


def write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


async def snapshot(service) -> dict:
    """Everything an import can change, to compare before and after a re-import."""
    async with service.sessions() as s:
        customers = [(c.id, c.display_name, c.phone_hash, c.phone_enc, c.birthday_md, c.opted_out, c.attributes)
                     for c in (await s.scalars(select(Customer).order_by(Customer.id))).all()]
        identities = (await s.execute(select(Identity.customer_id, Identity.channel, Identity.account,
                                             Identity.external_id).order_by(Identity.id))).all()
        tags = (await s.execute(select(CustomerTag.customer_id, CustomerTag.tag_id, CustomerTag.added_at)
                                .order_by(CustomerTag.id))).all()
    return {"customers": customers, "identities": identities, "tags": tags}


HEADER = ["name", "phone", "birthday", "identity", "tags", "consent", "city"]


async def test_import_merges_rejects_and_is_idempotent(make_config, clock, tmp_path):
    service = await started(make_config, clock)
    try:
        # already known: alice by identity, bob by phone; both first wrote to the brand (console:bob is staff)
        for user in ("alice", "bobby"):
            await service.receive(InboundEvent("console", "local", user, "text", text="hello",
                                               platform_msg_id=f"first-{user}", display_name=user))
        async with service.sessions() as s, s.begin():
            alice = await find_customer(s, "console", "alice", "local")
            bob = await find_customer(s, "console", "bobby", "local")
            await personal.set_phone(s, bob, "+8613900000002", service.keyring)
        path = write(tmp_path / "customers.csv", HEADER, [
            ["Carol", "139 0000 0001", "1990-05-17", "", "vip;奶粉", "yes", "上海"],        # 2 new
            ["Alice A", "13900000003", "", "console:alice", "vip", "", "北京"],              # 3 merged (identity)
            ["Bobby", "+86-139-0000-0002", "", "", "", "no", ""],                            # 4 merged (phone)
            ["Dave", "not a phone", "", "", "", "", ""],                                     # 5 rejected
            ["Erin", "13900000005", "1990-02-30", "", "", "", ""],                           # 6 rejected
            ["Frank", "", "", "", "vip", "", "广州"],                                         # 7 rejected
            ["Carol again", "13900000001", "", "console:carol", "new", "", ""],               # 8 merged (row 2)
            ["Mixed", "13900000002", "", "console:alice", "", "", ""],                       # 9 rejected (conflict)
            ["Gina", "", "", "telegram:42", "", "maybe", ""],                                 # 10 rejected
        ])
        importer = Importer(service.sessions, service.config, service.keyring, clock.now(), batch_size=4)
        summary = await importer.run(path)
        assert (summary.rows, summary.created, summary.merged, summary.rejected) == (9, 1, 3, 5)
        with summary.rejects_file.open(encoding="utf-8") as fh:
            rejects = {int(r["line"]): r["reason"] for r in csv.DictReader(fh)}
        assert sorted(rejects) == [5, 6, 7, 9, 10]
        assert rejects[5].startswith("phone:") and rejects[6].startswith("birthday:")
        assert rejects[7].startswith("phone/identity:") and rejects[9].startswith("conflict:")
        assert rejects[10].startswith("consent:")

        async with service.sessions() as s:
            carol = await personal.find_by_phone(s, "13900000001", service.keyring)
            assert carol.display_name == "Carol" and carol.attributes == {"city": "上海", "consent": "yes"}
            assert personal.reveal(carol, service.keyring)["birthday"].isoformat() == "1990-05-17"
            carol_tags = set((await s.scalars(select(Tag.name).join(CustomerTag).where(
                CustomerTag.customer_id == carol.id))).all())
            assert carol_tags == {"vip", "奶粉", "new"}
            assert (await s.scalar(select(Identity.customer_id).where(Identity.external_id == "carol"))) == carol.id
            alice = await s.get(Customer, alice.id)
            assert alice.display_name == "alice"  # filled only when missing
            assert (await personal.find_by_phone(s, "13900000003", service.keyring)).id == alice.id
            bob = await s.get(Customer, bob.id)
            assert bob.opted_out is True  # consent "no" is respected
            assert await s.scalar(select(func.count()).select_from(Customer)) == 3
            assert Customer.phone_enc is not None and b"13900000001" not in (carol.phone_enc or b"")

        before = await snapshot(service)
        again = await Importer(service.sessions, service.config, service.keyring, clock.now(), batch_size=4).run(path)
        assert (again.created, again.merged, again.updated, again.rejected) == (0, 4, 0, 5)
        assert await snapshot(service) == before
    finally:
        await service.stop()


ROWS = 5_000


def big_csv(path: Path, rows: int) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER + ["member_level"])
        for i in range(rows):
            w.writerow([f"客户{i}", f"139{i:08d}", f"19{70 + i % 30}-{1 + i % 12:02d}-{1 + i % 28:02d}",
                        f"console:user{i}" if i % 2 else "", "vip;奶粉" if i % 3 == 0 else "新客",
                        "yes" if i % 5 else "no", ["上海", "北京", "深圳"][i % 3], str(i % 4)])
    return path


async def test_large_import_bounded_memory_then_noop(make_config, clock, tmp_path):
    """5,000 rows here (bench/import_100k.py runs 100,000): peak traced memory stays far below the file's
    row count times a row's objects, and a second import writes nothing."""
    service = await started(make_config, clock)
    try:
        path = big_csv(tmp_path / "big.csv", ROWS)
        seen: list[int] = []
        tracemalloc.start()
        summary = await Importer(service.sessions, service.config, service.keyring, clock.now()).run(path, seen.append)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (summary.created, summary.rejected) == (ROWS, 0)
        assert peak < 150 * 2**20, f"peak {peak / 2**20:.0f} MiB"
        assert seen and seen[-1] == path.stat().st_size and seen == sorted(seen)  # progress reaches the end
        before = await snapshot(service)
        again = await Importer(service.sessions, service.config, service.keyring, clock.now()).run(path)
        assert (again.created, again.merged, again.updated) == (0, ROWS, 0)
        assert await snapshot(service) == before

        buffer = io.StringIO()
        assert await export_customers(service.sessions, service.config, buffer, "csv") == ROWS
        exported = list(csv.DictReader(io.StringIO(buffer.getvalue())))
        assert exported[1]["phone_last4"] == "0001" and "phone" not in exported[1]
        assert exported[1]["identity"] == "console:local:user1" and exported[0]["tags"] == "vip;奶粉"
        buffer = io.StringIO()
        await export_customers(service.sessions, service.config, buffer, "jsonl", keyring=service.keyring)
        first = json.loads(buffer.getvalue().splitlines()[0])
        assert (first["phone"], first["birthday"], first["attributes"]["city"]) == ("+8613900000000", "1970-01-01",
                                                                                    "上海")
    finally:
        await service.stop()


def test_cli_import_export(tmp_path, store):
    assert scrm(tmp_path, store, "init").returncode == 0
    path = write(tmp_path / "list.csv", HEADER, [["Ann", "13900000011", "", "console:ann", "vip", "yes", ""],
                                                 ["Bad", "x", "", "", "", "", ""]])
    first = scrm(tmp_path, store, "customers", "import", str(path))
    assert first.returncode == 0, first.stderr
    assert "importing list.csv" not in first.stderr  # the progress bar only draws on a terminal
    assert "2 row(s): 1 imported, 0 merged" in first.stdout and "1 rejected" in first.stdout
    assert (tmp_path / "list.rejects.csv").read_text(encoding="utf-8").splitlines()[1].startswith("3,\"phone:")
    second = scrm(tmp_path, store, "customers", "import", str(path))
    assert "0 imported, 1 merged with existing customers (0 updated, 1 unchanged)" in second.stdout

    exported = scrm(tmp_path, store, "customers", "export", "--format", "jsonl", "--personal")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout.splitlines()[0])["phone"] == "+8613900000011"
    one = scrm(tmp_path, store, "customers", "export", "console:ann", "--out", str(tmp_path / "ann.json"))
    assert one.returncode == 0, one.stderr  # the one-person (data subject) export still works
    assert "+8613900000011" in (tmp_path / "ann.json").read_text(encoding="utf-8")
    chat = scrm(tmp_path, store, "chat", "--as", "customer:ann", stdin="你好\n")
    assert chat.returncode == 0, chat.stderr
    out = tmp_path / "tp.csv"
    done = scrm(tmp_path, store, "touchpoints", "export", "--since", "2000-01-01", "--out", str(out), "--no-text")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert rows and "text" not in rows[0] and "text" in {r["kind"] for r in rows}
    assert scrm(tmp_path, store, "touchpoints", "export", "--since", "2999-01-01").stdout.strip().count("\n") == 0


async def test_touchpoint_export_streams(make_config, clock):
    service = await started(make_config, clock)
    try:
        buffer = io.StringIO()
        assert await export_touchpoints(service.sessions, buffer, clock.now(), fmt="jsonl") == 0
    finally:
        await service.stop()


async def test_csv_cells_never_become_formulas_and_round_trip(make_config, clock, tmp_path):
    """Names customers chose, like ``=HYPERLINK(...)``, reach the operator's spreadsheet as text (a leading
    ``'``), phone-like cells stay as they are, and importing the export again restores the names."""
    service = await started(make_config, clock)
    try:
        hostile = ['=HYPERLINK("http://evil.example","click")', "+SUM(A1:A9)", "-2+3", "@cmd"]
        rows = [[name, f"1390000{i:04d}", "", f"console:h{i}", "", "", ""] for i, name in enumerate(hostile)]
        path = write(tmp_path / "hostile.csv", HEADER, rows)
        summary = await Importer(service.sessions, service.config, service.keyring, clock.now()).run(path)
        assert summary.created == len(hostile)
        buffer = io.StringIO()
        await export_customers(service.sessions, service.config, buffer, "csv", keyring=service.keyring)
        exported = list(csv.DictReader(io.StringIO(buffer.getvalue())))
        assert [r["name"] for r in exported] == ["'" + name for name in hostile]
        assert exported[0]["phone"] == "+8613900000000"  # starts like a formula, but is a number: as it is
        again = write(tmp_path / "again.csv", ["name", "identity"], [[r["name"], r["identity"]] for r in exported])
        second = await Importer(service.sessions, service.config, service.keyring, clock.now()).run(again)
        assert (second.created, second.merged, second.updated) == (0, len(hostile), 0)
        async with service.sessions() as s:
            names = (await s.scalars(select(Customer.display_name).order_by(Customer.id))).all()
        assert names == hostile
    finally:
        await service.stop()
