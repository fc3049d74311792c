"""The tables and verdicts of a bench run: one column per mode present (direct, socat for S2,
ours, the reference, a baseline), medians [min–max] over the repeats, ratios taken within the
run. `summarize` returns the text and the same figures and verdicts as a dict for the JSON."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from typing import Any

from s1clients import CLIENTS
from scenarios import Bench, Run


class _Labels(dict[str, str]):
    """Column names of the modes; ours with --workers N ("proxy-2w") is "ours 2w"."""

    def __missing__(self, mode: str) -> str:
        return mode.replace("proxy-", "ours ")


LABEL = _Labels(direct="direct", socat="socat", proxy="ours", reference="reference",
                baseline="baseline")  # fmt: skip
S1_TARGETS = {"pika": 1.5, "php-loop": 1.5, "php-proc": 1.2, "amqp-publish": 1.2}
S2_TESTS = ["publish", "confirm", "consume_noack", "consume_ack"]
S2_VS_SOCAT = 0.95  # ours >= 0.95 x socat's msg/s
S2_CPU_VS_SOCAT = 1.5  # ours' CPU per message <= 1.5 x socat's
S3_RATE, S3_MAX_UPSTREAM, S3_CPU_US = 5000, 2, 100.0
S4_KIB = 20.0
NAN = float("nan")


# -- small helpers ----------------------------------------------------------------------------


def vals(runs: list[Run], metric: str) -> list[float]:
    """The metric over the runs that did not fail outright."""
    out = []
    for r in runs:
        v = r.metrics.get(metric)
        if v is not None and not r.error and not (isinstance(v, float) and math.isnan(v)):
            out.append(float(v))
    return out


def med(runs: list[Run], metric: str) -> float:
    v = vals(runs, metric)
    return statistics.median(v) if v else NAN


def fmt(runs: list[Run], metric: str, digits: int = 2) -> str:
    """median [min–max] (just the value for one repeat), '-' for none."""
    v = vals(runs, metric)
    if not v:
        return "-"
    m = f"{statistics.median(v):,.{digits}f}"
    return m if len(v) == 1 else f"{m} [{min(v):,.{digits}f}–{max(v):,.{digits}f}]"


def num(x: float, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:,.{digits}f}"


def ratio(a: float, b: float) -> float:
    return NAN if math.isnan(a) or math.isnan(b) or b == 0 else a / b


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("MET" if ok else "missed")


def judge(value: float, limit: float, at_most: bool) -> bool | None:
    if math.isnan(value) or math.isnan(limit):
        return None
    return value <= limit if at_most else value >= limit


def status(runs: list[Run]) -> str:
    if not runs:
        return "-"
    if all(r.skipped for r in runs):
        return "skipped"
    bad = [r for r in runs if r.error or (r.verify is not None and not r.verify["ok"])]
    return f"{len(bad)} FAILED" if bad else "ok"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Plain-text table: first and last column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        last = len(cells) - 1
        out = [str(c).ljust(w) if i in (0, last) else str(c).rjust(w) for i, (c, w) in
               enumerate(zip(cells, widths, strict=True))]  # fmt: skip
        return "  " + " | ".join(out)

    return [line(head), "  " + "-+-".join("-" * w for w in widths), *map(line, rows)]


class Groups:
    """Runs by (scenario, case) and mode."""

    def __init__(self, runs: list[Run], kinds: list[str]) -> None:
        self.kinds = kinds  # proxy modes, in column order
        self.by: dict[tuple[str, str], dict[str, list[Run]]] = {}
        for r in runs:
            self.by.setdefault((r.scenario, r.key()), {}).setdefault(r.mode, []).append(r)

    def cases(self, scenario: str, sort: Callable[[dict[str, Any]], Any] = str) -> list[Any]:
        found = [(json.loads(k), g) for (s, k), g in self.by.items() if s == scenario]
        return sorted(found, key=lambda x: sort(x[0]))

    def get(self, scenario: str, case: dict[str, Any], mode: str) -> list[Run]:
        return self.by.get((scenario, json.dumps(case, sort_keys=True)), {}).get(mode, [])

    def checks(self, g: dict[str, list[Run]], modes: list[str]) -> str:
        return ", ".join(f"{LABEL[m]} {status(g.get(m, []))}" for m in modes if m in g)


# -- S1 ---------------------------------------------------------------------------------------


def s1_lines(gr: Groups, summary: dict[str, Any]) -> list[str]:
    cases = gr.cases("S1", lambda c: (c["tls"], c["client"], c["rtt_ms"]))
    if not cases:
        return []
    modes = ["direct", *gr.kinds]
    head = ["client", "tls", "rtt"]
    for m in modes:
        head += [f"{LABEL[m]} mean", "p99"]
    head += [f"{LABEL[k]}/direct" for k in gr.kinds] + ["check"]
    rows = []
    for case, g in cases:
        row = [case["client"], "yes" if case["tls"] else "no", str(case["rtt_ms"])]
        for m in modes:
            row += [fmt(g.get(m, []), "mean_ms"), num(med(g.get(m, []), "p99_ms"))]
        d = med(g.get("direct", []), "mean_ms")
        row += [num(ratio(med(g.get(k, []), "mean_ms"), d)) for k in gr.kinds]
        rows.append([*row, gr.checks(g, modes)])
    lines = ["S1 short-lived publisher: ms per connect-publish-close cycle, mean [min–max], p99"]
    lines += [*table(head, rows), ""]
    lines.append("S1 targets: proxied at RTT 50 / the same client direct at RTT 0 (mean per cycle)")
    for tls in (False, True):
        for client in CLIENTS:
            lines += s1_target(gr, client, tls, summary)
    return [*lines, ""]


def s1_target(gr: Groups, client: str, tls: bool, summary: dict[str, Any]) -> list[str]:
    d0 = med(gr.get("S1", {"client": client, "rtt_ms": 0, "tls": tls}, "direct"), "mean_ms")
    at50 = {k: med(gr.get("S1", {"client": client, "rtt_ms": 50, "tls": tls}, k), "mean_ms")
            for k in gr.kinds}  # fmt: skip
    if math.isnan(d0) and all(math.isnan(v) for v in at50.values()):
        return []
    target = S1_TARGETS.get(client, 1.5)
    name = f"{client}{' tls' if tls else ''}"
    entry: dict[str, Any] = {"direct_rtt0_ms": d0, "target": target}
    parts = []
    for k, v in at50.items():
        r = ratio(v, d0)
        entry[LABEL[k]] = {"rtt50_ms": v, "ratio": r, "verdict": verdict(judge(r, target, True))}
        parts.append(f"{LABEL[k]} {num(v)} ms = {num(r)} {entry[LABEL[k]]['verdict']}")
    ours, ref = at50.get("proxy", NAN), at50.get("reference", NAN)
    if "reference" in at50:
        entry["ours_vs_reference"] = ratio(ours, ref)
        parts.append(f"ours/reference {num(ratio(ours, ref))}")
    summary[f"S1 {name}"] = entry
    return [f"  {name:17} direct@0 {num(d0)} ms; ≤ {target}: " + "; ".join(parts)]


# -- S2 ---------------------------------------------------------------------------------------


def s2_lines(gr: Groups, summary: dict[str, Any]) -> list[str]:
    cases = gr.cases("S2", lambda c: S2_TESTS.index(c["test"]))
    if not cases:
        return []
    modes = ["direct", "socat", *gr.kinds]
    relays = ["socat", *gr.kinds]
    head = ["test", *(f"{LABEL[m]} msg/s" for m in modes), *(f"{LABEL[m]}/d" for m in relays)]
    rows = []
    for case, g in cases:
        d = med(g.get("direct", []), "msg_s")
        row = [case["test"], *(fmt(g.get(m, []), "msg_s", 0) for m in modes)]
        row += [num(ratio(med(g.get(m, []), "msg_s"), d)) for m in relays]
        rows.append([*row, gr.checks(g, modes)])
    lines = ["S2 one long-lived connection, RTT 0: msg/s, median [min–max]"]
    lines += [*table([*head, "check"], rows), ""]
    head = ["test", *(f"{LABEL[m]} µs/msg" for m in relays)]
    head += [f"broker µs/msg {LABEL[m]}" for m in modes]
    rows = []
    for case, g in cases:
        row = [case["test"], *(fmt(g.get(m, []), "cpu_us_per_msg") for m in relays)]
        rows.append(row + [num(med(g.get(m, []), "broker_cpu_us_per_msg")) for m in modes])
    lines += ["S2 CPU per message: of the relay or proxy, and of the broker (schedstat, ns)"]
    lines += [*table(head, rows), ""]
    lines.append(
        f"S2 verdicts against the floor (socat, same run): msg/s ≥ {S2_VS_SOCAT} × socat, "
        f"CPU/msg ≤ {S2_CPU_VS_SOCAT} × socat's, msg/s ≥ reference; /direct for information"
    )
    for case, g in cases:
        lines.append(s2_verdict(case["test"], g, summary))
    return [*lines, ""]


def s2_verdict(test: str, g: dict[str, list[Run]], summary: dict[str, Any]) -> str:
    rate = {m: med(g.get(m, []), "msg_s") for m in ("direct", "socat", "proxy", "reference")}
    cpu = {m: med(g.get(m, []), "cpu_us_per_msg") for m in ("socat", "proxy", "reference")}
    vs_socat = ratio(rate["proxy"], rate["socat"])
    cpu_vs = ratio(cpu["proxy"], cpu["socat"])
    vs_ref = ratio(rate["proxy"], rate["reference"])
    v = {
        "throughput": verdict(judge(vs_socat, S2_VS_SOCAT, False)),
        "cpu": verdict(judge(cpu_vs, S2_CPU_VS_SOCAT, True)),
        "reference": verdict(judge(vs_ref, 1.0, False)),
    }
    summary[f"S2 {test}"] = {
        "msg_s": {LABEL[m]: x for m, x in rate.items()},
        "cpu_us_per_msg": {LABEL[m]: x for m, x in cpu.items()},
        "ours_vs_socat": vs_socat,
        "cpu_vs_socat": cpu_vs,
        "ours_vs_reference": vs_ref,
        "ours_vs_direct": ratio(rate["proxy"], rate["direct"]),
        "verdicts": v,
    }
    return (
        f"  {test:14} ours/socat {num(vs_socat)} {v['throughput']}; CPU ours/socat "
        f"{num(cpu_vs)} ({num(cpu['proxy'])} / {num(cpu['socat'])} µs) {v['cpu']}; "
        f"ours/reference {num(vs_ref)} {v['reference']}; ours/direct "
        f"{num(ratio(rate['proxy'], rate['direct']))}"
    )


# -- S3 ---------------------------------------------------------------------------------------


def s3_lines(gr: Groups, summary: dict[str, Any]) -> list[str]:
    cases = gr.cases("S3", lambda c: (c["rtt_ms"], c["loops"]))
    if not cases:
        return []
    modes = ["direct", *gr.kinds]
    head = ["loops", "rtt", *(f"{LABEL[m]} pub/s" for m in modes)]
    head += [f"{LABEL[m]} p50/p99 ms" for m in modes] + [f"{LABEL[k]}/d" for k in gr.kinds]
    head.append("check")
    rows = []
    for case, g in cases:
        d = med(g.get("direct", []), "pub_s")
        row = [str(case["loops"]), str(case["rtt_ms"])]
        row += [fmt(g.get(m, []), "pub_s", 0) for m in modes]
        row += [f"{num(med(g.get(m, []), 'p50_ms'), 1)}/{num(med(g.get(m, []), 'p99_ms'), 1)}"
                for m in modes]  # fmt: skip
        row += [num(ratio(med(g.get(k, []), "pub_s"), d)) for k in gr.kinds]
        rows.append([*row, gr.checks(g, modes)])
    lines = ["S3 concurrent short-lived publishers: publishes/s median [min–max], cycle ms"]
    lines += [*table(head, rows), "", *s3_costs(gr, cases, modes)]
    return [*lines, *s3_verdicts(gr, summary), ""]


def s3_costs(gr: Groups, cases: list[Any], modes: list[str]) -> list[str]:
    """What a publish costs the broker, direct and proxied, and what a cycle costs the proxy."""
    head = ["loops", "rtt", *(f"broker µs/pub {LABEL[m]}" for m in modes)]
    head += [f"{LABEL[k]} µs/cycle" for k in gr.kinds]
    head += [f"{LABEL[k]} up max" for k in gr.kinds] + ["ours connects", "ours ch opens"]
    rows = []
    for case, g in cases:
        row = [str(case["loops"]), str(case["rtt_ms"])]
        row += [num(med(g.get(m, []), "broker_cpu_us_per_pub"), 1) for m in modes]
        row += [num(med(g.get(k, []), "proxy_cpu_us_per_pub"), 1) for k in gr.kinds]
        row += [num(med(g.get(k, []), "upstream_conns_max"), 0) for k in gr.kinds]
        ours = g.get("proxy", [])
        row += [num(med(ours, "upstream_connects"), 0), num(med(ours, "upstream_channel_opens"), 0)]
        rows.append(row)
    title = "S3 costs: CPU per publish of the (shared) broker, per cycle of the proxy; upstream"
    return [title, *table(head, rows), ""]


def s3_verdicts(gr: Groups, summary: dict[str, Any]) -> list[str]:
    out = []
    for case, g in gr.cases("S3", lambda c: (c["rtt_ms"], c["loops"])):
        ours = g.get("proxy", [])
        rate, up = med(ours, "pub_s"), med(ours, "upstream_conns_max")
        cpu = med(ours, "proxy_cpu_us_per_pub")
        entry = {m: {k: med(g.get(m, []), k) for k in ("pub_s", "broker_cpu_us_per_pub",
                 "proxy_cpu_us_per_pub", "upstream_conns_max")} for m in g}  # fmt: skip
        entry = {LABEL[m]: v for m, v in entry.items()}
        entry["cpu_verdict"] = verdict(judge(cpu, S3_CPU_US, True))
        name = f"{case['loops']} loops RTT {case['rtt_ms']}"
        line = f"  {name:18} ours CPU {num(cpu, 1)} µs/cycle (≤ {S3_CPU_US:.0f}) "
        line += entry["cpu_verdict"]
        if case["loops"] == 200 and case["rtt_ms"] == 50:
            ok = judge(rate, S3_RATE, False)
            ok = ok and (math.isnan(up) or up <= S3_MAX_UPSTREAM) if ok is not None else None
            entry["rate_verdict"] = verdict(ok)
            line += f"; {num(rate, 0)} pub/s, {num(up, 0)} upstream (≥ {S3_RATE}, ≤ 2) "
            line += entry["rate_verdict"]
            line += f"; reference {num(med(g.get('reference', []), 'pub_s'), 0)} pub/s"
        summary[f"S3 {name}"] = entry
        out.append(line)
    return ["S3 verdicts", *out] if out else []


# -- S4, S5, S6: one row per kind -------------------------------------------------------------


def s4_lines(gr: Groups, summary: dict[str, Any]) -> list[str]:
    cases = gr.cases("S4")
    lines: list[str] = []
    for case, g in cases:
        rows = []
        for k in (m for m in gr.kinds if m in g):
            p = g[k]
            returned = [100 * v for v in vals(p, "returned_frac")]
            rows.append([LABEL[k], fmt(p, "kib_per_client", 1), fmt(p, "rss_before_kib", 0),
                         fmt(p, "rss_with_kib", 0), fmt(p, "rss_after_kib", 0),
                         num(statistics.median(returned), 0) if returned else "-",
                         num(med(p, "upstream_conns_with"), 0), status(p)])  # fmt: skip
            summary[f"S4 {LABEL[k]}"] = {"kib_per_client": med(p, "kib_per_client"),
                                         "returned_frac": med(p, "returned_frac")}  # fmt: skip
        head = ["proxy", "KiB/client", "RSS before", "with", "after", "returned %", "up", "check"]
        lines += [f"S4 memory, {case['clients']} idle clients with one channel each (KiB)"]
        lines += table(head, rows)
        kib = med(g.get("proxy", []), "kib_per_client")
        v = verdict(judge(kib, S4_KIB, True))
        summary.setdefault("S4 ours", {})["verdict"] = v
        lines += [f"  ours {num(kib, 1)} KiB per client (≤ {S4_KIB:.0f}) {v}", ""]
    return lines


S5_COLS = [("handed over", "handed_over"), ("in queue", "in_queue"), ("lost", "lost"),
           ("dup", "duplicated"), ("client errors", "client_errors"),
           ("failed but delivered", "failed_cycles_delivered"), ("cycles/s", "cycles_s"),
           ("max cycle ms", "max_cycle_ms"), ("replayed", "messages_replayed"),
           ("cut", "connections_cut")]  # fmt: skip
S6_COLS = [("bad clients", "bad_clients"), ("witness confirmed", "witness_confirmed"),
           ("witness msg/s", "witness_msg_s"), ("witness errors", "witness_errors"),
           ("upstream connects", "upstream_connects")]  # fmt: skip


def per_kind_lines(
    gr: Groups, scenario: str, title: str, cols: list[tuple[str, str]], summary: dict[str, Any]
) -> list[str]:
    lines: list[str] = []
    for _case, g in gr.cases(scenario):
        modes = [m for m in ["direct", *gr.kinds] if m in g]
        rows = []
        for m in modes:
            rows.append([LABEL[m], *(fmt(g[m], key, 0) for _, key in cols), status(g[m])])
            summary[f"{scenario} {LABEL[m]}"] = {key: med(g[m], key) for _, key in cols}
        lines += [title, *table(["", *(c for c, _ in cols), "check"], rows)]
    return lines


def s5_lines(gr: Groups, summary: dict[str, Any]) -> list[str]:
    lines = per_kind_lines(
        gr, "S5", "S5 upstream cut: publish-and-close loops without confirms, the path to the "
        "broker reset and refused for a while", S5_COLS, summary)  # fmt: skip
    if not lines:
        return []
    lost = med(gr.get("S5", gr.cases("S5")[0][0], "proxy"), "lost")
    v = verdict(None if math.isnan(lost) else lost == 0)
    summary.setdefault("S5 ours", {})["verdict"] = v
    return [*lines, f"  ours: every handed-over message in the queue (at least once): {v}", ""]


def s6_lines(gr: Groups, summary: dict[str, Any]) -> list[str]:
    lines = per_kind_lines(
        gr, "S6", "S6 isolation: a confirm publisher beside malformed clients with the same "
        "credentials (the same upstream through a proxy)", S6_COLS, summary)  # fmt: skip
    if not lines:
        return []
    errors = med(gr.get("S6", gr.cases("S6")[0][0], "proxy"), "witness_errors")
    v = verdict(None if math.isnan(errors) else errors == 0)
    summary.setdefault("S6 ours", {})["verdict"] = v
    return [*lines, f"  ours: the witness saw no error: {v}", ""]


# -- A/B against a baseline, footer, everything -----------------------------------------------

AB_METRICS = {
    "S1": [("mean_ms", "ms/cycle")],
    "S2": [("msg_s", "msg/s"), ("cpu_us_per_msg", "proxy µs/msg"),
           ("broker_cpu_us_per_msg", "broker µs/msg")],
    "S3": [("pub_s", "pub/s"), ("proxy_cpu_us_per_pub", "proxy µs/cycle"),
           ("broker_cpu_us_per_pub", "broker µs/pub")],
}  # fmt: skip


def ab_lines(gr: Groups, summary: dict[str, Any]) -> list[str]:
    """Ours beside the --baseline version, run by run interleaved: medians and ratio."""
    lines = ["A/B: ours / the baseline version (medians of the interleaved repeats)"]
    for (scenario, key), g in sorted(gr.by.items()):
        if "baseline" not in g:
            continue
        case = ", ".join(f"{k}={v}" for k, v in json.loads(key).items())
        for metric, label in AB_METRICS.get(scenario, []):
            a, b = med(g.get("proxy", []), metric), med(g["baseline"], metric)
            if math.isnan(a) and math.isnan(b):
                continue
            lines.append(
                f"  {scenario} {case:38} {label:15} {a:10.2f} / {b:10.2f} = {num(ratio(a, b)):>5}"
            )
            summary[f"A/B {scenario} {case} {metric}"] = {"proxy": a, "baseline": b}
    return [*lines, ""]


def footer(bench: Bench) -> list[str]:
    lines = []
    if bench.calibration:
        cal = ", ".join(
            f"{k}: {v['median_ms']:.2f} ms" for k, v in sorted(bench.calibration.items())
        )
        lines.append(f"delay relay calibration (sync basic.qos, median): {cal}")
    if bench.scanner != "unknown":
        lines.append(f"our frame scanner: {bench.scanner}")
    if "reference" in bench.kinds and bench.kinds["reference"].binary:
        lines.append(f"reference: cloudamqp/amqproxy 3.1.3, {bench.kinds['reference'].binary}")
    for kind, why in bench.unavailable.items():
        lines.append(f"{LABEL[kind].upper()} RUNS SKIPPED: {why}")
    if bench.proxy_failed:
        lines.append(f"runs skipped for {', '.join(bench.proxy_failed)}: did not start (notes)")
    failed = [r for r in bench.runs if r.error or (r.verify is not None and not r.verify["ok"])]
    skipped = sum(1 for r in bench.runs if r.skipped)
    lines.append(f"runs: {len(bench.runs)}, failed: {len(failed)}, skipped: {skipped}")
    for r in failed[:15]:
        lines.append(f"  FAILED {r.scenario} {r.case} {r.mode} rep{r.rep}: {r.error} {r.verify}")
    lines += [f"  note: {n[:400]}" for n in bench.notes[:10]]
    return lines


def summarize(bench: Bench) -> tuple[str, dict[str, Any]]:
    gr = Groups(bench.runs, bench.proxy_modes)
    summary: dict[str, Any] = {}
    lines: list[str] = []
    for part in (s1_lines, s2_lines, s3_lines, s4_lines, s5_lines, s6_lines):
        lines += part(gr, summary)
    if "baseline" in bench.kinds:
        lines += ab_lines(gr, summary)
    return "\n".join(lines + footer(bench)), summary
