"""The polling contract suite: what every REST polling plugin must do, as tests.

A plugin's tests run it in one line, by subclassing with a harness::

    class TestMyExchangeContract(PollingContract):
        harness = MyExchangeHarness()

The suite runs the plugin through the real polling runtime
(:mod:`connectors.runtime.polling`) against the plugin's simulator and a real
Kafka-protocol broker (the ``kafka_bootstrap`` fixture), reads every topic as a
transactional consumer does (``read_committed``) and checks what a user of the topics
would notice:

- every stream's records land on its channel's topic, keyed by their ``symbol``, with
  the ``exchange``/``channel``/``kind``/``schema`` headers (``<exchange>.<channel>/v1``),
  valid against the channel's JSON Schema, with the Kafka timestamp equal to
  ``receive_time_ms``; every decimal literal the exchange served is in Kafka as the
  same text (every row's literals together in one record: :func:`decimal_rows`), and
  nothing is dead-lettered;
- an unusable answer (not JSON, JSON of the wrong shape, a row with a bad decimal) is
  dead-lettered with its exact bytes (``original-sha256``), a reason from
  :data:`~connectors.runtime.errors.DEAD_LETTER_REASONS` and the ``exchange`` header,
  ``connector_dead_letters_total`` counts it, and polling goes on;
- a stop (what SIGTERM does) exits 0 with every transaction committed (nothing is left
  open or aborted), and a second run with the same config resumes from the stored
  state: no record is written twice, none is missing, no gap marker, the same epoch;
- ``/readyz`` is 200 while polling works; while the exchange answers 5xx,
  ``connector_requests_total`` counts each failure as ``retriable``, and once it
  recovers no record is lost.

The suite needs jsonschema (the ``test`` extra) and pytest's ``kafka_bootstrap``
fixture (a real broker: :func:`connectors.runtime.broker.kafka_broker`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import jsonschema
import requests

from connectors.runtime.errors import DEAD_LETTER_REASONS
from connectors.runtime.plugins import ConnectorPlugin
from connectors.testing.running import ConnectorThread, metric_value, ready
from connectors.testing.topics import read_topic
from connectors.testing.waits import T, unique, wait_until

#: The kinds of unusable answer every plugin's :meth:`PollingHarness.bad_answers` covers
#: (not JSON, JSON of the wrong shape, a row with a bad decimal).
REQUIRED_BAD_ANSWERS = frozenset({"invalid_json", "bad_answer", "bad_decimal"})
#: ``connector_requests_total`` outcomes that mean the exchange was not usable.
FAILED_OUTCOMES = ("retriable", "rejected", "unauthorized", "rate_limited")

_DECIMAL_TEXT = re.compile(r"-?[0-9]+\.[0-9]+(?:[eE][-+]?[0-9]+)?|-?[0-9]+[eE][-+]?[0-9]+")


@dataclass(frozen=True)
class BadAnswer:
    """One unusable 2xx answer the harness serves in place of the exchange's next one.

    ``channel``: the stream's channel whose next answer it replaces (its records must go
    on arriving afterwards); ``request``: the harness's own name of the request (a
    path); ``body``: the whole answer, byte for byte; ``dead``: the bytes that must be
    dead-lettered (the whole body, or the one bad row exactly as it stands in the body);
    ``reason``: the dead letter's ``error.reason``.
    """

    channel: str
    request: str
    body: bytes
    dead: bytes
    reason: str
    content_type: str = "application/json"


class PollingHarness(Protocol):
    """What a polling plugin gives the suite: its plugin, simulator and knobs.

    ``exchange()`` yields one object (called ``sim`` below) that every other method gets
    back: the simulator, plus whatever the harness puts in front of it to serve bad
    answers and 5xx (a loopback proxy, the simulator's own fault controls).
    """

    plugin: ConnectorPlugin

    #: The channel whose rows the exchange keeps and the plugin writes each exactly once
    #: (an account's transactions): the suite counts it across restarts and outages.
    ledger_channel: str

    def exchange(self) -> contextlib.AbstractContextManager[Any]:
        """A running simulator on 127.0.0.1 whose activity keeps adding ledger rows and
        changing the other streams' data."""
        ...

    def config(self, sim: Any, bootstrap: str, prefix: str) -> Any:
        """A config polling every stream of ``sim`` at least once a second, with a fast
        back-off and topics named from ``prefix``; the same arguments give the same
        config (a second run resumes the first run's state)."""
        ...

    def topics(self, config: Any) -> Mapping[str, str]:
        """channel → topic for every enabled stream."""
        ...

    def dead_letter_topic(self, config: Any) -> str: ...

    def schema(self, channel: str) -> Mapping[str, Any] | None:
        """The channel's JSON Schema (None: the plugin ships none)."""
        ...

    def served(self, sim: Any) -> list[str]:
        """The body of every 2xx answer the simulator served so far, as text."""
        ...

    def pause(self, sim: Any, paused: bool) -> None:
        """Stop (or restart) the exchange's activity: while paused no row is added and
        no value changes, but requests are still answered."""
        ...

    def held(self, sim: Any) -> Counter[str]:
        """The identity (:meth:`identity`) of every ledger row the exchange holds."""
        ...

    def identity(self, data: Mapping[str, Any]) -> str:
        """The identity of a ledger record's ``data``: the same text as :meth:`held`
        gives the row it was written from."""
        ...

    def bad_answers(self) -> Sequence[BadAnswer]:
        """Unusable answers, covering at least :data:`REQUIRED_BAD_ANSWERS`."""
        ...

    def serve(self, sim: Any, bad: BadAnswer) -> None:
        """Answer the next request ``bad.request`` with ``bad.body`` (status 200)."""
        ...

    def fail(self, sim: Any, failing: bool) -> None:
        """While ``failing``, answer every request with a 5xx."""
        ...

    def failures(self, sim: Any) -> int:
        """How many 5xx answers were served so far."""
        ...


def canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def decimal_rows(body: str) -> list[Counter[str]]:
    """The decimal literals of every row of a JSON answer, as the exchange wrote them.

    A row is an innermost object or array (one holding no object or array); its
    literals are its numbers with a fraction or an exponent and its strings that hold
    one, counted (a row may hold one value twice). Rows without a decimal are left out.

    >>> decimal_rows('{"data": [{"a": 142.950, "b": "0.10", "c": 7}, {"d": "x1.5"}]}')
    [Counter({'142.950': 1, '0.10': 1})]
    """
    return _decimal_rows(json.loads(body, parse_float=str, parse_int=str))


def _decimal_rows(value: Any) -> list[Counter[str]]:
    """:func:`decimal_rows` of a decoded value (numbers as their text, or as numbers:
    those are not decimal text and count as none)."""
    if not isinstance(value, dict | list):
        return []
    items = list(value.values()) if isinstance(value, dict) else value
    nested = [v for v in items if isinstance(v, dict | list)]
    if nested:
        return [row for v in nested for row in _decimal_rows(v)]
    found = Counter(v for v in items if isinstance(v, str) and _DECIMAL_TEXT.fullmatch(v))
    return [found] if found else []


def _decimals_held(data: Any) -> Counter[str]:
    """Every decimal text a record's ``data`` holds, at any depth."""
    held: Counter[str] = Counter()
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, str) and _DECIMAL_TEXT.fullmatch(value):
            held[value] += 1
    return held


def _rows_not_written(served: Sequence[str], written: Sequence[Counter[str]]) -> list[str]:
    """The served rows whose decimals are not all, as the same text, in one record."""
    by_literal: dict[str, list[Counter[str]]] = {}
    for data in written:
        for literal in data:
            by_literal.setdefault(literal, []).append(data)
    missing: list[str] = []
    checked: set[tuple[tuple[str, int], ...]] = set()
    for body in served:
        for row in decimal_rows(body):
            key = tuple(sorted(row.items()))
            if key in checked:
                continue
            checked.add(key)
            rarest = min(row, key=lambda lit: len(by_literal.get(lit, ())))
            if not any(row <= data for data in by_literal.get(rarest, ())):
                missing.append(" ".join(sorted(row.elements())))
    return missing


def _values(records: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in records]


def _events(records: list[Any]) -> list[dict[str, Any]]:
    return [v for v in _values(records) if v["kind"] == "event"]


def _has_event(after_ms: int = -1) -> Callable[[list[Any]], bool]:
    def enough(records: list[Any]) -> bool:
        return any(v["receive_time_ms"] > after_ms for v in _events(records))

    return enough


def _at_least(n: int) -> Callable[[list[Any]], bool]:
    return lambda records: len(records) >= n


def _metrics(conn: ConnectorThread) -> str:
    return requests.get(f"http://127.0.0.1:{conn.health_port}/metrics", timeout=5).text


def _status(conn: ConnectorThread, path: str) -> int:
    return requests.get(f"http://127.0.0.1:{conn.health_port}{path}", timeout=5).status_code


def _ready(conn: ConnectorThread) -> bool:
    return conn.health_port is not None and ready(conn.health_port)


class PollingContract:
    """Subclass with ``harness = <your PollingHarness>``."""

    harness: ClassVar[PollingHarness]

    @contextlib.contextmanager
    def _running(self, bootstrap: str) -> Iterator[tuple[Any, Any, ConnectorThread]]:
        h = self.harness
        with h.exchange() as sim:
            config = h.config(sim, bootstrap, unique())
            with ConnectorThread(h.plugin, config) as conn:
                yield sim, config, conn

    def _ledger(self, bootstrap: str, config: Any) -> list[dict[str, Any]]:
        topic = self.harness.topics(config)[self.harness.ledger_channel]
        return _events(read_topic(bootstrap, topic, committed=True, timeout=T(20), idle=T(2)))

    def _wait_ledger_complete(self, bootstrap: str, sim: Any, config: Any) -> None:
        """Wait until every ledger row the exchange holds is in Kafka (committed)."""
        h = self.harness
        held = h.held(sim)

        def complete(records: list[Any]) -> bool:
            got = Counter(h.identity(v["data"]) for v in _events(records))
            return not held - got

        topic = h.topics(config)[h.ledger_channel]
        try:
            read_topic(bootstrap, topic, until=complete, timeout=T(30), committed=True)
        except AssertionError:
            got = Counter(h.identity(v["data"]) for v in self._ledger(bootstrap, config))
            missing = list((held - got).items())
            raise AssertionError(
                f"{topic}: {len(missing)} ledger rows the exchange holds never arrived, "
                f"e.g. {missing[:2]}; written but never held: {list((got - held).items())[:2]}"
            ) from None

    def _assert_ledger_exactly_once(self, bootstrap: str, sim: Any, config: Any) -> None:
        h = self.harness
        got = Counter(h.identity(v["data"]) for v in self._ledger(bootstrap, config))
        held = h.held(sim)
        assert not got - held, f"written twice or never held: {list((got - held).items())[:3]}"
        assert not held - got, f"lost: {list((held - got).items())[:3]}"

    # -- 1 ---------------------------------------------------------------------------

    def test_records_land_keyed_with_headers_schemas_and_exact_decimals(
        self, kafka_bootstrap: str
    ) -> None:
        h = self.harness
        with self._running(kafka_bootstrap) as (sim, config, conn):
            topics = h.topics(config)
            for topic in topics.values():
                read_topic(
                    kafka_bootstrap, topic, until=_has_event(), timeout=T(30), committed=True
                )
            h.pause(sim, True)
            self._wait_ledger_complete(kafka_bootstrap, sim, config)
            # Every stream polls a few more times: whatever was served before is then
            # committed (the last answer in flight at the stop holds nothing new).
            seen = len(h.served(sim))
            wait_until(lambda: len(h.served(sim)) >= seen + 3 * len(topics), T(30), "more polls")
            served = h.served(sim)
            assert conn.stop().exit_code == 0
            self._assert_ledger_exactly_once(kafka_bootstrap, sim, config)
        written: list[Counter[str]] = []
        for channel, topic in topics.items():
            recs = read_topic(kafka_bootstrap, topic, committed=True, timeout=T(20), idle=T(1))
            assert _events(recs), f"{channel}: no record on {topic}"
            schema = h.schema(channel)
            validator = None if schema is None else jsonschema.Draft202012Validator(schema)
            for rec in recs:
                value = json.loads(rec.value)
                if validator is not None:
                    validator.validate(value)
                headers = dict(rec.headers)
                assert headers["exchange"] == h.plugin.exchange.encode()
                assert headers["channel"] == channel.encode()
                assert headers["kind"] == value["kind"].encode()
                assert headers["schema"] == f"{h.plugin.exchange}.{channel}/v1".encode()
                assert value["exchange"] == h.plugin.exchange
                assert value["channel"] == channel
                if value["kind"] == "event":
                    assert rec.key is not None and rec.key.decode() == value["symbol"]
                assert rec.timestamp == value["receive_time_ms"]
                written.append(_decimals_held(value["data"]))
        missing = _rows_not_written(served, written)
        assert not missing, f"rows served whose decimals no record holds as text: {missing[:3]}"
        assert read_topic(kafka_bootstrap, h.dead_letter_topic(config), timeout=T(3)) == []

    # -- 2 ---------------------------------------------------------------------------

    def test_unusable_answers_are_dead_lettered_and_polling_goes_on(
        self, kafka_bootstrap: str
    ) -> None:
        h = self.harness
        bad = list(h.bad_answers())
        uncovered = REQUIRED_BAD_ANSWERS - {b.reason for b in bad}
        assert not uncovered, f"the harness serves no bad answer of {sorted(uncovered)}"
        for b in bad:
            assert b.reason in DEAD_LETTER_REASONS, b.reason
            assert b.dead in b.body, "the dead letter must be bytes the exchange served"
        with self._running(kafka_bootstrap) as (sim, config, conn):
            topics = h.topics(config)
            for channel in {b.channel for b in bad}:
                read_topic(
                    kafka_bootstrap,
                    topics[channel],
                    until=_has_event(),
                    timeout=T(30),
                    committed=True,
                )
            for b in bad:
                h.serve(sim, b)
            dead = read_topic(
                kafka_bootstrap,
                h.dead_letter_topic(config),
                until=_at_least(len(bad)),
                timeout=T(30),
                committed=True,
            )
            # Polling goes on: every stream that got a bad answer writes records again.
            last = max(r.timestamp for r in dead)
            for channel in {b.channel for b in bad}:
                read_topic(
                    kafka_bootstrap,
                    topics[channel],
                    until=_has_event(after_ms=last),
                    timeout=T(30),
                    committed=True,
                )
            text = _metrics(conn)
            assert _ready(conn), "an unusable answer must not make the connector not ready"
            assert conn.stop().exit_code == 0
        dead = read_topic(
            kafka_bootstrap, h.dead_letter_topic(config), committed=True, timeout=T(10), idle=T(2)
        )
        assert len(dead) == len(bad)
        got = Counter((r.value, dict(r.headers)["error.reason"].decode()) for r in dead)
        assert got == Counter((b.dead, b.reason) for b in bad)
        for rec in dead:
            headers = dict(rec.headers)
            assert headers["original-sha256"].decode() == hashlib.sha256(rec.value).hexdigest()
            assert headers["exchange"] == h.plugin.exchange.encode()
        assert metric_value(text, "connector_dead_letters_total") == len(bad)
        for reason, n in Counter(b.reason for b in bad).items():
            assert metric_value(text, "connector_dead_letters_total", reason=reason) == n

    # -- 3 ---------------------------------------------------------------------------

    def test_a_stop_commits_and_a_second_run_resumes_exactly_once(
        self, kafka_bootstrap: str
    ) -> None:
        h = self.harness
        with h.exchange() as sim:
            config = h.config(sim, kafka_bootstrap, unique())
            topics = h.topics(config)
            ledger = topics[h.ledger_channel]
            with ConnectorThread(h.plugin, config) as first:
                read_topic(
                    kafka_bootstrap,
                    ledger,
                    until=lambda rs: len(_events(rs)) >= 8,
                    timeout=T(30),
                    committed=True,
                )
                # Stopped while the exchange is busy: a poll may be in flight.
                assert first.stop().exit_code == 0
            h.pause(sim, True)
            # The last transaction is committed: nothing is left open or aborted, so a
            # read_committed consumer sees every record written.
            for topic in topics.values():
                written = len(read_topic(kafka_bootstrap, topic, timeout=T(10), idle=T(1)))
                try:
                    read_topic(
                        kafka_bootstrap,
                        topic,
                        until=_at_least(written),
                        timeout=T(5),
                        committed=True,
                    )
                except AssertionError:
                    raise AssertionError(
                        f"{topic}: the last transaction is not committed"
                    ) from None
            first_run = read_topic(
                kafka_bootstrap, ledger, committed=True, timeout=T(10), idle=T(1)
            )
            with ConnectorThread(h.plugin, config) as second:
                h.pause(sim, False)
                read_topic(
                    kafka_bootstrap,
                    ledger,
                    until=lambda rs: len(_events(rs)) >= len(_events(first_run)) + 5,
                    timeout=T(30),
                    committed=True,
                )
                h.pause(sim, True)
                self._wait_ledger_complete(kafka_bootstrap, sim, config)
                assert second.stop().exit_code == 0
            both = read_topic(kafka_bootstrap, ledger, committed=True, timeout=T(10), idle=T(2))
            old = {(r.partition, r.offset) for r in first_run}
            second_run = [r for r in both if (r.partition, r.offset) not in old]
            held = h.held(sim)
            c1 = Counter(h.identity(v["data"]) for v in _events(first_run))
            c2 = Counter(h.identity(v["data"]) for v in _events(second_run))
            again = sorted(k for k in c2 if k in c1 and c1[k] + c2[k] > held[k])
            assert not again, f"written again after the restart: {again[:3]}"
            assert c1 and c2, "both runs must write ledger records"
            self._assert_ledger_exactly_once(kafka_bootstrap, sim, config)
        # A restart is seamless: no gap marker, and every record keeps the epoch.
        epochs: set[int] = set()
        for topic in topics.values():
            recs = _values(read_topic(kafka_bootstrap, topic, committed=True, timeout=T(10)))
            assert not [v for v in recs if v["kind"] != "event"], f"{topic}: a marker"
            epochs.update(v["resync_epoch"] for v in recs)
        assert len(epochs) == 1, f"the restart changed the resync epoch: {sorted(epochs)}"

    # -- 4 ---------------------------------------------------------------------------

    def test_readiness_and_metrics_follow_the_exchange(self, kafka_bootstrap: str) -> None:
        h = self.harness
        with self._running(kafka_bootstrap) as (sim, config, conn):
            wait_until(lambda: _ready(conn), T(30), "ready")
            ledger = h.topics(config)[h.ledger_channel]
            read_topic(kafka_bootstrap, ledger, until=_has_event(), timeout=T(30), committed=True)
            text = _metrics(conn)
            for outcome in FAILED_OUTCOMES:
                assert metric_value(text, "connector_requests_total", outcome=outcome) == 0
            ok_before = metric_value(text, "connector_requests_total", outcome="ok")
            assert ok_before > 0

            h.fail(sim, True)
            try:
                wait_until(lambda: h.failures(sim) >= 20, T(20), "a run of 5xx answers")
                assert _status(conn, "/healthz") == 200  # the process is alive
            finally:
                h.fail(sim, False)
            failures = h.failures(sim)

            def counted() -> float:
                return metric_value(_metrics(conn), "connector_requests_total", outcome="retriable")

            wait_until(lambda: counted() >= failures, T(20), "every 5xx counted")
            ok_after = metric_value(_metrics(conn), "connector_requests_total", outcome="ok")
            wait_until(
                lambda: (
                    metric_value(_metrics(conn), "connector_requests_total", outcome="ok")
                    > ok_after
                ),
                T(20),
                "answers again",
            )
            wait_until(lambda: _ready(conn), T(20), "ready after the exchange recovered")
            h.pause(sim, True)
            self._wait_ledger_complete(kafka_bootstrap, sim, config)
            text = _metrics(conn)
            assert conn.stop().exit_code == 0
            self._assert_ledger_exactly_once(kafka_bootstrap, sim, config)
        assert metric_value(text, "connector_requests_total", outcome="retriable") == failures
        for outcome in FAILED_OUTCOMES[1:]:
            assert metric_value(text, "connector_requests_total", outcome=outcome) == 0
        assert metric_value(text, "connector_requests_total", outcome="ok") > ok_after


__all__ = [
    "REQUIRED_BAD_ANSWERS",
    "BadAnswer",
    "PollingContract",
    "PollingHarness",
    "canonical",
    "decimal_rows",
]
