"""Robicoin request signing (pure, no I/O).

Every POST carries ``public_key``, ``public_id``, ``time`` (Unix seconds) and
``hash = md5(public_key . public_id . time . md5(private_key))`` as form fields,
lowercase hex, ``.`` being string concatenation (the spec's PHP).
"""

from __future__ import annotations

import hashlib
import hmac


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def sign(public_key: str, public_id: str, time_s: int, private_key: str) -> str:
    """The ``hash`` field.

    >>> sign("PUBKEY", "42", 1524922783, "SECRET")
    'cc7c90d68f4e112488b26cc28b4143e3'
    """
    return _md5(f"{public_key}{public_id}{time_s}{_md5(private_key)}")


def secret_values(public_key: str, public_id: str, private_key: str) -> tuple[str, ...]:
    """Everything that must never be shown: the three credentials, and
    ``md5(private_key)``, which is all a forger needs to sign (see :func:`sign`)."""
    return (private_key, _md5(private_key), public_key, public_id)


def auth_fields(public_key: str, public_id: str, private_key: str, now_s: int) -> dict[str, str]:
    """The four fields every POST must carry, for the time ``now_s``."""
    return {
        "public_key": public_key,
        "public_id": public_id,
        "time": str(now_s),
        "hash": sign(public_key, public_id, now_s, private_key),
    }


def hash_matches(
    public_key: str, public_id: str, time_field: str, private_key: str, claimed: str
) -> bool:
    """Constant-time check of a claimed hash (used by the simulator)."""
    expected = _md5(f"{public_key}{public_id}{time_field}{_md5(private_key)}")
    return hmac.compare_digest(expected, claimed.strip().lower())
