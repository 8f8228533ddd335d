from __future__ import annotations

import strawberry

from quartermaster.schema.customer import CustomerType
from quartermaster.schema.enums import Role


@strawberry.type(name="Viewer", description="Who the bearer token says the caller is.")
class ViewerType:
    role: Role
    customer: CustomerType | None = strawberry.field(
        default=None,
        description="Set for CUSTOMER callers: the only customer whose orders and quotations "
        "they see.",
    )
