"""Builds the strawberry Schema: every domain's roots merged, plus the protective extensions."""

from __future__ import annotations

from functools import partial
from typing import Any

import strawberry
from graphql import (
    GraphQLError,
    GraphQLInputObjectType,
    GraphQLInterfaceType,
    GraphQLObjectType,
    GraphQLSchema,
    Undefined,
)
from strawberry.extensions import (
    AddValidationRules,
    DisableIntrospection,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.tools import merge_types

from quartermaster.config import GraphQLSettings
from quartermaster.resolvers.customer import CustomerQuery
from quartermaster.resolvers.integration import IntegrationMutation
from quartermaster.resolvers.node import NodeQuery
from quartermaster.resolvers.order import OrderMutation, OrderQuery
from quartermaster.resolvers.product import ProductMutation, ProductQuery
from quartermaster.resolvers.quotation import QuotationMutation, QuotationQuery
from quartermaster.resolvers.stock import StockMutation, StockQuery
from quartermaster.resolvers.subscription import StockSubscription
from quartermaster.resolvers.warehouse import WarehouseQuery
from quartermaster.schema.access import AccessPolicy
from quartermaster.schema.customer import CustomerType
from quartermaster.schema.extensions import DatabaseRouting, ErrorCodes, OperationMetrics
from quartermaster.schema.integration import IntegrationJobType
from quartermaster.schema.order import OrderLineType, OrderType
from quartermaster.schema.product import ProductType
from quartermaster.schema.quotation import QuotationLineType, QuotationType
from quartermaster.schema.scalars import SCALAR_OVERRIDES
from quartermaster.schema.stock import StockLevelType
from quartermaster.schema.warehouse import WarehouseType

Query = merge_types(
    "Query",
    (
        NodeQuery,
        ProductQuery,
        WarehouseQuery,
        StockQuery,
        CustomerQuery,
        OrderQuery,
        QuotationQuery,
    ),
)
Mutation = merge_types(
    "Mutation",
    (ProductMutation, StockMutation, OrderMutation, QuotationMutation, IntegrationMutation),
)
Subscription = merge_types("Subscription", (StockSubscription,))

#: Node implementations that no root field names directly still belong in the schema.
NODE_TYPES = [
    ProductType,
    WarehouseType,
    StockLevelType,
    CustomerType,
    OrderType,
    OrderLineType,
    QuotationType,
    QuotationLineType,
    IntegrationJobType,
]


class QuartermasterSchema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        # Expected errors are the client's business; ErrorCodes logs the unexpected ones.
        return None


def build_schema(settings: GraphQLSettings | None = None) -> strawberry.Schema:
    settings = settings or GraphQLSettings()
    # The limiters are validation rules. Their rule classes are made once here: the validation
    # cache keys on the rule classes, and fresh classes per request would never hit it.
    limiters = [
        QueryDepthLimiter(max_depth=settings.max_depth),
        MaxAliasesLimiter(max_alias_count=settings.max_aliases),
    ]
    if not settings.introspection:
        limiters.append(DisableIntrospection())
    rules = [rule for limiter in limiters for rule in limiter.validation_rules]
    extensions: list[Any] = [
        ErrorCodes,
        OperationMetrics,
        AccessPolicy,
        DatabaseRouting,
        partial(MaxTokensLimiter, max_token_count=settings.max_tokens),
        partial(ParserCache, maxsize=1024),
        partial(AddValidationRules, rules),
        partial(ValidationCache, maxsize=1024),
    ]
    schema = QuartermasterSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=NODE_TYPES,
        extensions=extensions,
        scalar_overrides=SCALAR_OVERRIDES,
        config=StrawberryConfig(disable_field_suggestions=not settings.field_suggestions),
    )
    _drop_null_defaults(schema._schema)
    return schema


def _drop_null_defaults(schema: GraphQLSchema) -> None:
    """An optional argument or input field left out is simply absent (Python's own default,
    None, applies), so the SDL says ``first: Int`` as the contract does, not ``first: Int = null``.
    """
    for graphql_type in schema.type_map.values():
        if isinstance(graphql_type, (GraphQLObjectType, GraphQLInterfaceType)):
            for field in graphql_type.fields.values():
                for argument in field.args.values():
                    if argument.default_value is None:
                        argument.default_value = Undefined
        elif isinstance(graphql_type, GraphQLInputObjectType):
            for input_field in graphql_type.fields.values():
                if input_field.default_value is None:
                    input_field.default_value = Undefined


def export_sdl() -> str:
    return build_schema().as_str() + "\n"
