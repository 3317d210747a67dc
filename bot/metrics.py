"""Prometheus metrics of one server, on a registry of its own (tests build many servers).

Everything is counted where it happens, in the server process, after the database job that
did it committed, except the pending waits: a gauge counted from the database on each
scrape (bot/server.py), so it is exact whatever ended them (a transition, a config edit
that stranded them, retention, another node) and however start-up and the timer
interleave. Both processes' CPU, memory and file descriptors come from prometheus-client's
ProcessCollector (`process_*` for the server, `flowbot_db_process_*` for the database
process). Names and example alerts: docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from bot.flow import WAIT_KINDS

# no *_created samples: they double the exposition and no alert uses them
disable_created_metrics()  # type: ignore[no-untyped-call]

PLATFORMS = ("telegram", "whatsapp")
# why a platform update was answered 200 (so the platform stops sending it) but not used;
# a fixed set, so the label cannot grow with what senders post
IGNORED_REASONS = ("too_large", "bad_json", "not_an_update", "unsupported", "other")
# request latencies: a commit is ~1-50 ms; up to 10 s for a stalled disk
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# how late an expiry fired, and how long a message waited to be delivered
LATENESS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 120.0)
DELIVERY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0, 120.0, 600.0)


class Metrics:
    """The metrics one server keeps. `db_pid()` names the database process (None: none)."""

    def __init__(self, db_pid: Callable[[], int | None] = lambda: None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        ProcessCollector(namespace="flowbot_db", registry=r,
                         pid=lambda: db_pid() or "no-database-process")
        PlatformCollector(registry=r)
        self.inbound = Counter(
            "flowbot_inbound_events", "Messages and button presses from users, by channel "
            "and outcome (accepted, deduplicated: a platform's redelivery).",
            ["channel", "outcome"], registry=r)
        self.callbacks = Counter(
            "flowbot_webview_callbacks", "POST /webview/callback answers by outcome: success, "
            "error (the flow's branches), not_found, already_resolved, expired, cancelled.",
            ["outcome"], registry=r)
        self.webhooks = Counter(
            "flowbot_webhooks", "POST /webhook answers by outcome: accepted, deduplicated "
            "(replayed webhook-id), not_waiting, not_found, refused (bad request or "
            "signature), gone, early (came before its Webhook block: kept, answered 202), "
            "early_applied (a kept call a Webhook block took as it started), dropped (kept, "
            "then discarded: no block within webhooks.early_window).",
            ["outcome"], registry=r)
        self.waits_opened = Counter(
            "flowbot_waits_opened", "Waits opened by transitions, by kind.", ["kind"],
            registry=r)
        self.waits_resolved = Counter(
            "flowbot_waits_resolved", "Waits ended, by kind and outcome (success, error, "
            "expired, failure, done, cancelled, removed: its block is gone from the config).",
            ["kind", "outcome"], registry=r)
        self.pending = Gauge(
            "flowbot_pending_waits", "Waits open now, by kind (counted from the database "
            "on each scrape).", ["kind"], registry=r)
        self.outbox = Counter(
            "flowbot_outbox_messages", "Outgoing messages by channel and outcome: sent, "
            "retried (a transient failure, sent again later), failed (given up).",
            ["channel", "outcome"], registry=r)
        self.ignored = Counter(
            "flowbot_platform_updates_ignored", "Platform updates answered 200 (so the "
            "platform does not send them again) but not used, by channel and reason: "
            "too_large (over the channel's body limit), bad_json, not_an_update (no "
            "update_id / not the platform's shape), unsupported (a kind flows do not take: "
            "a sticker, a service message, an empty message), other.",
            ["channel", "reason"], registry=r)
        for platform in PLATFORMS:
            for reason in IGNORED_REASONS:
                self.ignored.labels(platform, reason)
        self.callback_seconds = Histogram(
            "flowbot_webview_callback_seconds", "Time to answer POST /webview/callback, from "
            "the request's arrival to the answer (the commit included).", buckets=LATENCY,
            registry=r)
        self.webhook_seconds = Histogram(
            "flowbot_webhook_seconds", "Time to answer POST /webhook, the commit included.",
            buckets=LATENCY, registry=r)
        self.transition_seconds = Histogram(
            "flowbot_transition_seconds", "Time from handing an event to the database worker "
            "to its committed transition, by event kind (message, callback, webhook, timer).",
            ["event"], buckets=LATENCY, registry=r)
        self.timer_lateness = Histogram(
            "flowbot_timer_lateness_seconds", "How long after its deadline an expiry or delay "
            "was committed.", buckets=LATENESS, registry=r)
        self.delivery_delay = Histogram(
            "flowbot_outbox_delivery_seconds", "Time from a message's commit to the "
            "platform's acceptance of it, by channel (retries included).", ["channel"],
            buckets=DELIVERY, registry=r)
        # children bound once: .labels() is a dict lookup under a lock on the hot path
        for kind in WAIT_KINDS:
            self.pending.labels(kind)
        self.transition = {e: self.transition_seconds.labels(e)
                           for e in ("message", "callback", "webhook", "timer", "http")}
        self._pending = {k: self.pending.labels(k) for k in WAIT_KINDS}
        self._opened = {k: self.waits_opened.labels(k) for k in WAIT_KINDS}

    def opened(self, kind: str) -> None:
        self._opened[kind].inc()

    def resolved(self, kind: str, outcome: str) -> None:
        self.waits_resolved.labels(kind, outcome).inc()

    def ignored_update(self, channel: str, reason: str) -> None:
        """Count one platform update answered 200 but not used; a reason outside
        IGNORED_REASONS counts as "other" (labels stay a fixed set)."""
        self.ignored.labels(channel, reason if reason in IGNORED_REASONS else "other").inc()

    def set_pending(self, counts: Mapping[str, int]) -> None:
        """The pending waits by kind, as the database counted them just now (a kind it
        has none of is 0)."""
        for kind in WAIT_KINDS:
            self._pending[kind].set(counts.get(kind, 0))

    def count_events(self, counts: Mapping[str, int]) -> None:
        """Expose the runtime's own tallies (retention prunes, stranded conversations moved,
        …) as `flowbot_events_total{kind}`, read on each scrape."""
        self.registry.register(_Tallies(counts))

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (version 0.0.4)."""
        return generate_latest(self.registry)


class _Tallies(Collector):
    def __init__(self, counts: Mapping[str, int]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "flowbot_events", "Other tallies of the runtime by kind: pruned_<category> "
            "(retention), stranded_moved, chats_moved_<channel>, timer_<state>, ….",
            labels=["kind"])
        for kind, value in sorted(self.counts.items()):
            family.add_metric([kind], value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())
