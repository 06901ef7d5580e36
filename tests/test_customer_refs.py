"""One reader of customer references for every surface: ``#id``, ``channel:id`` and
``channel:account:id`` name the same customer in the CLI, staff chat, the API and file imports, and a
reference that names no one gets the same message everywhere (issue 21, item 3: before, only
``scrm customers import`` read ``console:local:X``; the others looked up the external id ``local:X``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from scrm.customers import (
    AmbiguousCustomer,
    BadCustomerRef,
    UnknownCustomer,
    find_by_ref,
    parse_ref,
)
from scrm.importer import Importer
from scrm.loyalty.history import ImportResult, import_batch
from scrm.store.models import Conversion, Identity
from scrm.web import SERVICE, create_app
from tests.conftest import cli_env
from tests.test_foundation_flow import say

CHANNELS: dict[str, dict[str, Any]] = {"console": {"local": {}}, "wecom": {"a": {}, "b": {}}}
FORMS = ("console:local:cd00166", "console:cd00166", "CONSOLE:cd00166")
UNKNOWN = "console:local:nobody"
UNKNOWN_MESSAGE = "no customer console:local:nobody"


def test_parse_reads_the_account_only_when_it_is_one_of_the_channel():
    ref = parse_ref(" console:local:cd00166 ", CHANNELS)
    assert (ref.channel, ref.account, ref.external_id) == ("console", "local", "cd00166")
    ref = parse_ref("console:cd00166", CHANNELS)
    assert (ref.channel, ref.account, ref.external_id, ref.accounts) == ("console", None, "cd00166", ("local",))
    # External ids with ':' in them: the middle part is an account only if the channel has it.
    ref = parse_ref("wecom:wm:abc", CHANNELS)
    assert (ref.account, ref.external_id) == (None, "wm:abc")
    ref = parse_ref("wecom:b:wm:abc", CHANNELS)
    assert (ref.account, ref.external_id) == ("b", "wm:abc")
    assert parse_ref("#42", CHANNELS).id == 42 and parse_ref("42", CHANNELS).id == 42
    assert parse_ref("#" + "9" * 5000, CHANNELS).id > 2**31 - 1 # names no one, asks the store nothing
    phone = parse_ref("phone:138 0013 8000", CHANNELS)
    assert phone.phone == "+8613800138000" and phone.text == "phone:…8000" and "138" not in repr(phone)
    for bad in ("", "alice", "#", "#x", "¹", "console:", ":x", "console:local:", "console:" + "x" * 129,
                "phone:call me"):
        with pytest.raises(BadCustomerRef):
            parse_ref(bad, CHANNELS)


@pytest.fixture
async def client(aiohttp_client, make_config, clock):
    config = make_config({"staff": {"console:boss": "admin"},
                          "api": {"keys": {"shop": {"key": "shop-key-0123456789abcdef",
                                                    "scopes": ["customers:read", "customers:write"]}}}})
    return await aiohttp_client(create_app(config, clock))


async def test_api_staff_chat_and_imports_read_references_alike(client, tmp_path):
    service = client.app[SERVICE]
    await say(client, "cd00166", "你好")
    async with service.sessions() as s:
        cid = await s.scalar(select(Identity.customer_id).where(Identity.external_id == "cd00166"))
    headers = {"Authorization": "Bearer shop-key-0123456789abcdef"}

    # The API's {ref} paths.
    for ref in (*FORMS, f"%23{cid}", str(cid)):
        resp = await client.get(f"/api/v1/customers/{ref}", headers=headers)
        assert resp.status == 200 and (await resp.json())["id"] == cid, ref
    resp = await client.get(f"/api/v1/customers/{UNKNOWN}", headers=headers)
    assert resp.status == 404 and (await resp.json())["error"] == {"code": "customer_not_found",
                                                                   "message": UNKNOWN_MESSAGE}
    resp = await client.post(f"/api/v1/customers/{FORMS[0]}/tags", json={"add": ["vip"]}, headers=headers)
    assert resp.status == 200 and (await resp.json())["customer_id"] == cid

    # Staff chat.
    for n, ref in enumerate((*FORMS, f"#{cid}")):
        reply = (await say(client, "boss", f"/tag {ref} +t{n}"))["replies"][0]
        assert reply == f"{ref}: +t{n}", reply
    reply = (await say(client, "boss", f"/customer {UNKNOWN}"))["replies"][0]
    assert reply == f"没有找到客户 {UNKNOWN_MESSAGE}"

    # The order history import.
    orders = [(n, {"order_id": f"o{n}", "customer": ref, "date": "2026-01-05", "amount": 10})
              for n, ref in enumerate((*FORMS, f"#{cid}", UNKNOWN), 1)]
    result = ImportResult()
    async with service.sessions() as s, s.begin():
        await import_batch(s, orders, service.clock.now(), result, service.config.channels)
    assert result.orders == 4 and result.rejected == [f"line 5: {UNKNOWN_MESSAGE}"]
    async with service.sessions() as s:
        assert set((await s.scalars(select(Conversion.customer_id))).all()) == {cid}

    # The customer import reads its identity column the same way (and refuses ids and phones there).
    path = tmp_path / "people.csv"
    path.write_text("name,identity\nAnn,console:local:cd00166\nBen,#1\n", "utf-8")
    summary = await Importer(service.sessions, service.config, service.keyring, service.clock.now()).run(path)
    assert (summary.created, summary.merged, summary.rejected) == (0, 1, 1)


async def test_account_left_out_on_a_channel_with_several(client):
    """Two console accounts: ``console:amy`` is ambiguous when amy is a different customer on each,
    and found when she is on one; the account may always be named."""
    service = client.app[SERVICE]
    channels = {"console": {"local": {}, "shop": {}}}
    await say(client, "amy", "你好")
    await say(client, "bea", "你好")
    async with service.sessions() as s, s.begin():
        amy, bea = [await s.scalar(select(Identity.customer_id).where(Identity.external_id == n)) for n in ("amy", "bea")]
        s.add(Identity(customer_id=bea, channel="console", account="shop", external_id="amy",
                       created_at=service.clock.now()))
    async with service.sessions() as s:
        assert (await find_by_ref(s, "console:bea", channels)).id == bea
        assert (await find_by_ref(s, "console:shop:amy", channels)).id == bea
        assert (await find_by_ref(s, "console:local:amy", channels)).id == amy
        with pytest.raises(AmbiguousCustomer, match=r"console:amy names different customers on console "
                                                    r"accounts local, shop: use console:<account>:amy"):
            await find_by_ref(s, "console:amy", channels)
        # One configured account: that account's amy, the other account's is not looked at.
        assert (await find_by_ref(s, "console:amy", {"console": {"local": {}}})).id == amy
        with pytest.raises(UnknownCustomer, match="^no customer console:shop:nobody$"):
            await find_by_ref(s, "console:shop:nobody", channels)
        with pytest.raises(BadCustomerRef, match="phone number is not accepted here"):
            await find_by_ref(s, "phone:13800138000", channels)


def test_cli_commands_read_references_alike(tmp_path, store):
    env = cli_env(store)

    def scrm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "scrm", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300, check=False)

    assert scrm("init").returncode == 0
    people = Path(tmp_path / "people.csv")
    people.write_text("name,identity\nAnn,console:local:cd00166\n", "utf-8")
    assert scrm("customers", "import", str(people)).returncode == 0
    shown = scrm("customers", "show", "console:local:cd00166", "--json")
    assert shown.returncode == 0, shown.stderr
    cid = json.loads(shown.stdout)["id"]
    for ref in ("console:cd00166", f"#{cid}"):
        again = scrm("customers", "show", ref, "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["id"] == cid, again.stderr

    tagged = scrm("customers", "tag", "console:local:cd00166", "+vip")
    assert tagged.returncode == 0 and "+vip" in tagged.stdout, tagged.stderr
    orders = tmp_path / "orders.csv"
    orders.write_text("order_id,customer,date,amount\n"
                      "O1,console:local:cd00166,2026-01-05,120\n"
                      f"O2,#{cid},2026-01-06,80\n"
                      f"O3,{UNKNOWN},2026-01-07,80\n", "utf-8")
    imported = scrm("conversions", "import", str(orders))
    assert imported.returncode == 1 and "imported 2 orders" in imported.stdout
    assert f"line 4: {UNKNOWN_MESSAGE}" in imported.stderr

    # The same words, and exit 1, from every command given a customer no one is.
    for args in (("customers", "show", UNKNOWN), ("customers", "tag", UNKNOWN, "+vip"),
                 ("customers", "merge", "console:local:cd00166", UNKNOWN), ("customers", "export", UNKNOWN),
                 ("customers", "erase", UNKNOWN, "--yes"), ("audit", "--customer", UNKNOWN),
                 ("campaigns", "preview", "welcome", UNKNOWN)):
        refused = scrm(*args)
        assert (refused.returncode, refused.stderr.splitlines()[-1]) == (1, UNKNOWN_MESSAGE), args  # after any log
    bad = scrm("customers", "show", "alice")
    assert bad.returncode == 2 and "not a customer reference: 'alice'" in bad.stderr
