# syntax=docker/dockerfile:1
# Quartermaster: the API (`quartermaster serve`), workers and relay (`quartermaster worker`) and
# the one-shot `quartermaster migrate` all run from this image (see docker-compose.yml).

# --- builder: uv resolves exactly uv.lock into /app/.venv ------------------------------------
FROM python:3.11-slim AS builder
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /uvx /bin/
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first: this layer is reused until pyproject.toml or uv.lock change.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project
COPY README.md alembic.ini ./
COPY src ./src
COPY migrations ./migrations
# The project itself as a wheel (migrations are packaged inside it), not an editable link.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# --- runtime: the virtualenv only, run as an unprivileged user ---------------------------------
FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 quartermaster \
    && useradd --system --uid 10001 --gid quartermaster --home-dir /app --shell /usr/sbin/nologin quartermaster
COPY --from=builder --chown=quartermaster:quartermaster /app/.venv /app/.venv
ENV PATH="/app/.venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    QM_ENV=production \
    QM_HOST=0.0.0.0 \
    QM_PORT=8000
WORKDIR /app
USER quartermaster
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["quartermaster", "healthcheck"]
CMD ["quartermaster", "serve"]
