"""Campaigns: the list with each one's state, last run and funnel; a campaign's page with its funnel by
variant and channel, skips by reason and recent runs; pause and resume; a preview as a chosen customer;
the campaign's TOML edited in the page; a new campaign from a demo campaign.

Every figure and check comes from the core the CLI and chat use: :func:`scrm.reports.funnels`,
:func:`scrm.charts.funnel_png`, :mod:`scrm.campaigns.control`, :func:`scrm.campaigns.outbox.preview`,
:func:`scrm.campaigns.timed.last_runs`, and :func:`scrm.campaigns.definitions.check_file`, which checks a
file's text as the folder would load it. A file is written only when it has no problems, whole (a
temporary file renamed over it), and the service reloads at once; other instances pick the file up as
they pick up a file edited by hand. Each change is in the audit log with its diff.

The funnels are read for every campaign at once and kept as a snapshot (:mod:`scrm.snapshots`): a
campaign sent to 100,000 customers takes ~0.5 s to count (a reply check per delivery), so the list,
the campaign's page and its charts show the last funnels, saying when they were read, while newer
ones are read in the background.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
from pathlib import Path
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from jinja2 import TemplateError
from sqlalchemy import select

from scrm import charts, reports
from scrm.audit import audit
from scrm.campaigns import control, timed
from scrm.campaigns.definitions import (
    CampaignError,
    LoadedCampaign,
    Problem,
    campaigns_folder,
    check_file,
    check_new_file,
    describe_trigger,
    load_campaigns,
    write_file,
)
from scrm.campaigns.outbox import preview
from scrm.config_file import demo_file
from scrm.console.app import Pages, error_page, service, snapshots, staff
from scrm.customers import CustomerRefError, customer_of, parse_ref
from scrm.service import Service
from scrm.snapshots import Snapshot, Snapshots
from scrm.store.engine import reading, writing
from scrm.store.models import Campaign

pages = Pages()
#: The new-campaign page: no campaign name starts with "_", so it is never a campaign's page.
NEW = "/campaigns/_new"


def _loaded(request: web.Request) -> LoadedCampaign | None:
    return service(request).campaigns.get(request.match_info["name"])


async def _no_campaign(request: web.Request) -> web.Response:
    return await error_page(request, 404, f"No campaign {request.match_info['name'][:64]!r}.")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _read(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except FileNotFoundError:
        return ""


def _submitted(form: Any) -> str:
    """The textarea's text as the file will hold it: browsers send a textarea's lines ending in CRLF."""
    text = form.get("toml", "")
    return text.replace("\r\n", "\n") if isinstance(text, str) else ""


def _folder_problems(request: web.Request) -> list[str]:
    """Why the campaigns folder would not load now (the running set then stays as it was), or nothing."""
    try:
        load_campaigns(service(request).config)
    except CampaignError as exc:
        return exc.problems
    return []


def _audience(loaded: LoadedCampaign) -> str:
    d = loaded.definition
    return "groups" if d.audience.groups else d.audience.segment or "the customer"


async def _funnels(svc: Service, kept: Snapshots) -> Snapshot[dict[str, reports.Funnel]]:
    """Every loaded campaign's funnel (:func:`scrm.reports.funnels`), kept as a snapshot: the list, a
    campaign's page and its charts show the same figures, read at the time they say."""
    days, names = svc.config.reports.attribution_days, tuple(sorted(svc.campaigns))

    async def read() -> dict[str, reports.Funnel]:
        async with reading(svc.sessions) as session:
            return await reports.funnels(session, names, days)

    return await kept.get(("funnels", days, names), read)


@pages.get("/campaigns", "manager")
async def campaign_list(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    async with reading(svc.sessions) as session:
        paused = set((await session.scalars(select(Campaign.name).where(Campaign.paused))).all())
        runs = await timed.last_runs(session)
    snapshot = await _funnels(svc, snapshots(request))
    funnels = {name: snapshot.value.get(name) for name in sorted(svc.campaigns)}
    rows: list[dict[str, Any]] = [
        {"loaded": svc.campaigns[name], "trigger": describe_trigger(svc.campaigns[name].definition),
         "audience": _audience(svc.campaigns[name]), "paused": name in paused, "run": runs.get(name),
         "run_text": timed.describe_run(runs.get(name)), "funnel": f}
        for name, f in funnels.items()]
    failed = sorted(name for name, run in runs.items() if name in svc.campaigns and run.status == "failed")
    return aiohttp_jinja2.render_template("campaigns.html", request, {
        "rows": rows, "failed": failed, "at": snapshot.at,
        "steps": reports.STEPS, "label": reports.label, "templates": sorted(_templates()),
        "folder_problems": _folder_problems(request), "notice": request.query.get("notice")})


def _file_state(request: web.Request, loaded: LoadedCampaign) -> tuple[str, list[str]] | None:
    """Whether the file on disk is what runs; if not, what the operator should know."""
    if not loaded.path.exists():
        return "The file is no longer in the campaigns folder: the service drops the campaign at its next reload.", []
    if hashlib.sha256(loaded.path.read_bytes()).hexdigest() == loaded.digest:
        return None
    problems = _folder_problems(request)
    if problems:
        return ("The file on disk is not what runs: the campaigns folder does not load, so the service keeps "
                "running the previous version until these are fixed:", problems)
    return "The file on disk changed: the service picks it up within seconds.", []


@pages.get("/campaigns/{name}", "manager")
async def campaign_page(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    loaded = _loaded(request)
    if loaded is None:
        return await _no_campaign(request)
    name = loaded.definition.name
    async with reading(svc.sessions) as session:
        paused = bool(await session.scalar(select(Campaign.paused).where(Campaign.name == name)))
        runs = await timed.recent_runs(session, name)
    snapshot = await _funnels(svc, snapshots(request))
    return aiohttp_jinja2.render_template("campaign.html", request, {
        "loaded": loaded, "d": loaded.definition, "trigger": describe_trigger(loaded.definition),
        "audience": _audience(loaded), "paused": paused, "funnel": snapshot.value.get(name), "at": snapshot.at,
        "runs": runs,
        "describe_run": timed.describe_run, "steps": reports.STEPS, "label": reports.label,
        "source": _read(loaded.path), "file_state": _file_state(request, loaded),
        "notice": request.query.get("notice"), "ref": "",
        "attribution": reports.attribution_rule(svc.config.reports.attribution_days, "both")})


@pages.get("/campaigns/{name}/funnel.png", "manager")
async def funnel_chart(request: web.Request) -> web.StreamResponse:
    """The funnel as a PNG, by A/B variant (``?by=variant``) or by channel (``?by=channel``), drawn in a
    worker thread (:meth:`scrm.messages.Chart.png`) once for each snapshot of the funnels."""
    loaded = _loaded(request)
    if loaded is None:
        return await _no_campaign(request)
    by = request.query.get("by", "variant")
    if by not in ("variant", "channel"):
        raise web.HTTPBadRequest(text="by is variant or channel")
    svc, kept, name = service(request), snapshots(request), loaded.definition.name

    async def draw() -> bytes | None:
        funnel = (await _funnels(svc, kept)).value.get(name)
        return None if funnel is None else await charts.chart(charts.funnel_png, funnel, "both", None, by).png()

    png = (await kept.get(("funnel.png", name, by), draw)).value
    if png is None:
        raise web.HTTPNotFound(text="this campaign has planned nothing yet")
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "private, no-cache"})


async def _switch(request: web.Request, paused: bool) -> web.StreamResponse:
    """Pause or resume in the store (every instance's outbox reads it) and in this instance at once."""
    svc = service(request)
    loaded = _loaded(request)
    if loaded is None:
        return await _no_campaign(request)
    name = loaded.definition.name
    await control.switch(svc, name, paused)
    raise web.HTTPSeeOther(f"/console/campaigns/{name}?notice={'paused' if paused else 'resumed'}")


@pages.post("/campaigns/{name}/pause", "operator")
async def pause(request: web.Request) -> web.StreamResponse:
    return await _switch(request, True)


@pages.post("/campaigns/{name}/resume", "operator")
async def resume(request: web.Request) -> web.StreamResponse:
    return await _switch(request, False)


@pages.get("/campaigns/{name}/preview", "manager")
async def preview_page(request: web.Request) -> web.StreamResponse:
    """Every step as the customer would read it (nothing is sent or granted); showing a customer's data,
    it is audited as a view of them."""
    svc = service(request)
    loaded = _loaded(request)
    if loaded is None:
        return await _no_campaign(request)
    who, d = staff(request), loaded.definition
    ref = request.query.get("customer", "").strip()[:200]
    context: dict[str, Any] = {"d": d, "ref": ref, "error": None, "customer": None, "steps": []}
    if ref:
        values = {pool: spec.value for pool, spec in svc.config.coupons.items()}
        try:
            wanted = parse_ref(ref, svc.config.channels)
            async with writing(svc.sessions) as session:
                customer = await customer_of(session, wanted)
                channel = wanted.channel or "console"
                texts = await preview(session, d, customer, channel, values)
                await audit(session, who.actor, who.role, customer.id, "view", f"campaign preview {d.name}",
                            at=svc.clock.now())
            context |= {"customer": customer, "channel": channel, "steps": list(zip(d.journey, texts, strict=True))}
        except CustomerRefError as exc:
            context["error"] = str(exc)
        except TemplateError as exc:
            context["error"] = f"A message template did not render for this customer: {exc}"
    # 200 with the reason when the customer is not found: htmx swaps only a successful answer into the page
    return aiohttp_jinja2.render_template("campaign_preview.html", request, context)


# --- editing -------------------------------------------------------------------------------------

def _templates() -> dict[str, Path]:
    """The demo campaigns shipped with scrm, by file name without ``.toml``: starting points for new ones."""
    return {path.stem: path for path in sorted(demo_file("campaigns").glob("*.toml"))}


def _editor(request: web.Request, status: int = 200, **context: Any) -> web.Response:
    return aiohttp_jinja2.render_template("campaign_edit.html", request, {
        "problems": [], "name": None, "templates": sorted(_templates()), "template": None, "paused": True,
        **context}, status=status)


async def _save(request: web.Request, path: Path, old: str, new: str, what: str,
                added: tuple[str, bool] | None = None) -> None:
    """Write the checked text, audit it with its diff, and reload this instance's campaigns.

    The file is written inside the audit entry's transaction: a write that fails rolls the entry back.
    ``added`` is a new campaign's (name, start paused): its store row comes first, so that it starts
    paused if asked (:func:`control.add_campaign`).
    """
    svc, who = service(request), staff(request)
    now = svc.clock.now()
    diff = "\n".join(difflib.unified_diff(old.splitlines(), new.splitlines(),
                                          "/dev/null" if added else f"a/{path.name}", f"b/{path.name}", lineterm=""))
    async with writing(svc.sessions) as session:
        if added is not None:
            await control.add_campaign(session, *added, now)
        await audit(session, who.actor, who.role, None, "campaign_edit", f"{what}\n{diff}", at=now)
        await asyncio.to_thread(write_file, path, new)
    await svc.reload_campaigns()


@pages.get("/campaigns/{name}/edit", "operator")
async def edit_page(request: web.Request) -> web.StreamResponse:
    loaded = _loaded(request)
    if loaded is None:
        return await _no_campaign(request)
    text = _read(loaded.path)
    return _editor(request, name=loaded.definition.name, file=loaded.path.name, text=text, base=_digest(text))


@pages.post("/campaigns/{name}/edit", "operator")
async def save_edit(request: web.Request) -> web.StreamResponse:
    """Save the campaign's file if its new text has no problems; else the page again, with them."""
    svc = service(request)
    loaded = _loaded(request)
    if loaded is None:
        return await _no_campaign(request)
    name, path = loaded.definition.name, loaded.path
    form = await request.post()
    text, base = _submitted(form), str(form.get("base", ""))
    current = _read(path)
    problems: list[Problem] = []
    if base != _digest(current):
        problems.append(Problem(path.name, "", "the file changed since this page was opened (by hand or by "
                                               "someone else): copy your text, reload the page and edit the file as it is now"))
    campaign, found = check_file(svc.config, path, text.encode())
    problems += found
    if campaign is not None and campaign.definition.name != name:
        problems.append(Problem(path.name, "name", f"stays {name!r} when editing (deliveries and figures are kept "
                                                   "by name): make a new campaign for a new name"))
    if problems:
        return _editor(request, 400, name=name, file=path.name, text=text, base=base, problems=problems)
    if text == current:
        raise web.HTTPSeeOther(f"/console/campaigns/{name}?notice=unchanged")
    await _save(request, path, current, text, f"edited campaign {name} ({path.name})")
    raise web.HTTPSeeOther(f"/console/campaigns/{name}?notice=saved")


@pages.get(NEW, "operator")
async def new_page(request: web.Request) -> web.StreamResponse:
    """A new campaign's text, starting from a demo campaign (``?template=welcome``)."""
    templates = _templates()
    chosen = request.query.get("template", "")
    text = templates[chosen].read_text("utf-8") if chosen in templates else ""
    return _editor(request, template=chosen if chosen in templates else None, text=text,
                   file=None, base="", folder=campaigns_folder(service(request).config).name)


@pages.post(NEW, "operator")
async def create(request: web.Request) -> web.StreamResponse:
    """Add ``<name>.toml`` to the campaigns folder if the text has no problems (starting paused if asked)."""
    svc = service(request)
    form = await request.post()
    text, template, start_paused = _submitted(form), str(form.get("template", ""))[:64], form.get("paused") == "on"
    path, campaign, problems = check_new_file(svc.config, text.encode())
    if campaign is None or problems:
        return _editor(request, 400, template=template or None, text=text, file=None, base="", problems=problems,
                       paused=start_paused, folder=path.parent.name)
    name = campaign.definition.name
    origin = f" from the demo campaign {template}" if template in _templates() else ""
    await _save(request, path, "", text, f"new campaign {name} ({path.name}){origin}", (name, start_paused))
    if name not in svc.campaigns:  # the folder does not load (another file's problem): the list says why
        raise web.HTTPSeeOther("/console/campaigns?notice=not_loaded")
    raise web.HTTPSeeOther(f"/console/campaigns/{name}?notice=created")
