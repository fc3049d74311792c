"""The supervisor's view of the whole proxy (``--workers``), from its workers' answers: sums,
the oldest age, per-worker series, ids that name their worker; and its restart backoff."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from amqproxy import aggregate
from amqproxy.aggregate import WorkerView
from amqproxy.supervisor import backoff, describe_exit

VIEWS = [WorkerView(1, 101, True, 0, 5.0, ""), WorkerView(2, 202, True, 1, 1.0, "exit status 1")]


def _row(clients: int, oldest: float, held: bool) -> dict[str, object]:
    return {
        "user": "app",
        "vhost": "/",
        "clients": clients,
        "outage_held": held,
        "channels": {"leased": clients, "parked": 1, "settling": 0},
        "outbox": {"messages": 1, "bytes": 10, "oldest_seconds": oldest},
    }


def test_pools_of_one_user_and_vhost_merge_into_one_row() -> None:
    answers = {
        1: {"pools": [_row(2, 0.5, False)], "paused": False},
        2: {"pools": [_row(3, 2.0, True), {**_row(1, 0, False), "vhost": "b"}], "paused": False},
    }
    merged = aggregate.pools(answers)
    assert [(r["user"], r["vhost"]) for r in merged["pools"]] == [("app", "/"), ("app", "b")]
    row = merged["pools"][0]
    assert row["clients"] == 5 and row["outage_held"] is True
    assert row["channels"] == {"leased": 5, "parked": 2, "settling": 0}
    assert row["outbox"] == {"messages": 2, "bytes": 20, "oldest_seconds": 2.0}
    assert answers[1]["pools"][0]["clients"] == 2  # the answers are not changed


def test_clients_get_ids_that_name_their_worker() -> None:
    answers = {2: {"clients": [{"id": 7}]}, 1: {"clients": [{"id": 7}, {"id": 9}]}}
    rows = aggregate.clients(answers)["clients"]
    assert [(r["id"], r["worker"]) for r in rows] == [("1-7", 1), ("1-9", 1), ("2-7", 2)]


def test_ready_while_any_live_worker_is_ready_and_the_supervisor_does_not_drain() -> None:
    ready = {"ready": True, "status": "ok", "reasons": [], "clients": 2, "outbox": {"bytes": 1}}
    starting = {"ready": False, "status": "starting", "reasons": ["not checked"], "clients": 1}
    ok, body = aggregate.health({1: ready, 2: starting}, VIEWS, draining=False)
    assert ok and body["status"] == "ok" and body["clients"] == 3
    assert body["workers"]["ready"] == 1 and body["workers"]["alive"] == 2
    assert [r["pid"] for r in body["workers"]["list"]] == [101, 202]
    ok, body = aggregate.health({2: starting}, VIEWS, draining=False)
    assert not ok and body["reasons"] == ["worker 2: not checked"]
    ok, body = aggregate.health({1: ready}, VIEWS, draining=True)
    assert not ok and body["status"] == "draining"
    ok, body = aggregate.health({}, VIEWS, draining=False)
    assert not ok and body["reasons"] == ["no worker answers"]


def test_metrics_are_summed_per_label_set_with_per_worker_series() -> None:
    def worker(clients: int, oldest: float, accepted: int) -> str:
        return (
            "# HELP amqproxy_client_connections Clients\n# TYPE amqproxy_client_connections gauge\n"
            f'amqproxy_client_connections{{user="a",vhost="/"}} {clients}\n'
            "# HELP amqproxy_outbox_oldest_seconds Age\n"
            "# TYPE amqproxy_outbox_oldest_seconds gauge\n"
            f'amqproxy_outbox_oldest_seconds{{user="a",vhost="/"}} {oldest}\n'
            "# HELP amqproxy_client_connections_accepted_total Accepted\n"
            "# TYPE amqproxy_client_connections_accepted_total counter\n"
            f"amqproxy_client_connections_accepted_total {accepted}\n"
        )

    counters = aggregate.Counters()
    text = aggregate.metrics({1: worker(2, 1.5, 10), 2: worker(3, 0.5, 7)}, VIEWS, counters)
    text = text.decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("amqproxy_client_connections", (("user", "a"), ("vhost", "/")))] == 5
    assert samples[("amqproxy_outbox_oldest_seconds", (("user", "a"), ("vhost", "/")))] == 1.5
    assert samples[("amqproxy_client_connections_accepted_total", ())] == 17
    w = "amqproxy_worker_client_connections_accepted_total"
    assert samples[(w, (("worker", "1"),))] == 10 and samples[(w, (("worker", "2"),))] == 7
    assert samples[("amqproxy_worker_restarts_total", (("worker", "2"),))] == 1
    # a worker that did not answer: up 0, out of the gauges, its counters as it said last
    text = aggregate.metrics({1: worker(2, 1.5, 11)}, VIEWS, counters).decode()
    assert 'amqproxy_worker_up{worker="2"} 0.0' in text
    assert 'amqproxy_client_connections{user="a",vhost="/"} 2.0' in text
    assert "amqproxy_client_connections_accepted_total 18.0" in text
    # worker 2 restarted (a new pid) and counts from 0: the sum does not go down
    restarted = [VIEWS[0], WorkerView(2, 303, True, 2, 0.1, "killed by SIGKILL")]
    text = aggregate.metrics({1: worker(2, 1.5, 11), 2: worker(0, 0, 1)}, restarted, counters)
    assert "amqproxy_client_connections_accepted_total 19.0" in text.decode()


def test_restart_backoff_and_exit_descriptions() -> None:
    assert [backoff(n) for n in range(8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exit status 3"


def test_nodes_are_one_row_each_with_every_workers_view() -> None:
    def node(state: str, checked: float, conns: int) -> dict[str, object]:
        return {"node": "n1:5672", "state": state, "checked_seconds_ago": checked,
                "upstream_connections": conns}  # fmt: skip

    rows = aggregate.nodes(
        {1: {"nodes": [node("reachable", 3.0, 2)]}, 2: {"nodes": [node("unreachable", 0.5, 1)]}}
    )["nodes"]
    assert len(rows) == 1
    assert rows[0]["state"] == "unreachable" and rows[0]["upstream_connections"] == 3
    assert rows[0]["workers"] == {"1": "reachable", "2": "unreachable"}
