"""``exchange-connectors``: run, demo, simulate, list."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from connectors import __version__
from connectors.runtime import config as config_mod
from connectors.runtime import plugins
from connectors.runtime.app import EXIT_CONFIG, run_connector
from connectors.runtime.errors import ConfigError
from connectors.runtime.logs import setup_logging

log = logging.getLogger("connectors.cli")


def _cmd_list(_: argparse.Namespace) -> int:
    found = plugins.discover()
    if not found:
        print("no connector plugins installed")
        return 0
    width = max(len(n) for n in found)
    for name, plugin in found.items():
        print(f"{name:<{width}}  {plugin.kind:<6}  {plugin.exchange:<10}  {plugin.summary}")
    return 0


#: How long an exiting process waits for worker threads still in a call.
EXIT_GRACE_S = 2.0


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        plugin = plugins.get(args.connector)
        cfg = config_mod.load(plugin.config_type, args.config)
    except ConfigError as exc:
        setup_logging()
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    setup_logging(cfg.runtime.log_level, cfg.runtime.log_json)
    loop = asyncio.new_event_loop()
    workers = ThreadPoolExecutor(thread_name_prefix="connector-io")
    loop.set_default_executor(workers)
    result = loop.run_until_complete(run_connector(plugin, cfg))
    loop.run_until_complete(loop.shutdown_asyncgens())
    # Idle worker threads end at once; one still blocked in a call (an HTTP answer, a
    # Kafka read) must not hold the process past its grace period, as asyncio.run
    # would. run_connector has already flushed, committed or reported all it took.
    workers.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + EXIT_GRACE_S
    busy = []
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            busy.append(thread.name)
    if busy:
        log.warning("exiting with %d worker thread(s) still in a call", len(busy))
        logging.shutdown()
        os._exit(result.exit_code)
    loop.close()
    return result.exit_code


def _cmd_check(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        plugin = plugins.get(args.connector)
        cfg = config_mod.load(plugin.config_type, args.config)
        plugin.create(cfg)  # resolves credentials too
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    print(f"{args.config}: valid configuration for {plugin.name}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    setup_logging()
    candidates = [p for p in plugins.discover().values() if p.exchange == args.exchange]
    sims = [p for p in candidates if p.simulate is not None]
    if not sims:
        log.error("no simulator for exchange %r", args.exchange)
        return EXIT_CONFIG
    simulate = sims[0].simulate
    assert simulate is not None
    with contextlib.suppress(KeyboardInterrupt):
        simulate(args.host, args.port, args.rate)
    return 0


def _cmd_auth_guard(args: argparse.Namespace) -> int:
    """Show or reset a connector's persisted auth-failure guard."""
    import json
    import time

    from connectors.runtime import authguard
    from connectors.runtime.errors import RetriableError
    from connectors.runtime.state import read_state, write_records

    setup_logging()
    try:
        plugin = plugins.get(args.connector)
        if plugin.auth_guard is None:
            raise ConfigError(f"{plugin.name} keeps no auth guard")
        cfg = config_mod.load(plugin.config_type, args.config)
        spec = plugin.auth_guard(cfg)
        if spec is None:
            raise ConfigError(f"{plugin.name}: no credentials configured, so no guard")
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG
    try:
        view = authguard.view_of(read_state(cfg.kafka, spec.topic), spec)
        if args.action == "reset":
            now_ms = int(time.time() * 1000)
            write_records(cfg.kafka, authguard.reset_records(spec, view, now_ms, by=args.by))
            view = authguard.view_of(read_state(cfg.kafka, spec.topic), spec)
    except RetriableError as exc:
        log.error("Kafka: %s", exc)
        return 1
    print(json.dumps(authguard.describe(view, spec), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from connectors.runtime.demo import run_demo

    setup_logging("WARNING")
    return run_demo(seconds=args.seconds, only=args.connector)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exchange-connectors", description="Kafka connectors for crypto exchanges."
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="installed connector plugins")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="run one connector until SIGTERM")
    p.add_argument("connector", help="plugin name, see 'list'")
    p.add_argument("--config", required=True, help="YAML config file")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a config file and exit")
    p.add_argument("connector")
    p.add_argument("--config", required=True)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("simulate", help="run an exchange simulator on loopback")
    p.add_argument("exchange", help="e.g. cryptomus")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--rate", type=float, default=5.0, help="updates per second per channel")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "auth-guard", help="show or reset the persisted authentication-failure guard"
    )
    p.add_argument("action", choices=["show", "reset"])
    p.add_argument("connector", help="plugin name, e.g. robicoin-poller")
    p.add_argument("--config", required=True, help="the connector's YAML config file")
    p.add_argument("--by", default="operator", help="who resets (recorded in the guard)")
    p.set_defaults(func=_cmd_auth_guard)

    p = sub.add_parser("demo", help="embedded broker + simulators + connectors, with a live view")
    p.add_argument("--seconds", type=float, default=30.0, help="run this long (0 = until Ctrl-C)")
    p.add_argument("--connector", action="append", help="only these connectors (repeatable)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
