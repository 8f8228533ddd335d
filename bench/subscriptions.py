"""Live stock benchmark: many WebSocket subscribers on one server, stock changes at a fixed rate.

One `quartermaster serve` and one `quartermaster worker --only-relay` (real outbox relay), a
driver in this process sending `adjustStock` mutations at `--rate` per second, and
`--clients` client processes that open `--subscribers` graphql-transport-ws connections
between them (one `stockChanged` subscription each) with a small WebSocket client written for
the purpose (an asyncio Protocol; the `websockets` library costs several times more CPU per
message, and the clients share the 2 cores with the server). Writes
bench/RESULTS-subscriptions.md and bench/results-subscriptions.json. Not part of the test
suite; see bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import multiprocessing
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BENCH, ROOT, Server, log, pct, plain, prepare_database, run_cli

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/qm_bench_live"
DEFAULT_REDIS = "redis://127.0.0.1:6379/12"
STREAM = "qm:stock-events"

EVENT_FIELDS = """cursor reason onHandDelta reservedDelta occurredAt
  stockLevel { id onHand reserved available isLow warehouse { code } product { sku name } }"""
DOCUMENTS = [
    # The dashboard everyone runs (scenario "all"), and three more shapes for "mixed".
    "subscription Dashboard($w: [ID!], $after: String) { stockChanged(warehouseIds: $w, "
    "after: $after) { " + EVENT_FIELDS + " } }",
    "subscription Levels($w: [ID!]) { stockChanged(warehouseIds: $w) { cursor occurredAt "
    "onHandDelta stockLevel { id available isLow } } }",
    "subscription Low($w: [ID!]) { stockChanged(warehouseIds: $w) { cursor occurredAt reason "
    "stockLevel { id onHand available lowStockThreshold warehouse { id code name } } } }",
    "subscription Products($w: [ID!]) { stockChanged(warehouseIds: $w) { cursor occurredAt "
    "stockLevel { id onHand product { id sku name unitPrice } } } }",
]
ADJUST = (
    "mutation Adjust($input: AdjustStockInput!) { adjustStock(input: $input) "
    "{ stockLevel { id onHand } errors { code } } }"
)


def staff_token() -> str | None:
    """A STAFF token under the development secret, when the server has authentication."""
    try:
        from quartermaster.auth import DEV_SECRET, Role, mint_token
    except ImportError:
        return None
    return mint_token(DEV_SECRET, Role.STAFF, subject="bench-subscriptions", ttl_s=3600)


# ---------------------------------------------------------------- the client processes


class Stats:
    def __init__(self, sample_every: int) -> None:
        self.recv = array("d")  # receive time of every delivery
        self.occurred = array("d")  # occurredAt of its event
        self.xadded = array("d")  # the stream entry's time (the ms part of the cursor)
        #: (stock level id, onHand, receive time) of every sample_every-th subscriber
        self.samples: list[tuple[str, int, float]] = []
        self.sample_every = sample_every
        self.errors: list[str] = []
        self.closed = 0


class WSClient(asyncio.Protocol):
    """graphql-transport-ws over a raw transport: handshake, masked client frames, unmasked
    server frames parsed in place; one subscription per connection."""

    def __init__(self, index: int, port: int, subscribe: bytes, stats: Stats, token: str | None):
        self.index = index
        self.port = port
        self.subscribe = subscribe
        self.stats = stats
        self.token = token
        self.sample = index % stats.sample_every == 0
        self.buf = bytearray()
        self.upgraded = False
        self.subscribed = asyncio.get_running_loop().create_future()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET /graphql HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n"
            ).encode()
        )

    def send(self, payload: bytes, opcode: int = 0x1) -> None:
        assert self.transport is not None
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        masked = int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        self.transport.write(header + mask + masked.to_bytes(n, "big"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.stats.errors.append(bytes(buf[:200]).decode(errors="replace"))
                self.fail()
                return
            del buf[: end + 4]
            self.upgraded = True
            init = {
                "type": "connection_init",
                "payload": {"token": self.token} if self.token else {},
            }
            self.send(orjson.dumps(init))
        pos, size = 0, len(buf)
        while size - pos >= 2:
            opcode, length = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if size - pos < head + length:
                break
            payload = bytes(buf[pos + head : pos + head + length])
            pos += head + length
            if opcode == 0x1:
                self.on_text(payload)
            elif opcode == 0x9:
                self.send(payload, 0xA)  # pong
            elif opcode == 0x8:
                self.stats.closed += 1
                self.stats.errors.append(f"closed: {int.from_bytes(payload[:2], 'big')}")
        del buf[:pos]

    def on_text(self, payload: bytes) -> None:
        now = time.time()
        message = orjson.loads(payload)
        kind = message["type"]
        if kind == "next":
            data = message["payload"].get("data")
            if not data:
                self.stats.errors.append(payload[:300].decode(errors="replace"))
                return
            event = data["stockChanged"]
            stats = self.stats
            stats.recv.append(now)
            stats.occurred.append(dt.datetime.fromisoformat(event["occurredAt"]).timestamp())
            stats.xadded.append(int(event["cursor"].partition("-")[0]) / 1000)
            if self.sample:
                level = event["stockLevel"]
                stats.samples.append((level["id"], level["onHand"], now))
        elif kind == "connection_ack":
            self.send(self.subscribe)
            if not self.subscribed.done():
                self.subscribed.set_result(None)
        elif kind != "pong":
            self.stats.errors.append(payload[:300].decode(errors="replace"))

    def fail(self) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(RuntimeError("handshake failed"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail()


def client_process(
    conn: Any,
    port: int,
    plan: list[tuple[int, int, dict[str, Any]]],
    sample_every: int,
    token: str | None,
) -> None:
    """One client process: open its connections, report ready, then report its deliveries."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stats = Stats(sample_every)
        clients = []
        for index, document, variables in plan:
            message = {
                "id": "1",
                "type": "subscribe",
                "payload": {"query": DOCUMENTS[document], "variables": variables},
            }
            subscribe = orjson.dumps(message)
            _, client = await loop.create_connection(
                lambda i=index, s=subscribe: WSClient(i, port, s, stats, token), "127.0.0.1", port
            )
            clients.append(client)
        await asyncio.gather(*(c.subscribed for c in clients))
        conn.send("ready")
        window = await loop.run_in_executor(None, conn.recv)
        t0, t1 = window
        recv, occurred, xadded = stats.recv, stats.occurred, stats.xadded
        in_window = [i for i in range(len(occurred)) if t0 <= occurred[i] < t1]
        conn.send(
            {
                "delivered_in_window": sum(1 for t in recv if t0 <= t < t1),
                "latency_occurred": [recv[i] - occurred[i] for i in in_window],
                "latency_xadd": [recv[i] - xadded[i] for i in in_window],
                "events_in_window": len(in_window),
                "samples": stats.samples,
                "errors": stats.errors[:20],
                "error_count": len(stats.errors),
                "closed": stats.closed,
            }
        )

    asyncio.run(main())


# ---------------------------------------------------------------- the driver


async def drive(
    base: str,
    levels: list[tuple[int, int]],
    rate: float,
    seconds: float,
    done: dict[tuple[str, int], float],
    failures: list[str],
    token: str | None,
) -> None:
    """Open loop: one adjustStock (+1, RECEIPT) every 1/rate s; response time per (level,
    onHand), which is unique because every change adds one unit."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    from quartermaster.schema.node import encode_id

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:

        async def one(product: int, warehouse: int) -> None:
            variables = {
                "input": {
                    "productId": encode_id("Product", product),
                    "reason": "RECEIPT",
                    "warehouseId": encode_id("Warehouse", warehouse),
                    "delta": 1,
                }
            }
            try:
                response = await http.post(
                    "/graphql", json={"query": ADJUST, "variables": variables}
                )
                body = response.json()
                result = body["data"]["adjustStock"]
                if result["errors"]:
                    failures.append(str(result["errors"]))
                    return
                level = result["stockLevel"]
                done[(level["id"], level["onHand"])] = time.time()
            except Exception as exc:  # recorded, the run is then invalid
                failures.append(f"{type(exc).__name__}: {exc}")

        tasks = set()
        start = time.monotonic()
        n = 0
        while (now := time.monotonic()) < start + seconds:
            product, warehouse = levels[n % len(levels)]
            task = asyncio.create_task(one(product, warehouse))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - now))
        await asyncio.gather(*tasks)


# ---------------------------------------------------------------- one scenario


def metrics_of(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    found = {}
    for name in (
        "qm_live_events_total",
        "qm_live_deliveries_total",
        "qm_live_renders_total",
        "qm_live_slow_closes_total",
        "qm_live_subscriptions",
    ):
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        found[name] = float(match.group(1)) if match else 0.0
    return found


def tree_cpu(pid: int) -> float:
    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def run_scenario(
    name: str,
    args: argparse.Namespace,
    server: Server,
    writer: Server,
    relay_pid: int,
    levels: list[tuple[int, int]],
    warehouses: list[int],
    token: str | None,
) -> dict[str, Any]:
    from quartermaster.schema.node import encode_id

    label = name
    name, _, at = label.partition("@")  # e.g. all@20: the `all` scenario at 20 changes/s
    rate = float(at) if at else args.rate
    subscribers = 0 if name == "none" else args.subscribers
    clients = args.clients if subscribers else 0
    plans: list[list[tuple[int, int, dict[str, Any]]]] = [[] for _ in range(clients)]
    for i in range(subscribers):
        if name == "all":
            document, variables = 0, {}
        elif name == "wide":  # the dashboard over three of the five warehouses (60 % of events)
            w = [warehouses[(i + k) % len(warehouses)] for k in range(3)]
            document, variables = 0, {"w": [encode_id("Warehouse", x) for x in w]}
        else:  # each subscriber watches one warehouse with one of four documents
            document = i % len(DOCUMENTS)
            variables = {"w": [encode_id("Warehouse", warehouses[(i // 4) % len(warehouses)])]}
        plans[i % args.clients].append((i, document, variables))
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for plan in plans:
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=client_process, args=(child, server.port, plan, args.sample_every, token)
        )
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        for pipe in pipes:
            if not pipe.poll(120):
                raise SystemExit("a client process did not get its subscriptions up in 120 s")
            assert pipe.recv() == "ready"
        log(f"[{label}] {subscribers} subscribers connected; warm-up {args.warmup:.0f} s")
        time.sleep(1.0)  # the last subscriptions register with the hub
        done: dict[tuple[str, int], float] = {}
        failures: list[str] = []
        asyncio.run(drive(writer.base, levels, rate, args.warmup, {}, failures, token))
        before = metrics_of(server.base)
        cpu0 = {
            "server": server.cpu_seconds(),
            "writer": writer.cpu_seconds(),
            "relay": tree_cpu(relay_pid),
            "clients": sum(tree_cpu(p.pid or 0) for p in procs),
        }
        machine0 = psutil.cpu_times()
        t0 = time.time()
        log(f"[{label}] measuring {args.duration:.0f} s at {rate:g} changes/s")
        asyncio.run(drive(writer.base, levels, rate, args.duration, done, failures, token))
        t1 = time.time()
        cpu1 = {
            "server": server.cpu_seconds(),
            "writer": writer.cpu_seconds(),
            "relay": tree_cpu(relay_pid),
            "clients": sum(tree_cpu(p.pid or 0) for p in procs),
        }
        machine1 = psutil.cpu_times()
        time.sleep(3.0)  # let the last events arrive
        after = metrics_of(server.base)
        for pipe in pipes:
            pipe.send((t0, t1))
        reports = [pipe.recv() for pipe in pipes]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    seconds = t1 - t0
    latency_occ = sorted(x * 1000 for r in reports for x in r["latency_occurred"])
    latency_hub = sorted(x * 1000 for r in reports for x in r["latency_xadd"])
    latency_resp = sorted(
        (t - done[(level, on_hand)]) * 1000
        for r in reports
        for level, on_hand, t in r["samples"]
        if (level, on_hand) in done and t0 <= done[(level, on_hand)] < t1
    )
    events = len(done)
    matching = {"all": subscribers, "none": 0}.get(name)
    delivered = sum(r["delivered_in_window"] for r in reports)
    received_for_window = sum(r["events_in_window"] for r in reports)
    busy = (sum(machine1) - machine1.idle - machine1.iowait) - (
        sum(machine0) - machine0.idle - machine0.iowait
    )
    deltas = {k: after[k] - before[k] for k in after}
    row = {
        "scenario": label,
        "subscribers": subscribers,
        "client_processes": clients,
        "rate_target": rate,
        "changes": events,
        "changes_per_s": events / seconds,
        "deliveries_per_s": delivered / seconds,
        "deliveries_for_window_events": received_for_window,
        "expected_deliveries": events * matching if matching is not None else None,
        "latency_from_occurredAt_ms": {
            "p50": pct(latency_occ, 0.5),
            "p99": pct(latency_occ, 0.99),
            "max": latency_occ[-1] if latency_occ else None,
            "n": len(latency_occ),
        },
        "latency_from_response_ms": {
            "p50": pct(latency_resp, 0.5),
            "p99": pct(latency_resp, 0.99),
            "max": latency_resp[-1] if latency_resp else None,
            "n": len(latency_resp),
        },
        "latency_from_xadd_ms": {
            "p50": pct(latency_hub, 0.5),
            "p99": pct(latency_hub, 0.99),
            "max": latency_hub[-1] if latency_hub else None,
            "n": len(latency_hub),
        },
        "server_cpu_s_per_s": (cpu1["server"] - cpu0["server"]) / seconds,
        "relay_cpu_s_per_s": (cpu1["relay"] - cpu0["relay"]) / seconds,
        "writer_cpu_s_per_s": (cpu1["writer"] - cpu0["writer"]) / seconds
        if writer is not server
        else None,
        "clients_cpu_s_per_s": (cpu1["clients"] - cpu0["clients"]) / seconds,
        "machine_busy_cores": busy / seconds,
        "server_cpu_s": cpu1["server"] - cpu0["server"],
        "delivered": delivered,
        "hub_events": deltas["qm_live_events_total"],
        "hub_deliveries": deltas["qm_live_deliveries_total"],
        "hub_renders": deltas["qm_live_renders_total"],
        "slow_closes": deltas["qm_live_slow_closes_total"],
        "failures": failures[:10],
        "client_errors": [e for r in reports for e in r["errors"]][:10],
        "client_error_count": sum(r["error_count"] for r in reports),
    }
    log(
        f"[{label}] {row['deliveries_per_s']:.0f} deliveries/s, p50/p99 "
        f"{row['latency_from_occurredAt_ms']['p50']:.1f}/"
        f"{row['latency_from_occurredAt_ms']['p99']:.1f} ms from occurredAt, "
        f"{row['latency_from_xadd_ms']['p50']:.1f}/{row['latency_from_xadd_ms']['p99']:.1f} ms "
        f"from XADD; server {row['server_cpu_s_per_s']:.2f} cores; renders "
        f"{row['hub_renders']:.0f} for {row['hub_events']:.0f} events"
    )
    return row


# ---------------------------------------------------------------- results


def write_results(meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:

    def ms(value: Any) -> str:
        return "—" if value is None else f"{value:.1f}"

    lines = [
        "# Live stock subscriptions benchmark",
        "",
        f"Measured {meta['date']} on {meta['machine']} ({meta['cpus']} cores, load average "
        f"{meta['load_before']} before the run). Reproduce with:",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
        "The subscribers' server process (`quartermaster serve`, one uvicorn worker)"
        + (
            ", a second server instance that takes the mutations"
            if meta["writes_via"] == "other"
            else ""
        )
        + f", one relay process (`quartermaster worker --only-relay`, "
        f"`QM_RELAY_POLL_S={meta['relay_poll_s']}`), {meta['clients']} client processes, "
        "PostgreSQL and Redis, all on the same 2-core machine. Each change is an `adjustStock` "
        "(`RECEIPT`, +1) sent by an open-loop driver; the event goes through the outbox, the "
        "relay, the Redis stream and the hub to every matching subscriber.",
        "",
        "| scenario | subscribers | changes/s | deliveries/s | delivered / expected | "
        "commit→client p50 / p99 / max ms | response→client p50 / p99 ms | "
        "XADD→client p50 / p99 ms | server CPU | renders/event |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        occ, resp = r["latency_from_occurredAt_ms"], r["latency_from_response_ms"]
        hub = r["latency_from_xadd_ms"]
        expected = r["expected_deliveries"]
        complete = "—" if expected is None else f"{r['deliveries_for_window_events']} / {expected}"
        renders = r["hub_renders"] / r["hub_events"] if r["hub_events"] else 0
        lines.append(
            f"| {r['scenario']} | {r['subscribers']} | {r['changes_per_s']:.1f} | "
            f"{r['deliveries_per_s']:.0f} | {complete} | "
            f"{ms(occ['p50'])} / {ms(occ['p99'])} / {ms(occ['max'])} | "
            f"{ms(resp['p50'])} / {ms(resp['p99'])} | {ms(hub['p50'])} / {ms(hub['p99'])} | "
            f"{r['server_cpu_s_per_s']:.2f} cores | {renders:.2f} |"
        )
    lines += [
        "",
        "Columns:",
        "",
        "- *deliveries/s*: `next` messages the clients received during the measured "
        "window, divided by its length.",
        "- *expected*: for `all`, deliveries of the window's events that arrived / "
        "changes × subscribers (every subscriber gets every event).",
        "- *p50/p99/max ms*: commit-to-client latency per delivery, from the event's "
        "`occurredAt` (the transaction's `now()`, taken a few ms *before* the commit, so "
        "this slightly overstates the latency) to the client's receive time.",
        "- *(resp.)*: from the moment the driver received the mutation's response (after "
        "the commit, so this slightly understates it), for every "
        f"{meta['sample_every']}th subscriber.",
        "- *XADD→client*: from the stream entry's own timestamp (the ms part of the "
        "cursor, set by Redis when the relay added it) to the client: the hub, the "
        "render, the WebSocket writes and the client, without the relay's share.",
        "- *server CPU*: CPU seconds per second of the server process the subscribers are "
        "connected to"
        + (
            " (the mutations go to a second instance, as they would behind a load balancer)."
            if meta["writes_via"] == "other"
            else " (the mutations included; the `none` row is that load without subscribers)."
        ),
        "- *renders/event*: selections executed per stock event (hub metric "
        "`qm_live_renders_total` / `qm_live_events_total`). Without render groups it "
        "would be the number of matching subscribers.",
        "",
    ]
    lines += ["Other figures per scenario:", ""]
    base = next((r for r in rows if r["scenario"] == "none" and r["changes"]), None)
    per_change = 0.0
    if meta["writes_via"] == "same" and base:
        per_change = base["server_cpu_s"] / base["changes"]
    for r in rows:
        fan_out = ""
        if r["delivered"]:
            net = r["server_cpu_s"] - per_change * r["changes"]
            r["server_us_per_delivery"] = net / r["delivered"] * 1e6
            fan_out = f"subscriber server {r['server_us_per_delivery']:.1f} µs CPU per delivery"
            if per_change:
                fan_out += f" (net of {per_change * 1000:.1f} ms per mutation)"
            fan_out += "; "
        if r.get("writer_cpu_s_per_s") is not None:
            fan_out += f"mutation server {r['writer_cpu_s_per_s']:.2f} cores; "
        lines.append(
            f"- `{r['scenario']}`: {fan_out}relay {r['relay_cpu_s_per_s']:.2f} cores, clients "
            f"{r['clients_cpu_s_per_s']:.2f} cores, whole machine {r['machine_busy_cores']:.2f} "
            f"of {meta['cpus']} cores busy; {r['hub_events']:.0f} events, "
            f"{r['hub_deliveries']:.0f} deliveries and {r['hub_renders']:.0f} renders in the "
            f"hub; slow closes {r['slow_closes']:.0f}; driver failures {len(r['failures'])}; "
            f"client errors {r['client_error_count']}."
        )
    lines += ["", "## Notes", "", *meta["notes"], ""]
    (BENCH / "RESULTS-subscriptions.md").write_text("\n".join(lines))
    (BENCH / "results-subscriptions.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """The reading of the table, from the measured rows."""
    out = []
    everyone = [
        r for r in rows if r["scenario"].split("@")[0] in ("all", "wide") and r["delivered"]
    ]
    good = [r for r in everyone if r["latency_from_occurredAt_ms"]["p99"] < 100]
    # The target: 1,000 subscribers on one instance, 50 changes/s, at least 20,000
    # deliveries/s with commit→client p99 under 100 ms.
    target = [
        r for r in everyone
        if r["subscribers"] >= 1000 and r["changes_per_s"] >= 49.5
        and r["deliveries_per_s"] >= 20_000
    ]  # fmt: skip
    for r in target:
        lat = r["latency_from_occurredAt_ms"]
        met = lat["p99"] < 100
        out.append(
            f"- Target (1,000 subscribers, 50 changes/s, ≥ 20,000 deliveries/s, p99 < 100 ms): "
            f"`{r['scenario']}` delivered {r['deliveries_per_s']:,.0f}/s to "
            f"{r['subscribers']:,} subscribers at {r['changes_per_s']:.0f} changes/s with p50 "
            f"{lat['p50']:.0f} ms and p99 {lat['p99']:.0f} ms: **{'met' if met else 'missed'}**."
        )
    if good:
        best = max(good, key=lambda r: r["deliveries_per_s"])
        out.append(
            f"- Highest load here that keeps commit→client p99 under 100 ms: `{best['scenario']}`"
            f", {best['deliveries_per_s']:,.0f} deliveries/s to {best['subscribers']} "
            f"subscribers (p50 {best['latency_from_occurredAt_ms']['p50']:.0f} ms, p99 "
            f"{best['latency_from_occurredAt_ms']['p99']:.0f} ms)."
        )
    for r in everyone:
        p99 = r["latency_from_occurredAt_ms"]["p99"]
        if p99 >= 100 and r["expected_deliveries"] is not None:
            out.append(
                f"- `{r['scenario']}` ({r['changes_per_s']:.0f} changes/s, "
                f"{r['subscribers'] * r['changes_per_s']:,.0f} deliveries/s offered): "
                f"{r['deliveries_per_s']:,.0f} deliveries/s arrived "
                f"({r['deliveries_for_window_events']:,} of {r['expected_deliveries']:,}), "
                f"but p99 is {p99:,.0f} ms: the machine ran at {r['machine_busy_cores']:.2f} "
                "of 2 cores and queues built up."
            )
        elif p99 >= 100:
            out.append(f"- `{r['scenario']}`: p99 is {p99:,.0f} ms, above the 100 ms target.")
    out += [
        "- One render per event and render group: `all` runs one document for every "
        "subscriber (1 render per event instead of 1,000), `mixed` four documents (4 instead "
        "of ~200). The filters (`warehouseIds`) and `after` are not part of the group key.",
        "- The subscriber server's CPU per delivery (other figures) is the fan-out's cost: the "
        "hub's share (filter, frame = shared payload + operation id, queue) is about 3.5 µs "
        "(measured in-process with a no-op socket); the rest is uvicorn's WebSocket framing "
        "(the hub calls the ASGI server's `send` directly, past Starlette's wrappers) and one "
        "`send()` system call per frame, since every subscriber has its own connection. "
        "Sends happen synchronously in the hub while a socket takes "
        "data; only a full socket costs a task. Render and product look-ups add to it in "
        "`mixed` (four renders per event, one product query per batch of events).",
        "- Latency includes the relay: it polls the outbox every `QM_RELAY_POLL_S` (20 ms) "
        "and publishes in commit order; *XADD→client* is the share after the relay.",
        "- Garbage collection: 1,000 connections hold ~250k long-lived objects, and a full "
        "collection walked all of them (100–330 ms, every 20–30 s under this load), a stall "
        "every subscriber saw. The API process now runs `gc_policy.py`: every `QM_GC_FREEZE_S` "
        "(10 s) `gc.freeze()` moves the survivors out of the collector's walk, and a sweep "
        "every `QM_GC_SWEEP_S` (600 s) reclaims cycles among them. Measured on `wide` before "
        "and after: p99 383 ms → 46 ms; `all` at 50 changes/s: p99 5.6 s (a saturated "
        "machine) → about 150 ms.",
        "- At 50,000 deliveries/s (`all`) the subscriber server spends about two thirds of its "
        "samples (py-spy) in the WebSocket transport's `write`, one `send()` system call per "
        "frame and subscriber; on loopback that call also carries the receiving side's TCP "
        "work. A read batch of several events is sent with every subscriber's socket corked "
        '(`TCP_CORK`, `qm_live_dispatches_total{events="several"}`), so the frames of the '
        "batch leave in one transmission per socket: when events queue up behind a fan-out, "
        "the next fan-out gets cheaper per event instead of the queue growing. Before that "
        "(and before the hub called uvicorn's `send` directly) `all` had p99 of 108–143 ms.",
        "- Everything shares 2 cores: the two servers, the relay, PostgreSQL, Redis, the "
        "driver and the Python clients (about 10 µs of client CPU per message). The knee is "
        "the machine's, not the hub's alone: the subscriber server itself stayed below one "
        "core.",
    ]
    return out


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database-url", default=DEFAULT_URL)
    p.add_argument("--redis-url", default=DEFAULT_REDIS)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--rate", type=float, default=50.0, help="stock changes per second")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--scenarios", default="none,all,all@30,all@40,wide,mixed")
    p.add_argument("--sample-every", type=int, default=10)
    p.add_argument("--products", type=int, default=2000)
    p.add_argument("--warehouses", type=int, default=5)
    p.add_argument("--reuse", action="store_true")
    p.add_argument(
        "--writes-via",
        choices=("other", "same"),
        default="other",
        help="send the mutations to a second server instance (default) or to the subscribers' one",
    )
    return p.parse_args()


def main() -> int:
    args = parse_args()
    url = args.database_url
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    reused = asyncio.run(prepare_database(plain(url), args.reuse, args.products))
    env = {**os.environ, "QM_DATABASE_URL": url, "QM_REDIS_URL": args.redis_url}
    if not reused:
        run_cli(["migrate"], env)
        run_cli(
            [
                "seed",
                "--products",
                str(args.products),
                "--warehouses",
                str(args.warehouses),
                "--customers",
                "50",
                "--orders",
                "200",
                "--quotations",
                "0",
            ],
            env,
        )

    async def facts() -> tuple[list[tuple[int, int]], list[int]]:
        conn = await asyncpg.connect(plain(url))
        try:
            rows = await conn.fetch(
                "SELECT s.product_id, s.warehouse_id FROM stock_levels s JOIN products p "
                "ON p.id = s.product_id WHERE p.active ORDER BY s.id"
            )
            warehouses = [
                r["id"] for r in await conn.fetch("SELECT id FROM warehouses ORDER BY id")
            ]
        finally:
            await conn.close()
        levels = [(r["product_id"], r["warehouse_id"]) for r in rows]
        random.Random(7).shuffle(levels)
        return levels, warehouses

    levels, warehouses = asyncio.run(facts())
    # Old entries would only make the server's start slower; the stream is this bench's own.
    subprocess.run(
        ["redis-cli", "-u", args.redis_url, "DEL", STREAM], check=False, capture_output=True
    )
    logdir = Path(tempfile.mkdtemp(prefix="qm-bench-live-"))
    log(f"logs in {logdir}")
    os.environ.update({"QM_REDIS_URL": args.redis_url, "QM_PUBLIC_CATALOGUE": "true"})
    server = Server("dataloaders", url, logdir)
    writer = server
    if args.writes_via == "other":
        (logdir / "writer").mkdir()
        writer = Server("dataloaders", url, logdir / "writer")
    relay_log = (logdir / "relay.log").open("wb")
    relay = subprocess.Popen(
        ["uv", "run", "quartermaster", "worker", "--only-relay"],
        cwd=ROOT,
        env={**env, "QM_LOG_LEVEL": "warning"},
        stdout=relay_log,
        stderr=relay_log,
        start_new_session=True,
    )
    token = staff_token()
    rows = []
    try:
        server.wait_healthy()
        writer.wait_healthy()
        for name in args.scenarios.split(","):
            rows.append(
                run_scenario(name, args, server, writer, relay.pid, levels, warehouses, token)
            )
            time.sleep(2)
    finally:
        server.stop()
        if writer is not server:
            writer.stop()
        relay.terminate()
        try:
            relay.wait(15)
        except subprocess.TimeoutExpired:
            relay.kill()
    argv = " ".join(sys.argv[1:])
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "cpus": psutil.cpu_count(),
        "load_before": load_before,
        "command": "uv run python bench/subscriptions.py" + (f" {argv}" if argv else ""),
        "relay_poll_s": os.environ.get("QM_RELAY_POLL_S", "0.02"),
        "writes_via": args.writes_via,
        "clients": args.clients,
        "sample_every": args.sample_every,
        "notes": notes(rows),
    }
    write_results(meta, rows)
    log("wrote bench/RESULTS-subscriptions.md and bench/results-subscriptions.json")
    bad = [r for r in rows if r["failures"] or r["client_error_count"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
