"""A fake platform served on a loopback port of its own that can go away and come back on that port.

While it is down nothing listens there, so every connection attempt is refused at once: a platform
outage as the network shows it (what the channels must tell apart from an answer lost after a request
went out). pytest-aiohttp's test servers cannot stop and start again on the same port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web


class LoopbackServer:
    """Serves ``make_app()`` (a fresh application each start: aiohttp freezes one once it runs)."""

    def __init__(self, make_app: Callable[[], web.Application]) -> None:
        self._make_app = make_app
        self._runner: web.AppRunner | None = None
        #: The port, chosen by the system at the first start and kept for every later one.
        self.port = 0

    @property
    def up(self) -> bool:
        return self._runner is not None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        """Listen (again) on the port."""
        if self._runner is not None:
            return
        runner = web.AppRunner(self._make_app(), shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening and close the open connections (a request being answered finishes first)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def refuses(self) -> bool:
        """True when a connection to the port is refused (what a client sees while it is down)."""
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except ConnectionRefusedError:
            return True
        writer.close()
        await writer.wait_closed()
        return False
