"""Access control and query cost, checked on the parsed operation before any resolver runs.

``analyze`` walks the operation once (fragments expanded) and returns every selected
``(parent type, field)`` pair and the operation's cost:

- a field that costs a query costs 1 per parent it is selected on: every object field (a row
  or a batch of rows), and the few scalars backed by SQL of their own (``SQL_SCALARS``);
  ``totalCount`` is a ``COUNT`` over the whole list and costs ``COUNT_COST``;
- every other scalar or enum field (a column of a row already read) costs 0;
- a connection's page size (``first``/``last``, the default page size when neither is given,
  capped at the maximum) multiplies its ``edges`` and what is under them; ``totalCount`` and
  ``pageInfo`` come once per connection;
- ``nodes(ids: [...])`` multiplies by the number of ids; other list fields by ``LIST_ESTIMATE``.

``AccessPolicy`` (a schema extension) asks ``quartermaster.policy`` about every pair, compares the
cost with the caller's budget, charges the rate limiter, and answers with an error and no data
when any of these refuses (the cost and the budget are in the error's extensions). It runs for
every operation on every transport: HTTP requests, each operation on a WebSocket (queries,
mutations and subscription starts alike) and graphql-sse streams.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLInterfaceType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    ListValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    VariableNode,
    get_named_type,
    is_leaf_type,
)
from strawberry.extensions import SchemaExtension
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType

from quartermaster import policy
from quartermaster.auth import ANONYMOUS

#: What a list field without page arguments is assumed to hold (order lines, stock per product).
LIST_ESTIMATE = 10
#: A connection's ``totalCount``: a ``COUNT`` reads every row of the filtered list, not one page,
#: so it costs like a list field without page arguments.
COUNT_COST = LIST_ESTIMATE
#: Scalars that read rows of their own (through a loader), costed like an object field.
SQL_SCALARS: dict[tuple[str, str], int] = {
    ("Product", "availableQuantity"): 1,  # sums the product's stock levels
}


def scalar_cost(parent: str, field_name: str) -> int:
    """What selecting the scalar ``parent.field_name`` once costs (0: a column already read)."""
    if field_name == "totalCount" and parent.endswith("Connection"):
        return COUNT_COST
    return SQL_SCALARS.get((parent, field_name), 0)


@dataclass
class Analysis:
    cost: int = 0
    fields: set[tuple[str, str]] = field(default_factory=set)


def analyze(
    schema: GraphQLSchema,
    document: Any,
    operation_name: str | None,
    variables: dict[str, Any] | None,
    default_page: int,
    max_page: int,
) -> Analysis:
    operation: OperationDefinitionNode | None = None
    fragments: dict[str, FragmentDefinitionNode] = {}
    for definition in document.definitions:
        if isinstance(definition, FragmentDefinitionNode):
            fragments[definition.name.value] = definition
        elif isinstance(definition, OperationDefinitionNode) and (
            operation_name is None
            or (definition.name is not None and definition.name.value == operation_name)
        ):
            operation = operation or definition
    analysis = Analysis()
    if operation is None:
        return analysis
    root = schema.get_root_type(operation.operation)
    if root is None:
        return analysis
    defaults = {
        d.variable.name.value: d.default_value for d in operation.variable_definitions or ()
    }
    walker = _Walker(schema, fragments, variables or {}, defaults, default_page, max_page, analysis)
    analysis.cost = walker.selection_set(root, operation.selection_set, 1, set())
    return analysis


class _Walker:
    def __init__(
        self,
        schema: GraphQLSchema,
        fragments: dict[str, FragmentDefinitionNode],
        variables: dict[str, Any],
        defaults: dict[str, Any],
        default_page: int,
        max_page: int,
        analysis: Analysis,
    ) -> None:
        self.schema = schema
        self.fragments = fragments
        self.variables = variables
        self.defaults = defaults
        self.default_page = default_page
        self.max_page = max_page
        self.analysis = analysis

    def selection_set(
        self,
        parent: Any,
        selection_set: SelectionSetNode | None,
        multiplier: int,
        seen: set[str],
        page: int = 1,
    ) -> int:
        """The cost of ``selection_set`` selected ``multiplier`` times; ``page`` is the page size
        when ``parent`` is a connection (it multiplies the ``edges`` only)."""
        if selection_set is None:
            return 0
        cost = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                cost += self.field(parent, selection, multiplier, seen, page)
            elif isinstance(selection, InlineFragmentNode):
                target = parent
                if selection.type_condition is not None:
                    target = self.schema.get_type(selection.type_condition.name.value) or parent
                cost += self.selection_set(target, selection.selection_set, multiplier, seen, page)
            elif isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                fragment = self.fragments.get(name)
                if fragment is None or name in seen:
                    continue  # validation reports unknown or cyclic fragments
                target = self.schema.get_type(fragment.type_condition.name.value) or parent
                cost += self.selection_set(
                    target, fragment.selection_set, multiplier, seen | {name}, page
                )
        return cost

    def field(
        self, parent: Any, node: FieldNode, multiplier: int, seen: set[str], page: int = 1
    ) -> int:
        name = node.name.value
        if name.startswith("__"):
            return 0
        parent_name = getattr(parent, "name", "?")
        self.analysis.fields.add((parent_name, name))
        if not isinstance(parent, (GraphQLObjectType, GraphQLInterfaceType)):
            return 0
        definition = parent.fields.get(name)
        if definition is None:
            return 0
        field_type = definition.type
        named = get_named_type(field_type)
        on_connection = parent_name.endswith("Connection")
        if on_connection and name == "edges":
            multiplier *= page  # one edge per row of the page; the list needs no other estimate
        if is_leaf_type(named):
            return multiplier * scalar_cost(parent_name, name)
        if getattr(named, "name", "").endswith("Connection"):
            inner = self.selection_set(
                named, node.selection_set, multiplier, seen, self.fan_out(node, field_type)
            )
            return multiplier + inner
        fan_out = 1 if on_connection else self.fan_out(node, field_type)
        return multiplier + self.selection_set(
            named, node.selection_set, multiplier * fan_out, seen
        )

    def fan_out(self, node: FieldNode, field_type: Any) -> int:
        args = {a.name.value: a.value for a in node.arguments or ()}
        if "first" in args or "last" in args:
            sizes = [self.int_value(args[k]) for k in ("first", "last") if k in args]
            size = max((s for s in sizes if s is not None), default=self.default_page)
            return max(1, min(size, self.max_page))
        if node.name.value == "nodes" and "ids" in args:
            ids = self.value(args["ids"])
            return max(1, len(ids)) if isinstance(ids, list) else LIST_ESTIMATE
        if getattr(get_named_type(field_type), "name", "").endswith("Connection"):
            return self.default_page
        unwrapped = field_type.of_type if isinstance(field_type, GraphQLNonNull) else field_type
        if isinstance(unwrapped, GraphQLList):
            return LIST_ESTIMATE
        return 1

    def value(self, node: Any) -> Any:
        if isinstance(node, VariableNode):
            name = node.name.value
            if name in self.variables:
                return self.variables[name]
            default = self.defaults.get(name)
            return self.value(default) if default is not None else None
        if isinstance(node, IntValueNode):
            return int(node.value)
        if isinstance(node, ListValueNode):
            return [self.value(v) for v in node.values]
        return getattr(node, "value", None)

    def int_value(self, node: Any) -> int | None:
        value = self.value(node)
        return value if isinstance(value, int) and not isinstance(value, bool) else None


_NEEDS_STREAM = GraphQLError(
    "Subscriptions run over WebSocket (graphql-transport-ws) or Server-Sent Events "
    "(POST with `Accept: text/event-stream`), not as a plain HTTP request.",
    extensions={"code": "SUBSCRIPTION_NEEDS_STREAM"},
)


class AccessPolicy(SchemaExtension):
    """Refuses what the caller's role may not select, queries over the caller's cost budget and
    callers over their rate limit — before execution, with a coded error and no data."""

    cost: int | None = None

    async def on_execute(self) -> AsyncIterator[None]:
        ec = self.execution_context
        context = ec.context
        settings = getattr(context, "settings", None)
        if settings is None or ec.graphql_document is None:
            yield
            return
        principal = getattr(context, "principal", ANONYMOUS)
        access = settings.access
        analysis = analyze(
            ec.schema._schema,
            ec.graphql_document,
            ec.operation_name,
            ec.variables,
            settings.graphql.default_page_size,
            settings.graphql.max_page_size,
        )
        self.cost = analysis.cost
        error = self._refusal(principal, analysis, access)
        if error is None:
            limiter = getattr(context, "rate_limiter", None)
            if limiter is not None:
                decision = await limiter.charge(context.rate_key, principal, max(1, analysis.cost))
                if not decision.allowed:
                    context.retry_after = decision.retry_after
                    request = getattr(context, "request", None)
                    scope = getattr(request, "scope", None)
                    if scope is not None and scope.get("type") == "http":
                        # the HTTP view answers 429 + Retry-After; a socket has no status, so
                        # WebSocket callers get only the error (code and retryAfter)
                        scope.setdefault("state", {})["qm_retry_after"] = decision.retry_after
                    error = GraphQLError(
                        f"Rate limit reached; retry in {decision.retry_after:.0f} s.",
                        extensions={"code": "RATE_LIMITED", "retryAfter": decision.retry_after},
                    )
        if error is not None:
            if ec.operation_type is OperationType.SUBSCRIPTION:
                raise error  # strawberry answers a subscription's on_execute error as its result
            ec.result = ExecutionResult(data=None, errors=[error])
        elif ec.operation_type is OperationType.SUBSCRIPTION:
            # Plain HTTP runs the operation once, like a query, and ignores this result's being
            # set; the streaming transports (WebSocket, SSE) subscribe instead and never read it.
            ec.result = ExecutionResult(data=None, errors=[_NEEDS_STREAM])
        yield

    def _refusal(self, principal: Any, analysis: Analysis, access: Any) -> GraphQLError | None:
        for parent, name in sorted(analysis.fields):
            refusal = policy.field_allowed(
                principal, parent, name, public_catalogue=access.public_catalogue
            )
            if refusal is not None:
                return GraphQLError(refusal.message, extensions={"code": refusal.code})
        budget = access.cost_budget(principal.role)
        if budget and analysis.cost > budget:
            return GraphQLError(
                f"This query would cost {analysis.cost} points; your budget is {budget}. "
                "Ask for smaller pages or fewer nested fields.",
                extensions={"code": "QUERY_TOO_COSTLY", "cost": analysis.cost, "budget": budget},
            )
        return None
