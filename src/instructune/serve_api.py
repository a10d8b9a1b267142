"""The OpenAI-compatible API of `instructune serve`: transformers' own request handlers (`transformers serve`) with
the run's model names put in front of them. Ours are the checks that answer a bad request with an OpenAI-shaped 4xx
(`{"error": {"message", "type", "param", "code"}}`, never a 500 with a traceback), the prompt each model name reads
(a task's name: the user's text in that task's training prompt, as `instructune generate` builds it) and the
defaults of a fine-tuned model (greedy, the task's answer budget). Generation, streaming and the response bodies
are transformers'."""

from __future__ import annotations

import hmac
import json
import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from transformers.cli.serving.chat_completion import ChatCompletionHandler, TransformersCompletionCreateParamsStreaming
from transformers.cli.serving.completion import CompletionHandler, TransformersTextCompletionCreateParams
from transformers.cli.serving.utils import CancelOnDisconnect, RequestIdMiddleware

from .errors import InstructuneError

log = logging.getLogger("instructune.serve")
# The OpenAI schema of each endpoint (transformers' copy of the openai package's own), less transformers' extensions:
# `generation_config` would hand a client any argument of `generate`.
EXTENSIONS = {"generation_config", "chat_template_kwargs"}
CHAT_FIELDS = set(TransformersCompletionCreateParamsStreaming.__mutable_keys__) - EXTENSIONS
TEXT_FIELDS = set(TransformersTextCompletionCreateParams.__mutable_keys__) - EXTENSIONS
# (kind, least, most) of each number a request may set; `n`: one answer per request
NUMBERS = {"max_tokens": (int, 1, None), "max_completion_tokens": (int, 1, None), "n": (int, 1, 1),
           "temperature": (float, 0, 2), "top_p": (float, 0, 1), "frequency_penalty": (float, -2, 2),
           "presence_penalty": (float, -2, 2), "seed": (int, -2**63, 2**63 - 1)}
# the other fields transformers reads, by the JSON type they must have
SHAPES = {"stream": (bool, "a boolean"), "stop": ((str, list), "a string or an array of strings"),
          "logit_bias": (dict, "an object mapping token ids to numbers"), "stream_options": (dict, "an object"),
          "tools": (list, "an array"), "suffix": (str, "a string")}
ROLES = {"system", "developer", "user", "assistant", "tool"}


class APIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def check_body(body, fields: set[str], text_field: str) -> None:
    """What OpenAI checks before it runs a request: an object, known fields, a model, numbers in range, the input."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    for name in body:
        if name not in fields:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", name)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise APIError(400, "You must provide a model parameter.", "model")
    for name, (kind, least, most) in NUMBERS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or \
                not math.isfinite(value):
            raise APIError(400, f"Invalid type for '{name}': expected {'a number' if kind is float else 'an integer'}, "
                                f"but got {value!r} instead.", name, "invalid_type")
        if (least is not None and value < least) or (most is not None and value > most):
            side = f"below minimum value. Expected a value >= {least}" if least is not None and value < least else \
                f"above maximum value. Expected a value <= {most}"
            raise APIError(400, f"Invalid '{name}': {kind.__name__} {side}, but got {value} instead.", name,
                           "integer_above_max_value" if name == "n" else "invalid_value")
    for name, (kind, words) in SHAPES.items():
        value = body.get(name)
        if value is not None and not isinstance(value, kind) or _bad_items(name, value):
            raise APIError(400, f"Invalid type for '{name}': expected {words}.", name, "invalid_type")
    if text_field == "messages":
        _check_messages(body.get("messages"))
    elif not isinstance(body.get("prompt"), str):
        raise APIError(400, "Invalid 'prompt': expected a string.", "prompt", "invalid_type")


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "Invalid 'messages': expected a non-empty array of message objects.", "messages")
    for i, m in enumerate(messages):
        where = f"messages.[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"Invalid '{where}.role': expected one of {sorted(ROLES)}.", f"{where}.role")
        content = m.get("content")
        parts_ok = isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
        if not (isinstance(content, str) or parts_ok or (content is None and m["role"] == "assistant")):
            raise APIError(400, f"Invalid '{where}.content': expected a string or an array of text parts.",
                           f"{where}.content")


def _bad_items(name: str, value) -> bool:
    """What inside `stop` and `logit_bias` transformers would fail on (a 500) instead of refusing."""
    if name == "stop" and isinstance(value, list):
        return not all(isinstance(v, str) for v in value)
    if name == "logit_bias" and isinstance(value, dict):
        return not all(k.lstrip("-").isdigit() and isinstance(v, (int, float)) and not isinstance(v, bool)
                       and -100 <= v <= 100 for k, v in value.items())
    return False


def message_text(message: dict) -> str:
    content = message.get("content") or ""
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


class Served:
    """What both endpoints do before transformers generates: the model name, the prompt's tokens, the budget."""

    def __init__(self, served: dict, generation_state):
        super().__init__(None, generation_state)  # the handler's model manager: names are resolved here instead
        self.served = served

    def model(self, name: str):
        if name not in self.served:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.", "model",
                           "model_not_found")
        return self.served[name]

    def _build_generation_kwargs(self, body: dict, model_generation_config) -> dict:
        """transformers' settings for the request, with a fine-tuned model's defaults: the task's answer budget (the
        run's own name: 256 tokens, as `chat`) unless the request sets one, greedy unless it asks a temperature > 0."""
        kwargs = super()._build_generation_kwargs(body, model_generation_config)
        if body.get("max_completion_tokens") is None and body.get("max_tokens") is None:
            kwargs["max_new_tokens"] = model_generation_config.max_new_tokens
        kwargs["do_sample"] = bool(body.get("temperature"))
        return kwargs

    def prepare(self, body: dict, chat: bool):
        """The served model, its inputs (as transformers' runners take them) and the generation settings."""
        engine = self.model(body["model"])
        kwargs = self._build_generation_kwargs(body, engine.generation_config)
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        try:  # free chat through the chat template the run trained with: transformers' rendering (tools too)
            ids = self.render_messages(engine, body["messages"], body)["input_ids"] \
                if chat and engine.template is None and engine.fmt.chat else \
                engine.prompt_ids(body, chat, kwargs["max_new_tokens"])
        except InstructuneError as e:
            raise APIError(400, str(e), "messages" if chat else "prompt") from None
        ids = ids if isinstance(ids, list) else ids.tolist()
        ids = ids[0] if ids and isinstance(ids[0], list) else ids
        kwargs["max_new_tokens"] = engine.fit(len(ids), kwargs["max_new_tokens"], strict=bool(asked)
                                              or engine.template is not None, param="messages" if chat else "prompt")
        return engine, engine.inputs(ids), kwargs


class ChatHandler(Served, ChatCompletionHandler):
    """/v1/chat/completions: transformers' handler (streaming, usage, tool calls) on our model names."""

    async def handle_request(self, body, request_id: str):
        check_body(body, CHAT_FIELDS, "messages")
        engine, inputs, kwargs = await self.run_in_thread(self.prepare, body, True)
        if body.get("stream"):
            return self._streaming(request_id, engine, inputs, kwargs, body.get("tools"), body.get("stream_options"))
        return await self._non_streaming(request_id, engine, inputs, kwargs, tools=body.get("tools"))


class TextHandler(Served, CompletionHandler):
    """/v1/completions: a prompt as text (a task's name: the task's input, in its training prompt)."""

    async def handle_request(self, body, request_id: str):
        check_body(body, TEXT_FIELDS, "prompt")
        engine, inputs, kwargs = await self.run_in_thread(self.prepare, body, False)
        if body.get("stream"):
            return self._streaming(request_id, engine, inputs, kwargs, body.get("suffix"), body.get("stream_options"))
        return await self._non_streaming(request_id, engine, inputs, kwargs, body.get("suffix"))


def build_app(served: dict, chat: ChatHandler, text: TextHandler, api_key: str | None) -> FastAPI:
    """The routes (models, chat and text completions, health), the API key check and the errors, all OpenAI-shaped."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(CancelOnDisconnect)
    _error_handlers(app)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise APIError(401, "You didn't provide an API key. Provide it as 'Authorization: Bearer YOUR_KEY'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(given[len("Bearer "):].encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/v1/models")
    def models(request: Request):
        authorized(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": m.created, "owned_by": "instructune"}
                                           for name, m in served.items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorized(request)
        return await chat.handle_request(await _json(request), request.state.request_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorized(request)
        return await text.handle_request(await _json(request), request.state.request_id)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request. The body must be valid JSON.") from None


def _error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error object: ours, the framework's (unknown path, wrong method), transformers' own
    refusals (ValueError: a request it cannot take) and, for a fault of the server, a 500 with no traceback."""

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse(APIError(exc.status_code, message).body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        return JSONResponse(APIError(400, str(exc.errors()[:1])).body, status_code=400)

    @app.exception_handler(ValueError)
    async def refused(_request, exc: ValueError):
        return JSONResponse(APIError(400, str(exc)).body, status_code=400)

    @app.exception_handler(Exception)
    async def fault(_request, exc: Exception):
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        body = APIError(500, f"The server had an error while processing your request ({type(exc).__name__}).",
                        kind="server_error").body
        return JSONResponse(body, status_code=500)
