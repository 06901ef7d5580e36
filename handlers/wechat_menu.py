"""The Official Account's custom menu (自定义菜单): its config, and ``scrm wechat menu push|show|delete``.

``[channels.wechat.<account>.menu]`` holds up to 3 ``[[...menu.button]]`` entries, each a leaf (``click``
with a ``key``, ``view`` with a ``url``, ``miniprogram`` with ``appid``, ``pagepath`` and a fallback
``url``) or a parent of up to 5 ``sub_button`` leaves, checked against WeChat's limits (names at most 16
bytes at the top and 60 in a submenu, keys 128, URLs 1024; a Chinese character is 3 bytes) so a bad
menu is refused by key path before WeChat sees it. ``[...menu.clicks.<KEY>]`` says what a tap on the
click button with that key does (:class:`scrm.acquisition.menus.MenuClick`); the core does it when the tap arrives.

The commands talk to WeChat with the channel's own API client (handlers.wechat, imported when a command
runs: that module imports this one for the settings model).
"""

from __future__ import annotations

import asyncio
import difflib
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import click
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scrm.acquisition.menus import MenuClick

if TYPE_CHECKING:
    from handlers.wechat import WeChatSettings
    from scrm.acquisition.links import Links
    from scrm.config import Config

T = TypeVar("T")
KEY_BYTES = 128
URL_BYTES = 1024
#: What WeChat's menu errcodes mean, in the words an operator can act on.
ERRCODES = {
    40016: "the number of buttons is wrong (1 to 3 at the top)",
    40017: "a button's type is not one WeChat knows",
    40018: "a button's name is too long (16 bytes at the top; a Chinese character is 3)",
    40019: "a button's key is too long (128 bytes)",
    40020: "a button's URL is too long (1024 bytes)",
    40023: "the number of sub-buttons is wrong (1 to 5 under a button)",
    40024: "a sub-button's type is not one WeChat knows",
    40025: "a sub-button's name is too long (60 bytes)",
    40026: "a sub-button's key is too long (128 bytes)",
    40027: "a sub-button's URL is too long (1024 bytes)",
    40033: "the request was not UTF-8 as WeChat wants it",
    40054: "a sub-button's URL is on a domain WeChat does not allow for this account",
    40055: "a button's URL is on a domain WeChat does not allow for this account",
    46003: "the account has no menu",
    48001: "this account may not use the menu API (an unverified subscription account?)",
    65301: "WeChat has no such conditional menu",
}


def _fits(value: str, limit: int, what: str) -> str:
    size = len(value.encode("utf-8"))
    if size > limit:
        raise ValueError(f"{what} is {size} bytes; WeChat takes at most {limit} (a Chinese character is 3)")
    return value


class SubButton(BaseModel):
    """A leaf: ``click`` (a ``key`` for the tap event), ``view`` (opens ``url``) or ``miniprogram``."""

    model_config = ConfigDict(extra="forbid")
    NAME_BYTES: ClassVar[int] = 60

    name: str = Field(min_length=1)
    type: Literal["click", "view", "miniprogram"] | None = None
    key: str | None = Field(None, min_length=1)
    url: str | None = None
    appid: str | None = Field(None, min_length=1)
    pagepath: str | None = Field(None, min_length=1)

    @field_validator("name")
    @classmethod
    def _name_fits(cls, value: str) -> str:
        return _fits(value, cls.NAME_BYTES, "the name")

    @field_validator("key")
    @classmethod
    def _key_fits(cls, value: str | None) -> str | None:
        return value if value is None else _fits(value, KEY_BYTES, "the key")

    @field_validator("url")
    @classmethod
    def _web_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value if value is None else _fits(value, URL_BYTES, "the URL")

    @model_validator(mode="after")
    def _leaf(self) -> SubButton:
        self._check_leaf()
        return self

    def _check_leaf(self) -> None:
        """Raise ValueError unless the type has what it needs and nothing it does not take."""
        if self.type is None:
            raise ValueError("give type: click (with key), view (with url) or miniprogram (with appid, pagepath, url)")
        needs = {"click": ("key",), "view": ("url",), "miniprogram": ("appid", "pagepath", "url")}[self.type]
        if missing := [f for f in needs if getattr(self, f) is None]:
            raise ValueError(f"a {self.type} button needs {', '.join(missing)}")
        if extra := [f for f in ("key", "url", "appid", "pagepath") if f not in needs and getattr(self, f)]:
            raise ValueError(f"a {self.type} button takes no {', '.join(extra)}")

    def body(self, link: Callable[[str], str] = str) -> dict[str, Any]:
        """The button as menu/create takes it; ``link`` gives the URL a view button opens for its target."""
        fields = {"type": self.type, "name": self.name, "key": self.key,
                  "url": link(self.url) if self.type == "view" and self.url else self.url,
                  "appid": self.appid, "pagepath": self.pagepath}
        return {k: v for k, v in fields.items() if v is not None}


class Button(SubButton):
    """A top-level button: a leaf, or a parent (name only) of 1 to 5 ``sub_button`` leaves."""

    NAME_BYTES: ClassVar[int] = 16

    sub_button: list[SubButton] = Field([], max_length=5)

    @model_validator(mode="after")
    def _leaf(self) -> Button:
        if not self.sub_button and self.type is None:
            raise ValueError("give sub_button, or type: click (with key), view (with url) or miniprogram")
        if not self.sub_button:
            self._check_leaf()
        elif self.type is not None or self.key or self.url or self.appid or self.pagepath:
            raise ValueError("a button with sub_button has a name only (the sub-buttons do the rest)")
        return self

    def body(self, link: Callable[[str], str] = str) -> dict[str, Any]:
        if self.sub_button:
            return {"name": self.name, "sub_button": [b.body(link) for b in self.sub_button]}
        return super().body(link)


class Menu(BaseModel):
    """``button``: the menu as shown; ``clicks``: what each click key does."""

    model_config = ConfigDict(extra="forbid")

    button: list[Button] = Field(min_length=1, max_length=3)
    clicks: dict[str, MenuClick] = {}

    @model_validator(mode="after")
    def _keys(self) -> Menu:
        keys = [leaf.key for leaf in self.leaves() if leaf.key is not None]
        if twice := sorted({k for k in keys if keys.count(k) > 1}):
            raise ValueError(f"key {twice[0]!r} is on two buttons: a tap could not be told apart")
        if unknown := sorted(set(self.clicks) - set(keys)):
            raise ValueError(f"clicks.{unknown[0]}: no click button has this key (keys: {', '.join(keys) or 'none'})")
        return self

    def leaves(self) -> Iterator[SubButton]:
        for button in self.button:
            yield from button.sub_button or [button]

    def body(self, link: Callable[[str], str] = str) -> dict[str, Any]:
        """menu/create's body; ``link`` as for :meth:`SubButton.body`."""
        return {"button": [b.body(link) for b in self.button]}


@asynccontextmanager
async def _tracked(config: Config, account: str) -> AsyncIterator[Links]:
    """The tracked links (scrm.acquisition.links) view buttons open, saved to the store on the way out: a
    visit is counted as a click, people apart from link previews, and WeChat's VIEW event names who tapped."""
    from scrm.acquisition import links
    from scrm.cli.base import open_private_store
    from scrm.clock import SystemClock
    from scrm.store.engine import writing

    async with open_private_store(config) as (sessions, keyring):
        tracked = links.for_menu(config, keyring, "wechat", account, SystemClock().now())
        yield tracked
        async with writing(sessions) as session:
            await tracked.save(session)


def describe(button: list[dict[str, Any]]) -> list[str]:
    """A menu (menu/get's or menu/create's ``button`` list) as lines, one a button, for reading and diffing."""
    lines = []
    for top in button:
        subs = top.get("sub_button") or []
        lines.append(f"{top.get('name', '')}" + ("" if subs else f"  {_action(top)}"))
        lines += [f"  └ {sub.get('name', '')}  {_action(sub)}" for sub in subs]
    return lines


def _action(button: dict[str, Any]) -> str:
    kind = button.get("type", "?")
    if kind == "click":
        return f"click {button.get('key', '')}"
    if kind == "miniprogram":
        return f"miniprogram {button.get('appid', '')}:{button.get('pagepath', '')} ({button.get('url', '')})"
    return f"{kind} {button.get('url') or button.get('key') or button.get('media_id') or button.get('article_id', '')}"


# -- CLI ------------------------------------------------------------------------------------------


@click.group("menu")
def menu_cli() -> None:
    """The Official Account's custom menu: push the config's, show WeChat's, delete it."""


_account_option = click.option("--account", "account", default=None,
                               help="The [channels.wechat.<account>] to use (default: the only one).")


def _settings(ctx: click.Context, account: str | None) -> tuple[Config, str, WeChatSettings]:
    from handlers.wechat import WeChatSettings
    from scrm.cli.base import EXIT_USAGE, load

    config = load(ctx)
    accounts = config.channels.get("wechat", {})
    if account is None and len(accounts) == 1:
        account = next(iter(accounts))
    if account not in accounts:
        named = ", ".join(sorted(accounts)) or "none"
        why = "give --account" if account is None else f"no wechat account {account!r}"
        click.echo(f"{why} (configured: {named})", err=True)
        sys.exit(EXIT_USAGE)
    assert account is not None
    return config, account, WeChatSettings.model_validate(accounts[account])


def _configured(account: str, settings: WeChatSettings) -> Menu:
    from scrm.cli.base import EXIT_USAGE

    if settings.menu is None:
        click.echo(f"channels.wechat.{account}.menu is not set: no menu to push", err=True)
        sys.exit(EXIT_USAGE)
    return settings.menu


async def _call(settings: WeChatSettings, endpoint: str, body: dict[str, Any] | None = None) -> Any:
    """One menu API call with the channel's token handling; WeChat's refusals leave as :class:`MenuError`."""
    from handlers.wechat import _NETWORK_ERRORS, _Api, _ApiError, _network_name, _NotSent, _TokenError

    api = _Api(settings)
    await api.start()
    try:
        return await api.call(endpoint, body, method="GET" if body is None else "POST")
    except _TokenError as exc:
        raise MenuError(f"WeChat refused the access token: {exc}") from exc
    except _ApiError as exc:
        meaning = ERRCODES.get(exc.errcode) if exc.errcode is not None else None
        raise MenuError(f"WeChat refused {endpoint}: {exc}" + (f" — {meaning}" if meaning else ""),
                        exc.errcode) from exc
    except _NotSent as exc:
        raise MenuError(f"WeChat's API could not be reached: {_network_name(exc.cause)}") from exc
    except _NETWORK_ERRORS as exc:
        raise MenuError(f"WeChat's API could not be reached: {_network_name(exc)}") from exc
    finally:
        await api.stop()


class MenuError(Exception):
    """A menu call that did not succeed, said in words; ``errcode`` is WeChat's when it answered one."""

    def __init__(self, reason: str, errcode: int | None = None) -> None:
        super().__init__(reason)
        self.errcode = errcode


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's calls; WeChat's refusal is printed, exit 1."""
    from scrm.cli.base import EXIT_FAILED

    try:
        return asyncio.run(coro)
    except MenuError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_FAILED)


@menu_cli.command("push")
@_account_option
@click.pass_context
def push(ctx: click.Context, account: str | None) -> None:
    """Replace the account's menu on WeChat with the config's (menu/create)."""
    from scrm.campaigns.definitions import load_campaigns
    from scrm.cli.base import EXIT_USAGE, guard
    from scrm.conversations.replies import load_replies
    from scrm.acquisition.menus import check_clicks

    config, account, settings = _settings(ctx, account)
    menu = _configured(account, settings)
    campaigns = {c.definition.name: c for c in guard(load_campaigns)(config)}
    if problems := check_clicks(menu.clicks, guard(load_replies)(config), campaigns):
        for path, problem in problems:
            click.echo(f"channels.wechat.{account}.menu.clicks.{path}: {problem}", err=True)
        sys.exit(EXIT_USAGE)

    async def push_menu() -> None:
        async with _tracked(config, account) as tracked:
            body = menu.body(tracked.track)
        await _call(settings, "menu/create", body)  # the links are stored before WeChat shows them

    guard(_run)(push_menu())
    click.echo(f"menu pushed to wechat:{account} ({len(list(menu.leaves()))} buttons); "
               "WeChat shows it to followers within about 5 minutes")


@menu_cli.command("show")
@_account_option
@click.pass_context
def show(ctx: click.Context, account: str | None) -> None:
    """The menu WeChat has (menu/get), and how the config's differs from it."""
    from scrm.cli.base import guard

    config, account, settings = _settings(ctx, account)

    async def current() -> list[dict[str, Any]]:
        try:
            answer = await _call(settings, "menu/get")
        except MenuError as exc:
            if exc.errcode == 46003:
                return []
            raise
        return list(((answer or {}).get("menu") or {}).get("button") or [])

    live = describe(_run(current()))
    click.echo(f"wechat:{account} menu on WeChat:")
    click.echo("\n".join(f"  {line}" for line in live) if live else "  (none)")
    if settings.menu is None:
        click.echo(f"channels.wechat.{account}.menu is not set in {ctx.obj['config_path']}")
        return
    menu = settings.menu

    async def configured() -> list[dict[str, Any]]:
        async with _tracked(config, account) as tracked:  # as pushed: the same target gives the same link
            return list(menu.body(tracked.track)["button"])

    wanted = describe(guard(_run)(configured()))
    if wanted == live:
        click.echo("the config's menu is the same")
        return
    click.echo("`scrm wechat menu push` would change it:")
    for line in difflib.unified_diff(live, wanted, "on WeChat", "config", lineterm="", n=len(live) + len(wanted)):
        click.echo(f"  {line}")


@menu_cli.command("delete")
@_account_option
@click.pass_context
def delete(ctx: click.Context, account: str | None) -> None:
    """Remove the account's menu on WeChat (menu/delete); the config keeps it for the next push."""
    _, account, settings = _settings(ctx, account)
    _run(_call(settings, "menu/delete"))
    click.echo(f"menu deleted on wechat:{account}")
