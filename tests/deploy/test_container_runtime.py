"""What the container image promises, checked without a Docker engine: a connector
runs as a non-root user, with no capabilities, on a read-only root filesystem (a
private mount namespace remounts ``/`` read-only), and SIGTERM drains it cleanly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from connectors.runtime.broker import free_port
from connectors.simulators.cryptomus import CryptomusSimulator
from connectors.simulators.harness import Harness
from connectors.testing import T, read_topic, ready, unique, wait_until

pytestmark = pytest.mark.e2e

USER = "user-ro-0001"
KEY = "apikey-ro-secret"
NOBODY = "65534"
#: Remount / read-only in a private mount namespace, then drop to the given user with
#: no capabilities at all, then exec the connector ("$@").
READ_ONLY_ROOT = (
    "mount --bind / / && mount -o remount,bind,ro / && "
    'exec setpriv --reuid="$UID_TO" --regid="$UID_TO" --clear-groups '
    '--inh-caps=-all --bounding-set=-all "$@"'
)


def _jail(argv: list[str]) -> list[str]:
    """``argv`` in a private mount namespace with ``/`` read-only, as ``$UID_TO``."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        READ_ONLY_ROOT,
        "sh",
        *argv,
    ]


@pytest.fixture(scope="module")
def jail_user() -> str:
    """The user the jailed connector runs as: nobody when it can read the interpreter
    and the package; otherwise root without a single capability."""
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
        pytest.skip("needs root, unshare and setpriv to build a read-only mount namespace")
    probe = [sys.executable, "-c", "import connectors.cli"]
    for uid in (NOBODY, "0"):
        proc = subprocess.run(
            _jail(probe), env=dict(os.environ, UID_TO=uid), capture_output=True, text=True
        )
        if proc.returncode == 0:
            return uid
    pytest.skip(f"cannot build a read-only mount namespace here: {proc.stderr.strip()}")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can read (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="ro-root-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_connector_runs_read_only_non_root_and_drains_on_sigterm(
    jail_user: str, shared_dir: Path, kafka_bootstrap: str
) -> None:
    port = free_port()
    prefix = unique()
    with Harness(CryptomusSimulator(updates_per_second=20.0, accounts={USER: KEY})) as sim:
        config = shared_dir / "config.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "cryptomus": {
                        "ws_url": sim.ws_url,
                        "api_url": sim.base_url,
                        "scales_url": sim.base_url,
                        "markets": ["BTC_USDT"],
                        "channels": ["trade", "ticker"],
                        "topics": {"trade": f"{prefix}.trades", "ticker": f"{prefix}.tickers"},
                    },
                    "kafka": {"bootstrap_servers": kafka_bootstrap, "linger_ms": 3000},
                    "runtime": {"health_host": "127.0.0.1", "health_port": port},
                }
            )
        )
        config.chmod(0o644)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/nonexistent",
            "UID_TO": jail_user,
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "CRYPTOMUS_USER_ID": USER,
            "CRYPTOMUS_API_KEY": KEY,
        }
        argv = [sys.executable, "-m", "connectors", "run", "cryptomus-ws", "--config", str(config)]
        proc = subprocess.Popen(
            _jail(argv),
            env=env,
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_until(lambda: ready(port) or proc.poll() is not None, T(30), "ready")
            assert proc.poll() is None, proc.communicate()[0]
            # The process really is the unprivileged one, on a read-only root.
            status = Path(f"/proc/{proc.pid}/status").read_text()
            uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
            assert uid_line.split()[1:] == [jail_user] * 4
            cap_eff = next(ln for ln in status.splitlines() if ln.startswith("CapEff:"))
            assert int(cap_eff.split()[1], 16) == 0
            # Its root filesystem refuses writes (seen through the process's own root).
            with pytest.raises(OSError) as refused:
                Path(f"/proc/{proc.pid}/root/{prefix}.probe").write_text("x")
            assert refused.value.errno == errno.EROFS
            wait_until(lambda: sim.control.counters()["trades_sent"] >= 10, T(20), "trades")
            sim.control.pause_updates()
            sent = sim.control.counters()["trades_sent"]
            # Records are still lingering in the producer: SIGTERM must flush them.
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=T(30))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, out
    assert "Read-only file system" not in out and "Permission denied" not in out, out
    trades = [
        r
        for r in read_topic(kafka_bootstrap, f"{prefix}.trades", timeout=T(15))
        if json.loads(r.value)["kind"] == "event"
    ]
    assert len(trades) == sent
