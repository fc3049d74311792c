"""amqproxy benchmark runner: the scenarios of BENCHMARKS.md, and the fault and isolation ones,
in one command, with the reference proxy (cloudamqp/amqproxy 3.1.3) beside ours.

    python bench/run.py [--quick|--full] [--scenarios S1,S2,S3,S4,S5,S6] [--json out.json]

Starts what it needs (our proxy, the reference, delay relays, a socat relay, a private TLS
RabbitMQ node), interleaves direct and proxied runs, checks every run's queue, stops everything
it started, prints the tables with their verdicts and writes the same as JSON. A proxy that
cannot start has its runs reported as skipped, with the reason; the others still run.
Layout: scenarios.py (what runs), measure.py (how), report.py (the tables), common.py
(processes, /proc, queues), fastamqp.py (the client).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, Kind, Proxy, baseline_src
from report import summarize
from scenarios import FULL, QUICK, SCENARIOS, Bench, Mode, log


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (default)")
    g.add_argument("--full", action="store_true", help="BENCHMARKS.md sizes, 3 repeats, TLS")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list, e.g. S1,S3")
    ap.add_argument("--json", help="write results here (default bench/results/<time>.json)")
    ap.add_argument("--repeats", type=int, help="override the repeat count")
    ap.add_argument("--s3-duration", type=float, help="seconds per S3 run (spec: 15)")
    ap.add_argument("--clients", help="S1 clients to run, e.g. pika,php-loop")
    ap.add_argument("--tls", action="store_true", help="quick mode: add the TLS S1 cases")
    ap.add_argument("--s3-procs", type=int, default=1, help="client processes for S3 loops")
    ap.add_argument("--s3-loops", help="S3 loop counts, e.g. 200 (default: 50,200)")
    ap.add_argument("--s3-rtts", help="S3 upstream RTTs in ms, e.g. 0,50 (default: 0,50)")
    ap.add_argument("--no-proxy", action="store_true", help="no proxy at all: direct runs only")
    ap.add_argument("--no-ours", action="store_true", help="leave our proxy out")
    ap.add_argument("--proxy-module", default="amqproxy", help="python -m MODULE to start")
    ap.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="also measure ours with --workers N (a supervisor and N worker processes; its "
        "CPU is the whole process tree's): a column 'ours Nw' beside 'ours'",
    )
    ap.add_argument(
        "--no-reference", action="store_true", help="leave the reference proxy out (no build)"
    )
    ap.add_argument(
        "--reference-bin",
        metavar="PATH",
        help="the reference executable (default: built by ../shared/peers/build-amqproxy.sh)",
    )
    ap.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="also measure our proxy as of GIT_REF (a worktree under bench/results), "
        "interleaved with the current one: a baseline column and an A/B table",
    )
    return ap.parse_args(argv)


def configure(args: argparse.Namespace) -> tuple[Mode, list[str], list[Kind]]:
    mode = FULL if args.full else QUICK
    if args.repeats:
        mode.repeats = args.repeats
    if args.tls and not mode.s1_tls_rtts:
        mode.s1_tls_rtts = [0, 50]
    if args.s3_duration:
        mode.s3_duration = args.s3_duration
    if args.s3_loops:
        mode.s3_loops = [int(n) for n in args.s3_loops.split(",")]
    if args.s3_rtts:
        mode.s3_rtts = [int(n) for n in args.s3_rtts.split(",")]
    if args.clients:
        import s1clients

        wanted = tuple(c.strip() for c in args.clients.split(","))
        for module in (s1clients, sys.modules["scenarios"], sys.modules["report"]):
            module.CLIENTS = wanted  # type: ignore[attr-defined]
    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise SystemExit(f"unknown scenarios {bad}; known: {', '.join(SCENARIOS)}")
    kinds: list[Kind] = []
    if not args.no_proxy:
        kinds += [] if args.no_ours else [Kind("proxy")]
        if args.workers and args.workers > 1:
            kinds.append(Kind(f"proxy-{args.workers}w", workers=args.workers))
        kinds += [] if args.no_reference else [Kind("reference")]
        if args.baseline:
            kinds.append(Kind("baseline", src=baseline_src(args.baseline)))
            log(f"baseline: {args.baseline} from {kinds[-1].src}")
    return mode, scenarios, kinds


def write_json(bench: Bench, path: str | None, summary: dict[str, Any], table: str) -> str:
    out = path or os.path.join(RESULTS_DIR, time.strftime("bench-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    doc = {
        "mode": bench.mode.__dict__,
        "scenarios": bench.scenarios,
        "command": " ".join(["python3", "bench/run.py", *sys.argv[1:]]),
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "kinds": {k: v.__dict__ for k, v in bench.kinds.items()},
        "unavailable": bench.unavailable,
        "s3_client_procs": bench.s3_procs,
        "proxy_frame_scanner": bench.scanner,
        "relay_calibration": bench.calibration,
        "duration_s": time.monotonic() - bench.t0,
        "summary": summary,
        "tables": table,
        "notes": bench.notes,
        "runs": [r.__dict__ for r in bench.runs],
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Proxy.module = args.proxy_module
    mode, scenarios, kinds = configure(args)
    bench = Bench(mode, scenarios, kinds)
    bench.s3_procs = args.s3_procs

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too: a run started in the background by a non-interactive shell has it ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    interrupted = False
    try:
        bench.prepare(args.reference_bin)
        bench.run_all()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything the bench started")
    finally:
        # a second Ctrl-C must not cut the cleanup short (the TLS node takes seconds to stop)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        bench.close()
    table, summary = summarize(bench)
    print()
    print(table)
    summary["interrupted"] = interrupted
    out = write_json(bench, args.json, summary, table)
    print(f"\nJSON written to {out}  ({time.monotonic() - bench.t0:.0f} s)")
    return 130 if interrupted else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
