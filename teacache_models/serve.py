"""The `teacache-serve` command: the server (`teacache_models.server.main`), or, where the `server` extra is
not installed, one line that says which package is missing and how to install it, instead of a traceback."""

from __future__ import annotations

import sys

# What the server package imports beyond the core dependencies (the `server` extra and what it brings).
SERVER_MODULES = frozenset({"fastapi", "prometheus_client", "pydantic", "python_multipart", "starlette", "uvicorn"})


def main(argv: list[str] | None = None) -> int:
    try:
        from .server.main import main as serve
    except ImportError as error:
        if error.name not in SERVER_MODULES:
            raise
        print(f"teacache-serve: {error}", file=sys.stderr)
        return 1
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
