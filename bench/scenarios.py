"""The scenarios of BENCHMARKS.md (S1-S4) and the fault and isolation ones (S5, S6): what runs,
in which order, against which proxy kinds. Every case runs direct and through each kind,
interleaved (A B C, C B A, ...), and checks its queue.

`Bench` owns every process it starts (proxies, delay relays, socat, the TLS node) and stops them
all in `close()`. Measurement helpers live in measure.py, the tables in report.py.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import fastamqp
import measure
from common import (
    Admin,
    Kind,
    Proxy,
    ProxyUnavailable,
    Socat,
    build_reference,
    check_reference,
    percentile,
    pid_listening_on,
    rss_kib,
    summarize_ms,
    verify_queue,
)
from delayrelay import RelayProcess, calibrate
from s1clients import CLIENTS, Target, run_client

BROKER_PORT = 5672
MAX_DIRECT_CONNS = 450  # the shared broker has ~830 sockets: stay well below
SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "S6")


@dataclass
class Mode:
    """Sizes and repeat counts for one run mode."""

    name: str
    repeats: int
    s1_rtts: list[int]
    s1_tls_rtts: list[int]
    s1_n_max: int
    s1_budget_s: float
    s2_publish: int
    s2_confirm: int
    s2_consume: int
    s3_loops: list[int]
    s3_rtts: list[int]
    s3_duration: float
    s4_clients: int
    s4_settle_s: float
    s5_loops: int = 8
    s5_duration: float = 6.0
    s5_cut_at: float = 2.0
    s5_outage: float = 2.0
    s6_duration: float = 4.0
    s6_bad_every: float = 0.1


QUICK = Mode(
    name="quick",
    repeats=1,
    s1_rtts=[0, 50],
    s1_tls_rtts=[],
    s1_n_max=60,
    s1_budget_s=1.2,
    s2_publish=20_000,
    s2_confirm=5_000,
    s2_consume=20_000,
    s3_loops=[50, 200],
    s3_rtts=[0, 50],
    s3_duration=2.5,
    s4_clients=1000,
    s4_settle_s=2.0,
)
FULL = Mode(
    name="full",
    repeats=3,
    s1_rtts=[0, 10, 50],
    s1_tls_rtts=[0, 50],
    s1_n_max=200,
    s1_budget_s=1.5,
    s2_publish=100_000,
    s2_confirm=20_000,
    s2_consume=100_000,
    s3_loops=[50, 200],
    s3_rtts=[0, 50],
    s3_duration=15.0,
    s4_clients=1000,
    s4_settle_s=5.0,
    s5_duration=10.0,
    s5_cut_at=4.0,
    s6_duration=8.0,
)


@dataclass
class Run:
    scenario: str
    case: dict[str, Any]
    mode: str  # direct | socat | proxy (ours) | reference | baseline
    rep: int
    metrics: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] | None = None
    error: str | None = None
    skipped: str | None = None

    def key(self) -> str:
        return json.dumps(self.case, sort_keys=True)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    """Owns every process the bench starts, and stops them all in close()."""

    def __init__(self, mode: Mode, scenarios: list[str], kinds: list[Kind]) -> None:
        self.mode = mode
        self.scenarios = scenarios
        self.kinds = {k.name: k for k in kinds}  # the proxies measured beside direct
        self.unavailable: dict[str, str] = {}  # kind -> why its runs are skipped
        self.runs: list[Run] = []
        self.notes: list[str] = []
        self.relays: dict[tuple[int, int], RelayProcess] = {}
        self.proxies: dict[str, Proxy] = {}
        self.proxy_failed: dict[str, str] = {}
        self.tls: Any = None
        self.socat: Socat | None = None
        self.admins: dict[int, Admin] = {}
        self.calibration: dict[str, Any] = {}
        self.id_seq = 0
        self.broker_pid = pid_listening_on(BROKER_PORT)
        self.s3_procs = 1
        self.scanner = "unknown"  # our proxy's frame scanner, from its startup line
        self.t0 = time.monotonic()

    # -- resources -------------------------------------------------------------------------

    @property
    def proxy_modes(self) -> list[str]:
        """The proxies measured beside direct, in column order."""
        return list(self.kinds)

    def prepare(self, reference_bin: str | None) -> None:
        """Find out which kinds can run: ours must start, the reference must build."""
        if "proxy" in self.kinds:
            ok, why = Proxy.available()
            if not ok:
                self.unavailable["proxy"] = f"`python -m {Proxy.module} --help` fails: {why}"
                log(f"OUR PROXY NOT AVAILABLE — its runs will be skipped: {why}")
        if "reference" in self.kinds:
            try:
                log("reference proxy: building or finding cloudamqp/amqproxy 3.1.3 ...")
                path = check_reference(reference_bin) if reference_bin else build_reference()
                self.kinds["reference"] = Kind("reference", binary=path)
                log(f"reference proxy: {path}")
            except Exception as e:
                self.unavailable["reference"] = f"reference proxy unavailable: {e}"[:300]
                log(self.unavailable["reference"])

    def admin(self, port: int) -> Admin:
        if port not in self.admins:
            self.admins[port] = Admin(port)
        return self.admins[port]

    def relay(self, rtt: int, target_port: int) -> int:
        """Port to reach `target_port` with `rtt` ms upstream latency (no relay at RTT 0)."""
        if rtt == 0:
            return target_port
        key = (rtt, target_port)
        if key not in self.relays:
            self.relays[key] = RelayProcess(("127.0.0.1", target_port), rtt).start()
            r = self.relays[key]
            cal = calibrate("127.0.0.1", r.port, n=10) if target_port == BROKER_PORT else None
            if cal:
                self.calibration[f"rtt{rtt}"] = cal
                log(f"delay relay RTT {rtt} ms: basic.qos {cal['median_ms']:.2f} ms median")
        return self.relays[key].port

    def proxy(self, upstream_port: int, tls: bool = False, kind: str = "proxy") -> Proxy | None:
        """The proxy of `kind` in front of `upstream_port` (started once, kept for the
        session); None when that kind cannot run."""
        if kind in self.unavailable:
            return None
        url = f"{'amqps' if tls else 'amqp'}://127.0.0.1:{upstream_port}"
        key = f"{kind} {url}"
        p = self.proxies.get(key)
        if p is not None and p.alive():
            return p
        if p is not None:
            self.notes.append(f"{kind} proxy for {url} died; log tail: {p.log_tail()}")
            p.stop()
        if key in self.proxy_failed:
            return None
        try:
            p = self.kinds[kind].proxy(url, ca=self.tls.ca if tls else None).start()
        except ProxyUnavailable as e:
            self.proxy_failed[key] = str(e)
            self.notes.append(str(e))
            log(f"{kind} proxy unavailable: {e}")
            return None
        self.proxies[key] = p
        if kind == "proxy" and self.scanner == "unknown":
            self.scanner = p.frame_scanner()
            log(f"proxy frame scanner: {self.scanner}")
        return p

    def skip_reason(self, kind: str) -> str:
        return self.unavailable.get(kind, f"{kind} proxy did not start (see notes)")

    def tls_broker(self) -> Any:
        if self.tls is None:
            from tlsbroker import TLSBroker

            log("starting private TLS RabbitMQ node bench-tls@localhost ...")
            t0 = time.monotonic()
            self.tls = TLSBroker().start()
            log(f"TLS node ready in {time.monotonic() - t0:.1f}s (tls port {self.tls.tls_port})")
        return self.tls

    def next_ids(self, n: int) -> int:
        base = self.id_seq
        self.id_seq += n + 1
        return base

    def close(self) -> None:
        """Stop everything this bench started; one failing step does not skip the others."""
        steps: list[tuple[str, Any]] = [(f"admin {p}", a.close) for p, a in self.admins.items()]
        steps += [(f"proxy {u}", p.stop) for u, p in self.proxies.items()]
        steps += [(f"relay {k}", r.stop) for k, r in self.relays.items()]
        if self.socat is not None:
            steps.append(("socat", self.socat.stop))
        if self.tls is not None:
            log("stopping TLS node ...")
            steps.append(("TLS node", self.tls.stop))
        for name, stop in steps:
            try:
                stop()
            except Exception as e:
                log(f"cleanup of {name} failed: {e!r}")
        self.tls = None
        self.socat = None

    def order(self, rep: int, modes: list[str]) -> list[str]:
        """A B C, C B A, ...: interleave so drift hits every side alike."""
        return modes if rep % 2 == 0 else list(reversed(modes))

    def add(self, run: Run) -> Run:
        self.runs.append(run)
        tag = (run.skipped and f"SKIPPED ({run.skipped})") or run.error or ""
        v = run.verify
        vtxt = "" if v is None else (" verify ok" if v["ok"] else f" VERIFY FAILED {v}")
        brief = {k: round(x, 3) if isinstance(x, float) else x for k, x in run.metrics.items()}
        log(f"{run.scenario} {run.case} {run.mode} rep{run.rep}: {brief}{vtxt} {tag}")
        return run

    # -- S1 --------------------------------------------------------------------------------

    def s1(self) -> None:
        m = self.mode
        cases = [(c, False, r) for r in m.s1_rtts for c in CLIENTS]
        if m.s1_tls_rtts:
            try:
                self.tls_broker()
                cases += [(c, True, r) for r in m.s1_tls_rtts for c in CLIENTS]
            except Exception as e:
                self.notes.append(f"TLS node failed to start, TLS cases skipped: {e!r}")
        for rep in range(m.repeats):
            for client, tls, rtt in cases:
                case = {"client": client, "tls": tls, "rtt_ms": rtt}
                for mode in self.order(rep, ["direct", *self.proxy_modes]):
                    self.s1_run(case, mode, rep)

    def s1_run(self, case: dict[str, Any], mode: str, rep: int) -> None:
        tls, rtt, client = case["tls"], case["rtt_ms"], case["client"]
        run = Run("S1", case, mode, rep)
        broker_plain = self.tls.plain_port if tls else BROKER_PORT
        upstream = self.tls.tls_port if tls else BROKER_PORT
        up_port = self.relay(rtt, upstream)
        if mode == "direct":
            target = Target(up_port, tls_ca=self.tls.ca if tls else None)
        else:
            p = self.proxy(up_port, tls, kind=mode)
            if p is None:
                run.skipped = self.skip_reason(mode)
                self.add(run)
                return
            target = Target(p.port)  # the client speaks plain AMQP to the local proxy
        admin = self.admin(broker_plain)
        queue = admin.new_queue("s1")
        n_max = self.mode.s1_n_max
        base = self.next_ids(n_max)
        try:
            res = run_client(client, target, queue, base, n_max, self.mode.s1_budget_s)
            run.metrics = summarize_ms(res.times_ms[1:])  # first cycle is a warm-up
            run.error = res.error
            run.verify = verify_queue(admin, queue, res.ids, res.maybe_ids, delete=False)
        except Exception as e:
            run.error = repr(e)[:300]
        finally:
            admin.delete(queue)
        self.add(run)

    # -- S2 --------------------------------------------------------------------------------

    def s2(self) -> None:
        self.socat = Socat(BROKER_PORT).start()
        tests = ["publish", "confirm", "consume_noack", "consume_ack"]
        for rep in range(self.mode.repeats):
            for test in tests:
                for mode in self.order(rep, ["direct", "socat", *self.proxy_modes]):
                    self.s2_run(test, mode, rep)

    def s2_run(self, test: str, mode: str, rep: int) -> None:
        m = self.mode
        run = Run("S2", {"test": test}, mode, rep)
        pid: int | None = None
        if mode == "direct":
            port = BROKER_PORT
        elif mode == "socat":
            assert self.socat is not None
            port, pid = self.socat.port, self.socat.pid
        else:
            p = self.proxy(BROKER_PORT, kind=mode)
            if p is None:
                run.skipped = self.skip_reason(mode)
                self.add(run)
                return
            port, pid = p.port, p.pid
        admin = self.admin(BROKER_PORT)
        queue = admin.new_queue("s2")
        n = {"publish": m.s2_publish, "confirm": m.s2_confirm}.get(test, m.s2_consume)
        base = self.next_ids(n)
        ids = list(range(base, base + n))
        try:
            if test.startswith("consume"):
                fastamqp.run(measure.prefill(BROKER_PORT, queue, ids))
                admin.settled_count(queue, n)
            probe = measure.cpu_probe({"relay": pid, "broker": self.broker_pid})
            res = fastamqp.run(measure.s2_client(port, queue, test, ids, probe))
            run.metrics = {"msg_s": n / res["elapsed"], "elapsed_s": res["elapsed"], "n": n}
            if "relay" in res["cpu_s"]:
                run.metrics["cpu_us_per_msg"] = res["cpu_s"]["relay"] / n * 1e6
            if "broker" in res["cpu_s"]:
                run.metrics["broker_cpu_us_per_msg"] = res["cpu_s"]["broker"] / n * 1e6
            if test.startswith("consume"):
                run.verify = measure.consume_check(admin, queue, ids, res["ids"])
            else:
                run.metrics["nacks"] = res.get("nacks", 0)
                run.verify = verify_queue(admin, queue, ids, delete=False)
        except Exception as e:
            run.error = repr(e)[:300]
        finally:
            admin.delete(queue)
        self.add(run)

    # -- S3 --------------------------------------------------------------------------------

    def s3(self) -> None:
        m = self.mode
        for rep in range(m.repeats):
            for rtt in m.s3_rtts:
                for loops in m.s3_loops:
                    for mode in self.order(rep, ["direct", *self.proxy_modes]):
                        self.s3_run({"loops": loops, "rtt_ms": rtt}, mode, rep)

    def s3_run(self, case: dict[str, Any], mode: str, rep: int) -> None:
        loops, rtt = case["loops"], case["rtt_ms"]
        run = Run("S3", case, mode, rep)
        up_port = self.relay(rtt, BROKER_PORT)
        proxy = None
        if mode == "direct":
            if loops > MAX_DIRECT_CONNS:
                run.skipped = f"more than {MAX_DIRECT_CONNS} direct connections"
                self.add(run)
                return
            port = up_port
        else:
            proxy = self.proxy(up_port, kind=mode)
            if proxy is None:
                run.skipped = self.skip_reason(mode)
                self.add(run)
                return
            port = proxy.port
        admin = self.admin(BROKER_PORT)
        queue = admin.new_queue("s3")
        counters = measure.ProxyCounters(proxy)
        sampler = measure.MetricSampler(proxy) if proxy else None
        bcpu0 = measure.cpu(self.broker_pid)
        try:
            if sampler:
                sampler.start()
            res = measure.run_s3_clients(port, queue, loops, self.mode.s3_duration, self.s3_procs)
            if sampler:
                sampler.stop()
            bcpu1 = measure.cpu(self.broker_pid)
            n = len(res["ids"])
            run.metrics = {
                "pub_s": n / res["elapsed_s"],
                "p50_ms": percentile(res["lat_ms"], 50),
                "p99_ms": percentile(res["lat_ms"], 99),
                "published": n,
                "errors": res["n_errors"],
                "client_cpu_frac": res["client_cpu_s"] / res["elapsed_s"],
            }
            if bcpu0 is not None and bcpu1 is not None and n:
                run.metrics["broker_cpu_us_per_pub"] = (bcpu1 - bcpu0) / n * 1e6
            run.metrics.update(counters.deltas(n, res["elapsed_s"]))
            if sampler and sampler.max_upstream is not None:
                run.metrics["upstream_conns_max"] = sampler.max_upstream
            if res["n_errors"]:
                run.error = f"{res['n_errors']} failed cycles, e.g. {res['errors'][:2]}"
            run.verify = verify_queue(admin, queue, res["ids"], res["maybe_ids"], delete=False)
        except Exception as e:
            run.error = repr(e)[:300]
        finally:
            if sampler:
                sampler.stop()
            admin.delete(queue)
        self.add(run)

    # -- S4 --------------------------------------------------------------------------------

    def s4(self) -> None:
        case = {"clients": self.mode.s4_clients}
        for rep in range(self.mode.repeats):
            for kind in self.order(rep, self.proxy_modes):
                if kind in self.unavailable:
                    self.add(Run("S4", case, kind, rep, skipped=self.skip_reason(kind)))
                    continue
                # a fresh proxy per repeat: its baseline is a clean process, not the last one's
                try:
                    p = self.kinds[kind].proxy(f"amqp://127.0.0.1:{BROKER_PORT}").start()
                except ProxyUnavailable as e:
                    self.notes.append(str(e))
                    self.add(Run("S4", case, kind, rep, skipped=str(e)[:300]))
                    continue
                try:
                    # warm the pool (imports, first upstream connection) before the baseline
                    fastamqp.run(
                        fastamqp.short_cycle("127.0.0.1", p.port, "amqproxy-bench-none", 0)
                    )
                    time.sleep(0.5)
                    self.s4_run(p, kind, rep)
                finally:
                    p.stop()

    def s4_run(self, p: Proxy, kind: str, rep: int) -> None:
        n = self.mode.s4_clients
        run = Run("S4", {"clients": n}, kind, rep)
        try:
            rss0 = rss_kib(p.pid)
            res = fastamqp.run(measure.s4_clients(p, n, self.mode.s4_settle_s, MAX_DIRECT_CONNS))
            rss_after = rss_kib(p.pid)
            rss_with = res["rss_with"]
            run.metrics = {
                "rss_before_kib": rss0,
                "rss_with_kib": rss_with,
                "rss_after_kib": rss_after,
                "kib_per_client": (rss_with - rss0) / n,
                "returned_frac": (rss_with - rss_after) / max(1, rss_with - rss0),
                "opened": res["opened"],
                "upstream_conns_with": res["upstream_with"],
                "client_conns_with": res["clients_with"],
                "leased_channels_with": res["leased_with"],
                "upstream_conns_after": p.metric("amqproxy_upstream_connections"),
            }
            if res["error"]:
                run.error = res["error"]
        except Exception as e:
            run.error = repr(e)[:300]
        self.add(run)

    # -- S5: the upstream path is cut under a publish-and-close loop -----------------------

    def s5(self) -> None:
        for rep in range(self.mode.repeats):
            for mode in self.order(rep, ["direct", *self.proxy_modes]):
                self.s5_run(mode, rep)

    def s5_run(self, mode: str, rep: int) -> None:
        """Publish-and-close loops without confirms through a relay that is cut and refuses
        connections for a while: what was handed over (the client got CloseOk) must be in the
        queue once. Direct clients go through the same relay."""
        m = self.mode
        case = {"loops": m.s5_loops, "outage_s": m.s5_outage}
        run = Run("S5", case, mode, rep)
        if mode in self.unavailable:
            run.skipped = self.skip_reason(mode)
            self.add(run)
            return
        relay = measure.fault_relay(BROKER_PORT)
        proxy = None
        admin = self.admin(BROKER_PORT)
        queue = admin.new_queue("s5")
        try:
            port = relay.port
            if mode != "direct":
                proxy = self.kinds[mode].proxy(f"amqp://127.0.0.1:{relay.port}").start()
                port = proxy.port
            counters = measure.ProxyCounters(proxy)
            # the loops run in a child process, starting in 1 s: the relay's thread has this
            # process to itself, so the relay does not lag behind the loops it carries
            fault = threading.Timer(1.0 + m.s5_cut_at, measure.outage, (relay, m.s5_outage, run))
            fault.start()
            res = measure.run_s3_clients(port, queue, m.s5_loops, m.s5_duration, 1, delay=1.0)
            fault.join()
            run.metrics.update(measure.loss_report(admin, queue, res))
            run.metrics.update(counters.deltas(len(res["ids"]), 0.0, replay=True))
            # the guarantee is at least once: a replay may duplicate, it must not lose
            keys = ("lost", "duplicated", "unexpected", "handed_over")
            run.verify = {
                "ok": run.metrics["lost"] == 0 and run.metrics["unexpected"] == 0,
                **{k: run.metrics[k] for k in keys},
            }
        except Exception as e:
            run.error = repr(e)[:300]
        finally:
            if proxy is not None:
                proxy.stop()
            relay.close()
            admin.delete(queue)
        self.add(run)

    # -- S6: malformed clients beside a confirm publisher on the same upstream -------------

    def s6(self) -> None:
        for rep in range(self.mode.repeats):
            for mode in self.order(rep, ["direct", *self.proxy_modes]):
                self.s6_run(mode, rep)

    def s6_run(self, mode: str, rep: int) -> None:
        """A witness publishes with confirms on one long-lived connection while clients with
        the same credentials send malformed input: does the witness notice anything?"""
        m = self.mode
        run = Run("S6", {"bad_every_s": m.s6_bad_every}, mode, rep)
        port = BROKER_PORT
        proxy = None
        if mode != "direct":
            proxy = self.proxy(BROKER_PORT, kind=mode)
            if proxy is None:
                run.skipped = self.skip_reason(mode)
                self.add(run)
                return
            port = proxy.port
        admin = self.admin(BROKER_PORT)
        queue = admin.new_queue("s6")
        counters = measure.ProxyCounters(proxy)
        try:
            base = self.next_ids(10**7)
            res = fastamqp.run(measure.isolation(port, queue, m.s6_duration, m.s6_bad_every, base))
            run.metrics = {k: v for k, v in res.items() if k not in ("ids", "maybe_ids")}
            run.metrics.update(counters.deltas(len(res["ids"]), 0.0))
            run.verify = verify_queue(admin, queue, res["ids"], res["maybe_ids"], delete=False)
        except Exception as e:
            run.error = repr(e)[:300]
        finally:
            admin.delete(queue)
        self.add(run)

    # -- everything ------------------------------------------------------------------------

    def run_all(self) -> None:
        for s in self.scenarios:
            log(f"=== {s} ({self.mode.name}) ===")
            getattr(self, s.lower())()
