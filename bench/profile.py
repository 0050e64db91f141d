"""Where the connector's CPU goes: py-spy samples every thread of the running process.

py-spy runs outside the process (no code in the connector changes) with
``--nonblocking``, so the sampled process is not paused; only threads that are not
idle are sampled. The raw output has one line per distinct stack with its count.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

#: Inclusive shares worth naming (a sample counts for each of these on its stack).
STAGES = (
    ("websockets: read and decode frames", ("websockets/",)),
    ("parse the exchange frame (protocol.parse_frame)", ("parse_frame",)),
    ("encode the record envelope (records.Envelopes)", ("envelope (", "Envelopes.encode (")),
    ("Delivery.send on the event loop (incl. the producer's send)", ("Delivery.send",)),
    ("KafkaProducer.send: batching on the event loop", (";KafkaProducer.send (",)),
    ("kafka-python network thread (requests, acks, callbacks)", ("-network-thread",)),
    ("librdkafka poll thread (delivery callbacks)", ("rdkafka-poll",)),
    ("Prometheus metrics updates", ("prometheus_client/",)),
)


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


class Sampler:
    def __init__(self, pid: int, output: Path, rate: int = 200) -> None:
        self.output = output
        self.proc: subprocess.Popen[bytes] | None = None
        binary = py_spy()
        if binary is None:
            return
        self.proc = subprocess.Popen(
            [
                binary,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                str(output),
                "--nonblocking",
                "--threads",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        with contextlib.suppress(OSError):
            return summarize(self.output.read_text())
        return None


def summarize(raw: str, top: int = 12) -> dict[str, Any]:
    threads: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        total += count
        threads[thread] += count
        leaf = frames[-1]
        name, _, where = leaf.partition(" (")
        leaves[f"{name} ({where.split(':')[0].rstrip(')')})"] += count
        for label, needles in STAGES:
            if any(n in stack for n in needles):
                stages[label] += count
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "threads": {t: round(n / total, 3) for t, n in threads.most_common()},
        "stages": {s: round(stages[s] / total, 3) for s, _ in STAGES if stages[s]},
        "top_self": [(f, round(n / total, 3)) for f, n in leaves.most_common(top)],
    }
