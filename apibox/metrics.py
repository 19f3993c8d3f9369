"""Prometheus metrics: the instruments, and what each request adds to them.

One ``Metrics`` per gateway, on its own ``CollectorRegistry`` (not prometheus-client's global
one), so two gateways in one process never share counts. Labels come only from the config
(model and provider names) and from fixed sets (HTTP statuses, error codes, token classes):
nothing a client sends, and nothing about users or keys, becomes a label.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from itertools import accumulate

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from apibox.models import UsageRecord

# Seconds. LLM requests run from milliseconds (refusals, embeddings) to minutes (long answers).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
REJECTED_STATUSES = frozenset({400, 401, 402, 403})
RATE_LIMITED_STATUS = 429


class PlainCounter:
    """A labelled counter kept as plain numbers and turned into a Prometheus family when scraped.

    prometheus-client's own instruments take a lock and a few calls on every increment; a request
    made a dozen of them. The gateway's counts change only on the event loop's thread, so a dict
    is enough, and the work moves to the scrape."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.values.items():
            family.add_metric(labels, value)
        return family


class PlainHistogram:
    """A labelled histogram kept as plain numbers (a count per bucket and the sum), as PlainCounter."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 buckets: tuple[float, ...]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.buckets = buckets
        self.series: dict[tuple[str, ...], list[float]] = {}  # per bucket then +Inf: its count; last: the sum

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0] * (len(self.buckets) + 2)
        series[bisect_left(self.buckets, value)] += 1
        series[-1] += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        bounds = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
        for labels, series in self.series.items():
            family.add_metric(labels, list(zip(bounds, accumulate(series[:-1]), strict=True)), series[-1])
        return family


class PlainInstruments(Collector):
    """Hands a registry the families of the plain instruments when it is scraped."""

    def __init__(self, instruments: list[PlainCounter | PlainHistogram]) -> None:
        self.instruments = instruments

    def collect(self) -> Iterable[Metric]:
        return [instrument.family() for instrument in self.instruments]


class Metrics:
    """The gateway's instruments on one registry; ``exposition()`` is the /metrics page."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = PlainCounter(
            "apibox_requests", "API requests answered, by model, route (provider) and HTTP status. A billed "
            "request counts with the status of its usage row: 499 when the client went away, 502 when the "
            "upstream broke a stream that had started. Empty model or provider: not known (yet) when answered.",
            ("model", "provider", "status"))
        self.duration = PlainHistogram(
            "apibox_request_duration_seconds", "Time from a request's arrival to the end of its answer "
            "(the last byte written, for streams).", ("model",), LATENCY_BUCKETS)
        self.ttft = PlainHistogram(
            "apibox_time_to_first_token_seconds", "Time from a billed request's arrival to the first output "
            "from the upstream (for answers not streamed: the whole reply).", ("model", "provider"),
            TTFT_BUCKETS)
        self.upstream = PlainHistogram(
            "apibox_upstream_response_seconds", "Time from sending a request to an upstream to its response "
            "head, errors included (for answers not streamed, the reply's body is read in this time too).",
            ("provider",), LATENCY_BUCKETS)
        self.upstream_failures = PlainCounter(
            "apibox_upstream_failures", "Upstream attempts that failed before any output (a later route may "
            "still have answered the request), by provider and error code.", ("provider", "code"))
        self.tokens = PlainCounter(
            "apibox_tokens", "Tokens of settled requests by model and class: prompt and completion; cached "
            "and cache_write are parts of prompt, reasoning a part of completion.", ("model", "class"))
        self.cost = PlainCounter(
            "apibox_cost_micro_usd", "What settled requests cost at their price, in micro-USD (1 USD = 1e6).",
            ("model",))
        self.charged = PlainCounter(
            "apibox_charged_micro_usd", "What settled requests took from balances, in micro-USD (their cost, "
            "capped at what the user had).", ("model",))
        self.rate_limited = PlainCounter(
            "apibox_rate_limited", "Requests refused with 429, by error code (rate_limit_exceeded: apibox's "
            "own limits; upstream_rate_limited: every route's upstream asked to wait).", ("code",))
        self.rejected = PlainCounter(
            "apibox_rejected", "Requests refused with 400, 401, 402 or 403, by status and error code.",
            ("status", "code"))
        self.keepalives = PlainCounter(
            "apibox_stream_keepalives", "Keep-alive comments written on streams their upstream left silent for "
            "server.stream_keepalive_seconds, by what came of them: sent, or client_gone (the client had left; "
            "its upstream was closed at once).", ("outcome",))
        # the process's CPU, memory and open files, its Python and its garbage collector's passes (as
        # prometheus-client's default registry has them): a pass a few requests is a reference cycle
        # made per request, and costs throughput
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        registry.register(GC_COLLECTOR)
        registry.register(PlainInstruments([self.requests, self.duration, self.ttft, self.upstream,
                                            self.upstream_failures, self.tokens, self.cost, self.charged,
                                            self.rate_limited, self.rejected, self.keepalives]))
        self.open_holds = Gauge(
            "apibox_open_holds", "Requests in flight holding money (a hold taken, not yet settled).",
            registry=registry)
        self.held = Gauge(
            "apibox_held_micro_usd", "The money those holds set aside, in micro-USD.", registry=registry)
        self.in_flight = Gauge(
            "apibox_requests_in_flight", "API requests being served now (not /metrics or health probes).",
            registry=registry)
        # The gauges that move on every request read plain numbers when scraped: an inc() or dec()
        # takes a lock and two calls, and these moved four times per request.
        self.in_flight_count = 0  # the middleware counts here
        self.open_hold_count = 0
        self.held_micro = 0
        self.in_flight.set_function(lambda: self.in_flight_count)
        self.open_holds.set_function(lambda: self.open_hold_count)
        self.held.set_function(lambda: self.held_micro)

    def exposition(self) -> bytes:
        """The metrics in Prometheus's text format."""
        return generate_latest(self.registry)

    def answered(self, model: str, provider: str, status: int, seconds: float, code: str | None) -> None:
        """One API request done: counted by its labels, timed, and counted again if it was refused."""
        self.requests.inc((model, provider, str(status)))
        self.duration.observe((model,), seconds)
        if status == RATE_LIMITED_STATUS:
            self.rate_limited.inc((code or "",))
        elif status in REJECTED_STATUSES:
            self.rejected.inc((str(status), code or ""))

    def holding(self, amount: int) -> None:
        self.open_hold_count += 1
        self.held_micro += amount

    def released(self, amount: int) -> None:
        self.open_hold_count -= 1
        self.held_micro -= amount

    def settled(self, record: UsageRecord) -> None:
        """A billed request's usage row: its tokens, cost and time to first token."""
        model = record.model
        for token_class, count in (("prompt", record.prompt_tokens), ("completion", record.completion_tokens),
                                   ("cached", record.cached_tokens), ("cache_write", record.cache_write_tokens),
                                   ("reasoning", record.reasoning_tokens)):
            if count:
                self.tokens.inc((model, token_class), count)
        if record.cost:
            self.cost.inc((model,), record.cost)
        if record.charged:
            self.charged.inc((model,), record.charged)
        if record.ttft_ms is not None:
            self.ttft.observe((model, record.provider), record.ttft_ms / 1000)

    def upstream_answered(self, provider: str, seconds: float) -> None:
        self.upstream.observe((provider,), seconds)

    def upstream_failed(self, provider: str, code: str | None, seconds: float | None) -> None:
        """An attempt that failed; ``seconds`` is None when no response head came (connect error, timeout)."""
        self.upstream_failures.inc((provider, code or ""))
        if seconds is not None:
            self.upstream.observe((provider,), seconds)


class RedisInstruments:
    """Whether the shared Redis answers, on the gateway's registry; only gateways configured with Redis have them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "apibox_redis_up", "1 while Redis answers; 0 while it does not and this process keeps its limits "
            "alone (each process then allows a subject its full limits).", registry=registry)
        self.fallbacks = Counter(
            "apibox_redis_fallbacks", "Requests whose limits were checked in this process alone because Redis "
            "did not answer in time.", registry=registry)
        self.up.set(1)
