"""Names and wire format of the Redis streams the relay writes and workers/subscribers read.

The relay (``workers/relay.py``) is the only writer. Delivery is at-least-once: a relay that dies
between ``XADD`` and marking its outbox rows published repeats those entries, so every reader
de-duplicates (jobs by their idempotency key and status, stock events by ``outbox_id``).
"""

from __future__ import annotations

from quartermaster.enums import IntegrationKind

#: One stream per job kind; entries: ``job_id``, ``kind``, ``key`` (the job's idempotency key).
JOB_STREAMS: dict[IntegrationKind, str] = {
    IntegrationKind.INVOICE: "qm:jobs:invoice",
    IntegrationKind.SHOP_SYNC: "qm:jobs:shop-sync",
    IntegrationKind.NOTIFICATION: "qm:jobs:notification",
}
#: Jobs that used up their attempts (or failed permanently); entries as in JOB_STREAMS plus
#: ``error``. Kept for people, nothing consumes it automatically.
DEAD_LETTER_STREAM = "qm:jobs:dead"
#: Sorted set of retries waiting for their time: member = JSON entry, score = due unix time.
RETRY_SCHEDULE = "qm:jobs:retry"
#: Consumer group every worker joins on each job stream.
WORKER_GROUP = "qm-workers"
#: Sorted set of the worker processes that reported lately (member = worker name, score = unix
#: time of its last report); each report lives under ``worker_report_key(name)`` with a TTL.
#: A report holds the worker's breaker states and partner call counts, so the /metrics of the
#: API (and of every worker) can show them for the whole pipeline.
WORKER_REPORTS = "qm:workers"

#: Every committed stock change, in commit order per stock level. Entries: ``outbox_id``,
#: ``occurred_at`` (ISO 8601) and ``payload`` (JSON: stock_level_id, product_id, warehouse_id,
#: reason, on_hand_delta, reserved_delta, on_hand, reserved, low_stock_threshold, order_id).
#: The entry id is the subscription cursor; the stream is capped (``QM_STOCK_EVENTS_MAXLEN``).
STOCK_EVENTS_STREAM = "qm:stock-events"


def job_stream(kind: IntegrationKind) -> str:
    return JOB_STREAMS[kind]


def worker_report_key(name: str) -> str:
    return f"qm:worker:{name}"
