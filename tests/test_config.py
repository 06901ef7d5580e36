"""Config validation: every problem named by key path, one line each, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scrm.config import ConfigError
from scrm.config_file import load_config
from tests.conftest import ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, "utf-8")
    return path


def test_example_config_is_valid(tmp_path):
    config = load_config(ROOT / "config.example.toml", environ={})
    assert config.store.url == "sqlite+aiosqlite:///scrm.db"
    assert config.store_url == f"sqlite+aiosqlite:///{ROOT / 'scrm.db'}"
    assert {r.tag for r in config.tagging.rules} >= {"奶粉", "coupon-seeker"}
    assert config.staff["console:bob"] == "manager"


def test_every_problem_is_named_by_key_path(tmp_path):
    path = write(tmp_path, """
[service]
port = 99999
colour = "red"
[store]
url = "mysql://x"
[coupons.w]
prefix = "lower"
[staff]
"console:eve" = "boss"
[channels.console.local]
allow_remote = "maybe"
[channels.carrier_pigeon.x]
""")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    problems = info.value.problems
    assert any(p.startswith("service.port: ") for p in problems)
    assert "service.colour: unknown key" in problems
    assert any(p.startswith("store.url: must start with") for p in problems)
    assert any(p.startswith("coupons.w.prefix: ") for p in problems)
    assert any(p.startswith("staff.console:eve: ") for p in problems)
    assert any(p.startswith("channels.console.local.allow_remote: ") for p in problems)
    assert any(p.startswith("channels.carrier_pigeon: unknown channel") for p in problems)
    assert len(problems) == 7


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[service\nport = 1"), environ={})
    assert "invalid TOML" in info.value.problems[0]
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", environ={})
    assert "no such file" in info.value.problems[0]


def test_environment_overrides_file(tmp_path):
    path = write(tmp_path, '[service]\nport = 8080\n')
    config = load_config(path, environ={"SCRM_SERVICE__PORT": "9090", "SCRM_STORE__URL": "sqlite+aiosqlite:///x.db",
                                        "SCRM_TEST_POSTGRES_URL": "ignored"})
    assert config.service.port == 9090
    assert config.store.url == "sqlite+aiosqlite:///x.db"


def test_cli_prints_problems_and_exits_non_zero(tmp_path):
    path = write(tmp_path, '[service]\nport = "eighty"\n[channels.console.local]\nallow_remote = 3\n')
    result = subprocess.run([sys.executable, "-m", "scrm", "-c", str(path), "run"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "service.port: " in result.stderr
    assert "channels.console.local.allow_remote: " in result.stderr
