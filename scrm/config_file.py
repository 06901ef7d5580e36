"""Reading a config file: TOML, environment overrides, and every problem named by its key path.

A bad file must never end in a traceback: :func:`load_config` raises :class:`ConfigError` carrying
one line per problem, each naming the key path (``channels.telegram.main.token: missing``). Channel
accounts are validated by their channel's own settings model, so this module sits above the
channel registry, and :mod:`scrm.config` (the models, which every module reads) below it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from scrm.channels import channel_types
from scrm.config import Config, ConfigError

ENV_PREFIX = "SCRM_"
#: Environment variables with this prefix are not config keys (tests, the config path itself).
_ENV_RESERVED = ("SCRM_TEST_", "SCRM_CONFIG")


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """``SCRM_CHANNELS__TELEGRAM__MAIN__TOKEN=x`` sets ``channels.telegram.main.token = "x"``."""
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name.startswith(_ENV_RESERVED):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = data
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[path[-1]] = value


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _problem(error: Mapping[str, Any]) -> str:
    if error["type"] == "missing":
        return "missing"
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return re.sub(r"^Value error, ", "", error["msg"])


def parse_config(data: dict[str, Any], base_dir: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Validate a config mapping (already read from TOML) including each channel's accounts."""
    data = dict(data)
    _apply_env(data, os.environ if environ is None else environ)
    problems: list[str] = []
    config: Config | None = None
    try:
        config = Config.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        problems += [f"{_location(e['loc'])}: {_problem(e)}" for e in exc.errors()]
    channels = data.get("channels", {})
    if isinstance(channels, dict):
        problems += _channel_problems(channels)
    if problems:
        raise ConfigError(problems)
    assert config is not None
    return config


def _channel_problems(channels: dict[str, Any]) -> list[str]:
    known = channel_types()
    problems: list[str] = []
    for kind, accounts in channels.items():
        if kind not in known:
            problems.append(f"channels.{kind}: unknown channel (known: {', '.join(sorted(known))})")
            continue
        if not isinstance(accounts, dict):
            continue
        for account, settings in accounts.items():
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", account):
                problems.append(f"channels.{kind}.{account}: account names use A-Z a-z 0-9 _ - only")
            try:
                known[kind].settings_model.model_validate(settings)
            except ValidationError as exc:
                problems += [
                    f"channels.{kind}.{account}.{_location(e['loc'])}: {_problem(e)}" for e in exc.errors()
                ]
    return problems


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file (run `scrm init` to write one)"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_config(data, path.resolve().parent, environ)


def demo_file(name: str) -> Path:
    """A file of the demo set (``config.example.toml``, ``campaigns``, ``replies``): inside the installed
    package, or the source checkout. ``scrm init`` copies them; the console offers the demo campaigns as
    templates."""
    packaged = Path(str(resources.files("scrm"))) / "demo" / name
    return packaged if packaged.exists() else Path(__file__).resolve().parents[1] / name
