"""``/console``: staff in chat get a single-use sign-in link to the browser console (10 minutes)."""

from __future__ import annotations

from scrm.config import Role
from scrm.console.accounts import LINK_TTL, account_for_identity, make_link
from scrm.staff import StaffContext, command

ALL: set[Role] = {"manager", "operator", "admin"}


@command("console", ALL, "/console")
async def console_link(ctx: StaffContext, args: str) -> str:
    """Only for a chat identity linked to a console account (``scrm staff add NAME --identity``)."""
    identity = f"{ctx.event.channel}:{ctx.event.external_id}"
    account = await account_for_identity(ctx.session, identity)
    if account is None:
        return (f"没有控制台账号 No console account is linked to {identity}: an admin runs "
                f"scrm staff add NAME --role {ctx.role} --identity {identity}")
    config = ctx.service.config
    base = (config.console.base_url or f"http://{config.service.host}:{config.service.port}").rstrip("/")
    token = await make_link(ctx.session, account, ctx.now)
    minutes = int(LINK_TTL.total_seconds() // 60)
    return f"控制台登录链接 Console sign-in link for {account.name} (once, {minutes} min):\n{base}/console/link/{token}"
