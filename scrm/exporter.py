"""Export customers and touchpoints as CSV or JSON lines, streamed from the store.

Rows come through a server-side cursor (``yield_per``), a thousand at a time, and are written as they
arrive: a million customers need a thousand rows of memory, not a million. Identities and tags are
aggregated per customer by the database in the same query. Phone numbers and birthdays are only
decrypted (through :mod:`scrm.personal`) when the operator asks for them with ``personal=True``;
otherwise the export carries what staff screens show (last four digits, birthday MM-DD).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TextIO

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm import personal
from scrm.keyring import Keyring
from scrm.store.models import Customer, CustomerTag, Identity, Tag, Touchpoint

if TYPE_CHECKING:
    from scrm.config import Config

Format = Literal["csv", "jsonl"]
CHUNK = 1000


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


class Writer:
    """CSV (a header row, lists joined by ``;``) or JSON lines, to a text stream."""

    def __init__(self, out: TextIO, fmt: Format, columns: list[str]) -> None:
        self.out, self.fmt, self.columns = out, fmt, columns
        self.csv = csv.writer(out) if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writerow(columns)

    def write(self, record: dict[str, Any]) -> None:
        if self.csv is None:
            self.out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            return
        self.csv.writerow([_csv_cell(record.get(c)) for c in self.columns])


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list):
        return spreadsheet_safe(";".join(str(v) for v in value))
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True) if value else ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else spreadsheet_safe(value)


#: What a spreadsheet reads as the start of a formula (OWASP's CSV injection list).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: Cells that start like a formula but are a number or a phone number: left alone so they round-trip.
_NUMBER_LIKE = re.compile(r"[+-]?[0-9][0-9 ().-]*")


def spreadsheet_safe(value: Any) -> Any:
    """A cell a spreadsheet will show instead of run: customers choose their names and write the
    texts, so ``=HYPERLINK(...)`` in a name must not become a live formula on the operator's desk.
    Such cells get a leading ``'`` (which spreadsheets hide); :func:`unescape_cell` takes it off again."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _NUMBER_LIKE.fullmatch(value):
        return "'" + value
    return value


def unescape_cell(value: str) -> str:
    """A cell as it was before :func:`spreadsheet_safe`: an export imported again keeps its names."""
    return value[1:] if value[:1] == "'" and value[1:2] in FORMULA_START else value


def customers_query(where: ColumnElement[bool] | None = None) -> Select[Any]:
    """Customers' rows (the table's columns) with their identities and tags aggregated by the database,
    in id order; only those matching ``where`` when given."""
    identity = Identity.channel + ":" + Identity.account + ":" + Identity.external_id
    identities = (select(func.aggregate_strings(identity, ";")).where(Identity.customer_id == Customer.id)
                  .correlate(Customer).scalar_subquery())
    tags = (select(func.aggregate_strings(Tag.name, ";")).join(CustomerTag, CustomerTag.tag_id == Tag.id)
            .where(CustomerTag.customer_id == Customer.id).correlate(Customer).scalar_subquery())
    # Plain rows, not ORM objects: nothing accumulates in a session's identity map while streaming.
    query = select(*Customer.__table__.c, identities.label("identity_list"), tags.label("tag_list")) \
        .order_by(Customer.id)
    return query if where is None else query.where(where)


def customer_columns(with_personal: bool) -> list[str]:
    """The export's columns: the importer's, so an export (with personal data) can be imported elsewhere."""
    phone_cols = ["phone", "birthday"] if with_personal else ["phone_last4", "birthday_md"]
    return ["id", "name", *phone_cols, "identity", "tags", "stage", "opted_out", "acquisition_source",
            "first_seen_at", "last_seen_at", "attributes"]


def customer_record(customer: Any, keyring: Keyring | None = None) -> dict[str, Any]:
    """One row of :func:`customers_query` as an export record; with a ``keyring``, phone and birthday
    decrypted, else what staff screens show (last four digits, birthday MM-DD)."""
    ids, tag_names = customer.identity_list, customer.tag_list
    record: dict[str, Any] = {"id": customer.id, "name": customer.display_name}
    if keyring is not None:
        values = personal.reveal(customer, keyring)
        record["phone"] = values["phone"]
        record["birthday"] = values["birthday"].isoformat() if values["birthday"] else None
    else:
        record["phone_last4"], record["birthday_md"] = customer.phone_last4, customer.birthday_md
    record.update(
        identity=sorted(ids.split(";")) if ids else [], tags=sorted(tag_names.split(";")) if tag_names else [],
        stage=customer.stage, opted_out=customer.opted_out, acquisition_source=customer.acquisition_source,
        first_seen_at=_iso(customer.first_seen_at), last_seen_at=_iso(customer.last_seen_at),
        attributes=customer.attributes or {})
    return record


async def export_customers(sessions: async_sessionmaker[AsyncSession], config: Config, out: TextIO,
                           fmt: Format = "csv", segment: str | None = None, now: datetime | None = None,
                           keyring: Keyring | None = None,
                           progress: Callable[[int], None] = lambda n: None) -> int:
    """Write every customer (of ``segment`` when given); with a ``keyring``, decrypted phone and birthday."""
    where = None
    if segment is not None:
        from scrm import segments
        from scrm.clock import SystemClock

        where = segments.condition(config.segments[segment], now or SystemClock().now(), config.segments)
    writer = Writer(out, fmt, customer_columns(keyring is not None))
    written = 0
    async with sessions() as session:
        result = await session.stream(customers_query(where).execution_options(yield_per=CHUNK))
        async for partition in result.partitions():
            for customer in partition:
                writer.write(customer_record(customer, keyring))
            written += len(partition)
            progress(written)
    return written


TOUCHPOINT_COLUMNS = ["id", "created_at", "customer_id", "actor", "channel", "account", "direction", "kind",
                      "campaign", "delivery_id", "platform_msg_id", "text", "payload"]


async def export_touchpoints(sessions: async_sessionmaker[AsyncSession], out: TextIO, since: datetime,
                             until: datetime | None = None, fmt: Format = "csv", text: bool = True,
                             progress: Callable[[int], None] = lambda n: None) -> int:
    """Write touchpoints created in [since, until), oldest first; ``text=False`` leaves message text out."""
    columns = [c for c in TOUCHPOINT_COLUMNS if text or c != "text"]
    cols = [getattr(Touchpoint, c) for c in columns]
    query = select(*cols).where(Touchpoint.created_at >= since).order_by(Touchpoint.id)
    if until is not None:
        query = query.where(Touchpoint.created_at < until)
    writer = Writer(out, fmt, columns)
    written = 0
    async with sessions() as session:
        result = await session.stream(query.execution_options(yield_per=CHUNK))
        async for partition in result.partitions():
            for row in partition:
                record = dict(zip(columns, row))
                record["created_at"] = _iso(record["created_at"])
                writer.write(record)
            written += len(partition)
            progress(written)
    return written

