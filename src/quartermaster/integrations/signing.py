"""Request signatures: an HMAC-SHA256 over the timestamp and the exact body bytes.

The header looks like ``t=1700000000,v1=<hex>`` (the scheme Stripe popularised). The timestamp
is inside the MAC so a captured request cannot be replayed after ``tolerance_s``; the body is
signed as sent, which is why the client encodes JSON once and signs those bytes.

Every request is signed. Outside production a partner without ``QM_<PARTNER>_SIGNING_SECRET``
gets :data:`DEV_SIGNING_SECRET` (public, like ``auth.DEV_SECRET``), which is also what the sandbox
partner of ``quartermaster dev`` checks; production refuses to build a client with it
(``PartnersSettings.signing_secret``).
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "X-QM-Signature"
#: The signing secret of every partner without one of its own, outside production only. It is
#: public (it is in the source), so a signature made with it proves nothing.
DEV_SIGNING_SECRET = "dev-only-insecure-signing-secret-change-me-0123"


def _mac(secret: str, body: bytes, timestamp: int) -> str:
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-QM-Signature`` header value for ``body`` sent at ``timestamp`` (unix seconds)."""
    return f"t={timestamp},v1={_mac(secret, body, timestamp)}"


def verify(secret: str, body: bytes, header: str, now: float, tolerance_s: float = 300) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and is at most ``tolerance_s`` old.

    Several ``v1=`` entries are accepted (any one may match) so a sender can sign with an old
    and a new secret while the secret is being rotated. Comparison is constant-time.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif name == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, body, timestamp)
    # No early exit: every candidate is compared, so timing says nothing about which matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected.encode(), candidate.encode())
    return matched
