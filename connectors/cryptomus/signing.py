"""Cryptomus user-API request signing (pure, no I/O).

``sign = md5_hex(base64(raw_body) + api_key)``; a request without a body signs the
empty string. The exact bytes sent must be the bytes signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def sign(body: bytes, api_key: str) -> str:
    """Return the ``sign`` header for ``body``.

    >>> sign(b'{"market":"TRX_USDT","quantity":"20"}', "fixture-api-key")
    '7a25ed96c474b99df63c8caad23459bc'
    """
    return hashlib.md5(base64.b64encode(body) + api_key.encode("utf-8")).hexdigest()


def signature_matches(body: bytes, api_key: str, claimed: str) -> bool:
    """Constant-time check of a claimed signature (used by the simulator)."""
    return hmac.compare_digest(sign(body, api_key), claimed.strip().lower())
