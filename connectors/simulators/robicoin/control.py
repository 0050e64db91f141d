"""What tests and benchmarks use to look inside the Robicoin simulator and to break it.

Thread-safe: every call takes the exchange's lock, so a test thread may call it while the
HTTP handler threads and the activity thread run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from connectors.simulators.robicoin.market import Row, TxRow
from connectors.simulators.robicoin.rules import Exchange, LoggedResponse


class RobicoinControl:
    """Counters and logs of what the clients did and were served, the accounts' state,
    and the faults a test injects."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._market = exchange.market
        self._lock = exchange.lock

    # ---- what the clients did and were served ----------------------------------------

    def counters(self) -> dict[str, Any]:
        """A snapshot: plain dicts and lists, safe to keep and compare."""
        with self._lock:
            data = dataclasses.asdict(self._exchange.counters)
            data["transactions_generated"] = self._market.transactions_generated
            data["blocked_ips"] = sorted(self._exchange.blocked)
            data["unauthorized_by_ip"] = dict(self._exchange.unauthorized_by_ip)
            return data

    @property
    def response_log(self) -> list[LoggedResponse]:
        """The last answers served (at most 10 000), oldest first."""
        with self._lock:
            return list(self._exchange.responses)

    def last_body(self, path: str) -> str | None:
        """Exact text of the last answer for ``path`` (full path or a suffix like
        ``/transaction``), or None if nothing was served there."""
        with self._lock:
            for entry in reversed(self._exchange.responses):
                if entry.path == path or entry.path.endswith(path):
                    return entry.body
        return None

    def transactions(self, public_key: str | None = None) -> list[TxRow]:
        """Every transaction row generated for the account (default one), oldest first."""
        with self._lock:
            return [dict(row) for row in self._market.account(public_key).transactions]

    def open_orders(self, public_key: str | None = None) -> list[Row]:
        """Every open order of the account, newest first, as ``/open-order`` rows."""
        with self._lock:
            return [o.open_row() for o in reversed(self._market.account(public_key).open_orders)]

    def balances(self, public_key: str | None = None) -> list[Row]:
        with self._lock:
            return self._market.balance_rows(self._market.account(public_key))

    def market_orders(self) -> list[Row]:
        """Every open order on the market (all accounts and others), newest first."""
        with self._lock:
            return [o.market_row() for o in self._market.all_open_orders()]

    def orders_created(self) -> list[dict[str, Any]]:
        """Every accepted create-order: the fields as received (``time`` is the client's
        auth field) plus ``received_at`` (server clock) and the ``data_id`` assigned."""
        with self._lock:
            return [dict(r) for r in self._exchange.orders_created]

    def orders_deleted(self) -> list[dict[str, Any]]:
        """Every successful delete-order: fields as received plus ``received_at``."""
        with self._lock:
            return [dict(r) for r in self._exchange.orders_deleted]

    # ---- market and accounts ---------------------------------------------------------

    def burst(self, n: int, same_second: bool = True, public_key: str | None = None) -> list[TxRow]:
        """Add ``n`` transactions at once (all in the current second, or in consecutive
        seconds ending now and never before the previous row) and return them."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            account = self._market.account(public_key)
            now = int(self._market.clock())
            start = now if same_second else max(account.last_tx_ts, now - (n - 1))
            rows = []
            for i in range(n):
                ts = now if same_second else max(start, min(now, start + i))
                rows.append(dict(self._market.add_transaction(account, ts)))
            return rows

    def pause_activity(self) -> None:
        """Stop generating market and account activity (transactions, orders, prices)."""
        with self._lock:
            self._market.paused = True

    def resume_activity(self) -> None:
        with self._lock:
            self._market.paused = False

    def set_key_active(self, public_key: str, active: bool) -> None:
        with self._lock:
            self._market.account(public_key).active = active

    def add_account(self, public_key: str, public_id: str, private_key: str) -> None:
        with self._lock:
            if public_key in self._market.accounts:
                raise ValueError("account already exists")
            self._market.add_account(public_key, public_id, private_key)

    # ---- faults ----------------------------------------------------------------------

    def unblock(self, ip: str | None = None) -> None:
        """Lift the block on ``ip`` (all IPs when None) and forget its failed attempts."""
        with self._lock:
            if ip is None:
                self._exchange.blocked.clear()
                self._exchange.unauthorized_by_ip.clear()
            else:
                self._exchange.blocked.discard(ip)
                self._exchange.unauthorized_by_ip.pop(ip, None)

    def set_create_delay(self, seconds: float) -> None:
        """create-order places the order, then waits this long before answering."""
        if math.isnan(seconds) or seconds < 0:
            raise ValueError("seconds must be >= 0")
        with self._lock:
            self._exchange.faults.create_delay = seconds

    def set_drop_create_response(self, n: int) -> None:
        """The next ``n`` accepted create-orders place the order, then close the
        connection without answering."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._exchange.faults.drop_creates = n

    def fail_next(self, path_suffix: str, status: int, n: int = 1) -> None:
        """Answer the next ``n`` requests whose path ends with ``path_suffix`` (e.g.
        ``/create-order``) with ``status`` (5xx) without doing anything else."""
        if not 500 <= status <= 599 or n < 1:
            raise ValueError("status must be 5xx and n >= 1")
        suffix = path_suffix if path_suffix.startswith("/") else "/" + path_suffix
        with self._lock:
            self._exchange.faults.failures.append([suffix, status, n])

    def set_delete_not_found(self, status: int, payload: object) -> None:
        """How delete-order answers an order that is not open (default ``404 {"error":
        "Order not found"}``). The spec only says "40x" and documents no error body, so
        tests also play e.g. ``400 {"error": "Order not found."}``."""
        if not 400 <= status <= 499 or status in (401, 403):
            raise ValueError("status must be a 4xx other than 401/403")
        with self._lock:
            self._exchange.faults.delete_not_found = (status, payload)

    def refuse_next_deletes(self, status: int, payload: object, n: int = 1) -> None:
        """Answer the next ``n`` authenticated, well-formed delete-orders with a 4xx
        ``status`` and ``payload`` without deleting anything (the order stays open)."""
        if not 400 <= status <= 499 or status in (401, 403) or n < 1:
            raise ValueError("status must be a 4xx other than 401/403, and n >= 1")
        with self._lock:
            self._exchange.faults.refused_deletes.extend([(status, payload)] * n)

    def set_drop_delete_response(self, n: int) -> None:
        """The next ``n`` successful delete-orders delete the order, then close the
        connection without answering."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._exchange.faults.drop_deletes = n
