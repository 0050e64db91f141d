"""Configuration that cannot work is refused at start: exit 2 and one clear line.

Every case goes through the command line as an operator calls it (``check-config``
and ``run``), with Kafka pointed at a closed loopback port so nothing is contacted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from connectors.testing import T

BASES = {
    "cryptomus-ws": "cryptomus:\n  markets: [BTC_USDT]\n",
    "robicoin-poller": "robicoin: {}\n",
    "robicoin-orders": "robicoin: {}\n",
}
#: Keeps every run away from real networks and from the port 8080 of other tests.
COMMON = "kafka:\n  bootstrap_servers: 127.0.0.1:1\nruntime:\n  health_host: 127.0.0.1\n"
CREDENTIALS = {
    "CRYPTOMUS_USER_ID": "cli-user",
    "CRYPTOMUS_API_KEY": "cli-key",
    "ROBICOIN_PUBLIC_KEY": "cli-public-key",
    "ROBICOIN_PUBLIC_ID": "1",
    "ROBICOIN_PRIVATE_KEY": "cli-private-key",
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EXCHANGE_CONNECTORS__", "CRYPTOMUS_", "ROBICOIN_", "KAFKA_"))
    }
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def cli(
    command: str, connector: str, config: Path, env: dict[str, str], timeout: float = 15
) -> tuple[int | None, str, float]:
    """Run the CLI; returns (exit code or None if it had to be killed, output, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "connectors", command, connector, "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=T(timeout))
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=T(10))
        code = None
    return code, out, time.monotonic() - started


def assert_refused(code: int | None, out: str, *fragments: str) -> None:
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2, f"exit {code}, output:\n{out[:2000]}"
    assert "Traceback" not in out, out[:2000]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{out[:2000]}"
    assert "configuration error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# (connector, YAML added to the connector's section or to the top level, key named)
BAD_VALUES = [
    ("cryptomus-ws", "cryptomus:\n  http_timeout_s: 0\n", "cryptomus.http_timeout_s"),
    ("cryptomus-ws", "cryptomus:\n  request_timeout_s: -1\n", "cryptomus.request_timeout_s"),
    ("cryptomus-ws", "cryptomus:\n  connect_timeout_s: -1\n", "cryptomus.connect_timeout_s"),
    ("cryptomus-ws", "cryptomus:\n  ping_timeout_s: 0\n", "cryptomus.ping_timeout_s"),
    ("cryptomus-ws", "cryptomus:\n  ping_timeout_s: .nan\n", "cryptomus.ping_timeout_s"),
    ("cryptomus-ws", "cryptomus:\n  max_frame_bytes: 0\n", "cryptomus.max_frame_bytes"),
    ("robicoin-poller", "robicoin:\n  request_timeout_s: 0\n", "robicoin.request_timeout_s"),
    ("robicoin-poller", "robicoin:\n  connect_timeout_s: -1\n", "robicoin.connect_timeout_s"),
    ("robicoin-poller", "robicoin:\n  auth_guard: {recheck_s: 0}\n", "recheck_s"),
    ("robicoin-poller", "robicoin:\n  rate_limit: {other: {count: 0}}\n", "rate_limit.other"),
    ("robicoin-orders", "robicoin:\n  request_timeout_s: -5\n", "robicoin.request_timeout_s"),
    ("robicoin-orders", "robicoin:\n  consumer: {session_timeout_ms: 0}\n", "session_timeout"),
    ("cryptomus-ws", "kafka:\n  stall_after_s: -1\n", "kafka.stall_after_s"),
    ("cryptomus-ws", "kafka:\n  stall_after_s: .inf\n", "kafka.stall_after_s"),
    ("robicoin-poller", "kafka:\n  topic_partitions: 0\n", "kafka.topic_partitions"),
    ("robicoin-orders", "kafka:\n  replication_factor: 0\n", "kafka.replication_factor"),
    ("cryptomus-ws", "kafka:\n  request_timeout_ms: 0\n", "kafka.request_timeout_ms"),
    (
        "cryptomus-ws",
        "kafka:\n  client: {security_protocol: PLAINTXT}\n",
        "kafka.client.security_protocol",
    ),
    ("robicoin-poller", "runtime:\n  drain_timeout_s: 0\n", "runtime.drain_timeout_s"),
    ("cryptomus-ws", "runtime:\n  health_port: 70000\n", "runtime.health_port"),
    ("robicoin-orders", "runtime:\n  health_port: -1\n", "runtime.health_port"),
]


def config_file(tmp_path: Path, connector: str, extra: str, port: int = 0) -> Path:
    """The connector's base, the common section, then ``extra`` merged per section."""
    import yaml

    data = yaml.safe_load(BASES[connector]) or {}
    data = {**data, **yaml.safe_load(COMMON)}
    data["runtime"]["health_port"] = port
    for section, values in (yaml.safe_load(extra) or {}).items():
        data[section] = {**(data.get(section) or {}), **values}
    path = tmp_path / f"{connector}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize(("connector", "extra", "key"), BAD_VALUES)
def test_a_value_that_cannot_work_is_refused_at_start(
    tmp_path: Path, command: str, connector: str, extra: str, key: str
) -> None:
    path = config_file(tmp_path, connector, extra)
    code, out, _ = cli(command, connector, path, clean_env(**CREDENTIALS))
    assert_refused(code, out, key)


def test_the_base_configs_are_valid(tmp_path: Path) -> None:
    """The cases above fail for their one bad value, not for the base."""
    for connector in BASES:
        path = config_file(tmp_path, connector, "")
        code, out, _ = cli("check-config", connector, path, clean_env(**CREDENTIALS))
        assert code == 0, out


def test_a_health_port_in_use_is_refused_at_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = config_file(tmp_path, "cryptomus-ws", "", port=port)
        code, out, _ = cli("run", "cryptomus-ws", path, clean_env(**CREDENTIALS))
    assert_refused(code, out, "runtime.health_port", str(port), "in use")


def test_a_long_value_is_shown_as_a_bounded_excerpt(tmp_path: Path) -> None:
    long_level = "LOUD" * 5000
    path = config_file(tmp_path, "cryptomus-ws", f"runtime:\n  log_level: {long_level}\n")
    code, out, _ = cli("check-config", "cryptomus-ws", path, clean_env(**CREDENTIALS))
    assert_refused(code, out, "runtime.log_level", "...")
    assert len(out) < 400, out


def _bomb(levels: int = 9, width: int = 9) -> str:
    """``billion laughs``: 9 levels of 9 aliases, about 387 million strings expanded."""
    rows = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    for n in range(1, levels):
        rows.append(f"&l{n} [" + ", ".join([f"*l{n - 1}"] * width) + "]")
    return "[" + ", ".join(rows) + "]"


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_yaml_alias_bomb_in_a_typed_value_is_refused_quickly(
    tmp_path: Path, command: str
) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(f"cryptomus:\n  markets: {_bomb()}\n" + COMMON)
    code, out, took = cli(command, "cryptomus-ws", path, clean_env(**CREDENTIALS), timeout=20)
    assert_refused(code, out, "alias")
    assert "MemoryError" not in out
    assert took < T(5), f"took {took:.1f}s"


# Distinctive values: none of them may appear anywhere in the output.
SECRET_TEXT = "zq-secret-7731-do-not-print"
SECRET_NUMBER = "31415926535897"
SECRET_FLOAT = "2718281.828459"
SECRET_VALUES = [
    ("cryptomus-ws", f"cryptomus:\n  credentials: {{api_key: [{SECRET_TEXT}]}}\n"),
    ("cryptomus-ws", f"cryptomus:\n  credentials: {{api_key: {SECRET_NUMBER}}}\n"),
    ("cryptomus-ws", f"cryptomus:\n  credentials: {{user_id: {{a: {SECRET_TEXT}}}}}\n"),
    ("robicoin-poller", f"robicoin:\n  credentials: {{public_id: {SECRET_NUMBER}}}\n"),
    ("robicoin-poller", f"robicoin:\n  credentials: {{public_key: [{SECRET_TEXT}]}}\n"),
    ("robicoin-orders", f"robicoin:\n  credentials: {{private_key: {{k: {SECRET_TEXT}}}}}\n"),
    ("robicoin-orders", f"robicoin:\n  command_auth: {{secret: {SECRET_NUMBER}}}\n"),
    ("robicoin-orders", f"robicoin:\n  command_auth: {{secret: {SECRET_FLOAT}}}\n"),
    ("cryptomus-ws", f"kafka:\n  client: {{sasl_plain_password: {SECRET_NUMBER}}}\n"),
]


@pytest.mark.parametrize(("connector", "extra"), SECRET_VALUES)
def test_a_secret_of_the_wrong_type_is_named_never_shown(
    tmp_path: Path, connector: str, extra: str
) -> None:
    path = config_file(tmp_path, connector, extra)
    field = extra.split("{", 1)[1].split(":", 1)[0]
    code, out, _ = cli("check-config", connector, path, clean_env())
    assert_refused(code, out, field)
    assert all(s not in out for s in (SECRET_TEXT, SECRET_NUMBER, SECRET_FLOAT)), out


def test_a_secret_from_an_environment_override_is_named_never_shown(tmp_path: Path) -> None:
    path = config_file(tmp_path, "robicoin-poller", "")
    env = clean_env(EXCHANGE_CONNECTORS__ROBICOIN__CREDENTIALS__PUBLIC_ID=SECRET_NUMBER)
    code, out, _ = cli("check-config", "robicoin-poller", path, env)
    assert_refused(code, out, "robicoin.credentials.public_id")
    assert SECRET_NUMBER not in out, out
