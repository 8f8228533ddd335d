"""Bearer tokens: who is calling (JWT, HS256, secret from ``QM_AUTH_SECRET``).

A token carries the caller's role (ADMIN, STAFF, CUSTOMER), the customer id for customers, and
an expiry. Nothing else about the caller is trusted or looked up per request, so checking a
token costs one HMAC and no database round trip.
"""

from __future__ import annotations

import enum
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import jwt

ISSUER = "quartermaster"
AUDIENCE = "quartermaster-api"
ALGORITHM = "HS256"
#: The development secret: refused when QM_ENV=production (see config.AuthSettings).
DEV_SECRET = "dev-only-insecure-secret-change-me-0123456789"
MIN_SECRET_LENGTH = 32


class Role(enum.Enum):
    ANONYMOUS = "ANONYMOUS"
    CUSTOMER = "CUSTOMER"
    STAFF = "STAFF"
    ADMIN = "ADMIN"


@dataclass(frozen=True)
class Principal:
    """The caller of one request (or of one WebSocket connection)."""

    role: Role
    customer_id: int | None = None
    subject: str | None = None
    expires_at: float | None = None

    @property
    def is_staff(self) -> bool:
        return self.role in (Role.STAFF, Role.ADMIN)

    @property
    def rate_key(self) -> str | None:
        """The rate-limit bucket of an authenticated caller (None: use the client address)."""
        return f"sub:{self.subject}" if self.subject else None


ANONYMOUS = Principal(Role.ANONYMOUS)


class AuthenticationError(Exception):
    """A token that is malformed, tampered with, expired or otherwise unusable."""

    def __init__(self, message: str, code: str = "UNAUTHENTICATED") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def mint_token(
    secret: str,
    role: Role,
    *,
    customer_id: int | None = None,
    ttl_s: int = 3600,
    subject: str | None = None,
    now: float | None = None,
) -> str:
    if role is Role.ANONYMOUS:
        raise ValueError("anonymous callers have no token")
    if role is Role.CUSTOMER and customer_id is None:
        raise ValueError("a CUSTOMER token needs a customer id")
    if role is not Role.CUSTOMER and customer_id is not None:
        raise ValueError("only CUSTOMER tokens carry a customer id")
    if ttl_s <= 0:
        raise ValueError("the time to live must be positive")
    issued = int(now if now is not None else time.time())
    claims: dict[str, object] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": subject or (f"customer:{customer_id}" if customer_id else f"{role.value.lower()}:"
                           + uuid.uuid4().hex[:12]),
        "role": role.value,
        "iat": issued,
        "exp": issued + ttl_s,
        "jti": uuid.uuid4().hex,
    }  # fmt: skip
    if customer_id is not None:
        claims["cid"] = customer_id
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


#: Tokens already verified (secret, token) → principal: a client sends the same token with
#: every request, and the signature check and claim parsing cost more than the rest of a small
#: query's authentication. Only valid tokens enter; expiry is checked again on every hit.
_VERIFIED: OrderedDict[tuple[str, str, float], Principal] = OrderedDict()
VERIFIED_CACHE_SIZE = 4096


def decode_token(secret: str, token: str, *, leeway_s: float = 5.0) -> Principal:
    """The principal of a valid token; ``AuthenticationError`` (with a clear message) if not."""
    key = (secret, token, leeway_s)
    cached = _VERIFIED.get(key)
    if cached is not None:
        if cached.expires_at is not None and time.time() > cached.expires_at + leeway_s:
            _VERIFIED.pop(key, None)
            raise AuthenticationError("The token has expired; get a new one.", "TOKEN_EXPIRED")
        _VERIFIED.move_to_end(key)
        return cached
    principal = _verify(secret, token, leeway_s)
    _VERIFIED[key] = principal
    if len(_VERIFIED) > VERIFIED_CACHE_SIZE:
        _VERIFIED.popitem(last=False)
    return principal


def _verify(secret: str, token: str, leeway_s: float) -> Principal:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=leeway_s,
            options={"require": ["exp", "iat", "sub", "role"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthenticationError("The token has expired; get a new one.", "TOKEN_EXPIRED") from exc
    except jwt.InvalidSignatureError as exc:
        raise AuthenticationError("The token's signature is not valid.") from exc
    except jwt.PyJWTError as exc:
        raise AuthenticationError(f"The token is not valid: {exc}.") from exc
    try:
        role = Role(claims["role"])
    except ValueError as exc:
        raise AuthenticationError("The token names an unknown role.") from exc
    customer_id = claims.get("cid")
    if role is Role.ANONYMOUS or (role is Role.CUSTOMER) != isinstance(customer_id, int):
        raise AuthenticationError("The token's role and customer do not fit together.")
    return Principal(
        role=role,
        customer_id=customer_id if role is Role.CUSTOMER else None,
        subject=str(claims["sub"]),
        expires_at=float(claims["exp"]),
    )


_BEARER = re.compile(r"^\s*Bearer\s+(\S+)\s*$", re.IGNORECASE)


def principal_from_header(secret: str, authorization: str | None) -> Principal:
    """The caller named by an ``Authorization`` header; anonymous when there is none."""
    if not authorization:
        return ANONYMOUS
    match = _BEARER.match(authorization)
    if match is None:
        raise AuthenticationError("Use `Authorization: Bearer <token>`.")
    return decode_token(secret, match.group(1))


_TTL = re.compile(r"^(\d+)([smhd]?)$")


def parse_ttl(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d`` → seconds."""
    match = _TTL.match(text.strip().lower())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 3600, 15m, 12h, 7d)")
    value, unit = int(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
