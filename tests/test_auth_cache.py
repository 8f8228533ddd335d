"""The cache of verified tokens: a hit costs no signature check, yet expiry and the secret
are still enforced on every request."""

from __future__ import annotations

import time

import pytest

from quartermaster import auth
from quartermaster.auth import AuthenticationError, Role, decode_token, mint_token

SECRET = "c" * 40


def test_a_cached_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    token = mint_token(SECRET, Role.STAFF, ttl_s=60)
    first = decode_token(SECRET, token)
    assert decode_token(SECRET, token) is first  # served from the cache
    later = time.time() + 60 + 6  # past expiry plus the 5 s leeway
    monkeypatch.setattr(auth.time, "time", lambda: later)
    with pytest.raises(AuthenticationError) as info:
        decode_token(SECRET, token)
    assert info.value.code == "TOKEN_EXPIRED"
    assert not any(key[1] == token for key in auth._VERIFIED)  # dropped: PyJWT decides again


def test_the_cache_is_keyed_by_secret_and_bounded() -> None:
    token = mint_token(SECRET, Role.ADMIN, ttl_s=60)
    decode_token(SECRET, token)
    with pytest.raises(AuthenticationError):
        decode_token("d" * 40, token)  # a verified token is not valid under another secret
    for i in range(auth.VERIFIED_CACHE_SIZE + 10):
        decode_token(SECRET, mint_token(SECRET, Role.STAFF, subject=f"s{i}", ttl_s=60))
    assert len(auth._VERIFIED) == auth.VERIFIED_CACHE_SIZE


def test_a_tampered_token_is_never_cached() -> None:
    head, payload, _sig = mint_token(SECRET, Role.STAFF, ttl_s=60).split(".")
    forged = f"{head}.{payload}.AAAA"
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            decode_token(SECRET, forged)
    assert not any(key[1] == forged for key in auth._VERIFIED)
