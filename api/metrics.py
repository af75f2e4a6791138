"""Prometheus metrics on ``GET /metrics``, all named ``trainq_*``.

HTTP metrics come from prometheus-fastapi-instrumentator (``trainq_http_requests_total``,
``trainq_http_request_duration_seconds``…) plus ``trainq_submit_duration_seconds``, the latency of
accepted ``POST /jobs``. At each scrape a collector reads Redis for the service's state: jobs by
state, queue depths, live workers, and each worker's own counters, which workers publish with
their status (:mod:`shared.workers`) — so one scrape of the API covers every worker, wherever it
runs. Run one API process per container: the HTTP metrics are per process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator, metrics

from api.deps import get_principal
from shared.scheduler import waiting_jobs
from shared.workers import live_workers

logger = logging.getLogger(__name__)


class ServiceCollector(Collector):
    """Jobs, queues and workers as Redis has them at scrape time."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("trainq_job_store_up", "1 when the API could read Redis for this scrape.")
        store = getattr(self.app.state, "store", None)
        if store is None:
            return
        try:
            states = store.count_by_state()
            workers = live_workers(store.redis)
            names = set(store.queues()) | {self.app.state.settings.default_queue} | {q for w in workers for q in w.queues}
            depths = {name: waiting_jobs(store.redis, name) for name in sorted(names)}
        except Exception as exc:  # Redis down: say so instead of failing the scrape
            logger.warning("metrics: Redis: %s: %s", type(exc).__name__, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("trainq_jobs", "Jobs in each state, every owner.", labels=["state"])
        for state, count in states.items():
            jobs.add_metric([state.value], count)
        yield jobs
        depth = GaugeMetricFamily(
            "trainq_queue_depth", "Jobs waiting in each queue: pending, or sent to Celery and not yet taken.", labels=["queue"]
        )
        for name, value in depths.items():
            depth.add_metric([name], value)
        yield depth
        yield GaugeMetricFamily("trainq_workers", "Live workers (reported within three heartbeat intervals).", value=len(workers))
        yield from _worker_metrics(workers)


def _worker_metrics(workers) -> Iterator[Metric]:
    busy = GaugeMetricFamily("trainq_worker_busy", "1 while the worker trains a job.", labels=["worker"])
    samples = GaugeMetricFamily("trainq_worker_samples_per_second", "Training throughput of the worker's current job.", labels=["worker"])
    step = GaugeMetricFamily("trainq_worker_step_seconds", "Mean seconds per optimizer step, latest progress interval.", labels=["worker"])
    uploaded = CounterMetricFamily("trainq_worker_upload_bytes", "Bytes the worker uploaded to S3 since it started.", labels=["worker"])
    outcomes = CounterMetricFamily("trainq_worker_jobs", "Attempts the worker ended, by outcome.", labels=["worker", "outcome"])
    heartbeat = GaugeMetricFamily("trainq_worker_last_heartbeat_seconds", "When the worker last reported (Unix time).", labels=["worker"])
    for worker in workers:
        m = worker.metrics
        busy.add_metric([worker.name], 1 if worker.current_job else 0)
        if m.samples_per_s is not None:
            samples.add_metric([worker.name], m.samples_per_s)
        if m.step_time_s is not None:
            step.add_metric([worker.name], m.step_time_s)
        uploaded.add_metric([worker.name], m.upload_bytes_total)
        for outcome, count in sorted(m.jobs_total.items()):
            outcomes.add_metric([worker.name, outcome], count)
        heartbeat.add_metric([worker.name], worker.last_heartbeat)
    yield from (busy, samples, step, uploaded, outcomes, heartbeat)


def _submit_latency(registry: CollectorRegistry):
    histogram = Histogram(
        "trainq_submit_duration_seconds", "Seconds to accept a job (POST /jobs answered 202).",
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=registry,
    )

    def observe(info: metrics.Info) -> None:
        if info.request.method == "POST" and info.modified_handler == "/jobs" and info.response is not None \
                and info.response.status_code == 202:
            histogram.observe(info.modified_duration)

    return observe


def instrument(app: FastAPI) -> None:
    """Measure ``app``'s requests and serve ``GET /metrics`` (a token as for every route)."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(app))
    instrumentator = Instrumentator(
        registry=registry, excluded_handlers=["/metrics"], should_exclude_streaming_duration=True,
    )
    instrumentator.add(
        metrics.default(metric_namespace="trainq", registry=registry, should_exclude_streaming_duration=True),
        _submit_latency(registry),
    )
    instrumentator.instrument(app).expose(
        app, include_in_schema=True, tags=["health"], dependencies=[Depends(get_principal)],
        summary="Prometheus metrics (`trainq_*`)",
    )
