"""Keyword auto-reply files: check them, list the rules."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from scrm.cli.base import guard, load, main, out
from scrm.conversations.replies import ReplyError, check_file, load_replies, replies_folder


@main.group()
def replies() -> None:
    """Keyword auto-reply rules and the fallback in the replies folder."""


@replies.command("validate")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
@guard
def replies_validate(ctx: click.Context, files: tuple[Path, ...]) -> None:
    """Check every reply file, or only FILES, each as it would load under its name in the replies folder;
    errors name the file, key and problem. A running service picks valid changes up within 5 s."""
    config = load(ctx)
    if not files:
        book = load_replies(config)
        out.print(f"{len(book.rules)} rule(s) valid, {'a' if book.fallback else 'no'} fallback")
        return
    folder = replies_folder(config)
    problems = [str(p) for file in files for p in check_file(config, folder / file.name, file.read_bytes())]
    if problems:
        raise ReplyError(problems)
    out.print(f"{len(files)} reply file(s) valid")


@replies.command("list")
@click.pass_context
@guard
def replies_list(ctx: click.Context) -> None:
    """The rules in the order they win (priority, then file and position), and the fallback. Matches:
    keywords (``a + b``: all of them), ``=exact``, ``~contains``, ``/regex/``."""
    book = load_replies(load(ctx))
    table = Table("priority", "matches", "channels", "cooldown", "file")
    table.add_column("name", no_wrap=True)
    table.columns.insert(0, table.columns.pop())
    for loaded in book.rules:
        r = loaded.rule
        keywords = [" + ".join(r.keywords)] if r.match == "all" else r.keywords
        terms = [*keywords, *(f"={p}" for p in r.exact), *(f"~{p}" for p in r.contains), *(f"/{p}/" for p in r.regex)]
        table.add_row(r.name, str(r.priority), ", ".join(terms), ", ".join(r.channels) or "all", r.cooldown,
                      loaded.file)
    out.print(table)
    fallback = book.fallback
    if fallback is None:
        out.print("no fallback: messages no rule answers get no automatic answer")
    else:
        h = fallback.hours
        out.print(f"fallback: {h.start}-{h.end} {','.join(h.days)} in staff time zones, cooldown {fallback.cooldown}")
