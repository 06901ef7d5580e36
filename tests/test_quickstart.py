"""The quick start shows the whole product: the config `scrm init` writes (config.example.toml) turns on
points, check-in, a reward with its coupon pool, referrals and a satisfaction survey, its replies/ folder
answers keywords and falls back in and out of working hours, and it carries the platform channels of
README's "Connecting channels" as commented tables that load once filled in."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from scrm.clock import ManualClock, SystemClock
from scrm.config_file import load_config, parse_config
from scrm.service import Service
from tests.conftest import ROOT, cli_env
from tests.test_loyalty import World


def scrm(cwd: Path, store: dict[str, Any], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m scrm`` as tests/test_cli.py runs it, on this checkout's code and demo files (as
    tests/e2e.py does), whatever copy of the package is installed."""
    env = cli_env(store, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "scrm", *args], cwd=cwd, env=env, input=stdin, capture_output=True,
                          check=False, text=True, timeout=120)


def test_quick_start_chat_answers_loyalty_commands(tmp_path, store):
    assert scrm(tmp_path, store, "init").returncode == 0
    chat = scrm(tmp_path, store, "chat", "--as", "customer:alice", stdin="签到\n积分\n/invite\n积分兑换\n积分兑换 1\n")
    assert chat.returncode == 0, chat.stderr
    out = chat.stdout
    assert "bot> 签到成功,+5 积分!当前积分 5。" in out
    assert "bot> 您的积分:5" in out and "+5 签到" in out and "回复「积分兑换」查看可兑换的礼券。" in out
    code = re.search(r"bot> 您的邀请码:([A-Z0-9]{8})", out)
    assert code, out
    assert f"发送「邀请码 {code.group(1)}」" in out and "您将获得 200 积分" in out
    assert "1. 10 元券 — 100 积分" in out
    assert "积分不足:需要 100,当前 5。" in out  # the reward is there; alice cannot afford it yet
    assert "bot> alice,欢迎" in out  # the demo welcome campaign as before

    manager = scrm(tmp_path, store, "chat", "--as", "manager:bob", stdin="/survey console:alice\n")
    assert manager.returncode == 0, manager.stderr
    assert "满意度调查已安排" in manager.stdout


async def test_demo_loyalty_end_to_end(tmp_path, store):
    """The written config's loyalty settings in use: an order earns points, points buy the reward's
    coupon, the survey comes delay_hours after the order and answering earns, a friend's first order
    pays the referrer. The scheduler is off: the test runs the loyalty sweep itself (tests/test_loyalty.py)."""
    assert scrm(tmp_path, store, "init").returncode == 0
    environ = {"SCRM_STORE__URL": store["url"]} | (
        {"SCRM_STORE__SCHEMA_NAME": store["schema_name"]} if "schema_name" in store else {})
    config = load_config(tmp_path / "config.toml", environ=environ)
    loyalty = config.loyalty
    assert loyalty is not None and loyalty.surveys is not None
    assert [r.pool for r in loyalty.rewards.values()] == ["points10"] and "points10" in config.coupons
    service = Service(config, ManualClock(SystemClock().now()))
    await service.start(scheduler=False)
    try:
        w = World(service)
        assert "+5" in await w.say("ann", "签到")
        await w.buy("ann", "Q-1", 120)
        assert (await w.run()).points == 120
        assert "您的积分:125" in await w.say("ann", "积分")
        answer = await w.say("ann", "积分兑换 1")
        code = re.search(r"券码 (PTS\w+)", answer)
        assert code and "剩余积分 25" in answer, answer
        assert "已核销" in await w.say("ann", f"我要用券 {code.group(1)}")

        w.inbox("ann")
        w.clock.advance(timedelta(hours=loyalty.surveys.delay_hours))
        assert (await w.run()).surveys_sent == 1
        assert any("1-5" in m for m in w.inbox("ann"))
        assert "感谢您的评价" in await w.say("ann", "5 很满意")
        assert "您的积分:35" in await w.say("ann", "积分")

        invite = re.search(r"邀请码:(\w+)", await w.say("ann", "/invite"))
        assert invite
        assert "已记录您的邀请人" in await w.say("ben", f"邀请码 {invite.group(1)}")
        await w.buy("ben", "Q-2", 80)
        assert (await w.run()).referrals_paid == 1
        assert "您的积分:235" in await w.say("ann", "积分")
    finally:
        await service.stop()


def test_quick_start_chat_answers_keywords(tmp_path, store):
    """The demo auto-replies (replies/ as `scrm init` writes it) in a piped chat: a rule per message, the
    negated keyword falls to the fallback, which the first message already had (its cooldown: silence)."""
    assert scrm(tmp_path, store, "init").returncode == 0
    chat = scrm(tmp_path, store, "chat", "--as", "customer:cleo",
                stdin="你好,我想买奶粉\n营业时间?\n推荐一款奶粉吧\n我不要快递,自己来取\n快递几天到\n")
    assert chat.returncode == 0, chat.stderr
    replies = [line for line in chat.stdout.splitlines() if line.startswith("bot> ")]
    fallback = [r for r in replies if "客服会尽快" in r or "下班时间" in r]
    assert len(fallback) == 1, replies  # in or out of hours, whenever the test runs; once, for the first message
    assert "bot> 门店营业时间:每天 9:00-21:00,线上商城 24 小时营业。" in chat.stdout
    assert "bot> cleo,选奶粉看段位、配方和宝宝的反应,拿不准就问我们的育婴顾问。" in chat.stdout
    assert chat.stdout.count("下单后 48 小时内发货") == 1  # 快递几天到, not 不要快递


async def test_demo_fallback_in_and_out_of_working_hours(tmp_path, store):
    assert scrm(tmp_path, store, "init").returncode == 0
    environ = {"SCRM_STORE__URL": store["url"]} | (
        {"SCRM_STORE__SCHEMA_NAME": store["schema_name"]} if "schema_name" in store else {})
    wednesday = datetime(2026, 12, 2, 2, 0)  # 10:00 in Asia/Shanghai, where the demo's staff are
    service = Service(load_config(tmp_path / "config.toml", environ=environ), ManualClock(wednesday))
    await service.start(scheduler=False)
    try:
        w = World(service)
        assert "客服会尽快在这里回复您" in await w.say("dee", "在吗")
        w.clock.advance(timedelta(hours=9))  # 19:00
        assert "现在是下班时间" in await w.say("eli", "在吗")
    finally:
        await service.stop()


# -- the commented channel tables ---------------------------------------------------------------------

_TABLE = re.compile(r"^\[channels\.(wechat|wecom|telegram)\.")
_SETTING = re.compile(r"^(\[\[?channels\.|[a-z_]+ = )")
#: What stands for a secret ("...", as in the README) in the commented tables, and a value of the shape the
#: platform gives: the tables must load once these are filled in (in the file or from the environment).
SECRETS = {
    ("wechat", "brand", "app_secret"): "0123456789abcdef0123456789abcdef",
    ("wechat", "brand", "encoding_aes_key"): "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    ("wecom", "acme", "secret"): "Xq3m2F0k9LwTnB7yR5vH1cJ8dE4gA6sPzUoWiKlMN",
    ("wecom", "acme", "token"): "wecomtoken",
    ("wecom", "acme", "encoding_aes_key"): "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq",
    ("telegram", "main", "token"): "7012345678:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0",
}


def uncommented_example() -> str:
    """config.example.toml with its commented WeChat, WeCom and Telegram tables uncommented: from the
    first commented channel table to the end of that comment block, every ``# [table]``, ``# [[table]]`` and
    ``# key = value`` line loses its ``# ``; the prose around them stays comments."""
    lines = (ROOT / "config.example.toml").read_text("utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ") and _TABLE.match(line[2:]))
    out = lines[:start]
    for i in range(start, len(lines)):
        if not lines[i].startswith("#"):
            out += lines[i:]
            break
        body = lines[i][2:]
        out.append(body if _SETTING.match(body) else lines[i])
    return "\n".join(out) + "\n"


def readme_channel_tables() -> dict[tuple[str, ...], tuple[dict[str, Any], set[str]]]:
    """Each table of README's "Connecting channels" examples: its values, and every key it names
    (optional ones are named in comments, ``# polling = true``)."""
    readme = (ROOT / "README.md").read_text("utf-8")
    section = readme.split("## Connecting channels", 1)[1].split("\n## ", 1)[0]
    tables: dict[tuple[str, ...], tuple[dict[str, Any], set[str]]] = {}
    for block in re.findall(r"```toml\n(.+?)\n```", section, re.DOTALL):
        data = tomllib.loads(block)
        for chunk in re.split(r"^(?=\[)", block, flags=re.MULTILINE):
            header = re.match(r"\[([^\]]+)\]", chunk)
            if header is None:
                continue
            path = tuple(header.group(1).split("."))
            values: Any = data
            for part in path:
                values = values[part]
            body = chunk.split("\n", 1)[1] if "\n" in chunk else ""
            keys = set(re.findall(r"(?:^|#|\s)([a-z_]+) = ", body, re.MULTILINE))
            tables[path] = ({k: v for k, v in values.items() if not isinstance(v, dict)}, keys)
    return tables


def test_commented_channel_tables_match_readme_and_load(tmp_path):
    data = tomllib.loads(uncommented_example())
    channels = data["channels"]
    assert set(channels) == {"console", "wechat", "wecom", "telegram"}

    readme = readme_channel_tables()
    assert len(readme) == 5  # wechat.brand, wecom.acme and its two welcome rules, telegram.main
    for path, (values, keys) in readme.items():
        table: Any = data
        for part in path:
            table = table[part]
        assert {k for k, v in table.items() if not isinstance(v, dict)} == keys, path
        assert {k: table[k] for k in values} == values, path  # the README's example values

    # With real values in place of the placeholders, in the file or from the environment as the
    # comments advise, it loads (each account validated by its channel's own settings model).
    filled = tomllib.loads(uncommented_example())
    environ = {}
    for (kind, account, key), value in SECRETS.items():
        assert "..." in filled["channels"][kind][account][key]
        filled["channels"][kind][account][key] = value
        del data["channels"][kind][account][key]
        environ[f"SCRM_CHANNELS__{kind.upper()}__{account.upper()}__{key.upper()}"] = value
    for config in (parse_config(filled, tmp_path, environ={}), parse_config(data, tmp_path, environ=environ)):
        assert set(config.channels["wechat"]) == {"brand"} and set(config.channels["telegram"]) == {"main"}
        assert set(config.channels["wecom"]["acme"]["welcome"]) == {"store_a", "default"}
        assert config.channels["wecom"]["acme"]["welcome"]["store_a"]["coupon_pool"] in config.coupons
