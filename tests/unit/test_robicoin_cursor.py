"""The poller's cursor against bursty exchanges: rows shown are written as often as shown.

Robicoin's ``/transaction`` answers with the last 25 rows, newest first, no ids,
second-resolution times, and identical rows are legal (one order filled by several equal
fills in one second). These tests play such an exchange offline, poll it at arbitrary
moments and feed every answer to :func:`protocol.advance`, as the poller does (the cursor
goes through its JSON form at every poll, as it does through the state topic).

The contract checked at every poll, against what the exchange really added since the
previous poll:

* no gap claimed  → exactly the rows added, in order, each as many times as it was added;
* gap claimed     → only when the answer is consistent with a full window's worth of new
  rows (it is full and none of it is older than the previous poll's newest second) *and*
  the overlap with the previous answer does not rule that out: there is no overlap, it
  is not unique, or new rows could too easily have repeated it (a single repeated row: a
  run of equal fills that went on); and even then nothing is written twice, and every
  row shown is written when more than a window's worth arrived and that was clear.
"""

from __future__ import annotations

import bisect
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.robicoin import protocol
from connectors.robicoin.protocol import Cursor

WINDOW = protocol.WINDOW_ROWS
EPOCH = datetime(2026, 1, 1, 10, 0, 0)


def tx(second: int, event: int) -> dict[str, Any]:
    """One movement: ``event`` names what happened (its amount), copies are identical."""
    stamp = (EPOCH + timedelta(seconds=second)).strftime("%Y-%m-%d %H:%M:%S")
    return {
        "zone": "taker",
        "type": "btc-try",
        "amount": f"{event}.00000000",
        "price": "100.00000000",
        "total": f"{event * 100}.00000000",
        "fee": "0.10000000",
        "status": "approved",
        "txid": None,
        "updated_at": stamp,
        "created_at": stamp,
    }


def answer(history: list[dict[str, Any]], upto: int) -> list[dict[str, Any]]:
    """What the exchange shows after its first ``upto`` rows: the last 25, newest first."""
    return list(reversed(history[max(0, upto - WINDOW) : upto]))


def restored(cursor: Cursor) -> Cursor:
    return Cursor.from_json(json.loads(json.dumps(cursor.to_json())))


def is_subsequence(small: list[Any], big: list[Any]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


# -- the cases ----------------------------------------------------------------------


def test_one_row_served_three_times_is_written_three_times() -> None:
    # 25 rows of one second on screen, the oldest of them ``a``; then two more copies of
    # ``a`` arrive in the same second: the exchange has shown ``a`` three times.
    a = tx(5, 999)
    history = [tx(4, i) for i in range(10)] + [a] + [tx(5, i) for i in range(100, 124)]
    first = protocol.advance(Cursor(), answer(history, len(history)), "created_at")
    history += [a, a]
    second = protocol.advance(restored(first.cursor), answer(history, len(history)), "created_at")
    written = first.new_rows + second.new_rows
    assert written.count(a) == 3
    assert second.new_rows == [a, a]
    assert not second.gap


def test_one_new_row_in_a_busy_second_is_written_without_a_gap() -> None:
    # A burst fills the window with one second; one more row of that second arrives,
    # identical to the row that just scrolled out of the window.
    y = tx(7, 500)
    history = [tx(6, i) for i in range(5)] + [y] + [tx(7, i) for i in range(24)]
    first = protocol.advance(Cursor(), answer(history, len(history)), "created_at")
    history.append(y)
    second = protocol.advance(restored(first.cursor), answer(history, len(history)), "created_at")
    assert second.new_rows == [y]
    assert not second.gap


def test_a_burst_sharing_a_second_with_rows_already_written_is_counted() -> None:
    # 15 rows of second 9 were written; 20 more of second 9 arrive (copies of those
    # among them): 35 rows of second 9 now, the window shows the last 25 of them.
    history = [tx(8, i) for i in range(10)] + [tx(9, i) for i in range(15)]
    first = protocol.advance(Cursor(), answer(history, len(history)), "created_at")
    burst = [tx(9, 13), tx(9, 14), tx(9, 14)] + [tx(9, i) for i in range(50, 67)]
    history += burst
    second = protocol.advance(restored(first.cursor), answer(history, len(history)), "created_at")
    assert second.new_rows == burst
    assert not second.gap


def test_a_burst_larger_than_the_window_in_the_same_second_is_a_gap_with_every_row_shown() -> None:
    history = [tx(8, i) for i in range(20)] + [tx(9, i) for i in range(5)]
    first = protocol.advance(Cursor(), answer(history, len(history)), "created_at")
    burst = [tx(9, i) for i in range(50, 90)]  # 40 rows in the same second
    history += burst
    second = protocol.advance(restored(first.cursor), answer(history, len(history)), "created_at")
    assert second.gap
    assert second.new_rows == burst[-WINDOW:]


def test_a_run_of_identical_rows_that_fills_the_window_cannot_be_counted_and_says_so() -> None:
    # 25 identical fills on screen, then more identical fills: the answer looks the same
    # whether 0, 3 or 30 arrived. Write nothing twice, and claim the gap.
    a = tx(3, 1)
    history = [tx(2, 0)] + [a] * 25
    first = protocol.advance(Cursor(), answer(history, len(history)), "created_at")
    history += [a] * 3
    second = protocol.advance(restored(first.cursor), answer(history, len(history)), "created_at")
    assert second.gap
    assert second.new_rows == []


def test_a_window_that_reaches_back_is_counted_and_claims_no_gap() -> None:
    history = [tx(1, i) for i in range(10)] + [tx(2, 7), tx(2, 7)]
    first = protocol.advance(Cursor(), answer(history, len(history)), "created_at")
    history += [tx(2, 7), tx(2, 8)] + [tx(3, i) for i in range(5)]
    second = protocol.advance(restored(first.cursor), answer(history, len(history)), "created_at")
    assert second.new_rows == history[12:]
    assert not second.gap


def test_a_full_window_after_empty_answers_is_a_gap() -> None:
    # The poller started on an account with no movements; 30 arrive before the next poll.
    first = protocol.advance(Cursor(), [], "created_at")
    assert first.new_rows == [] and not first.gap
    history = [tx(4, i) for i in range(30)]
    second = protocol.advance(restored(first.cursor), answer(history, 30), "created_at")
    assert second.gap
    assert second.new_rows == history[-WINDOW:]


# -- stored form: old cursors are still read ------------------------------------------------


def test_a_cursor_stored_by_the_previous_version_is_read_and_upgraded() -> None:
    history = [tx(1, i) for i in range(10)] + [tx(2, 7), tx(2, 7)]
    old = {"newest": "2026-01-01 10:00:02", "seen": {protocol.row_fingerprint(tx(2, 7)): 2}}
    history += [tx(2, 7), tx(3, 1)]
    step = protocol.advance(Cursor.from_json(old), answer(history, len(history)), "created_at")
    assert step.new_rows == [tx(2, 7), tx(3, 1)]
    assert not step.gap
    stored = step.cursor.to_json()
    # The new form keeps what the previous version reads (a downgrade still works) ...
    assert stored["newest"] == "2026-01-01 10:00:03"
    assert stored["seen"] == {protocol.row_fingerprint(tx(3, 1)): 1}
    # ... and from now on the cursor knows the order of the newest second's rows.
    history += [tx(3, 1)] * 2
    later = protocol.advance(restored(step.cursor), answer(history, len(history)), "created_at")
    assert later.new_rows == [tx(3, 1)] * 2


def test_open_orders_that_disappear_are_not_written_again() -> None:
    # The market's order list is not append-only: orders leave it, older ones scroll in.
    first_rows = [tx(1, i) for i in range(3)] + [tx(2, 10), tx(2, 11)]
    first = protocol.advance(Cursor(), list(reversed(first_rows)), "created_at", append_only=False)
    now = [tx(1, 0), tx(1, 2), tx(2, 10), tx(2, 12)]  # 1:1 and 2:11 filled, 2:12 new
    step = protocol.advance(
        restored(first.cursor), list(reversed(now)), "created_at", append_only=False
    )
    assert step.new_rows == [tx(2, 12)]
    assert not step.gap


# -- property: arbitrary poll moments over bursty histories ---------------------------------


@st.composite
def bursty_histories(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[int]]:
    """A history of seconds, each with events; an event is one movement written 1-4 times
    in a row (equal fills). Distinct events differ. Polls at arbitrary row counts (a poll
    can fall inside a burst), possibly twice at the same count."""
    history: list[dict[str, Any]] = []
    second = 0
    event = 0
    for _ in range(draw(st.integers(1, 12))):
        second += draw(st.integers(0, 2))
        for copies in draw(st.lists(st.integers(1, 4), min_size=0, max_size=16)):
            event += 1
            history += [tx(second, event)] * copies
    if not history:
        history = [tx(second, 0)]
    n = len(history)
    polls = sorted(draw(st.lists(st.integers(1, n), min_size=1, max_size=40)))
    return history, [*polls, n]


def ambiguous(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> bool:
    """Oracle: the current answer (oldest first) overlaps the previous one in more than
    one way, or in one way that new rows could too easily have produced by repeating the
    rows written last (the contract of :func:`protocol.coincidence`)."""
    previous = [protocol.row_fingerprint(r) for r in before]
    current = [protocol.row_fingerprint(r) for r in after]
    fits = [
        k
        for k in range(min(len(previous), len(current)), 0, -1)
        if previous[len(previous) - k :] == current[:k]
    ]
    if len(fits) != 1:
        return len(fits) > 1
    second = before[-1]["created_at"]
    tail = [fp for fp, r in zip(previous, before, strict=True) if r["created_at"] == second]
    now = [fp for fp, r in zip(current, after, strict=True) if r["created_at"] == second]
    # Chance that new rows repeat the overlap: each row's share of that second's rows.
    rows = Counter(tail + now[fits[0] :])
    chance = 1.0
    for fp in now[: fits[0]]:
        chance *= rows[fp] / sum(rows.values())
    return chance > protocol.COINCIDENCE


@dataclass
class Tally:
    polls: int = 0
    rows: int = 0
    gaps: int = 0
    needless_gaps: int = 0  # claimed although fewer than a window's worth arrived
    dropped_outside_gaps: int = 0
    dropped_inside_gaps: int = 0
    duplicates: int = 0
    shown_but_not_written: int = 0  # new rows the answer showed, not written
    same_second_overlaps: int = 0  # polls whose answer began inside the previous newest second


def drive(
    history: list[dict[str, Any]],
    polls: list[int],
    advance: Callable[..., Any] = protocol.advance,
    cursor_type: Any = Cursor,
    check: bool = True,
) -> Tally:
    """Poll ``history`` after each count in ``polls``; check (or just count) the contract."""
    tally = Tally()
    cursor = cursor_type()
    previous_upto: int | None = None
    for upto in polls:
        shown = answer(history, upto)
        cursor = cursor_type.from_json(json.loads(json.dumps(cursor.to_json())))
        step = advance(cursor, shown, "created_at")
        cursor = step.cursor
        tally.polls += 1
        if previous_upto is None:
            # First poll: what the window shows is all there is to write.
            assert step.new_rows == list(reversed(shown)) and not step.gap
            previous_upto = upto
            continue
        arrived = history[previous_upto:upto]
        written = step.new_rows
        before = list(reversed(answer(history, previous_upto)))
        after = list(reversed(shown))
        overlap = max(0, previous_upto - max(0, upto - WINDOW))
        if before and after and after[0]["created_at"] == before[-1]["created_at"]:
            tally.same_second_overlaps += 1
        tally.rows += len(arrived)
        arrived_n = Counter(map(protocol.row_text, arrived))
        written_n = Counter(map(protocol.row_text, written))
        extra, missing = written_n - arrived_n, arrived_n - written_n
        tally.duplicates += sum(extra.values())
        shown_new = Counter(map(protocol.row_text, after[overlap:]))
        tally.shown_but_not_written += sum((shown_new - written_n).values())
        if step.gap:
            tally.gaps += 1
            tally.dropped_inside_gaps += sum(missing.values())
            tally.needless_gaps += len(arrived) < WINDOW
        else:
            tally.dropped_outside_gaps += sum(missing.values())
        if check:
            if not step.gap:
                assert written == arrived, f"poll at {upto}: written != arrived"
            else:
                assert is_subsequence(written, arrived), f"poll at {upto}: wrote an old row"
                reaches_back = len(shown) < WINDOW or (
                    bool(before) and after[0]["created_at"] < before[-1]["created_at"]
                )
                assert not reaches_back, f"poll at {upto}: gap although the window reached back"
                unsure = ambiguous(before, after)
                assert len(arrived) >= WINDOW or unsure, f"poll at {upto}: needless gap"
                if not unsure:  # more than a window arrived: all of it is new
                    assert written == after, f"poll at {upto}: a shown new row was not written"
        previous_upto = upto
    return tally


@settings(max_examples=400, deadline=None)
@given(bursty_histories())
def test_bursty_history_polled_at_any_moment_keeps_the_contract(
    case: tuple[list[dict[str, Any]], list[int]],
) -> None:
    history, polls = case
    drive(history, polls)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 2)), min_size=1, max_size=120),
    st.lists(st.integers(1, 120), min_size=1, max_size=40),
)
def test_whatever_the_rows_nothing_is_ever_written_twice(
    steps: list[tuple[int, int]], poll_at: list[int]
) -> None:
    """Rows drawn from three values, so coincidences abound: some cannot be told apart
    and may be missed (with or without a gap there), but never written twice."""
    history: list[dict[str, Any]] = []
    second = 0
    for advance_by, value in steps:
        second += advance_by
        history.append(tx(second, value))
    polls = sorted({min(p, len(history)) for p in poll_at} | {len(history)})
    cursor = Cursor()
    written: list[dict[str, Any]] = []
    previous = 0
    for upto in polls:
        step = protocol.advance(restored(cursor), answer(history, upto), "created_at")
        assert is_subsequence(step.new_rows, history[max(previous, upto - WINDOW) : upto])
        written += step.new_rows
        cursor, previous = step.cursor, upto
    assert is_subsequence(written, history)


# -- a simulated exchange in real (simulated) time ------------------------------------------


def bursty_exchange(
    seed: int, seconds: int = 600, pool: int = 0
) -> tuple[list[dict[str, Any]], list[int]]:
    """An account trading in simulated time: background fills (some as 2-4 equal fills),
    and every ~20 s a burst of 40 rows inside one second, inserted in a few chunks, with
    identical copies among them (``pool`` > 0: each burst fill is one of ``pool`` rows,
    so copies also recur apart). The poller asks every 0.6-1.6 s, and now and then
    pauses 5-40 s (a restart, an outage). Returns the history and the row count at
    each poll."""
    rng = random.Random(seed)
    stamped: list[tuple[float, int, int]] = []  # (insert time, second, event)
    event = 0
    t = 0.0
    while True:
        t += rng.expovariate(0.8)
        if t >= seconds:
            break
        event += 1
        copies = 1 if rng.random() < 0.7 else rng.randint(2, 4)
        stamped += [(t, int(t), event)] * copies
    for start in range(5, seconds, 20):
        second = start + rng.randint(0, 10)
        chunks = sorted(rng.uniform(second, second + 0.999) for _ in range(rng.randint(1, 4)))
        left = 40
        while left > 0:
            event += 1 if not pool else 0
            if pool:
                event = 10_000_000 + rng.randrange(pool)
            copies = min(left, 1 if rng.random() < 0.6 else rng.randint(2, 5))
            stamped += [(rng.choice(chunks), second, event)] * copies
            left -= copies
    stamped.sort(key=lambda r: r[0])  # stable: copies of an event stay together
    times = [r[0] for r in stamped]
    history = [tx(s, e) for _, s, e in stamped]
    polls: list[int] = []
    now = rng.uniform(0, 1)
    while now < seconds:
        polls.append(bisect.bisect_right(times, now))
        now += rng.uniform(5, 40) if rng.random() < 0.01 else rng.uniform(0.6, 1.6)
    return history, polls


def test_bursty_simulated_runs_drop_nothing_outside_written_gaps() -> None:
    total = Tally()
    for seed, pool in [(0, 0), (1, 0), (2, 0), (3, 8), (4, 20)]:
        history, polls = bursty_exchange(seed, pool=pool)
        tally = drive(history, polls)
        for name in vars(total):
            setattr(total, name, getattr(total, name) + getattr(tally, name))
    # The runs must really have exercised bursts across polls and real overflows.
    assert total.same_second_overlaps >= 20
    assert total.gaps >= 1
    assert total.dropped_outside_gaps == 0
    assert total.duplicates == 0


if __name__ == "__main__":  # the figure for the issue: python tests/unit/test_robicoin_cursor.py
    import sys

    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    pool = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    total = Tally()
    for seed in range(runs):
        history, polls = bursty_exchange(seed, pool=pool)
        tally = drive(history, polls, check=False)
        for name in vars(total):
            setattr(total, name, getattr(total, name) + getattr(tally, name))
    print(f"{runs} runs x 600 simulated s, pool {pool}: {total}")
