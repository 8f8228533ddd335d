"""Domain operations. No strawberry, no starlette; the caller owns the transaction."""
