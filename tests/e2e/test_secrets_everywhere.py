"""Issue 12 §4: no credential of a run shows up anywhere a user can look.

An exchange that echoes the request in its answers (an HTML error page, a JSON error
body) is the worst case: the poller dead-letters those answers. Every topic of the run,
every log line and every HTTP endpoint is searched for the run's distinctive
credentials, for md5(private_key) (all a forger needs) and for every request's hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from kafka import KafkaConsumer

from connectors.runtime.logs import RedactingFormatter
from connectors.testing import T, read_topic, unique, wait_until
from tests.robicoin_helpers import make_config, run, streams

pytestmark = pytest.mark.e2e


class EchoExchange:
    """Answers every POST with the request's own form fields: as an HTML page (200),
    as a JSON error (503) or as JSON data rows that carry them (200), in turn."""

    def __init__(self) -> None:
        self.hashes: list[str] = []
        self.posts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                fields = dict(urllib.parse.parse_qsl(body))
                outer.hashes.append(fields.get("hash", ""))
                outer.posts += 1
                turn = outer.posts % 3
                if turn == 0:
                    status, ctype = 200, "text/html"
                    text = f"<html><body>Bad request: {body} {fields}</body></html>"
                elif turn == 1:  # (a 4xx would count as an auth failure: guarded)
                    status, ctype = 503, "application/json"
                    text = json.dumps({"error": f"invalid request {fields}"})
                else:
                    status, ctype = 200, "application/json"
                    text = json.dumps({"data": [{"currency": fields, "balance": "1.0"}]})
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v1"


@pytest.fixture
def echo_exchange() -> Iterator[EchoExchange]:
    ex = EchoExchange()
    ex.thread.start()
    yield ex
    ex.server.shutdown()
    ex.server.server_close()


def test_no_credential_appears_in_any_topic_log_or_endpoint(
    kafka_bootstrap: str, echo_exchange: EchoExchange, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tag = unique("")
    public_key = f"PUBKEY-{tag}-visible"
    public_id = f"8675309{int(tag, 16) % 10**6:06d}"
    private_key = f"PRIVATE-{tag}-secret"
    prefix = unique("sec")
    cfg = make_config(
        echo_exchange.base_url,
        kafka_bootstrap,
        prefix=prefix,
        public_key=public_key,
        public_id=public_id,
        private_key=private_key,
        streams=streams(0.2, enabled={"balance", "order", "open_order", "transaction"}),
    )
    endpoints: list[str] = []
    with run(cfg) as conn:
        wait_until(lambda: echo_exchange.posts >= 12, T(30), "a dozen echoed answers")
        for path in ("/metrics", "/healthz", "/readyz"):
            r = requests.get(f"http://127.0.0.1:{conn.health_port}{path}", timeout=T(5))
            endpoints.append(r.text)
        conn.stop()

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        names = sorted(t for t in consumer.topics() if t.startswith(prefix))
    finally:
        consumer.close()
    assert f"{prefix}.dlq" in names
    blobs: list[bytes] = []
    for name in names:
        for rec in read_topic(kafka_bootstrap, name, timeout=T(5)):
            blobs += [rec.key or b"", rec.value or b""]
            blobs += [k.encode() + b"=" + v for k, v in rec.headers]
    dead = read_topic(kafka_bootstrap, f"{prefix}.dlq", timeout=T(5))
    assert len(dead) >= 4, "the echoed answers are dead-lettered"

    md5_private = hashlib.md5(private_key.encode()).hexdigest()
    secrets = [public_key, public_id, private_key, md5_private]
    hashes = [h for h in echo_exchange.hashes if h]
    assert len(hashes) >= 12
    # What the log would show: every line through the connector's own formatter.
    formatter = RedactingFormatter(json_lines=False)
    logs = "\n".join(formatter.format(r) for r in caplog.records)
    text = b"\n".join(blobs) + logs.encode() + "\n".join(endpoints).encode()
    found = [s for s in secrets + hashes if s.encode() in text]
    where = sorted(
        {b[:300].decode("utf-8", "replace") for b in blobs for s in found if s.encode() in b}
    )
    where += [line[:300] for line in logs.splitlines() if any(s in line for s in found)]
    assert found == [], f"{len(found)} secret(s) found in: {where[:6]}"
