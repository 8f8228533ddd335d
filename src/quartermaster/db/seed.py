"""Deterministic demo and benchmark data behind ``quartermaster seed``.

One ``random.Random(random_seed)`` drives everything and every timestamp is a fixed base plus a
whole number of seconds, so the same :class:`SeedConfig` always yields byte-identical rows. Ids
are assigned here (1..N); the sequences are moved past them afterwards.

Speed: rows are rendered straight to COPY text and streamed over one asyncpg connection in one
transaction, so Python generates while PostgreSQL ingests. Foreign keys and plain indexes are
dropped for the load and re-created before commit, the way pg_restore does it (re-adding a
foreign key still validates every row, in one join).

The data is consistent: order and quotation totals add up, open orders' allocations equal
``stock_levels.reserved`` and the ``stock_movements`` ledger sums to every level;
:func:`check_invariants` verifies that with SQL.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

import asyncpg
import structlog
from sqlalchemy.engine import make_url

from . import seed_data as words

log = structlog.get_logger(__name__)

Progress = Callable[[str, int, int], None]

#: Every table of the schema, parents before children.
TABLES: tuple[str, ...] = (
    "customers",
    "warehouses",
    "products",
    "quotations",
    "quotation_lines",
    "orders",
    "order_lines",
    "stock_levels",
    "stock_allocations",
    "stock_movements",
    "integration_jobs",
    "outbox",
)

#: COPY column lists (space-separated), in the order the generators render them.
COLUMNS: dict[str, str] = {
    "customers": "id name email tier created_at updated_at",
    "warehouses": "id code name created_at updated_at",
    "products": (
        "id sku name description category unit_price currency active created_at updated_at"
    ),
    "quotations": (
        "id number customer_id status currency subtotal discount_total total valid_until"
        " created_at updated_at"
    ),
    "quotation_lines": (
        "id quotation_id product_id quantity unit_price discount_percent line_total"
    ),
    "orders": (
        "id number customer_id status currency subtotal discount_total total quotation_id"
        " cancel_reason created_at updated_at"
    ),
    "order_lines": "id order_id product_id quantity unit_price discount line_total",
    "stock_levels": ("id product_id warehouse_id on_hand reserved low_stock_threshold updated_at"),
    "stock_allocations": "id order_line_id warehouse_id quantity",
    "stock_movements": (
        "id stock_level_id reason on_hand_delta reserved_delta order_id note created_at"
    ),
}

BASE = datetime(2026, 1, 1, tzinfo=UTC)
DAY = 86_400
NULL = "\\N"  # COPY text format
_TICK = 10_000  # rows per COPY chunk and progress callback


def _at(year: int, month: int, day: int) -> int:
    """Seconds from BASE; every generated timestamp is BASE + a whole number of seconds."""
    return int((datetime(year, month, day, tzinfo=UTC) - BASE).total_seconds())


_DATES: dict[int, str] = {}


def _ts(seconds: int) -> str:
    """COPY text of the UTC timestamp BASE + seconds."""
    day, rem = divmod(seconds, DAY)
    date = _DATES.get(day)
    if date is None:
        date = _DATES[day] = (BASE + timedelta(days=day)).strftime("%Y-%m-%d")
    return f"{date} {rem // 3600:02d}:{rem // 60 % 60:02d}:{rem % 60:02d}+00"


def _money(cents: int) -> str:
    """COPY text of a non-negative amount given in cents."""
    return f"{cents // 100}.{cents % 100:02d}"


CUSTOMERS_FROM, CUSTOMERS_TO = _at(2023, 1, 1), _at(2024, 12, 31)
PRODUCTS_FROM, PRODUCTS_TO = _at(2023, 1, 1), _at(2024, 12, 1)
ORDERS_FROM, ORDERS_TO = _at(2025, 1, 1), _at(2026, 11, 1)
QUOTES_TO = _at(2026, 10, 1)  # accepted quotations' orders follow within 30 days
_PERCENT = {t: f"{t // 10}.{t % 10}0" for t in words.QUOTE_DISCOUNT_TENTHS}


def _pick(cumulative: tuple[tuple[float, str], ...], u: float) -> str:
    for threshold, value in cumulative:
        if u < threshold:
            return value
    return cumulative[-1][1]


def _check_copy_safe(value: object) -> None:
    """The word lists go into COPY text unescaped: refuse the characters that would need it."""
    if isinstance(value, str):
        if any(ch in value for ch in "\\\t\n\r"):
            raise ValueError(f"seed word {value!r} contains a COPY control character")
    elif isinstance(value, tuple):
        for item in value:
            _check_copy_safe(item)


@dataclass(frozen=True)
class SeedConfig:
    products: int = 2000
    warehouses: int = 5
    customers: int = 300
    orders: int = 5000
    quotations: int = 1000
    random_seed: int = 42

    def validate(self) -> None:
        for f in fields(self):
            if f.name != "random_seed" and getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must not be negative")
        if self.products and self.warehouses < 1:
            raise ValueError("products need at least one warehouse")
        if (self.orders or self.quotations) and (self.customers < 1 or self.products < 1):
            raise ValueError("orders and quotations need customers and products")


def connect_kwargs(database_url: str) -> dict[str, Any]:
    """asyncpg.connect() arguments for an SQLAlchemy URL (``?host=/dir`` selects a socket)."""
    url = make_url(database_url)

    def param(name: str) -> str | None:
        value = url.query.get(name)
        if isinstance(value, tuple):
            value = value[0] if value else None
        return value

    port = param("port") or url.port
    kwargs: dict[str, Any] = {
        "user": url.username,
        "password": url.password,
        "database": url.database,
        "host": param("host") or url.host,
        "port": int(port) if port is not None else None,
    }
    return {k: v for k, v in kwargs.items() if v is not None}


class _Generator:
    """Renders each table's rows; later tables use what earlier ones recorded (ids are 1-based,
    slot 0 of the per-id lists is unused)."""

    def __init__(self, config: SeedConfig) -> None:
        self.cfg = config
        self.rng = random.Random(config.random_seed)
        self.tiers: list[str] = [""]
        self.price: list[int] = [0]  # cents
        self.price_text: list[str] = [""]
        self.receipt_ts: list[str] = [""]
        self.active_ids: list[int] = []
        self.popular_ids: list[int] = []
        # Stock levels: a product's levels have consecutive ids, one per warehouse in level_whs.
        self.level_first: list[int] = [0]
        self.level_whs: list[list[int]] = [[]]
        self.lvl_product: list[int] = [0]
        self.lvl_wh: list[int] = [0]
        self.lvl_threshold: list[int] = [0]
        self.reserved: list[int] = []
        self.shipped: list[int] = []
        self.on_hand: list[int] = []
        # Accepted quotations: (id, customer, created, valid_until, [(product, qty, discount)]).
        self.accepted: list[tuple[int, int, int, int, list[tuple[int, int, int]]]] = []
        self.order_status: list[str] = [""]
        self.order_created: list[str] = [""]
        self.order_updated: list[str] = [""]
        # Order lines and allocations, column-wise.
        self.ol_order: list[int] = []
        self.ol_product: list[int] = []
        self.ol_qty: list[int] = []
        self.ol_discount: list[int] = []
        self.al_line: list[int] = []
        self.al_level: list[int] = []
        self.al_qty: list[int] = []
        self.al_order: list[int] = []
        self.shipments = 0

    @property
    def levels(self) -> int:
        return len(self.lvl_product) - 1

    def customers(self) -> Iterator[str]:
        r = self.rng.random
        n = self.cfg.customers
        span = CUSTOMERS_TO - CUSTOMERS_FROM
        created = sorted(CUSTOMERS_FROM + int(r() * span) for _ in range(n))
        adjs, nouns, sufs = words.COMPANY_ADJECTIVES, words.COMPANY_NOUNS, words.COMPANY_SUFFIXES
        mailboxes = words.EMAIL_LOCALS
        domains: dict[tuple[str, str], str] = {}
        for i in range(1, n + 1):
            adj = adjs[int(r() * len(adjs))]
            noun = nouns[int(r() * len(nouns))]
            suffix = sufs[int(r() * len(sufs))]
            domain = domains.get((adj, noun))
            if domain is None:
                domain = domains[(adj, noun)] = f"{adj}-{noun}.example".lower().replace(" ", "")
            tier = _pick(words.TIERS, r())
            self.tiers.append(tier)
            email = f"{mailboxes[int(r() * len(mailboxes))]}.{i}@{domain}"
            c = created[i - 1]
            updated = _ts(c + int(r() * 200 * DAY))
            yield f"{i}\t{adj} {noun} {suffix}\t{email}\t{tier}\t{_ts(c)}\t{updated}\n"

    def warehouses(self) -> Iterator[str]:
        cities = words.WAREHOUSE_CITIES
        for i in range(1, self.cfg.warehouses + 1):
            if i <= len(cities):
                code, name = f"WH-{cities[i - 1][0]}", f"{cities[i - 1][1]} DC"
            else:
                code, name = f"WH-{i:03d}", f"Regional DC {i:03d}"
            created = _ts(_at(2022, 1, 3) + (i - 1) * 7 * DAY)
            yield f"{i}\t{code}\t{name}\t{created}\t{created}\n"

    def products(self) -> Iterator[str]:
        r = self.rng.random
        n = self.cfg.products
        span = PRODUCTS_TO - PRODUCTS_FROM
        # A quarter of the catalogue arrived in bulk imports and shares their exact timestamps.
        imports = [PRODUCTS_FROM + int(r() * span) for _ in range(max(1, n // 500))]
        created = sorted(
            imports[int(r() * len(imports))] if r() < 0.25 else PRODUCTS_FROM + int(r() * span)
            for _ in range(n)
        )
        cats = words.CATEGORIES
        points = [tuple(p for p in words.PRICE_POINTS if lo <= p <= hi) for *_, (lo, hi) in cats]
        # Roughly log-uniform without floating-point pow (integer maths is portable).
        edges = [(lo, *(e for e in words.PRICE_EDGES if lo < e < hi), hi) for *_, (lo, hi) in cats]
        for i in range(1, n + 1):
            ci = int(r() * len(cats))
            prefix, category, attrs, items, sizes, _ = cats[ci]
            attr = attrs[int(r() * len(attrs))]
            item = items[int(r() * len(items))]
            size = sizes[int(r() * len(sizes))]
            if r() < 0.35:  # a shelf price many products share
                cents = points[ci][int(r() * len(points[ci]))]
            else:  # uniform within a random band between the category's bounds
                band = int(r() * (len(edges[ci]) - 1))
                low, high = edges[ci][band], edges[ci][band + 1]
                cents = low + int(r() * (high - low + 1))
            price = _money(cents)
            active = "t" if i == 1 or r() >= 0.05 else "f"
            description = (
                NULL if r() < 0.1 else f"{item} ({attr.lower()}, {size}), {category.lower()} range."
            )
            c = created[i - 1]
            self.price.append(cents)
            self.price_text.append(price)
            self.receipt_ts.append(_ts(c + DAY))
            if active == "t":
                self.active_ids.append(i)
            updated = _ts(c if r() < 0.5 else c + int(r() * 300 * DAY))
            yield (
                f"{i}\t{prefix}-{i:06d}\t{attr} {item} {size}\t{description}\t{category}\t{price}"
                f"\tEUR\t{active}\t{_ts(c)}\t{updated}\n"
            )
        shuffled = list(self.active_ids)
        self.rng.shuffle(shuffled)
        self.popular_ids = shuffled[: max(1, len(shuffled) // 10)]
        self._layout_levels()

    def _layout_levels(self) -> None:
        r = self.rng.random
        all_whs = list(range(1, self.cfg.warehouses + 1))
        max_k = min(len(all_whs), words.MAX_WAREHOUSES_PER_PRODUCT)
        for p in range(1, self.cfg.products + 1):
            k = 1 + int(r() * max_k)
            whs = all_whs if k >= len(all_whs) else sorted(self.rng.sample(all_whs, k))
            self.level_first.append(len(self.lvl_product))
            self.level_whs.append(whs)
            for wh in whs:
                self.lvl_product.append(p)
                self.lvl_wh.append(wh)
                self.lvl_threshold.append(5 + int(r() * 21))
        self.reserved = [0] * len(self.lvl_product)
        self.shipped = [0] * len(self.lvl_product)
        self.on_hand = [0] * len(self.lvl_product)

    def _pick_products(self, k: int) -> list[int]:
        """k distinct active products; 40% of picks come from a popular tenth of the range."""
        r = self.rng.random
        act, pop = self.active_ids, self.popular_ids
        k = min(k, len(act))
        chosen: list[int] = []
        while len(chosen) < k:
            p = pop[int(r() * len(pop))] if r() < 0.4 else act[int(r() * len(act))]
            if p not in chosen:
                chosen.append(p)
        return chosen

    def quotations(self) -> tuple[list[str], list[str]]:
        r = self.rng.random
        qtys = words.QUANTITIES
        created = sorted(
            ORDERS_FROM + int(r() * (QUOTES_TO - ORDERS_FROM)) for _ in range(self.cfg.quotations)
        )
        heads: list[str] = []
        lines: list[str] = []
        for qid in range(1, self.cfg.quotations + 1):
            c = created[qid - 1]
            status = _pick(words.QUOTE_STATUSES, r())
            if status == "ACCEPTED" and len(self.accepted) >= self.cfg.orders:
                status = "SENT"  # every accepted quotation needs one of the orders
            customer = 1 + int(r() * self.cfg.customers)
            if status == "EXPIRED":
                valid = c + (14 + int(r() * 17)) * DAY
            elif status in ("DRAFT", "SENT"):
                valid = c + (30 + int(r() * 701)) * DAY  # up to two years out
            else:
                valid = c + (30 + int(r() * 61)) * DAY
            updated = c if status == "DRAFT" else c + int(r() * 14 * DAY)
            subtotal = total = 0
            quoted: list[tuple[int, int, int]] = []
            for p in self._pick_products(1 + int(r() * 6)):
                qty = qtys[int(r() * len(qtys))]
                tenths = words.QUOTE_DISCOUNT_TENTHS[int(r() * len(words.QUOTE_DISCOUNT_TENTHS))]
                gross = qty * self.price[p]
                line_total = (gross * (1000 - tenths) + 500) // 1000  # half-up to cents
                subtotal += gross
                total += line_total
                lines.append(
                    f"{len(lines) + 1}\t{qid}\t{p}\t{qty}\t{self.price_text[p]}"
                    f"\t{_PERCENT[tenths]}\t{_money(line_total)}\n"
                )
                quoted.append((p, qty, gross - line_total))
            heads.append(
                f"{qid}\tQT-{qid:06d}\t{customer}\t{status}\tEUR\t{_money(subtotal)}"
                f"\t{_money(subtotal - total)}\t{_money(total)}\t{_ts(valid)}\t{_ts(c)}"
                f"\t{_ts(updated)}\n"
            )
            if status == "ACCEPTED":
                self.accepted.append((qid, customer, c, valid, quoted))
        return heads, lines

    def _order_times(self) -> list[tuple[int, int]]:
        """(created, source) by creation time: source < len(accepted) is a quotation's order."""
        r = self.rng.random
        stubs = [
            (created + 3600 + int(r() * min(valid - created, 30 * DAY)), i)
            for i, (_, _, created, valid, _) in enumerate(self.accepted)
        ]
        first = len(stubs)
        for i in range(first, self.cfg.orders):
            if i > first and r() < 0.05:  # the exact timestamp of an earlier order
                stubs.append((stubs[first + int(r() * (i - first))][0], i))
            else:
                stubs.append((ORDERS_FROM + int(r() * (ORDERS_TO - ORDERS_FROM)), i))
        stubs.sort()
        return stubs

    def orders(self) -> Iterator[str]:
        r = self.rng.random
        qtys, reasons = words.QUANTITIES, words.CANCEL_REASONS
        price, level_first, level_whs = self.price, self.level_first, self.level_whs
        ol_order, ol_product, ol_qty, ol_discount = (
            self.ol_order,
            self.ol_product,
            self.ol_qty,
            self.ol_discount,
        )
        al_line, al_level, al_qty, al_order = (
            self.al_line,
            self.al_level,
            self.al_qty,
            self.al_order,
        )
        n_accepted = len(self.accepted)
        for oid, (created, source) in enumerate(self._order_times(), start=1):
            status = _pick(words.ORDER_STATUSES, r())
            quotation = NULL
            if source < n_accepted:
                qid, customer, _, _, lines = self.accepted[source]
                quotation = str(qid)
            else:
                customer = 1 + int(r() * self.cfg.customers)
                pct = words.TIER_DISCOUNT_PCT[self.tiers[customer]]
                lines = []
                for p in self._pick_products(1 + int(r() * 8)):
                    qty = qtys[int(r() * len(qtys))]
                    lines.append((p, qty, (qty * price[p] * pct + 50) // 100))  # half-up
            if status == "PENDING":
                updated = created + int(r() * 3600)
            elif status == "FULFILLED":
                updated = created + DAY + int(r() * 13 * DAY)
            else:
                updated = created + 3600 + int(r() * 4 * DAY)
            created_ts, updated_ts = _ts(created), _ts(updated)
            self.order_status.append(status)
            self.order_created.append(created_ts)
            self.order_updated.append(updated_ts)
            # Open orders reserve stock; fulfilled ones record what shipped; cancelled: nothing.
            tally = self.shipped if status == "FULFILLED" else self.reserved
            allocate = status != "CANCELLED"
            subtotal = discount_total = 0
            for p, qty, discount in lines:
                subtotal += qty * price[p]
                discount_total += discount
                ol_order.append(oid)
                ol_product.append(p)
                ol_qty.append(qty)
                ol_discount.append(discount)
                if not allocate:
                    continue
                # From one warehouse holding the product, sometimes split over two.
                k = len(level_whs[p])
                j = int(r() * k)
                parts: tuple[tuple[int, int], ...]
                if k > 1 and qty > 1 and r() < 0.15:
                    q1 = 1 + int(r() * (qty - 1))
                    parts = ((j, q1), ((j + 1 + int(r() * (k - 1))) % k, qty - q1))
                else:
                    parts = ((j, qty),)
                for offset, part in parts:
                    level = level_first[p] + offset
                    tally[level] += part
                    al_line.append(len(ol_order))
                    al_level.append(level)
                    al_qty.append(part)
                    al_order.append(oid)
                    if status == "FULFILLED":
                        self.shipments += 1
            reason = reasons[int(r() * len(reasons))] if status == "CANCELLED" else NULL
            yield (
                f"{oid}\tSO-{oid:06d}\t{customer}\t{status}\tEUR\t{_money(subtotal)}"
                f"\t{_money(discount_total)}\t{_money(subtotal - discount_total)}\t{quotation}"
                f"\t{reason}\t{created_ts}\t{updated_ts}\n"
            )

    def order_lines(self) -> Iterator[str]:
        price, price_text = self.price, self.price_text
        for i, (oid, p, qty, disc) in enumerate(
            zip(self.ol_order, self.ol_product, self.ol_qty, self.ol_discount, strict=True), 1
        ):
            total = _money(qty * price[p] - disc)
            yield f"{i}\t{oid}\t{p}\t{qty}\t{price_text[p]}\t{_money(disc)}\t{total}\n"

    def stock_levels(self) -> Iterator[str]:
        """Final levels: on_hand = reserved + available; ~8% have available <= threshold,
        including every level of a few sold-out products (available 0 everywhere)."""
        r = self.rng.random
        n = self.cfg.products
        sold_out = set(self.rng.sample(range(1, n + 1), max(1, n // 40))) if n > 1 else set()
        for level in range(1, len(self.lvl_product)):
            threshold = self.lvl_threshold[level]
            if self.lvl_product[level] in sold_out:
                available = 0
            elif r() < words.LOW_STOCK_SHARE:
                available = int(r() * (threshold + 1))
            else:
                available = threshold + 1 + int(r() * (500 - threshold))
            reserved = self.reserved[level]
            on_hand = self.on_hand[level] = reserved + available
            updated = _ts(ORDERS_TO + int(r() * 30 * DAY))
            yield (
                f"{level}\t{self.lvl_product[level]}\t{self.lvl_wh[level]}\t{on_hand}"
                f"\t{reserved}\t{threshold}\t{updated}\n"
            )

    def stock_allocations(self) -> Iterator[str]:
        lvl_wh = self.lvl_wh
        for i, (line, level, qty) in enumerate(
            zip(self.al_line, self.al_level, self.al_qty, strict=True), 1
        ):
            yield f"{i}\t{line}\t{lvl_wh[level]}\t{qty}\n"

    def stock_movements(self) -> Iterator[str]:
        """The ledger: a receipt per level, then each allocation's reservation (and shipment)."""
        mid = 0
        for level in range(1, len(self.lvl_product)):
            mid += 1
            receipt = self.on_hand[level] + self.shipped[level]
            when = self.receipt_ts[self.lvl_product[level]]
            yield f"{mid}\t{level}\tRECEIPT\t{receipt}\t0\t{NULL}\tInitial stock receipt\t{when}\n"
        status, created, updated = self.order_status, self.order_created, self.order_updated
        for level, qty, oid in zip(self.al_level, self.al_qty, self.al_order, strict=True):
            mid += 1
            yield f"{mid}\t{level}\tRESERVATION\t0\t{qty}\t{oid}\t{NULL}\t{created[oid]}\n"
            if status[oid] == "FULFILLED":
                mid += 1
                yield f"{mid}\t{level}\tSHIPMENT\t{-qty}\t{-qty}\t{oid}\t{NULL}\t{updated[oid]}\n"


async def _copy(
    conn: asyncpg.Connection,
    table: str,
    lines: Iterable[str],
    total: int,
    progress: Progress | None,
) -> int:
    """COPY one table from rendered lines, pulled lazily so generation overlaps ingestion."""
    started = time.perf_counter()
    done = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal done
        it = iter(lines)
        while chunk := list(islice(it, _TICK)):
            yield "".join(chunk).encode()
            done += len(chunk)
            if progress is not None and done < total:
                progress(table, done, total)

    if progress is not None:
        progress(table, 0, total)
    await conn.copy_to_table(table, source=chunks(), columns=COLUMNS[table].split(), format="text")
    if progress is not None:
        progress(table, done, total)
    log.info(
        "seed.table_loaded", table=table, rows=done, seconds=round(time.perf_counter() - started, 3)
    )
    return done


async def _detach_constraints(conn: asyncpg.Connection) -> tuple[list[str], list[str]]:
    """Drop the seeded tables' foreign keys and plain indexes; return the DDL re-creating them
    (indexes, foreign keys). Primary keys and unique constraints stay in place."""
    tables = list(TABLES)
    fks = await conn.fetch(
        """
        SELECT conrelid::regclass::text AS tbl, quote_ident(conname) AS name,
               pg_get_constraintdef(oid) AS definition
        FROM pg_constraint
        WHERE contype = 'f' AND conrelid IN (SELECT to_regclass(t) FROM unnest($1::text[]) t)
        ORDER BY 1, 2""",
        tables,
    )
    indexes = await conn.fetch(
        """
        SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS ddl
        FROM pg_index i
        WHERE i.indrelid IN (SELECT to_regclass(t) FROM unnest($1::text[]) t)
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        ORDER BY 1""",
        tables,
    )
    for fk in fks:
        await conn.execute(f"ALTER TABLE {fk['tbl']} DROP CONSTRAINT {fk['name']}")
    for index in indexes:
        await conn.execute(f"DROP INDEX {index['name']}")
    add_fks = [
        f"ALTER TABLE {fk['tbl']} ADD CONSTRAINT {fk['name']} {fk['definition']}" for fk in fks
    ]
    return [index["ddl"] for index in indexes], add_fks


async def seed_database(
    database_url: str, config: SeedConfig, progress: Progress | None = None
) -> dict[str, int]:
    """Fill an EMPTY, migrated database; returns row counts per table.

    ``progress(table, rows_done, rows_total)`` is called as each table streams in. Raises
    RuntimeError if products already exist (nothing is written then). Needs the privileges
    of the schema owner (it drops and re-creates foreign keys and indexes, atomically).
    """
    config.validate()
    _check_copy_safe(words.WORD_LISTS)
    gen = _Generator(config)
    counts = dict.fromkeys(TABLES, 0)
    started = time.perf_counter()
    conn = await asyncpg.connect(**connect_kwargs(database_url))
    try:
        async with conn.transaction():
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM products)"):
                raise RuntimeError("the database already has products; seed needs an empty one")
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
            create_indexes, add_foreign_keys = await _detach_constraints(conn)

            async def load(table: str, lines: Iterable[str], total: int | None = None) -> None:
                if total is None:
                    lines = list(lines)
                    total = len(lines)
                counts[table] = await _copy(conn, table, lines, total, progress)

            cfg = config
            await load("customers", gen.customers(), cfg.customers)
            await load("warehouses", gen.warehouses(), cfg.warehouses)
            await load("products", gen.products(), cfg.products)
            heads, lines = gen.quotations()
            await load("quotations", heads)
            await load("quotation_lines", lines)
            del heads, lines
            await load("orders", gen.orders(), cfg.orders)
            await load("order_lines", gen.order_lines(), len(gen.ol_order))
            await load("stock_levels", gen.stock_levels(), gen.levels)
            await load("stock_allocations", gen.stock_allocations(), len(gen.al_line))
            movements = gen.levels + len(gen.al_line) + gen.shipments
            await load("stock_movements", gen.stock_movements(), movements)

            step = time.perf_counter()
            for ddl in create_indexes:
                await conn.execute(ddl)
            await conn.execute(f"ANALYZE {', '.join(TABLES)}")  # also plans the FK validation
            for ddl in add_foreign_keys:
                await conn.execute(ddl)
            for table in TABLES:
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" coalesce(max(id), 1), max(id) IS NOT NULL) FROM {table}"
                )
            log.info("seed.constraints_restored", seconds=round(time.perf_counter() - step, 2))
    finally:
        await conn.close()
    log.info("seed.done", seconds=round(time.perf_counter() - started, 2), **counts)
    return counts


# -- self-check -------------------------------------------------------------------------------


async def check_invariants(database_url: str) -> list[str]:
    """Human-readable consistency violations of the stock and money data; empty means OK."""
    problems: list[str] = []
    conn = await asyncpg.connect(**connect_kwargs(database_url))
    try:
        for description, sql in words.INVARIANT_CHECKS:
            rows = await conn.fetch(f"SELECT count(*) OVER () AS n, x FROM ({sql}) c(x) LIMIT 5")
            if rows:
                examples = ", ".join(str(row["x"]) for row in rows)
                problems.append(f"{rows[0]['n']} {description} (e.g. {examples})")
    finally:
        await conn.close()
    return problems
