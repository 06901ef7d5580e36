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
