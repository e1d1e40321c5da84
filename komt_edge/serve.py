"""`komt-edge serve MODEL`: an OpenAI-compatible server and a Korean chat page, on llama-cpp-python.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` (each with and without
``stream``: server-sent events ending in ``data: [DONE]``), ``GET /health``, and the chat page at ``/``
(``komt_edge/static/chat.html``: one static file, no build step, nothing from the network).

Why a thin FastAPI app over ``Llama.create_chat_completion`` rather than llama-cpp-python's own
``llama_cpp.server`` (``create_app(settings)``): that server chooses a chat format by name from its settings,
keeps one model per process in module globals behind one lock, and needs pydantic-settings, sse-starlette and
starlette-context on top of FastAPI. komt-edge needs the template from the file or a komt family's (a handler
object, :func:`komt_edge.runtime.load`), the template's stop strings, ``--parallel`` copies of the model served
side by side, a static page at ``/``, OpenAI-shaped JSON for every 4xx, and a stream that stops generating when
its client goes away (the page's stop button). Each request runs on a model copy taken from a pool (one request per copy at a time; the others wait their turn,
in order) through :meth:`LoadedModel.chat` / :meth:`LoadedModel.complete`, which generate exactly the text
llama-cpp-python's unstreamed ``create_chat_completion`` / ``create_completion`` give for the same messages and
fields, but stream it in linear time (:mod:`komt_edge.generation`; llama-cpp-python's own streaming re-decodes the
whole reply for every token). Fields a request leaves out take llama-cpp-python's defaults (for chat: temperature
0.2, top_p 0.95, top_k 40, min_p 0.05, repeat_penalty 1.0 — so ``temperature: 0`` is greedy with no repeat
penalty). No streamed piece carries U+FFFD or half a Hangul syllable (the page also decodes the byte stream with a
streaming TextDecoder). A client that leaves — a dropped stream, an unanswered request, the page's stop button —
ends its generation within one token, and its model copy serves the next request at once.

Loopback by default; ``--api-key`` makes every ``/v1`` route require ``Authorization: Bearer KEY``.
"""

import asyncio
import contextlib
import ipaddress
import json
import queue
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from .errors import KomtError
from .generation import Generation
from .runtime import LoadedModel, load, resolve_gguf

STATIC = Path(__file__).parent / "static"
_END = object()


class ModelPool:
    """``parallel`` copies of one GGUF model; a request holds one copy from its start to its last token."""

    def __init__(self, models: list[LoadedModel]):
        self.models = models
        self._idle: queue.Queue[LoadedModel] = queue.Queue()
        for m in models:
            self._idle.put(m)

    @property
    def first(self) -> LoadedModel:
        return self.models[0]

    @property
    def busy(self) -> int:
        """How many copies are generating now."""
        return len(self.models) - self._idle.qsize()

    @contextlib.contextmanager
    def take(self) -> Iterator[LoadedModel]:
        model = self._idle.get()
        try:
            yield model
        finally:
            self._idle.put(model)

    def close(self) -> None:
        for m in self.models:
            m.close()


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def _request_models():
    """The request bodies (pydantic); unknown fields are ignored, as OpenAI clients send extras."""
    from pydantic import BaseModel, ConfigDict, Field

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "user", "assistant"]
        content: str | list[dict[str, Any]]

        def text(self) -> str:
            if isinstance(self.content, str):
                return self.content
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        stream: bool = False
        max_tokens: int | None = Field(default=None, ge=1)
        temperature: float | None = Field(default=None, ge=0, le=2)
        top_p: float | None = Field(default=None, ge=0, le=1)
        top_k: int | None = Field(default=None, ge=0)
        min_p: float | None = Field(default=None, ge=0, le=1)
        repeat_penalty: float | None = Field(default=None, ge=0)
        frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
        presence_penalty: float | None = Field(default=None, ge=-2, le=2)
        seed: int | None = None
        stop: str | list[str] | None = None
        n: int = Field(default=1, ge=1, le=1)
        logit_bias: dict[str, float] | None = None

        def kwargs(self, extra_stop: list[str], n_vocab: int) -> dict:
            """The generation fields; the stop strings are the request's, then ``extra_stop``."""
            fields = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "frequency_penalty",
                      "presence_penalty", "seed")
            out = {k: getattr(self, k) for k in fields if getattr(self, k) is not None}
            stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
            out["stop"] = stop + [s for s in extra_stop if s not in stop]
            if self.logit_bias:
                out["logit_bias"] = token_bias(self.logit_bias, n_vocab)
            return out

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)

    class CompletionRequest(Sampling):
        prompt: str | list[str]

        def text(self) -> str:
            if isinstance(self.prompt, str):
                return self.prompt
            if len(self.prompt) != 1:
                raise ValueError("prompt: give one string (batches of prompts are not supported)")
            return self.prompt[0]

    return ChatRequest, CompletionRequest


def token_bias(bias: dict[str, float], n_vocab: int) -> dict[int, float]:
    """OpenAI's ``logit_bias`` (token id → bias from -100 to 100) with integer ids; anything else is a ValueError."""
    out = {}
    for key, value in bias.items():
        if not (key.strip().isdigit() and int(key) < n_vocab):
            raise ValueError(f"logit_bias: {key!r} is not a token id of this model (0 to {n_vocab - 1})")
        if not -100 <= value <= 100:
            raise ValueError(f"logit_bias: the bias of token {key} is {value}; give a number from -100 to 100")
        out[int(key)] = float(value)
    return out


@dataclass
class Job:
    """One request's generation, run in its own thread on a pooled model; its pieces (streamed) or its finished
    :class:`Generation` go to the event loop. ``cancelled`` ends it within one token."""

    start: Callable[[LoadedModel, Callable[[], bool]], Generation]  # (model, cancelled) → generation
    stream: bool
    pool: ModelPool
    loop: asyncio.AbstractEventLoop

    def __post_init__(self):
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        threading.Thread(target=self._work, daemon=True).start()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def _work(self) -> None:
        try:
            with self.pool.take() as model:
                if self.cancelled.is_set():
                    return
                generation = self.start(model, self.cancelled.is_set)
                try:
                    if self.stream:
                        self._put(generation)  # the reply has begun: the response can start
                        for piece in generation:
                            self._put(piece)
                    else:
                        generation.run()
                        self._put(generation)
                finally:
                    generation.close()
        except Exception as err:  # noqa: BLE001 — reported to the client, not the server's end
            self._put(err)
        finally:
            self._put(_END)

    async def next(self, request=None):
        """The next event; with ``request``, a client that leaves meanwhile cancels the job (and raises)."""
        if request is None:
            return await self.events.get()
        event, gone = asyncio.ensure_future(self.events.get()), asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if event not in done:
            event.cancel()
            self.cancelled.set()
            raise ClientGone
        return event.result()


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def _disconnected(request) -> None:
    """Returns when the client of ``request`` (whose body has been read) closes its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _status_of(err: Exception) -> int:
    """llama-cpp-python raises ValueError for requests it cannot serve (too long for the context, a template
    that refuses the messages): the client's error. Anything else is the server's."""
    import jinja2

    return 400 if isinstance(err, (ValueError, jinja2.TemplateError)) else 500


def create_app(pool: ModelPool, *, model_id: str, api_key: str | None = None):
    """The FastAPI application over ``pool``."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    ChatRequest, CompletionRequest = _request_models()
    app = FastAPI(title="komt-edge serve", docs_url=None, redoc_url=None, openapi_url=None)
    stop_strings = pool.first.stop

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if tuple(first.get("loc", ())) == ("body",) and kind and not kind.endswith("json"):
            return _error(415, f"the request body is {kind}: send it as JSON, with Content-Type: application/json")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else
                      str(first.get("msg", "invalid request")))

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else
                      "server_error")

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send Authorization: Bearer <the --api-key value>")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "parallel": len(pool.models), "busy": pool.busy,
                "auth": api_key is not None}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((STATIC / "chat.html").read_text(encoding="utf-8"))

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(time.time()),
                                            "owned_by": "komt-edge"}]}

    async def respond(request: Request, start: Callable[[LoadedModel, Callable[[], bool]], Generation],
                      stream: bool, shape: type[ChatShape] | type[CompletionShape]):
        """Run ``start`` on a pooled model; answer with ``shape``'s JSON, or stream it as server-sent events."""
        job = Job(start, stream, pool, asyncio.get_running_loop())
        try:
            first = await job.next(request)
        except ClientGone:  # the client left while waiting for its turn or its answer: no one reads this
            return _error(499, "the client closed the connection", "client_closed_request")
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if first is _END:
            return _error(503, "the request ended before any answer", "server_error")
        if isinstance(first, Exception):
            status = _status_of(first)
            return _error(status, str(first), "invalid_request_error" if status < 500 else "server_error")
        if not stream:
            return shape.whole(first, model_id)

        async def events():
            generation = first
            try:
                for chunk in shape.head(generation, model_id):
                    yield _sse(chunk)
                while (item := await job.next()) is not _END:
                    if isinstance(item, Exception):
                        yield _sse({"error": {"message": str(item), "type": "server_error"}})
                        break
                    yield _sse(shape.piece(generation, model_id, item))
                else:
                    yield _sse(shape.end(generation, model_id))
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # the client left (or the reply ended): stop generating

        return StreamingResponse(events(), media_type="text/event-stream; charset=utf-8",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def vocabulary() -> int:
        return pool.first.llm.n_vocab()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            fields = body.kwargs(stop_strings, vocabulary())
        except ValueError as err:
            return _error(400, str(err))
        return await respond(request, lambda m, cancelled: m.chat(messages, cancelled=cancelled, **fields),
                             body.stream, ChatShape)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        try:
            prompt = body.text()
            fields = body.kwargs([], vocabulary())
        except ValueError as err:
            return _error(400, str(err))
        return await respond(request, lambda m, cancelled: m.complete(prompt, cancelled=cancelled, **fields),
                             body.stream, CompletionShape)

    return app


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class ChatShape:
    """OpenAI's chat.completion of a finished generation, and the chunks of a streamed one."""

    @staticmethod
    def whole(g: Generation, model_id: str) -> dict:
        message = {"role": "assistant", "content": g.text}
        return {"id": "chat" + g.id, "object": "chat.completion", "created": g.created, "model": model_id,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": g.finish_reason}],
                "usage": g.usage()}

    @staticmethod
    def chunk(g: Generation, model_id: str, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": "chat" + g.id, "object": "chat.completion.chunk", "created": g.created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    @classmethod
    def head(cls, g: Generation, model_id: str) -> list[dict]:
        return [cls.chunk(g, model_id, {"role": "assistant"})]

    @classmethod
    def piece(cls, g: Generation, model_id: str, text: str) -> dict:
        return cls.chunk(g, model_id, {"content": text})

    @classmethod
    def end(cls, g: Generation, model_id: str) -> dict:
        return cls.chunk(g, model_id, {}, g.finish_reason)


class CompletionShape:
    """OpenAI's text_completion of a finished generation, and the chunks of a streamed one."""

    @staticmethod
    def chunk(g: Generation, model_id: str, text: str, finish_reason: str | None = None) -> dict:
        return {"id": g.id, "object": "text_completion", "created": g.created, "model": model_id,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}

    @classmethod
    def whole(cls, g: Generation, model_id: str) -> dict:
        return {**cls.chunk(g, model_id, g.text, g.finish_reason), "usage": g.usage()}

    @staticmethod
    def head(g: Generation, model_id: str) -> list[dict]:
        return []

    @classmethod
    def piece(cls, g: Generation, model_id: str, text: str) -> dict:
        return cls.chunk(g, model_id, text)

    @classmethod
    def end(cls, g: Generation, model_id: str) -> dict:
        return cls.chunk(g, model_id, "", g.finish_reason)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """The address can be listened on, before a model is loaded (uvicorn would log a traceback-like error)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise KomtError(f"--host {host}: {err.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise KomtError(f"cannot listen on {host}:{port}: {err.strerror}; choose another --port (0: any free "
                            "one) or stop what uses it") from None


class Server:
    """A running server (uvicorn in a thread): ``url``, ``stop()``; ``serve`` blocks on one until Ctrl-C."""

    def __init__(self, app, host: str, port: int, *, pool: ModelPool, verbose: bool = False):
        import uvicorn

        self.pool = pool
        config = uvicorn.Config(app, host=host, port=port, log_level="info" if verbose else "warning",
                                access_log=verbose, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise KomtError(f"could not listen on {host}:{port}: is the port in use? choose another with --port")
            time.sleep(0.02)
        sock = self._server.servers[0].sockets[0].getsockname()
        shown = f"[{sock[0]}]" if ":" in sock[0] else sock[0]
        self.url = f"http://{shown}:{sock[1]}"

    def wait(self) -> None:
        while self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.pool.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, parallel: int = 1,
          quant: str | None = None, org: str | None = None, revision: str | None = None, template: str | None = None,
          n_ctx: int | None = None, n_threads: int | None = None, lora: str | None = None, verbose: bool = False,
          log: Callable[[str], None] = print) -> Server:
    """Resolve MODEL, load ``parallel`` copies and start serving them; returns the running server."""
    from .output import is_verbose

    if parallel < 1:
        raise KomtError(f"--parallel {parallel}: give 1 or more")
    if api_key is not None and not api_key.strip():
        raise KomtError("--api-key is empty: give the key clients must send")
    check_port(host, port)
    path = resolve_gguf(model, quant=quant, org=org, revision=revision, log=log)
    models = [load(path, template=template, n_ctx=n_ctx, n_threads=n_threads, lora=lora) for _ in range(parallel)]
    pool = ModelPool(models)
    try:
        app = create_app(pool, model_id=path.stem, api_key=api_key)
        return Server(app, host, port, pool=pool, verbose=verbose or is_verbose())
    except BaseException:
        pool.close()
        raise


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, log: Callable[[str], None] = print,
          **kwargs) -> None:
    """`komt-edge serve`: start (see :func:`start`), print where, and serve until Ctrl-C."""
    server = start(model, host=host, port=port, log=log, **kwargs)
    try:
        first = server.pool.first
        what = f"komt-{first.family} template" if first.family else "the file's chat template"
        log(f"serving {first.path.name} ({what}, context {first.n_ctx}, {len(server.pool.models)} at a time)")
        log(f"  chat page:  {server.url}/")
        log(f"  OpenAI API: {server.url}/v1  (model id {first.path.stem!r})")
        if not is_loopback(host):
            log(f"  listening on {host}: reachable from other machines"
                + ("" if kwargs.get("api_key") else "; consider --api-key"))
        log("Ctrl-C stops the server")
        try:
            server.wait()
        except KeyboardInterrupt as err:
            if getattr(err, "signum", signal.SIGINT) != signal.SIGINT:
                raise  # SIGTERM/SIGHUP: the usual interrupted exit
            log("stopped")
    finally:
        server.stop()
