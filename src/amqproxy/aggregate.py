"""The whole proxy from its workers' answers (``--workers``): what the supervisor's HTTP port
shows is made here from what each worker's private endpoint said.

Pure functions of the answers and of what the supervisor knows of its workers: numbers are
summed (an age is the oldest), lists are joined with a ``worker`` field, and a client's id
becomes ``"W-ID"`` (worker, id in that worker) so that a close finds its worker.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

Json = dict[str, Any]
# Ages are not added up: the whole proxy's is the oldest of its workers'.
OLDEST = frozenset({"oldest_seconds", "amqproxy_outbox_oldest_seconds"})


@dataclass(frozen=True)
class WorkerView:
    """One worker slot as the supervisor sees it."""

    index: int
    pid: int | None  # None: not running (waiting to be restarted)
    alive: bool
    restarts: int
    uptime_seconds: float
    last_exit: str  # how its previous process ended ("" for none)


# ---- JSON -------------------------------------------------------------------------------------


def _merge(into: Json, row: Mapping[str, Any]) -> None:
    """Add ``row`` into ``into``: numbers summed (ages: the largest), flags or-ed, nested
    objects merged the same way, text kept from the first."""
    for key, value in row.items():
        have = into.get(key)
        if key not in into:
            into[key] = value
            if isinstance(value, dict):  # a copy of its own, to merge the next ones into
                into[key] = {}
                _merge(into[key], value)
        elif isinstance(value, bool) or isinstance(have, bool):
            into[key] = bool(have) or bool(value)
        elif isinstance(value, int | float) and isinstance(have, int | float):
            into[key] = max(have, value) if key in OLDEST else have + value
        elif isinstance(value, dict) and isinstance(have, dict):
            _merge(have, value)


def pools(answers: Mapping[int, Json]) -> Json:
    """The same (user, vhost) of several workers is one row, its numbers summed."""
    rows: dict[tuple[str, str], Json] = {}
    paused = False
    for _, body in sorted(answers.items()):
        paused = paused or bool(body.get("paused"))
        for row in body.get("pools", []):
            key = (str(row.get("user")), str(row.get("vhost")))
            _merge(rows.setdefault(key, {}), row)
    return {"pools": [rows[key] for key in sorted(rows)], "paused": paused}


def clients(answers: Mapping[int, Json]) -> Json:
    out = []
    for index, body in sorted(answers.items()):
        for row in body.get("clients", []):
            out.append({**row, "id": f"{index}-{row.get('id')}", "worker": index})
    return {"clients": out}


def upstreams(answers: Mapping[int, Json]) -> Json:
    out: list[Json] = []
    for index, body in sorted(answers.items()):
        out.extend({**row, "worker": index} for row in body.get("upstreams", []))
    out.sort(key=lambda row: (str(row.get("pool")), row["worker"], str(row.get("name"))))
    return {"upstreams": out}


def _node_rows(answers: Mapping[int, list[Json]]) -> list[Json]:
    """One row per node: what the worker that checked it last saw, the workers' upstream
    connections to it summed, and each worker's view of its state (``workers``)."""
    rows: dict[str, Json] = {}
    for index, found in sorted(answers.items()):
        for row in found:
            name = str(row.get("node"))
            have = rows.get(name)
            states = (have or {}).get("workers", {})
            states[str(index)] = row.get("state")
            connections = int(row.get("upstream_connections") or 0)
            if have is not None:
                connections += int(have.get("upstream_connections") or 0)
                fresher = (row.get("checked_seconds_ago") or float("inf")) < (
                    have.get("checked_seconds_ago") or float("inf")
                )
                row = row if fresher else have
            rows[name] = {**row, "upstream_connections": connections, "workers": states}
    return list(rows.values())


def nodes(answers: Mapping[int, Json]) -> Json:
    return {"nodes": _node_rows({i: body.get("nodes", []) for i, body in answers.items()})}


def paused(answers: Mapping[int, Json], asked: int) -> Json:
    """The answer of POST /api/pause or /api/resume sent to every worker."""
    return {
        "paused": bool(answers) and all(body.get("paused") for body in answers.values()),
        "clients": sum(int(body.get("clients", 0)) for body in answers.values()),
        "workers": len(answers),
        "workers_not_answering": asked - len(answers),
    }


def _worker_rows(workers: list[WorkerView], answers: Mapping[int, Json]) -> list[Json]:
    rows = []
    for view in workers:
        body = answers.get(view.index)
        rows.append(
            {
                "worker": view.index,
                "pid": view.pid,
                "alive": view.alive,
                "answers": body is not None,
                "ready": bool(body and body.get("ready")),
                "status": body.get("status") if body else ("down" if not view.alive else "?"),
                "clients": body.get("clients", 0) if body else 0,
                "restarts": view.restarts,
                "uptime_seconds": round(view.uptime_seconds, 3),
                "last_exit": view.last_exit or None,
            }
        )
    return rows


def health(
    answers: Mapping[int, Json], workers: list[WorkerView], draining: bool
) -> tuple[bool, Json]:
    """Ready while the supervisor is not draining and at least one live worker is ready: the
    kernel gives new clients only to workers that listen, so one worker down or restarting
    does not make the others' port a bad place to send clients."""
    bodies = [answers[index] for index in sorted(answers)]
    ready = not draining and any(body.get("ready") for body in bodies)
    reasons: list[str] = []
    if draining:
        reasons.append("draining: shutting down")
    elif not bodies:
        reasons.append("no worker answers")
    elif not ready:
        for index in sorted(answers):
            reasons += [f"worker {index}: {reason}" for reason in answers[index].get("reasons", [])]
    first = next((body for body in bodies if body.get("ready")), bodies[0] if bodies else {})
    status = "ok" if ready else ("draining" if draining else first.get("status", "no worker"))
    body: Json = {
        "status": status,
        "ready": ready,
        "reasons": reasons,
        "listening": any(b.get("listening") for b in bodies),
        "draining": draining or any(b.get("draining") for b in bodies),
        "paused": any(b.get("paused") for b in bodies),
        "broker": first.get("broker", {}),
        "clients": sum(int(b.get("clients", 0)) for b in bodies),
        "upstream_connections": sum(int(b.get("upstream_connections", 0)) for b in bodies),
        "upstream": first.get("upstream", ""),
    }
    outbox: Json = {}
    warnings: list[str] = []
    for b in bodies:
        _merge(outbox, b.get("outbox", {}))
        warnings += [w for w in b.get("warnings", []) if w not in warnings]
    body["outbox"] = outbox
    if any("nodes" in b for b in bodies):
        body["nodes"] = _node_rows({i: answers[i].get("nodes", []) for i in answers})
    if warnings:
        body["warnings"] = warnings
    rows = _worker_rows(workers, answers)
    body["workers"] = {
        "configured": len(workers),
        "alive": sum(view.alive for view in workers),
        "ready": sum(row["ready"] for row in rows),
        "list": rows,
    }
    return ready, body


# ---- /metrics ---------------------------------------------------------------------------------


class _Families:
    """Pre-built metric families, for ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


Key = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and labels


class Counters:
    """The workers' counters as the whole proxy's, kept between scrapes: a restarted worker
    counts from 0 again, so what its previous process had counted (as of the last scrape) is
    carried over, and a worker that does not answer counts with what it said last. The sums
    do not go down (Prometheus would read a drop as a reset of the whole proxy's counter);
    what a worker counted between the last scrape and its death is lost."""

    def __init__(self) -> None:
        self.meta: dict[str, tuple[str, str]] = {}  # family -> (help, type), first seen first
        self.family_of: dict[Key, str] = {}
        self.carried: dict[Key, float] = {}
        self.last: dict[int, tuple[int | None, dict[Key, float]]] = {}  # worker -> pid, values

    def observe(self, index: int, pid: int | None, values: dict[Key, float]) -> None:
        old = self.last.get(index)
        if old is not None and old[0] != pid:  # a new process: the old one's counts stay
            for key, value in old[1].items():
                self.carried[key] = self.carried.get(key, 0.0) + value
        self.last[index] = (pid, values)

    def totals(self) -> dict[Key, float]:
        out = dict(self.carried)
        for _, values in self.last.values():
            for key, value in values.items():
                out[key] = out.get(key, 0.0) + value
        return out


def _summed(
    texts: Mapping[int, str], pids: Mapping[int, int | None], counters: Counters
) -> list[Metric]:
    """Every sample of the workers' metrics per name and label set: gauges summed over the
    workers that answered (ages: the largest), counters over every process (``Counters``)."""
    gauges: dict[Key, float] = {}
    for index, text in sorted(texts.items()):
        counted: dict[Key, float] = {}
        for family in text_string_to_metric_families(text):
            counters.meta.setdefault(family.name, (family.documentation, family.type))
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if family.type == "counter":
                    counted[key] = sample.value
                    counters.family_of[key] = family.name
                elif key not in gauges:
                    gauges[key] = sample.value
                    counters.family_of[key] = family.name
                elif family.name in OLDEST:
                    gauges[key] = max(gauges[key], sample.value)
                else:
                    gauges[key] += sample.value
        counters.observe(index, pids.get(index), counted)
    families = {name: Metric(name, doc, kind) for name, (doc, kind) in counters.meta.items()}
    for (sample_name, labels), value in [*gauges.items(), *counters.totals().items()]:
        families[counters.family_of[(sample_name, labels)]].add_sample(
            sample_name, dict(labels), value
        )
    return list(families.values())


def _one(text: str, sample_name: str) -> float:
    """The value of an unlabelled sample in one worker's metrics (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and not sample.labels:
                return float(sample.value)
    return 0.0


def _per_worker(texts: Mapping[int, str], workers: list[WorkerView]) -> list[Metric]:
    up = GaugeMetricFamily(
        "amqproxy_worker_up", "1 when the worker runs and answered this scrape", labels=["worker"]
    )
    open_ = GaugeMetricFamily(
        "amqproxy_worker_client_connections",
        "Client sockets open on the worker, admitted or not",
        labels=["worker"],
    )
    accepted = CounterMetricFamily(
        "amqproxy_worker_client_connections_accepted",
        "Client connections the worker's process accepted since it started",
        labels=["worker"],
    )
    restarts = CounterMetricFamily(
        "amqproxy_worker_restarts", "Times the supervisor restarted the worker", labels=["worker"]
    )
    for view in workers:
        label = [str(view.index)]
        text = texts.get(view.index)
        up.add_metric(label, 1 if view.alive and text is not None else 0)
        restarts.add_metric(label, view.restarts)
        if text is not None:
            open_.add_metric(label, _one(text, "amqproxy_client_connections_total_open"))
            accepted.add_metric(label, _one(text, "amqproxy_client_connections_accepted_total"))
    alive = GaugeMetricFamily("amqproxy_workers_alive", "Worker processes running")
    alive.add_metric([], sum(view.alive for view in workers))
    configured = GaugeMetricFamily("amqproxy_workers", "Worker processes configured (--workers)")
    configured.add_metric([], len(workers))
    return [configured, alive, up, restarts, open_, accepted]


def metrics(texts: Mapping[int, str], workers: list[WorkerView], counters: Counters) -> bytes:
    """The Prometheus text of the whole proxy: the workers' samples summed, then the
    per-worker series (labelled ``worker``)."""
    pids = {view.index: view.pid for view in workers}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(_summed(texts, pids, counters) + _per_worker(texts, workers)))
    return generate_latest(registry)
