"""Executing a subscription's selection once per event and *render group*, not per subscriber.

The root field ``stockChanged`` resolves to the event itself, so its arguments (filters,
``after``) never change what the selection renders to; only the document, the operation name
and the variables used *below* the root field do. Subscribers that share those three share a
``RenderGroup``: for each event the group executes the selection once (graphql-core, the
strawberry schema, one per-batch context whose loaders every group shares) and serializes
the ``payload`` of the ``next`` message once; each subscriber only wraps it with its own id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from graphql import (
    DocumentNode,
    ExecutionResult,
    FieldNode,
    FragmentDefinitionNode,
    GraphQLSchema,
    Node,
    OperationDefinitionNode,
    VariableNode,
    execute,
)
from strawberry.execution import optimized_is_awaitable

from quartermaster.live.events import StockEvent
from quartermaster.schema.extensions import normalize_error


@dataclass(frozen=True, slots=True)
class RenderKey:
    query: str
    operation_name: str | None
    #: orjson of the variables the selection below the root field uses (sorted keys).
    variables: bytes
    #: What the subscriber may read (role and customer): nested rows are read with it.
    scope: Any = None


def _count_variables(node: Any, counts: Counter[str]) -> None:
    if isinstance(node, VariableNode):
        counts[node.name.value] += 1
        return
    if isinstance(node, Node):
        for key in node.keys:
            if key in ("loc", "variable_definitions"):
                continue
            _count_variables(getattr(node, key, None), counts)
    elif isinstance(node, (tuple, list)):
        for item in node:
            _count_variables(item, counts)


def selection_variables(
    operation: OperationDefinitionNode,
    fragments: Iterable[FragmentDefinitionNode],
    root_fields: Iterable[FieldNode],
) -> set[str]:
    """Names of the variables used anywhere except in the root field's own arguments."""
    everywhere: Counter[str] = Counter()
    _count_variables(operation, everywhere)
    for fragment in fragments:
        _count_variables(fragment, everywhere)
    in_root_arguments: Counter[str] = Counter()
    for field in root_fields:
        _count_variables(field.arguments, in_root_arguments)
    return {name for name, n in everywhere.items() if n > in_root_arguments[name]}


class RenderGroup:
    """One (document, operation name, selection variables): renders each event once."""

    __slots__ = (
        "document",
        "key",
        "operation_name",
        "principal",
        "schema",
        "subscribers",
        "variables",
    )

    def __init__(
        self,
        key: RenderKey,
        schema: GraphQLSchema,
        document: DocumentNode,
        operation_name: str | None,
        variables: dict[str, Any],
        principal: Any = None,
    ) -> None:
        self.key = key
        self.schema = schema
        self.document = document
        self.operation_name = operation_name
        self.variables = variables
        #: The caller whose access rules apply to nested fields (None: the context default).
        self.principal = principal
        self.subscribers = 0

    def render(self, event: StockEvent, context: Any) -> str | Awaitable[str]:
        """The ``payload`` JSON of the ``next`` message for ``event`` (cached on the event)."""
        cached = event.rendered.get(self)
        if cached is not None:
            return cached
        is_awaitable: Any = optimized_is_awaitable
        result = execute(
            self.schema,
            self.document,
            root_value=event.graphql,
            context_value=context,
            variable_values=self.variables,
            operation_name=self.operation_name,
            is_awaitable=is_awaitable,
        )
        if isinstance(result, ExecutionResult):
            return self._store(event, context, result)
        return self._finish(event, context, result)

    async def _finish(
        self, event: StockEvent, context: Any, pending: Awaitable[ExecutionResult]
    ) -> str:
        return self._store(event, context, await pending)

    def _store(self, event: StockEvent, context: Any, result: ExecutionResult) -> str:
        payload: dict[str, Any] = {"data": result.data}
        if result.errors:
            request_id = getattr(context, "request_id", None)
            payload["errors"] = [normalize_error(e, request_id).formatted for e in result.errors]
        text = orjson.dumps(payload).decode()
        event.rendered[self] = text
        return text


def render_key(
    query: str,
    operation_name: str | None,
    variables: dict[str, Any] | None,
    used: set[str],
    scope: Any = None,
) -> RenderKey:
    relevant = {name: value for name, value in (variables or {}).items() if name in used}
    variables_json = orjson.dumps(relevant, option=orjson.OPT_SORT_KEYS)
    return RenderKey(query, operation_name, variables_json, scope)


def access_scope(principal: Any) -> Any:
    """The part of a caller that access rules look at: two staff members see the same rows,
    two customers only their own."""
    if principal is None:
        return None
    role = getattr(principal, "role", None)
    return (getattr(role, "value", role), getattr(principal, "customer_id", None))


def document_of(
    operation: OperationDefinitionNode, fragments: Iterable[FragmentDefinitionNode]
) -> DocumentNode:
    """The executable document as strawberry parsed and validated it (no second parse)."""
    return DocumentNode(definitions=(operation, *fragments))
