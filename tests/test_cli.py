"""The CLI as a new user runs it: init, a scripted chat, the 360° view, redemption at the till, report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import cli_env


def scrm(cwd: Path, store: dict[str, Any], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scrm", *args], cwd=cwd, env=cli_env(store), input=stdin,
                          capture_output=True, check=False,
                          text=True, timeout=120)


def test_new_user_session(tmp_path, store):
    assert scrm(tmp_path, store, "init").returncode == 0
    assert (tmp_path / "config.toml").exists() and (tmp_path / "campaigns" / "welcome.toml").exists()
    assert scrm(tmp_path, store, "init").returncode == 1  # never overwrites silently

    chat = scrm(tmp_path, store, "chat", "--as", "customer:alice", stdin="你好,我想买奶粉,有优惠券吗\n")
    assert chat.returncode == 0, chat.stderr
    assert "bot> alice,欢迎" in chat.stdout  # the campaign message arrived before the chat exited

    shown = scrm(tmp_path, store, "customers", "show", "console:alice", "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert {t["name"]: t["source"] for t in view["tags"]} == {"奶粉": "keyword", "coupon-seeker": "keyword"}
    code = view["coupons"][0]["code"]
    assert code in chat.stdout
    kinds = [t["kind"] for t in view["touchpoints"]]
    assert kinds[0] == "text" and "campaign_message" in kinds and "coupon_granted" in kinds

    redeemed = scrm(tmp_path, store, "coupons", "redeem", code)
    assert redeemed.returncode == 0 and "已核销" in redeemed.stdout
    again = scrm(tmp_path, store, "coupons", "redeem", code)
    assert again.returncode == 1 and "已经使用过" in again.stderr
    assert scrm(tmp_path, store, "coupons", "redeem", "NOSUCHCODE").returncode == 1
    pools = {p["name"]: p for p in json.loads(scrm(tmp_path, store, "coupons", "list", "--json").stdout)}
    assert (pools["welcome"]["issued"], pools["welcome"]["redeemed"], pools["welcome"]["free"]) == (1, 1, 0)

    (tmp_path / "codes.csv").write_text("code,expires\nSUP-1,2027-01-31\nsup-2\nSUP-1\n", "utf-8")
    imported = scrm(tmp_path, store, "coupons", "import", "winback", "codes.csv", "--expires", "2099-12-31")
    assert imported.returncode == 0, imported.stderr
    assert "2 new code(s) in pool winback (1 duplicate(s) skipped)" in imported.stdout
    (tmp_path / "codes.csv").write_text("OK-1\nnot a code\n", "utf-8")
    refused = scrm(tmp_path, store, "coupons", "import", "winback", "codes.csv")
    assert refused.returncode == 1 and "line 2: 'NOT A CODE'" in refused.stderr
    pools = {p["name"]: p for p in json.loads(scrm(tmp_path, store, "coupons", "list", "--json").stdout)}
    assert pools["winback"]["free"] == 2  # the refused file added nothing
    segments = {s["segment"]: s["count"] for s in json.loads(scrm(tmp_path, store, "segments", "list", "--json").stdout)}
    assert segments["formula_fans"] == 1 and segments["silent_30d"] == 0

    report = json.loads(scrm(tmp_path, store, "report", "--json").stdout)
    assert (report["new_customers"], report["campaign_sends"], report["coupon_redemptions"]) == (1, 1, 1)
    assert report["conversion_rate"] == 1.0

    manager = scrm(tmp_path, store, "chat", "--as", "manager:bob", stdin="/report\n")
    assert "新客户 New customers" in manager.stdout

    assert scrm(tmp_path, store, "customers", "show", "console:nobody").returncode == 1
    listed = scrm(tmp_path, store, "campaigns", "list")
    assert "welcome" in listed.stdout


def test_campaign_errors_name_file_key_and_problem(tmp_path, store):
    scrm(tmp_path, store, "init")
    (tmp_path / "campaigns" / "broken.toml").write_text(
        'name = "broken"\n[trigger]\nevent = "first_message"\ndelay = "soon"\n[coupon]\npool = "nope"\n'
        '[message]\ntext = "hi {{ custmer.name }}"\n', "utf-8")
    result = scrm(tmp_path, store, "campaigns", "validate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "broken.toml: trigger.delay: 'soon' is not a duration" in result.stderr
    (tmp_path / "campaigns" / "broken.toml").write_text(
        'name = "broken"\n[trigger]\nevent = "first_message"\n[coupon]\npool = "nope"\n'
        '[message]\ntext = "hi {{ custmer.name }}"\n', "utf-8")
    result = scrm(tmp_path, store, "campaigns", "validate")
    assert "broken.toml: coupon.pool: unknown pool 'nope'" in result.stderr
    assert "broken.toml: message.text: unknown variable(s): custmer" in result.stderr


def test_validate_checks_a_file_as_the_folder_would_load_it(tmp_path, store):
    """`scrm campaigns validate FILE`: one file's problems, and its name against the folder's other files,
    before it is put there (the console's editor runs the same check, scrm.campaigns.definitions.check_file)."""
    scrm(tmp_path, store, "init")
    before = sorted(p.name for p in (tmp_path / "campaigns").iterdir())
    draft = tmp_path / "welcome-2.toml"
    draft.write_text((tmp_path / "campaigns" / "welcome.toml").read_text("utf-8"), "utf-8")
    taken = scrm(tmp_path, store, "campaigns", "validate", str(draft))
    assert taken.returncode == 2 and "welcome-2.toml: name: 'welcome' is already used by welcome.toml" in taken.stderr
    draft.write_text(draft.read_text("utf-8").replace('name = "welcome"', 'name = "welcome-2"'), "utf-8")
    valid = scrm(tmp_path, store, "campaigns", "validate", str(draft))
    assert valid.returncode == 0 and "1 campaign file(s) valid" in valid.stdout
    # a new version of a file in the folder is checked in its place (its own name is not a clash)
    edited = tmp_path / "winback.toml"
    edited.write_text((tmp_path / "campaigns" / "winback.toml").read_text("utf-8").replace("days = 30", "days = 0"),
                      "utf-8")
    wrong = scrm(tmp_path, store, "campaigns", "validate", str(edited))
    assert wrong.returncode == 2 and "winback.toml: trigger.days: Input should be greater than 0" in wrong.stderr
    assert "already used" not in wrong.stderr
    assert sorted(p.name for p in (tmp_path / "campaigns").iterdir()) == before
