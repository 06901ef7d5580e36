"""``scrm chat``: a terminal chat with the service through its console channel.

It talks HTTP to a running ``scrm run`` when one answers at the configured address, and otherwise
starts the same application in-process on a free loopback port: one code path either way.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from scrm.config import Config

Printer = Callable[[str], None]


def console_account(config: Config) -> str | None:
    return next(iter(config.channels.get("console", {})), None)


@asynccontextmanager
async def _service_url(config: Config, url: str | None) -> AsyncIterator[str]:
    base = url or f"http://{config.service.host}:{config.service.port}"
    if await _answers(base):
        yield base
        return
    if url:
        raise ConnectionError(f"no SCRM service answers at {url}")
    from scrm.web import create_app

    runner = web.AppRunner(create_app(config), handle_signals=False)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def _answers(base: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http, \
                http.get(f"{base}/healthz") as resp:
            return resp.status in (200, 503) and "scheduler" in await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False


def _show(out: Printer, text: str) -> None:
    out("bot> " + text.replace("\n", "\n     "))


class ChatSession:
    def __init__(self, http: aiohttp.ClientSession, base: str, account: str, user: str, out: Printer) -> None:
        self.http, self.user, self.out = http, user, out
        self.base = f"{base}/console/{account}"

    async def say(self, text: str) -> None:
        body = {"user": self.user, "text": text, "id": uuid.uuid4().hex}
        async with self.http.post(f"{self.base}/messages", json=body) as resp:
            if resp.status != 200:
                self.out(f"!! {resp.status}: {await resp.text()}")
                return
            data = await resp.json()
            for reply in data["replies"]:
                _show(self.out, reply)
            for path in data.get("images", []):
                _show(self.out, f"[chart: {path}]")

    async def poll(self, wait: float) -> int:
        """Print what arrived; returns how many deliveries are still pending for this user."""
        params = {"user": self.user, "wait": str(wait)}
        async with self.http.get(f"{self.base}/updates", params=params) as resp:
            resp.raise_for_status()
            data = await resp.json()
        for message in data["messages"]:
            _show(self.out, message)
        return int(data["pending"]) + len(data["messages"])

    async def drain(self, deadline: float = 30.0) -> None:
        """Wait until nothing is pending for this user (or the deadline passes)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end and await self.poll(wait=1.0):
            pass


async def run_chat(config: Config, user: str, url: str | None, lines: AsyncIterator[str] | None,
                   out: Printer = print) -> int:
    """Scripted when ``lines`` is given (one message per line), interactive otherwise."""
    account = console_account(config)
    if account is None:
        out("error: no console channel configured (add [channels.console.local] to the config)")
        return 2
    async with _service_url(config, url) as base, aiohttp.ClientSession() as http:
        chat = ChatSession(http, base, account, user, out)
        if lines is not None:
            async for line in lines:
                if line.strip():
                    await chat.say(line.rstrip("\n"))
                    await chat.poll(wait=0)
            await chat.drain()
            return 0
        return await _interactive(chat)


async def _interactive(chat: ChatSession) -> int:
    chat.out(f"Chatting as {chat.user}. Ctrl-D to leave.")

    async def listen() -> None:
        while True:
            await chat.poll(wait=10)

    listener = asyncio.create_task(listen())
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                line = await loop.run_in_executor(None, input, f"{chat.user}> ")
            except EOFError:
                break
            if line.strip():
                await chat.say(line)
    finally:
        listener.cancel()
    await chat.drain(deadline=5)
    return 0


async def stdin_lines() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        yield line
