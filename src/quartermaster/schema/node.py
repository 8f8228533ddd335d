"""The Relay ``Node`` interface and opaque global ids.

A global id is ``base64url("<TypeName>:<primary key>")``. Clients must treat it as opaque; the
server decodes it, checks the type it names and refuses ids of another type.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable
from typing import Any, TypeVar

import strawberry

from quartermaster.errors import InvalidIdError


@strawberry.interface(name="Node", description="An object with an opaque global id (Relay).")
class Node:
    id: strawberry.ID = strawberry.field(
        description="Opaque global id (Relay). Decoding it is the server's business, not the "
        "client's."
    )


def encode_id(type_name: str, pk: int) -> strawberry.ID:
    raw = f"{type_name}:{pk}".encode()
    return strawberry.ID(base64.urlsafe_b64encode(raw).decode().rstrip("="))


def decode_any_id(global_id: str) -> tuple[str, int]:
    """``(type name, primary key)``; raises ``InvalidIdError`` for anything malformed."""
    try:
        padded = global_id + "=" * (-len(global_id) % 4)
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
        type_name, _, raw_pk = text.partition(":")
        pk = int(raw_pk)
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise InvalidIdError(f"{global_id!r} is not a valid id.") from exc
    if not type_name or pk <= 0 or pk > 2**63 - 1 or raw_pk != str(pk):
        raise InvalidIdError(f"{global_id!r} is not a valid id.")
    return type_name, pk


def decode_id(global_id: str, expected: str, argument: str = "id") -> int:
    """The primary key of a global id that must name ``expected``."""
    try:
        type_name, pk = decode_any_id(global_id)
    except InvalidIdError as exc:
        raise InvalidIdError(
            f"`{argument}` is not a valid id: {global_id!r}.", argument=argument
        ) from exc
    if type_name != expected:
        raise InvalidIdError(
            f"`{argument}` must be the id of a {expected}, got the id of a {type_name}.",
            argument=argument,
        )
    return pk


T = TypeVar("T")


def present(row: T | None) -> T:
    """A row behind a NOT NULL foreign key: missing means the database is inconsistent."""
    if row is None:
        raise LookupError("referenced row is missing")
    return row


def awaited(value: Awaitable[Any]) -> Any:
    """Hand a loader's future straight to graphql-core, which awaits whatever a resolver
    returns: a plain ``def`` resolver costs far less than an ``async def`` one per field."""
    return value
