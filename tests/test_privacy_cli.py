"""The privacy commands as an operator runs them: keys, the audited 360° view by phone, export,
erase, the audit log, and `scrm run` refusing a wrong or missing key."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import select

from scrm import personal
from scrm.config_file import load_config
from scrm.keyring import new_key_entry
from scrm.messages import InboundEvent
from scrm.service import Service
from scrm.store.models import Customer, Identity
from tests.conftest import ROOT, cli_env


def scrm(cwd: Path, store: dict[str, Any], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = cli_env(store, PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "scrm", *args], cwd=cwd, env=env, input=stdin, capture_output=True,
                          text=True, timeout=120, check=False)


async def seed(tmp_path: Path, store: dict[str, Any]) -> None:
    """Amy shares her phone in chat and her birthday is recorded; Ben only chats."""
    environ = {"SCRM_STORE__URL": store["url"], **({"SCRM_STORE__SCHEMA_NAME": store["schema_name"]}
                                                    if "schema_name" in store else {})}
    service = Service(load_config(tmp_path / "config.toml", environ))
    await service.start(scheduler=False)
    try:
        await service.receive(InboundEvent("console", "local", "amy", "contact_shared",
                                           payload={"phone": "138 1234 5678"}, platform_msg_id="p1"))
        await service.receive(InboundEvent("console", "local", "amy", "text", text="我想买奶粉", platform_msg_id="m1"))
        await service.receive(InboundEvent("console", "local", "ben", "text", text="hello", platform_msg_id="m2"))
        async with service.sessions() as s, s.begin():
            amy = await s.scalar(select(Customer).join(Identity).where(Identity.external_id == "amy"))
            assert amy is not None
            await personal.set_birthday(s, amy, date(1990, 5, 17), service.keyring)
    finally:
        await service.stop()


async def test_operator_privacy_session(tmp_path, store):
    assert scrm(tmp_path, store, "init").returncode == 0
    key_file = tmp_path / "privacy.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    await seed(tmp_path, store)

    shown = scrm(tmp_path, store, "customers", "show", "phone:+86 138-1234-5678", "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert (view["phone"], view["birthday_md"]) == ("*******5678", "05-17")
    assert "13812345678" not in shown.stdout and "1990" not in shown.stdout
    bad = scrm(tmp_path, store, "customers", "show", "phone:call-me")
    assert bad.returncode == 2 and "not a phone number" in bad.stderr

    assert scrm(tmp_path, store, "keys", "new").returncode == 0
    assert key_file.read_text().strip().splitlines()[-1].startswith("k2:")
    rotated = scrm(tmp_path, store, "keys", "rotate", "--batch", "1")
    assert rotated.returncode == 0, rotated.stderr
    assert "1 customer(s) re-encrypted under key k2" in rotated.stdout

    exported = scrm(tmp_path, store, "customers", "export", f"#{view['id']}", "--out", "amy.json", "--by", "dpo")
    assert exported.returncode == 0, exported.stderr
    data = json.loads((tmp_path / "amy.json").read_text("utf-8"))
    assert (data["personal"]["phone"], data["personal"]["birthday"]) == ("+8613812345678", "1990-05-17")
    assert stat.S_IMODE((tmp_path / "amy.json").stat().st_mode) == 0o600

    erased = scrm(tmp_path, store, "customers", "erase", f"#{view['id']}", "--yes", "--by", "dpo")
    assert erased.returncode == 0, erased.stderr
    assert scrm(tmp_path, store, "customers", "show", "phone:13812345678").returncode == 1
    assert scrm(tmp_path, store, "customers", "erase", "#999", "--yes").returncode == 1

    log = json.loads(scrm(tmp_path, store, "audit", "--customer", f"#{view['id']}", "--json").stdout)
    assert [(e["action"], e["via"]) for e in log] == [("view", "cli"), ("export", "cli"), ("erase", "cli")]
    assert [e["actor"] for e in log][1:] == ["cli:dpo", "cli:dpo"]
    assert json.loads(scrm(tmp_path, store, "audit", "--since", "2999-01-01", "--json").stdout) == []
    assert scrm(tmp_path, store, "audit", "--since", "last week").returncode == 2
    by_dpo = json.loads(scrm(tmp_path, store, "audit", "--actor", "dpo", "--json").stdout)
    assert [e["action"] for e in by_dpo] == ["export", "erase"]
    assert json.loads(scrm(tmp_path, store, "audit", "--until", "2000-01-01", "--json").stdout) == []

    good = key_file.read_text()
    key_file.write_text("\n".join([ln for ln in good.splitlines() if ln.startswith("lookup:")]
                                  + [new_key_entry("k2")]) + "\n")
    wrong = scrm(tmp_path, store, "run", "--port", "0")
    assert wrong.returncode == 2 and "privacy keys:" in wrong.stderr and "k2" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    key_file.unlink()
    missing = scrm(tmp_path, store, "run", "--port", "0")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    assert not key_file.exists()
