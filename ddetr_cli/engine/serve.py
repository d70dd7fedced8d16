"""``ddetr serve``: the Label Studio ML backend (``engine.ml_backend``) as an HTTP server
(FastAPI on uvicorn), stopped gracefully by SIGINT / SIGTERM (requests in flight are answered).

The event loop only parses requests and answers ``/health`` (Label Studio gives it 1 s); image
reading runs in the backend's reader threads and the model in its one model thread.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ddetr_cli.engine.ml_backend import LabelStudioBackend, RequestError


def create_app(backend: LabelStudioBackend) -> FastAPI:
    """The backend as an ASGI app. Closing the app (its lifespan) closes the backend's pools."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        backend.close()

    app = FastAPI(title="ddetr Label Studio ML backend", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body() or b"{}")
        except ValueError as e:
            raise RequestError(f"the request body is not JSON ({e})") from None

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/")
    @app.get("/health")
    async def health() -> dict:
        return backend.health()

    @app.post("/setup")
    async def setup(request: Request) -> dict:
        return backend.setup(await body_of(request))

    @app.get("/versions")
    async def versions() -> dict:
        return {"versions": [backend.model_version]}

    @app.post("/webhook")
    async def webhook(request: Request) -> dict:
        await request.body()
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        tasks, targets, project = backend.parse_predict(await body_of(request))
        loop = asyncio.get_running_loop()
        images = await loop.run_in_executor(None, backend.read_images, tasks, targets.config.image_field, project)
        results = await loop.run_in_executor(backend.model_pool, backend.predictions, tasks, images, targets)
        return {"results": results}

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port`` 0: any free port); OSError (in use, not an address) as it comes."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def run_server(backend: LabelStudioBackend, sock: socket.socket, *, access_log: bool = True,
               on_start: Callable[[str], None] | None = None) -> int | None:
    """Serve on ``sock`` until SIGINT / SIGTERM: uvicorn stops accepting, lets the requests in
    flight finish (30 s at most) and closes the backend. Returns the signal that stopped it.

    uvicorn raises the signal it caught again once it is done (so that a default handler ends
    the process); the handlers set here take it instead, so the caller decides how to exit."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    # uvicorn's access log goes to stdout by default; stdout is for --json
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config = uvicorn.Config(create_app(backend), log_level="info" if access_log else "warning", access_log=access_log,
                            log_config=log_config, timeout_graceful_shutdown=30, lifespan="on")
    server = uvicorn.Server(config)
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if on_start is not None:
            host, port = sock.getsockname()[:2]
            on_start(f"http://{f'[{host}]' if ':' in host else host}:{port}")
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return caught[0] if caught else None
