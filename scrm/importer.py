"""Import customers from a CSV file: streamed in batches, merged with who is already there, repeatable.

Why this shape: a brand's existing list can be millions of rows, so the file is read as a stream and
written one batch (one transaction) at a time; each batch is matched against the store with a few
set-based queries (identities, phone hashes), never a query per row. Rows are matched on a channel
identity or the phone number's keyed hash (via :mod:`scrm.personal`, the only place phones are
handled), so importing the same file again finds every row already there and changes nothing;
an interrupted import is resumed by running it again.

Columns, by header (case-insensitive): ``name``, ``phone``, ``birthday`` (YYYY-MM-DD), ``identity``
(``channel:id`` or ``channel:account:id``, several separated by ``;``), ``tags`` (``;``-separated),
``consent`` (yes/no); any other column becomes a custom attribute. Merging only fills what is missing
(name, phone, birthday), adds identities and tags, and sets the file's attributes; it never removes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from scrm import exporter, metrics, personal, rollups, tagging
from scrm.customers import BadCustomerRef, parse_ref
from scrm.keyring import Keyring
from scrm.store.dialect import dialect_name
from scrm.store.models import Customer, CustomerTag, Identity, Tag
from scrm.webhooks import events

if TYPE_CHECKING:
    from scrm.config import Config

COLUMNS = {
    "name": "name", "display_name": "name", "姓名": "name", "昵称": "name",
    "phone": "phone", "mobile": "phone", "手机": "phone", "手机号": "phone",
    "birthday": "birthday", "birth_date": "birthday", "生日": "birthday",
    "identity": "identity", "identities": "identity", "channel_identity": "identity",
    "tags": "tags", "标签": "tags",
    "consent": "consent", "marketing_consent": "consent",
}
_YES = {"yes", "y", "true", "1", "是", "同意"}
_NO = {"no", "n", "false", "0", "否", "不同意"}
MAX_FIELD = 1000


class ImportError_(Exception):
    """The file as a whole cannot be imported (no header, no matching column)."""


@dataclass
class Row:
    line: int
    raw: dict[str, str]
    name: str | None = None
    phone: str | None = None
    phone_hash: str | None = None
    birthday: date | None = None
    identities: list[tuple[str, str | None, str]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    consent: bool | None = None
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class Summary:
    rows: int = 0
    created: int = 0
    merged: int = 0
    updated: int = 0
    rejected: int = 0
    rejects_file: Path | None = None
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def unchanged(self) -> int:
        return self.merged - self.updated


class CountingReader(io.RawIOBase):
    """Counts bytes as a reader pulls them, for a progress bar that needs no second pass over the file
    (the customer and the order history imports)."""

    def __init__(self, raw: io.BufferedReader, report: Callable[[int], None]) -> None:
        self.raw, self.report, self.done = raw, report, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        self.done += n or 0
        self.report(self.done)
        return n or 0


class Importer:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], config: Config, keyring: Keyring,
                 now: datetime, batch_size: int = 1000) -> None:
        from scrm.channels import channel_types

        self.sessions, self.config, self.keyring, self.now = sessions, config, keyring, now
        self.batch_size = batch_size
        self.known_channels = set(channel_types())

    async def run(self, path: Path, progress: Callable[[int], None] = lambda done: None) -> Summary:
        summary = Summary()
        self.source = f"import:{path.name}"[:64]
        rejects_path = path.with_name(path.stem + ".rejects.csv")
        rejects: tuple[Any, Any] | None = None  # (file, csv writer: the csv module has no public writer type)
        with path.open("rb") as raw_file:
            text = io.TextIOWrapper(io.BufferedReader(CountingReader(raw_file, progress)), encoding="utf-8-sig",
                                    newline="")
            reader = csv.DictReader(text)
            header = self._header(reader.fieldnames)
            try:
                for batch in _batches(self._rows(reader, header), self.batch_size):
                    good: list[Row] = []
                    for item in batch:
                        summary.rows += 1
                        if isinstance(item, Row):
                            good.append(item)
                            continue
                        line, raw, reason = item
                        rejects = self._reject(rejects, rejects_path, reader.fieldnames or [], line, raw, reason,
                                               summary)
                    for row, reason in await self._write(good, summary):
                        rejects = self._reject(rejects, rejects_path, reader.fieldnames or [], row.line, row.raw,
                                               reason, summary)
            finally:
                if rejects is not None:
                    rejects[0].close()
        if rejects is None and rejects_path.exists():
            rejects_path.unlink()  # from an earlier run whose rejects are now fixed
        summary.rejects_file = rejects_path if rejects is not None else None
        for outcome, n in (("created", summary.created), ("merged", summary.merged), ("rejected", summary.rejected)):
            metrics.IMPORTED.labels(outcome).inc(n)
        return summary

    def _header(self, fieldnames: Any) -> dict[str, str]:
        if not fieldnames:
            raise ImportError_("the file is empty or has no header row")
        mapping: dict[str, str] = {}
        seen: set[str] = set()
        for name in fieldnames:
            key = (name or "").strip()
            role = COLUMNS.get(key.lower(), "attr:" + key)
            if not key or role in seen:
                raise ImportError_(f"column {name!r}: empty or repeated header")
            seen.add(role)
            mapping[name] = role
        if not {"phone", "identity"} & seen:
            raise ImportError_("no phone or identity column: rows could not be matched on a second import")
        return mapping

    def _reject(self, rejects: Any, path: Path, fieldnames: Sequence[str], line: int, raw: dict[str, Any], reason: str,
                summary: Summary) -> Any:
        if rejects is None:
            handle = path.open("w", encoding="utf-8", newline="")
            writer = csv.writer(handle)
            writer.writerow(["line", "reason", *fieldnames])
            rejects = (handle, writer)
        rejects[1].writerow([line, reason, *(_cell(raw.get(f)) for f in fieldnames)])
        summary.rejected += 1
        kind = reason.split(":")[0]
        summary.reasons[kind] = summary.reasons.get(kind, 0) + 1
        return rejects

    def _rows(self, reader: csv.DictReader[str], header: dict[str, str]) -> Iterator[Row | tuple[int, dict[str, Any], str]]:
        line = reader.line_num
        for raw in reader:
            start, line = line + 1, reader.line_num
            try:
                yield self._parse(start, raw, header)
            except ValueError as exc:
                yield start, raw, str(exc)

    def _parse(self, line: int, raw: dict[str, Any], header: dict[str, str]) -> Row:
        if None in raw:
            raise ValueError("columns: more fields than the header has")
        row = Row(line, raw)
        for column, role in header.items():
            value = exporter.unescape_cell((raw.get(column) or "").strip())
            if not value:
                continue
            if len(value) > MAX_FIELD:
                raise ValueError(f"{column}: longer than {MAX_FIELD} characters")
            if role == "name":
                row.name = value[:255]
            elif role == "phone":
                try:
                    row.phone_hash = personal.phone_hash(value, self.keyring)
                except personal.PersonalDataError as exc:
                    raise ValueError(f"phone: {exc}") from None
                row.phone = value
            elif role == "birthday":
                try:
                    row.birthday = date.fromisoformat(value)
                except ValueError:
                    raise ValueError(f"birthday: {value!r} is not a date like 1990-05-17") from None
                if not date(1900, 1, 1) <= row.birthday <= self.now.date():
                    raise ValueError(f"birthday: {value} is not a plausible birth date")
            elif role == "identity":
                row.identities = [self._identity(part.strip()) for part in value.split(";") if part.strip()]
            elif role == "tags":
                row.tags = sorted({t.strip() for t in value.split(";") if t.strip()})
                if bad := [t for t in row.tags if len(t) > 64 or any(c.isspace() for c in t)]:
                    raise ValueError(f"tags: {bad[0][:70]!r} is not a tag (no spaces, at most 64 characters)")
            elif role == "consent":
                folded = value.casefold()
                if folded not in _YES | _NO:
                    raise ValueError(f"consent: {value!r} is not yes or no")
                row.consent = folded in _YES
            else:
                row.attributes[role.removeprefix("attr:")] = value
        if not row.identities and row.phone_hash is None:
            raise ValueError("phone/identity: a row needs a phone or a channel identity to be matched")
        return row

    def _identity(self, text: str) -> tuple[str, str | None, str]:
        """One identity of the column, read as every customer reference is (:func:`scrm.customers.parse_ref`)."""
        try:
            ref = parse_ref(text, self.config.channels)
        except BadCustomerRef as exc:
            raise ValueError(f"identity: {exc}") from None
        if ref.channel is None or ref.external_id is None:
            raise ValueError(f"identity: {text[:80]!r} is not channel:id or channel:account:id")
        if ref.channel not in self.known_channels:
            raise ValueError(f"identity: unknown channel {ref.channel!r} "
                             f"(known: {', '.join(sorted(self.known_channels))})")
        return ref.channel, ref.account, ref.external_id

    def _account(self, channel: str, account: str | None) -> str | None:
        if account is not None:
            return account
        accounts = list(self.config.channels.get(channel, {}))
        return accounts[0] if len(accounts) == 1 else "default" if not accounts else None

    async def _write(self, rows: list[Row], summary: Summary) -> list[tuple[Row, str]]:
        """Match, create and merge one batch in one transaction; returns the rows rejected while matching."""
        rejected: list[tuple[Row, str]] = []
        if not rows:
            return rejected
        async with self.sessions() as session, session.begin():
            by_key = await self._existing(session, rows)
            known = set(by_key)
            new: list[tuple[Customer, Row]] = []
            plans: list[tuple[Customer, Row, bool]] = []
            for row in rows:
                keys = [("i", c, e) for c, _, e in row.identities] + ([("p", row.phone_hash)] if row.phone_hash else [])
                found = {id(by_key[k]): by_key[k] for k in keys if k in by_key}
                if len(found) > 1:
                    ids = ", ".join(f"#{c.id}" if c.id else "a row above" for c in found.values())
                    rejected.append((row, f"conflict: identity and phone belong to different customers ({ids})"))
                    continue
                missing = [(c, a, e) for c, a, e in row.identities if self._account(c, a) is None]
                if missing:
                    rejected.append((row, (f"identity: channel {missing[0][0]!r} has several accounts; "
                                           "write channel:account:id")))
                    continue
                if found:
                    customer = next(iter(found.values()))
                    plans.append((customer, row, True))  # also a repeat of a row above
                else:
                    customer = Customer(acquisition_source=self.source, first_seen_at=self.now,
                                        last_seen_at=self.now, attributes={}, opted_out=False, stage="acquisition")
                    new.append((customer, row))
                    plans.append((customer, row, False))
                for k in keys:
                    by_key[k] = customer
            for customer, row, existed in plans:
                if not existed and customer.id is None:
                    await self._fill(session, customer, row)  # before the INSERT: no UPDATE per new row
            session.add_all([c for c, _ in new])
            await session.flush()
            await events.emit_many(session, [("customer.created", c.id, {"source": self.source}) for c, _ in new],
                                   self.now)
            tags_now = await self._tags_of(session, {c.id for c, _, _ in plans})
            tag_id_of = await tagging.tag_ids(session, {name for _, row, _ in plans for name in row.tags})
            changed: set[int] = set()
            merged_rows = 0
            identities: list[dict[str, Any]] = []
            customer_tags: list[dict[str, Any]] = []
            for customer, row, existed in plans:
                filled = existed and await self._fill(session, customer, row)
                linked = self._links(customer, row, tags_now.setdefault(customer.id, set()), tag_id_of, known,
                                     identities, customer_tags)
                if existed and (filled or linked):
                    changed.add(customer.id)
                merged_rows += existed
            # Reports count new customers by day and first channel: the batch changes the day the import
            # began (new customers are stamped with it, however late it runs) and the first days of the
            # customers it gives an identity.
            first_seen = {c.id: c.first_seen_at for c, _, _ in plans}
            await rollups.invalidate(session, ({self.now} if new else set())
                                     | {first_seen[i["customer_id"]] for i in identities})
            # executemany of one cached statement: a 1000-row VALUES list would be compiled afresh each batch
            if identities:
                await session.execute(insert_ignore_stmt(session, Identity.__table__), identities)
            if customer_tags:
                await session.execute(insert_ignore_stmt(session, CustomerTag.__table__), customer_tags)
                if events.active(session):
                    names = {tid: name for name, tid in tag_id_of.items()}
                    await events.emit_many(session, [("tag.added", t["customer_id"], {
                        "channel": "system", "account": "-", "touchpoint": "tag_added", "tag": names[t["tag_id"]],
                        "source": "import", "by": self.source}) for t in customer_tags], self.now)
            summary.created += len(new)
            summary.merged += merged_rows
            summary.updated += len(changed)
        return rejected

    async def _existing(self, session: AsyncSession, rows: list[Row]) -> dict[tuple[str | None, ...], Customer]:
        """Customers already matching the batch's identities or phone hashes, in two queries (plus one load)."""
        external_ids = {e for r in rows for _, _, e in r.identities}
        hashes = {r.phone_hash for r in rows if r.phone_hash}
        key_to_id: dict[tuple[str | None, ...], int] = {}
        if external_ids:
            for channel, external_id, cid in (await session.execute(
                    select(Identity.channel, Identity.external_id, Identity.customer_id)
                    .where(Identity.external_id.in_(external_ids)).order_by(Identity.customer_id))):
                key_to_id.setdefault(("i", channel, external_id), cid)
        if hashes:
            for digest, cid in (await session.execute(
                    select(Customer.phone_hash, Customer.id).where(Customer.phone_hash.in_(hashes))
                    .order_by(Customer.id))):
                key_to_id.setdefault(("p", digest), cid)
        if not key_to_id:
            return {}
        customers = {c.id: c for c in (await session.scalars(
            select(Customer).where(Customer.id.in_(set(key_to_id.values()))))).all()}
        return {k: customers[cid] for k, cid in key_to_id.items()}

    async def _tags_of(self, session: AsyncSession, ids: set[int]) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        if ids:
            for cid, name in (await session.execute(
                    select(CustomerTag.customer_id, Tag.name).join(Tag, Tag.id == CustomerTag.tag_id)
                    .where(CustomerTag.customer_id.in_(ids)))):
                out.setdefault(cid, set()).add(name)
        return out

    async def _fill(self, session: AsyncSession, customer: Customer, row: Row) -> bool:
        """Fill the customer's missing fields from the row (before the insert, for new customers)."""
        changed = False
        if row.name and not customer.display_name:
            customer.display_name, changed = row.name, True
        if row.phone and customer.phone_hash is None:
            await personal.set_phone(session, customer, row.phone, self.keyring)
            changed = True
        if row.birthday and customer.birthday_md is None:
            await personal.set_birthday(session, customer, row.birthday, self.keyring)
            changed = True
        if row.consent is False and not customer.opted_out:
            customer.opted_out, changed = True, True  # a "no" is always respected; a "yes" never overrides an opt-out
        attributes = {**(customer.attributes or {}), **row.attributes}
        if row.consent is not None:
            attributes["consent"] = "yes" if row.consent else "no"
        if attributes != (customer.attributes or {}):
            customer.attributes, changed = attributes, True
        return changed

    def _links(self, customer: Customer, row: Row, tags: set[str], tag_id_of: dict[str, int],
               known: set[tuple[str | None, ...]], identities: list[dict[str, Any]],
               customer_tags: list[dict[str, Any]]) -> bool:
        """Queue the row's identities and tags the customer lacks; True when there are any."""
        changed = False
        for channel, account, external_id in row.identities:
            if ("i", channel, external_id) not in known:
                known.add(("i", channel, external_id))
                identities.append({"customer_id": customer.id, "channel": channel,
                                   "account": self._account(channel, account), "external_id": external_id,
                                   "created_at": self.now})
                changed = True
        for name in row.tags:
            if name not in tags:
                tags.add(name)
                customer_tags.append({"customer_id": customer.id, "tag_id": tag_id_of[name],
                                      "source": "import", "source_detail": self.source, "score": 1.0,
                                      "added_at": self.now})
                changed = True
        return changed


def insert_ignore_stmt(session: AsyncSession, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for executemany (both stores)."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = postgresql if dialect_name(session) == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return exporter.spreadsheet_safe("|".join(value))
    return "" if value is None else exporter.spreadsheet_safe(str(value))
