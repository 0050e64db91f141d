"""Child-process entry points of the Cryptomus benchmarks.

Each function runs in a spawned process and reports through a ``multiprocessing``
queue; live progress goes through a small shared array of counters so the parent can
wait without reading Kafka (which would steal CPU from what is being measured).

* :func:`source_worker` runs the real ``cryptomus-ws`` connector through the runtime's
  ``run_connector``, exactly as ``exchange-connectors run`` does. The only addition is
  timing: the runner gets a producer factory that wraps the real producer to note, per record,
  whether it is an exchange event and when the broker acknowledged it.
* :func:`ws_receiver` is the raw WebSocket limit: token, subscribe, count frames.
* :func:`producer_limit` is the raw producer limit: the connector's own producer
  settings, records of the connector's own sizes, no parsing, as fast as it goes.
* :func:`naive_peer` is the obvious hand-written pipeline for comparison.
* :func:`tuned_peer` is the same stack written with care: a fast JSON library, sends
  that are not awaited one by one, a bound on what waits for the broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import replace
from functools import partial
from typing import Any

#: Indices into the shared counter array.
EVENTS_SENT, EVENTS_ACKED, RECORDS_SENT, RECORDS_ACKED, FAILED = range(5)
N_COUNTERS = 5

MARKETS = ("BTC_USDT", "ETH_USDT")
CHANNELS = ("lastprice", "depth", "ticker", "trade")


def subscribe_params(channel: str) -> list[str]:
    return [f"{m}:0" for m in MARKETS] if channel == "depth" else list(MARKETS)


def _usage() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024}


def _quiet() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # Overloaded on purpose in the unthrottled runs: kafka-python then warns about its
    # own slow I/O loop many times a second.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


# -- the connector under test ---------------------------------------------------------------


def source_config(opts: dict[str, Any]) -> Any:
    from connectors.cryptomus.config import (
        Credentials,
        CryptomusConfig,
        CryptomusSettings,
        Topics,
    )
    from connectors.cryptomus.protocol import CHANNELS as ALL
    from connectors.runtime.config import Secret
    from connectors.runtime.settings import KafkaSettings, RuntimeSettings

    prefix = opts["prefix"]
    return CryptomusConfig(
        cryptomus=CryptomusSettings(
            ws_url=opts["ws_url"],
            api_url=opts["base_url"],
            scales_url=opts["base_url"],
            markets=list(MARKETS),
            channels=list(CHANNELS),
            depth_scale_indices=[0],
            market_refresh_s=0,
            credentials=Credentials(
                user_id=Secret(opts["user_id"]), api_key=Secret(opts["api_key"])
            ),
            topics=Topics(**{f: f"{prefix}.{f}" for f in (*ALL, "dead_letter")}),
        ),
        kafka=replace(KafkaSettings(bootstrap_servers=opts["bootstrap"]), **opts.get("kafka", {})),
        runtime=RuntimeSettings(
            health_host="127.0.0.1", health_port=opts.get("health_port", 0), drain_timeout_s=60
        ),
    )


def source_worker(opts: dict[str, Any], counters: Any, out: Any) -> None:
    """Run ``cryptomus-ws`` until SIGTERM; report every event record's ack time.

    The runner is handed a producer factory that wraps the configured producer: each
    send is noted (event or marker) and gets one more callback, which records when the
    broker acknowledged it. Nothing in the connector is patched."""
    _quiet()
    from connectors.cryptomus.plugin import PLUGIN
    from connectors.runtime.app import run_connector
    from connectors.runtime.kafka import create_producer
    from connectors.runtime.producer import DeliveryReport, Producer, SendFuture
    from connectors.runtime.settings import KafkaSettings

    is_event: list[bool] = []
    acked_at: dict[int, int] = {}
    event_header = ("kind", b"event")

    def acked(seq: int, _metadata: Any) -> None:
        acked_at[seq] = time.monotonic_ns()
        counters[RECORDS_ACKED] += 1
        if is_event[seq]:
            counters[EVENTS_ACKED] += 1

    class Timed:
        """One record's report: its ack time noted, then the connector's report told."""

        __slots__ = ("report", "seq")

        def __init__(self, report: DeliveryReport, seq: int) -> None:
            self.report = report
            self.seq = seq

        def ack(self, metadata: Any) -> None:
            acked(self.seq, metadata)
            self.report.ack(metadata)

        def fail(self, exc: BaseException) -> None:
            self.report.fail(exc)

    class TimedProducer:
        def __init__(self, inner: Producer) -> None:
            self.inner = inner

        def send(
            self,
            topic: str,
            *,
            value: bytes | None = None,
            key: bytes | None = None,
            headers: list[tuple[str, bytes]] | None = None,
            timestamp_ms: int | None = None,
            partition: int | None = None,
        ) -> SendFuture:
            event = event_header in (headers or ())
            seq = len(is_event)
            is_event.append(event)
            counters[RECORDS_SENT] += 1
            if event:
                counters[EVENTS_SENT] += 1
            future = self.inner.send(
                topic,
                value=value,
                key=key,
                headers=headers,
                timestamp_ms=timestamp_ms,
                partition=partition,
            )
            future.add_callback(acked, seq)
            return future

        def send_reported(
            self,
            topic: str,
            *,
            value: bytes | None,
            key: bytes | None,
            headers: list[tuple[str, bytes]] | None,
            timestamp_ms: int | None,
            partition: int | None,
            report: DeliveryReport,
        ) -> None:
            event = event_header in (headers or ())
            seq = len(is_event)
            is_event.append(event)
            counters[RECORDS_SENT] += 1
            if event:
                counters[EVENTS_SENT] += 1
            self.inner.send_reported(
                topic,
                value=value,
                key=key,
                headers=headers,
                timestamp_ms=timestamp_ms,
                partition=partition,
                report=Timed(report, seq),
            )

        def partitions_for(self, topic: str) -> Any:
            return self.inner.partitions_for(topic)

        def flush(self, timeout: float | None = None) -> None:
            self.inner.flush(timeout)

        def close(self, timeout: float | None = None) -> None:
            self.inner.close(timeout)

    def timed(settings: KafkaSettings) -> Producer:
        return TimedProducer(create_producer(settings))

    result = asyncio.run(run_connector(PLUGIN, source_config(opts), producer_factory=timed))
    events = [acked_at.get(i, 0) for i, ev in enumerate(is_event) if ev]
    out.put({"exit_code": result.exit_code, "error": result.error, "acks": events, **_usage()})


# -- the two limits ----------------------------------------------------------------------------


async def _subscribed_socket(opts: dict[str, Any], connect: Any) -> Any:
    """Token over signed REST, connect, subscribe the four public channels."""
    from connectors.cryptomus import protocol
    from connectors.cryptomus.rest import CryptomusRest
    from connectors.runtime.config import Secret

    rest = CryptomusRest(
        opts["base_url"], opts["base_url"], Secret(opts["user_id"]), Secret(opts["api_key"])
    )
    token = await asyncio.to_thread(rest.ws_token)
    ws = await connect(
        f"{opts['ws_url']}?token={token}", ping_interval=None, max_size=None, compression=None
    )
    for i, channel in enumerate(CHANNELS, 1):
        await ws.send(protocol.DIALECT.subscribe(i, channel, subscribe_params(channel)))
    return ws


def ws_receiver(opts: dict[str, Any], count: int, counters: Any, out: Any) -> None:
    """Receive ``count`` update frames and do nothing with them."""
    _quiet()
    from websockets.asyncio.client import connect

    async def main() -> dict[str, Any]:
        ws = await _subscribed_socket(opts, connect)
        got = 0
        first = last = 0
        nbytes = 0
        async with ws:
            async for frame in ws:
                if '_update"' not in frame[:64]:
                    continue
                last = time.monotonic_ns()
                if not first:
                    first = last
                got += 1
                nbytes += len(frame)
                counters[EVENTS_ACKED] = got
                if got >= count + opts.get("skip", 0):
                    break
        return {"frames": got, "bytes": nbytes, "first_ns": first, "last_ns": last}

    out.put({**asyncio.run(main()), **_usage()})


Record = tuple[str, bytes | None, bytes, list[Any]]


def producer_limit(bootstrap: str, records: list[Record], backend: str, out: Any) -> None:
    """Send ``records`` as fast as the producer takes them, with the connector's settings."""
    _quiet()
    from connectors.runtime.kafka import producer_config
    from connectors.runtime.settings import KafkaSettings

    settings = KafkaSettings(bootstrap_servers=bootstrap)
    failures: list[BaseException] = []
    acked = [0]

    def ok(_md: Any) -> None:
        acked[0] += 1

    producer: Any
    if backend == "kafka-python":
        from kafka import KafkaProducer

        producer = KafkaProducer(**producer_config(settings))
    else:
        from connectors.runtime.rdkafka import RdKafkaProducer

        producer = RdKafkaProducer(settings)
    for topic in {r[0] for r in records}:
        producer.partitions_for(topic)
    cpu0 = time.process_time()
    start = time.monotonic_ns()
    for topic, key, value, headers in records:
        fut = producer.send(topic, value=value, key=key, headers=headers)
        fut.add_callback(ok)
        fut.add_errback(failures.append)
    producer.flush(timeout=120)
    end = time.monotonic_ns()
    cpu = time.process_time() - cpu0
    producer.close(timeout=5)
    out.put(
        {
            "records": len(records),
            "acked": acked[0],
            "failed": len(failures),
            "first_error": repr(failures[0]) if failures else None,
            "seconds": (end - start) / 1e9,
            "cpu_s_in_loop": cpu,
            **_usage(),
        }
    )


# -- the naive peer ------------------------------------------------------------------------------


def naive_peer(opts: dict[str, Any], counters: Any, out: Any) -> None:
    """websockets + json.loads + aiokafka ``send_and_wait`` per record: the pipeline most
    people write first (cryptofeed's Kafka backend has this shape). One topic per
    channel, key = symbol, value = ``json.dumps`` of the parsed event."""
    _quiet()
    from aiokafka import AIOKafkaProducer
    from websockets.asyncio.client import connect

    prefix = opts["prefix"]
    acked_at: list[int] = []

    async def main() -> None:
        # aiokafka's idempotent producer does not start against every broker (not on
        # Tansu): acks=all without idempotence is the closest it gets.
        producer = AIOKafkaProducer(bootstrap_servers=opts["bootstrap"], acks="all")
        await producer.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(15, stop.set)
        try:
            ws = await _subscribed_socket(opts, connect)
            async with ws:
                reader = asyncio.ensure_future(_pump(ws, producer))
                await asyncio.wait(
                    [reader, asyncio.ensure_future(stop.wait())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                reader.cancel()
        finally:
            await producer.stop()

    async def _pump(ws: Any, producer: Any) -> None:
        async for frame in ws:
            msg = json.loads(frame)
            method = msg.get("method") or ""
            if not method.endswith("_update"):
                continue
            channel = method[: -len("_update")]
            data = msg["data"]
            items = data["trades"] if channel == "trade" else [data]
            for item in items:
                value = json.dumps({"symbol": data["symbol"], **item}).encode()
                counters[EVENTS_SENT] += 1
                counters[RECORDS_SENT] += 1
                await producer.send_and_wait(
                    f"{prefix}.{channel}", value, key=data["symbol"].encode()
                )
                acked_at.append(time.monotonic_ns())
                counters[RECORDS_ACKED] += 1
                counters[EVENTS_ACKED] += 1

    asyncio.run(main())
    out.put({"exit_code": 0, "error": None, "acks": acked_at, **_usage()})


# -- the tuned peer ------------------------------------------------------------------------------

#: The tuned peer stops reading the WebSocket while this many records wait for the
#: broker, and reads again once half of them are acknowledged (TCP then pushes back on
#: the exchange, as the source's own limit does).
TUNED_MAX_IN_FLIGHT = 20_000


def tuned_peer(opts: dict[str, Any], counters: Any, out: Any) -> None:
    """The naive peer's stack (websockets + aiokafka) written by someone who cares.

    Same topics, key and value shape as :func:`naive_peer` (one record per trade or
    update; key = symbol; value = the symbol plus the item), but: msgspec decodes and
    encodes (JSON numbers stay their exact text, as strings, instead of becoming
    floats); ``producer.send`` only enqueues, and each record's acknowledgement is
    counted by a callback on its future, so many records are in flight and aiokafka
    batches them (linger 5 ms); at most :data:`TUNED_MAX_IN_FLIGHT` records wait for
    the broker. A failed send counts as ``FAILED`` and makes the exit code 1."""
    _quiet()
    import msgspec
    from aiokafka import AIOKafkaProducer
    from websockets.asyncio.client import connect

    prefix = opts["prefix"]
    topics = {ch: f"{prefix}.{ch}" for ch in CHANNELS}
    decode = msgspec.json.Decoder(float_hook=str).decode
    encode = msgspec.json.Encoder().encode
    keys: dict[str, bytes] = {}
    #: Ack time per record in send order; 0 until the broker acknowledged it.
    acked_at: list[int] = []
    failures: list[BaseException] = []
    in_flight = 0
    resume_at = TUNED_MAX_IN_FLIGHT // 2
    room = asyncio.Event()
    room.set()
    clock = time.monotonic_ns

    def done(seq: int, future: asyncio.Future[Any]) -> None:
        nonlocal in_flight
        in_flight -= 1
        error = asyncio.CancelledError() if future.cancelled() else future.exception()
        if error is None:
            acked_at[seq] = clock()
            counters[RECORDS_ACKED] += 1
            counters[EVENTS_ACKED] += 1
        else:
            counters[FAILED] += 1
            failures.append(error)
        if in_flight <= resume_at:
            room.set()

    async def pump(ws: Any, producer: Any) -> None:
        nonlocal in_flight
        async for frame in ws:
            msg = decode(frame)
            method = msg.get("method") or ""
            if not method.endswith("_update"):
                continue
            channel = method[: -len("_update")]
            data = msg["data"]
            symbol = data["symbol"]
            key = keys.get(symbol) or keys.setdefault(symbol, symbol.encode())
            topic = topics[channel]
            for item in data["trades"] if channel == "trade" else (data,):
                seq = len(acked_at)
                acked_at.append(0)
                counters[EVENTS_SENT] += 1
                counters[RECORDS_SENT] += 1
                try:
                    future = await producer.send(topic, encode({"symbol": symbol, **item}), key)
                except Exception as exc:  # not even enqueued (buffer full, producer closed)
                    counters[FAILED] += 1
                    failures.append(exc)
                    continue
                in_flight += 1
                future.add_done_callback(partial(done, seq))
            if in_flight >= TUNED_MAX_IN_FLIGHT:
                room.clear()
                await room.wait()

    async def main() -> str | None:
        # Same as the naive peer: aiokafka's idempotent producer does not start against
        # every broker (not on Tansu), so acks=all without idempotence.
        producer = AIOKafkaProducer(bootstrap_servers=opts["bootstrap"], acks="all", linger_ms=5)
        await producer.start()
        for topic in topics.values():  # metadata before the first record, as the source does
            await producer.partitions_for(topic)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(15, stop.set)
        crashed: BaseException | None = None
        try:
            ws = await _subscribed_socket(opts, connect)
            async with ws:
                reader = asyncio.ensure_future(pump(ws, producer))
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait([reader, stopping], return_when=asyncio.FIRST_COMPLETED)
                if reader.done():  # the exchange closed the connection, or the pump broke
                    crashed = reader.exception()
                    await stopping  # run until SIGTERM, as the naive peer does
                else:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
            await producer.flush()
        finally:
            await producer.stop()
        deadline = time.monotonic() + 5
        while in_flight and time.monotonic() < deadline:  # let the last callbacks run
            await asyncio.sleep(0.01)
        if crashed is not None:
            return f"the reader failed: {crashed!r}"
        if failures:
            return f"{len(failures)} sends failed, the first: {failures[0]!r}"
        if in_flight:
            return f"{in_flight} records neither acknowledged nor failed after the flush"
        return None

    error = asyncio.run(main())
    out.put({"exit_code": 1 if error else 0, "error": error, "acks": acked_at, **_usage()})
