"""Configuration: typed, validated at start, unknown keys rejected, secrets hidden."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from connectors.cryptomus.config import CryptomusConfig
from connectors.runtime.config import load
from connectors.runtime.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "deploy" / "config" / "cryptomus-ws.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_the_shipped_example_is_valid() -> None:
    cfg = load(CryptomusConfig, EXAMPLE, environ={})
    assert cfg.cryptomus.markets == ["BTC_USDT", "ETH_USDT"]
    assert cfg.kafka.replication_factor == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cryptomus:\n  marketz: all\n", "unknown key 'marketz'"),
        ("kafka:\n  bootstrap_servers: 9092\n", "expected a string"),
        ("cryptomus:\n  channels: [trades]\n", "unknown trades"),
        ("cryptomus:\n  ping_interval_s: 70\n", "60 s idle limit"),
        ("kafka:\n  client: {acks: 1}\n", "set by the connector"),
        ("kafka:\n  client: {sasl_pasword: x}\n", "unknown kafka-python setting"),
        ("runtime:\n  health_port: eighty\n", "expected an integer"),
        ("- just\n- a list\n", "must hold a mapping"),
    ],
)
def test_mistakes_are_refused_with_the_key_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(CryptomusConfig, write(tmp_path, text), environ={})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "cryptomus:\n  markets: all\nkafka:\n  bootstrap_servers: a:1\n")
    cfg = load(
        CryptomusConfig,
        path,
        environ={
            "KAFKA_BOOTSTRAP_SERVERS": "b:2",
            "EXCHANGE_CONNECTORS__CRYPTOMUS__MARKETS": "[TRX_USDT]",
            "EXCHANGE_CONNECTORS__KAFKA__LINGER_MS": "20",
        },
    )
    assert cfg.kafka.bootstrap_servers == "b:2"
    assert cfg.cryptomus.markets == ["TRX_USDT"]
    assert cfg.kafka.linger_ms == 20


def test_credentials_come_from_files_and_never_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CRYPTOMUS_USER_ID", raising=False)
    monkeypatch.delenv("CRYPTOMUS_API_KEY", raising=False)
    (tmp_path / "uid").write_text("uid-very-secret\n")
    (tmp_path / "key").write_text("key-very-secret\n")
    path = write(
        tmp_path,
        f"cryptomus:\n  credentials:\n    user_id_file: {tmp_path / 'uid'}\n"
        f"    api_key_file: {tmp_path / 'key'}\n"
        "kafka:\n  client: {sasl_plain_password: kafka-very-secret}\n",
    )
    cfg = load(CryptomusConfig, path, environ={})
    user, key = cfg.cryptomus.credentials.resolve()
    assert (user.reveal(), key.reveal()) == ("uid-very-secret", "key-very-secret")
    shown = repr(cfg) + str(user) + str(key)
    assert "very-secret" not in shown


def test_missing_credentials_are_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRYPTOMUS_USER_ID", raising=False)
    monkeypatch.delenv("CRYPTOMUS_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="CRYPTOMUS_USER_ID"):
        CryptomusConfig().cryptomus.credentials.resolve()


def test_cli_check_config_and_list(tmp_path: Path) -> None:
    env_ok = {"CRYPTOMUS_USER_ID": "u", "CRYPTOMUS_API_KEY": "k", "PATH": ""}
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "connectors",
            "check-config",
            "cryptomus-ws",
            "--config",
            str(EXAMPLE),
        ],
        env=env_ok,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "connectors",
            "check-config",
            "cryptomus-ws",
            "--config",
            str(write(tmp_path, "cryptomus:\n  typo: 1\n")),
        ],
        env=env_ok,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown key 'typo'" in bad.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "connectors", "list"], capture_output=True, text=True, timeout=60
    )
    assert "cryptomus-ws" in listed.stdout


ROBICOIN_EXAMPLE = EXAMPLE.parent / "robicoin-poller.yaml"


def test_the_shipped_robicoin_example_is_valid() -> None:
    from connectors.robicoin.config import RobicoinConfig

    cfg = load(RobicoinConfig, ROBICOIN_EXAMPLE, environ={})
    assert cfg.robicoin.rate_limit.share.slots == 2
    assert cfg.robicoin.streams.ticker.windows == ["24h", "1min", "1hour"]
    assert cfg.robicoin.credentials.private_key is None  # never in the file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("robicoin:\n  timezone: Mars/Olympus\n", "unknown zone"),
        ("robicoin:\n  streams: {ticker: {windows: [5min]}}\n", "ticker.windows"),
        ("robicoin:\n  rate_limit: {ticker: {count: 12, window_s: 0.1}}\n", "10 per 100 ms"),
        ("robicoin:\n  rate_limit: {other: {count: 1, window_s: 0.05}}\n", "1 per 100 ms"),
        ("robicoin:\n  rate_limit: {share: {slots: 2, slot: 2}}\n", "slot must be"),
        ("robicoin:\n  auth_guard: {limit: 9}\n", "between 1 and 5"),
        ("robicoin:\n  streams: {balance: {emit: sometimes}}\n", "not one of"),
        ("robicoin:\n  base_url: ftp://x\n", "http"),
    ],
)
def test_robicoin_mistakes_are_refused(tmp_path: Path, text: str, message: str) -> None:
    from connectors.robicoin.config import RobicoinConfig
    from connectors.robicoin.streams import RobicoinPolling

    with pytest.raises(ConfigError, match=message):
        cfg = load(RobicoinConfig, write(tmp_path, text), environ={})
        RobicoinPolling(cfg)


def test_robicoin_private_streams_need_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connectors.robicoin.config import RobicoinConfig
    from connectors.robicoin.streams import RobicoinPolling

    for name in ("ROBICOIN_PUBLIC_KEY", "ROBICOIN_PUBLIC_ID", "ROBICOIN_PRIVATE_KEY"):
        monkeypatch.delenv(name, raising=False)
    cfg = load(RobicoinConfig, write(tmp_path, "robicoin: {}\n"), environ={})
    with pytest.raises(ConfigError, match="ROBICOIN_PUBLIC_KEY"):
        RobicoinPolling(cfg)
    # A ticker-only poller needs none.
    text = "robicoin:\n  streams: {order: {enabled: false}, balance: {enabled: false}, "
    text += "transaction: {enabled: false}, open_order: {enabled: false}}\n"
    poller = RobicoinPolling(load(RobicoinConfig, write(tmp_path, text), environ={}))
    assert poller.guard_spec() is None


def test_the_shipped_order_sink_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.robicoin.sink import RobicoinOrders
    from connectors.robicoin.sink_config import OrderSinkConfig

    cfg = load(OrderSinkConfig, EXAMPLE.parent / "robicoin-orders.yaml", environ={})
    assert cfg.robicoin.rate_limit.share.slot == 1  # the poller's example takes slot 0
    assert cfg.robicoin.command_auth.required
    for name, value in (
        ("ROBICOIN_PUBLIC_KEY", "k"),
        ("ROBICOIN_PUBLIC_ID", "1"),
        ("ROBICOIN_PRIVATE_KEY", "p"),
        ("ROBICOIN_COMMAND_HMAC_SECRET", "s"),
    ):
        monkeypatch.setenv(name, value)
    sink = RobicoinOrders(cfg)
    assert sink.policy.require_signature
    assert sink.guard_spec().topic == "robicoin.auth-guard"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("robicoin:\n  risk: {max_notional: lots}\n", "not a decimal"),
        ("robicoin:\n  risk: {max_amount: {btc-try: '-1'}}\n", "positive"),
        ("robicoin:\n  pairs: []\n", "list the pairs"),
        ("robicoin:\n  max_send_attempts: 0\n", "at least 1"),
    ],
)
def test_order_sink_mistakes_are_refused(tmp_path: Path, text: str, message: str) -> None:
    from connectors.robicoin.sink_config import OrderSinkConfig

    with pytest.raises(ConfigError, match=message):
        load(OrderSinkConfig, write(tmp_path, text), environ={})


def test_an_error_quotes_a_bounded_excerpt_even_of_a_huge_shared_value() -> None:
    """A value built from shared references (what YAML aliases give) expands to about
    387 million strings; the error must neither format it in full nor walk it."""
    import time

    from connectors.runtime.config import build
    from connectors.testing import T

    level: list[object] = ["lol"] * 9
    for _ in range(8):
        level = [level] * 9
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"cryptomus\.markets") as info:
        build(CryptomusConfig, {"cryptomus": {"markets": level}})
    assert time.monotonic() - started < T(1.0)
    message = str(info.value)
    assert "..." in message and len(message) < 200


def test_yaml_aliases_of_a_normal_size_still_work(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "cryptomus:\n  markets: &m [BTC_USDT, ETH_USDT]\n  balance_currencies: *m\n",
    )
    cfg = load(CryptomusConfig, path, environ={})
    assert cfg.cryptomus.balance_currencies == ["BTC_USDT", "ETH_USDT"]


def test_a_secret_given_as_a_number_is_named_not_shown(tmp_path: Path) -> None:
    from connectors.robicoin.config import RobicoinConfig

    path = write(tmp_path, "robicoin:\n  credentials: {public_id: 8675309123}\n")
    with pytest.raises(ConfigError, match=r"robicoin\.credentials\.public_id") as info:
        load(RobicoinConfig, path, environ={})
    assert "8675309123" not in str(info.value)
