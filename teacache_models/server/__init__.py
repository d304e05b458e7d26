"""An OpenAI-style HTTP server for one model: image generation, video jobs, TeaCache per request.

Needs the `server` extra (FastAPI, uvicorn, pydantic, prometheus_client); the core package never imports
this one. Start it with `teacache-serve --model NAME|PATH` or `python scripts/serve.py`; in Python,
`create_app(Served(...))` returns the ASGI application.
"""

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import python_multipart  # noqa: F401  (FastAPI's form parser)
    import uvicorn  # noqa: F401
except ImportError as error:
    raise ImportError(
        f"the server needs the 'server' extra ({error.name} is missing): pip install 'teacache_models[server]'",
        name=error.name,
    ) from error

from .app import create_app
from .schemas import Served

__all__ = ["Served", "create_app"]
