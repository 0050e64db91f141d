"""The Robicoin poller runs the polling contract suite
(``connectors.testing.polling_contract``).

The harness puts a loopback proxy (:class:`tests.http_faults.FaultyHttp`) between the
poller and the simulator: it forwards every request, serves the suite's unusable
answers in place of the next answer for one path, and answers 503 while the suite
wants the exchange down. The simulator itself keeps every one of its rules.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from connectors.robicoin.config import RobicoinConfig
from connectors.robicoin.plugin import PLUGIN
from connectors.robicoin.schemas import load_schema
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import RobicoinSimulator
from connectors.testing.polling_contract import BadAnswer, PollingContract, canonical
from tests.http_faults import FaultyHttp
from tests.robicoin_helpers import make_config, streams

pytestmark = pytest.mark.e2e

API = "/api/v1"
#: A ticker row as the exchange writes it, with one decimal that is not one; keys
#: sorted and compact, so the row's bytes in the answer are the bytes dead-lettered.
BAD_TICKER_ROW = (
    b'{"ask":"20659.95","avarage":"20761.68","bid":"20556.51","high":"20950.00",'
    b'"last":"20,659.95","low":"20500.00","type":"btc-try","volume":"142.95"}'
)
#: A maintenance page from a proxy in front of the exchange (UTF-8, not JSON).
MAINTENANCE = "<html><body><h1>Bak\u0131m \u00e7al\u0131\u015fmas\u0131</h1>\u2026</body></html>"
#: JSON, but ``data`` is an object, not the documented list.
WRONG_SHAPE = b'{"data": {"type": "btc-try", "last": 20659.95}, "error": null}'


@dataclass
class Rig:
    """The simulator and the proxy the poller talks to."""

    sim: Harness[RobicoinSimulator]
    proxy: FaultyHttp


def as_exchange_row(data: Mapping[str, Any]) -> dict[str, Any]:
    """A transaction record's data turned back into the row the exchange served."""
    row = {k: data[k] for k in ("zone", "amount", "price", "total", "fee", "status", "txid")}
    row.update(type=data["pair"], created_at=data["created_at"], updated_at=data["updated_at"])
    return row


class RobicoinHarness:
    plugin = PLUGIN
    ledger_channel = "transaction"

    @contextlib.contextmanager
    def exchange(self) -> Iterator[Rig]:
        with (
            Harness(
                RobicoinSimulator(
                    transactions_per_second=4.0, market_orders_per_second=4.0, seed=29
                )
            ) as sim,
            FaultyHttp(upstream=f"http://127.0.0.1:{sim.port}") as proxy,
        ):
            yield Rig(sim, proxy)

    def config(self, sim: Rig, bootstrap: str, prefix: str) -> RobicoinConfig:
        return make_config(
            sim.proxy.url + API,
            bootstrap,
            prefix=prefix,
            streams=streams(0.4, windows=["24h", "1min"]),
        )

    def topics(self, config: RobicoinConfig) -> Mapping[str, str]:
        s = config.robicoin
        return {
            name.replace("_", "-"): getattr(s.topics, name)
            for name in ("ticker", "order", "balance", "transaction", "open_order")
            if getattr(s.streams, name).enabled
        }

    def dead_letter_topic(self, config: RobicoinConfig) -> str:
        return config.robicoin.topics.dead_letter

    def schema(self, channel: str) -> Mapping[str, Any]:
        return load_schema(channel)

    def served(self, sim: Rig) -> list[str]:
        return [e.body for e in sim.sim.control.response_log if 200 <= e.status < 300]

    def pause(self, sim: Rig, paused: bool) -> None:
        if paused:
            sim.sim.control.pause_activity()
        else:
            sim.sim.control.resume_activity()

    def held(self, sim: Rig) -> Counter[str]:
        return Counter(canonical(row) for row in sim.sim.control.transactions())

    def identity(self, data: Mapping[str, Any]) -> str:
        return canonical(as_exchange_row(data))

    def bad_answers(self) -> Sequence[BadAnswer]:
        bad_row = b'{"data":[' + BAD_TICKER_ROW + b"]}"
        return [
            BadAnswer(
                "transaction",
                f"{API}/transaction",
                MAINTENANCE.encode(),
                MAINTENANCE.encode(),
                "invalid_json",
                content_type="text/html; charset=utf-8",
            ),
            BadAnswer("ticker", f"{API}/ticker", WRONG_SHAPE, WRONG_SHAPE, "bad_answer"),
            BadAnswer("ticker", f"{API}/ticker", bad_row, BAD_TICKER_ROW, "bad_decimal"),
        ]

    def serve(self, sim: Rig, bad: BadAnswer) -> None:
        sim.proxy.replace_next(bad.request, bad.body, content_type=bad.content_type)

    def fail(self, sim: Rig, failing: bool) -> None:
        sim.proxy.mode = "unavailable" if failing else "forward"

    def failures(self, sim: Rig) -> int:
        return sum(n for status, n in sim.proxy.statuses.items() if status >= 500)


class TestRobicoinContract(PollingContract):
    harness = RobicoinHarness()
