"""Tokens, the field policy and the query-cost analysis, without a server."""

from __future__ import annotations

import time

import jwt
import pytest
from click.testing import CliRunner
from graphql import parse

from quartermaster import policy
from quartermaster.api import build_schema
from quartermaster.auth import (
    ANONYMOUS,
    AuthenticationError,
    Principal,
    Role,
    decode_token,
    mint_token,
    parse_ttl,
    principal_from_header,
)
from quartermaster.cli import main
from quartermaster.config import AccessSettings
from quartermaster.schema.access import COUNT_COST, LIST_ESTIMATE, analyze

SECRET = "x" * 40


def test_token_round_trip_carries_role_customer_and_expiry() -> None:
    token = mint_token(SECRET, Role.CUSTOMER, customer_id=7, ttl_s=60)
    principal = decode_token(SECRET, token)
    assert principal.role is Role.CUSTOMER
    assert principal.customer_id == 7
    assert principal.expires_at is not None and 55 < principal.expires_at - time.time() <= 60
    staff = decode_token(SECRET, mint_token(SECRET, Role.STAFF))
    assert (staff.role, staff.customer_id) == (Role.STAFF, None)


def test_expired_tampered_and_foreign_tokens_are_refused_with_clear_codes() -> None:
    expired = mint_token(SECRET, Role.STAFF, ttl_s=10, now=time.time() - 3600)
    with pytest.raises(AuthenticationError) as info:
        decode_token(SECRET, expired)
    assert info.value.code == "TOKEN_EXPIRED"

    header, _payload, signature = mint_token(SECRET, Role.CUSTOMER, customer_id=1).split(".")
    forged_claims = jwt.encode(
        {"role": "ADMIN", "sub": "x", "iat": 1, "exp": 2**31, "iss": "quartermaster"}, "o" * 40
    ).split(".")[1]
    with pytest.raises(AuthenticationError) as info:
        decode_token(SECRET, f"{header}.{forged_claims}.{signature}")
    assert info.value.code == "UNAUTHENTICATED"

    with pytest.raises(AuthenticationError):
        decode_token(SECRET, mint_token("y" * 40, Role.ADMIN))  # another secret
    with pytest.raises(AuthenticationError):
        decode_token(SECRET, "not-a-jwt")
    none_alg = jwt.encode({"role": "ADMIN", "sub": "x"}, key=None, algorithm="none")
    with pytest.raises(AuthenticationError):
        decode_token(SECRET, none_alg)


def test_authorization_header_forms() -> None:
    assert principal_from_header(SECRET, None) is ANONYMOUS
    token = mint_token(SECRET, Role.ADMIN)
    assert principal_from_header(SECRET, f"Bearer {token}").role is Role.ADMIN
    assert principal_from_header(SECRET, f"bearer   {token} ").role is Role.ADMIN
    with pytest.raises(AuthenticationError):
        principal_from_header(SECRET, f"Basic {token}")


def test_mint_refuses_inconsistent_claims_and_ttl_parses() -> None:
    with pytest.raises(ValueError):
        mint_token(SECRET, Role.CUSTOMER)
    with pytest.raises(ValueError):
        mint_token(SECRET, Role.STAFF, customer_id=3)
    assert [parse_ttl(t) for t in ("90", "90s", "15m", "12h", "7d")] == [
        90, 90, 900, 43200, 604800
    ]  # fmt: skip
    with pytest.raises(ValueError):
        parse_ttl("soon")


def test_production_refuses_missing_short_or_default_secret() -> None:
    with pytest.raises(ValueError):
        AccessSettings(secret=None).token_secret(production=True)
    with pytest.raises(ValueError):
        AccessSettings(secret="short").token_secret(production=True)
    default = AccessSettings(secret=None).token_secret(production=False)
    with pytest.raises(ValueError):
        AccessSettings(secret=default).token_secret(production=True)
    assert AccessSettings(secret=SECRET).token_secret(production=True) == SECRET


CUSTOMER = Principal(Role.CUSTOMER, customer_id=5, subject="customer:5")
STAFF = Principal(Role.STAFF, subject="staff:1")
ADMIN = Principal(Role.ADMIN, subject="admin:1")


@pytest.mark.parametrize(
    ("principal", "parent", "field", "code"),
    [
        (ANONYMOUS, "Query", "viewer", None),
        (ANONYMOUS, "Query", "products", "UNAUTHENTICATED"),
        (ANONYMOUS, "Mutation", "placeOrder", "UNAUTHENTICATED"),
        (CUSTOMER, "Query", "orders", None),
        (CUSTOMER, "Mutation", "placeOrder", None),
        (CUSTOMER, "Mutation", "acceptQuotation", None),
        (CUSTOMER, "Mutation", "confirmOrder", "FORBIDDEN"),
        (CUSTOMER, "Mutation", "createQuotation", "FORBIDDEN"),
        (CUSTOMER, "StockLevel", "onHand", "FORBIDDEN"),
        (CUSTOMER, "StockLevel", "available", None),
        (CUSTOMER, "Order", "integrations", "FORBIDDEN"),
        (STAFF, "Mutation", "adjustStock", None),
        (STAFF, "Mutation", "createProduct", "FORBIDDEN"),
        (STAFF, "Mutation", "retryIntegrationJob", "FORBIDDEN"),
        (STAFF, "Order", "integrations", None),
        (ADMIN, "Mutation", "retryIntegrationJob", None),
        (ADMIN, "Mutation", "updateProduct", None),
    ],
)
def test_field_policy(principal: Principal, parent: str, field: str, code: str | None) -> None:
    refusal = policy.field_allowed(principal, parent, field)
    assert (refusal.code if refusal else None) == code


def test_public_catalogue_opens_catalogue_roots_to_anonymous_only() -> None:
    assert policy.field_allowed(ANONYMOUS, "Query", "products", public_catalogue=True) is None
    assert policy.field_allowed(ANONYMOUS, "Query", "orders", public_catalogue=True) is not None


SCHEMA = build_schema()._schema


def cost(query: str, variables: dict[str, object] | None = None) -> int:
    return analyze(SCHEMA, parse(query), None, variables, 20, 100).cost


def test_cost_multiplies_connections_by_page_size_and_counts_fragments() -> None:
    assert cost("{ viewer { role } }") == 1
    assert cost("{ products(first: 10) { edges { node { sku } } } }") == 1 + 10 + 10
    assert cost("{ products { edges { node { sku } } } }") == 1 + 20 + 20  # default page
    assert cost("{ products(first: 5000) { edges { node { sku } } } }") == 1 + 100 + 100  # capped
    nested = (
        "{ customers(first: 10) { edges { node {"
        " orders(first: 10) { edges { node { number } } } } } } }"
    )
    # customers 1, edges 10, node 10, orders 10, orders.edges 100, orders.node 100
    assert cost(nested) == 1 + 10 + 10 + 10 + 100 + 100
    by_variable = "query($n: Int) { products(first: $n) { edges { node { sku } } } }"
    assert cost(by_variable, {"n": 3}) == 1 + 3 + 3
    fragment = (
        "query { products(first: 2) { edges { node { ...P } } } }"
        " fragment P on Product { stock { available warehouse { code } } }"
    )
    # products 1, edges 2, node 2, stock 2 (one list per product), warehouse 2 × LIST_ESTIMATE
    assert cost(fragment) == 1 + 2 + 2 + 2 + 2 * LIST_ESTIMATE
    assert cost('{ nodes(ids: ["a", "b", "c"]) { id } }') == 1
    assert cost('{ nodes(ids: ["a", "b", "c"]) { ... on Order { customer { name } } } }') == 1 + 3


def test_sql_backed_scalars_cost_and_plain_scalars_are_free() -> None:
    # plain columns of a row already read cost nothing
    assert cost("{ products(first: 10) { edges { node { id sku name unitPrice } } } }") == 21
    # a COUNT is a statement of its own, once per connection (not per edge of its page)
    assert COUNT_COST > 1
    assert cost("{ orders(first: 1) { totalCount } }") == 1 + COUNT_COST
    assert cost("{ orders(first: 100) { totalCount } }") == 1 + COUNT_COST
    # ... and once per parent of a nested connection
    nested = "{ customers(first: 10) { edges { node { orders(first: 5) { totalCount } } } } }"
    assert cost(nested) == 1 + 10 + 10 + 10 + 10 * COUNT_COST
    # availableQuantity reads the product's stock levels, like `stock`
    assert (
        cost("{ products(first: 10) { edges { node { availableQuantity } } } }") == 1 + 10 + 10 + 10
    )
    # pageInfo comes from the page already read: once per connection
    assert cost("{ products(first: 100) { pageInfo { hasNextPage endCursor } } }") == 1 + 1
    fragment = (
        "{ products(first: 4) { ...C } } fragment C on ProductConnection "
        "{ totalCount edges { node { sku } } }"
    )
    assert cost(fragment) == 1 + COUNT_COST + 4 + 4


def test_token_command_mints_a_token_the_server_accepts() -> None:
    runner = CliRunner()
    env = {"QM_AUTH_SECRET": SECRET, "QM_ENV": "development"}
    result = runner.invoke(
        main, ["token", "--role", "customer", "--customer", "42", "--ttl", "15m"], env=env
    )
    assert result.exit_code == 0, result.output
    principal = principal_from_header(SECRET, f"Bearer {result.output.strip()}")
    assert (principal.role, principal.customer_id) == (Role.CUSTOMER, 42)
    assert principal.expires_at is not None
    assert 890 < principal.expires_at - time.time() <= 900
    staff = runner.invoke(main, ["token", "--role", "STAFF"], env=env)
    assert staff.exit_code == 0, staff.output
    principal = decode_token(SECRET, staff.output.strip())
    assert (principal.role, principal.customer_id) == (Role.STAFF, None)
    assert principal.expires_at is not None
    assert 12 * 3600 - 10 < principal.expires_at - time.time() <= 12 * 3600  # the default ttl
    with pytest.raises(AuthenticationError):  # signed with QM_AUTH_SECRET, nothing else
        decode_token("z" * 40, staff.output.strip())
    # a CUSTOMER token without a customer, a bad ttl: usage errors, no token
    for args in (["--role", "CUSTOMER"], ["--role", "ADMIN", "--ttl", "soon"]):
        refused = runner.invoke(main, ["token", *args], env=env)
        assert refused.exit_code == 2 and "." not in refused.stdout.strip(), refused.output
