"""SQL for each domain: base statements with filters, sorts and single-row lookups."""


def escape_like(text: str) -> str:
    """Escape LIKE wildcards so user search text matches literally."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
