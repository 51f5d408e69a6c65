"""The FastAPI app: OpenAI's /v1/models, /v1/completions, /v1/chat/completions and /v1/responses (JSON or
server-sent events), vLLM's /tokenize and /detokenize, plus /health and /metrics (Prometheus text). Requests go to
an engine: a `Scheduler` in another process (`EngineClient`, as `tools.serve` runs it) or in this one
(`LocalEngine`); each token reaches the request's asyncio queue on the app's event loop."""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import math
import time
import uuid
from contextlib import aclosing

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import structured
from ..harmony import HarmonyDelta, HarmonyStreamParser, HarmonyTokens, render_chat
from ..invalid import invalid
from ..request import QueueFull
from ..stop_text import StopText
from .errors import APIError, error_body, error_response
from .logprobs import ChatLogprobs, CompletionLogprobs, TokenNames
from .protocol import Parsed, check_model, parse_chat, parse_completion, parse_detokenize, parse_tokenize
from .responses import ResponseStore, ResponseWriter, chat_body, renamed, stored, usage as response_usage

DEFAULT_MAX_BODY = 4 << 20  # bytes: a 128k-token prompt as JSON token ids fits
DISCONNECT_POLL_S = 0.5


def create_app(engine, model_name: str, *, max_body_bytes: int = DEFAULT_MAX_BODY,
               api_key: str | None = None) -> FastAPI:
    """`engine`: an `EngineClient` (a split server's front end) or a `LocalEngine` (a `Scheduler` served from this
    process). Until the engine is ready (`engine.ready`, an asyncio.Event: its model loaded) every route answers
    503. With `api_key`, the API's routes (not /health, /metrics) answer 401 unless sent `Authorization: Bearer
    <api_key>`."""
    tokenizer = engine.tokenizer
    harmony = HarmonyTokens.from_tokenizer(tokenizer) if tokenizer.available else None
    names = TokenNames(tokenizer)
    structured.prepare(tokenizer)
    created = int(time.time())
    app = FastAPI(title="gptoss", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_WhileLoading, ready=engine.ready)
    if api_key:  # (added last, so checked first: no key, no answer, loading or not)
        app.add_middleware(_RequireKey, key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        return JSONResponse(error_body(400, str(exc)), status_code=400)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": engine.error}, status_code=503)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        try:
            text = await engine.metrics_text()
        except (RuntimeError, asyncio.TimeoutError) as exc:
            raise APIError(503, f"the engine did not answer: {exc or 'timed out'}") from None
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "gptoss",
                "max_model_len": engine.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model({"model": model_id}, model_name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await _json_body(http, max_body_bytes)
        check_model(body, model_name)
        parsed = parse_completion(body, tokenizer, engine.context)
        rid = f"cmpl-{uuid.uuid4().hex}"
        wanted = parsed.request.logprobs is not None
        logprobs = [CompletionLogprobs(names) if wanted else None for _ in range(parsed.choices)]
        choices = _submit(engine, parsed)
        if parsed.stream:
            return _sse(_completion_chunks(rid, model_name, parsed, choices, logprobs), choices)
        texts, finish, tokens = [[] for _ in range(parsed.choices)], [None] * parsed.choices, 0
        echo = _Echo(parsed)
        async for i, event in _drain(choices, http):
            tokens += event.token_id >= 0
            texts[i].append(echo.before(i, event, logprobs[i]) + event.text)
            finish[i] = event.finish_reason or finish[i]
            if wanted:
                logprobs[i].add(event)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "text": "".join(texts[i]), "finish_reason": finish[i],
                             "logprobs": logprobs[i].take() if wanted else None} for i in range(parsed.choices)],
                "usage": _usage(parsed.prompt_tokens, tokens, choices)}

    render = lambda m, t, e: render_chat(tokenizer, m, tools=t, reasoning_effort=e)  # noqa: E731

    @app.post("/tokenize")
    async def tokenize(http: HTTPRequest):
        """A prompt's token ids (or a chat's: its rendered prompt), as vLLM's server answers."""
        body = await _json_body(http, max_body_bytes)
        check_model(body, model_name, required=False)
        tokens = parse_tokenize(body, tokenizer, render)
        return {"count": len(tokens), "max_model_len": engine.context, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(http: HTTPRequest):
        body = await _json_body(http, max_body_bytes)
        check_model(body, model_name, required=False)
        return {"prompt": tokenizer.decode(parse_detokenize(body, tokenizer, engine.vocab_size))}

    async def chat_body_of(http: HTTPRequest) -> dict:
        """A chat-shaped request's body, its model checked (chat needs the tokenizer's harmony tokens)."""
        body = await _json_body(http, max_body_bytes)
        check_model(body, model_name)
        if harmony is None:
            raise APIError(400, "this checkpoint has no tokenizer.json, so no chat: use /v1/completions with "
                                "token ids")
        return body

    kept = ResponseStore()  # Responses API responses, for previous_response_id and GET

    def chat_reply(parsed: Parsed) -> _ChatReply:
        return _ChatReply(_parser(harmony, tokenizer, parsed.forced), parsed.stop_strings,
                          ChatLogprobs(names) if parsed.request.logprobs is not None else None)

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        parsed = parse_chat(await chat_body_of(http), tokenizer, engine.context, render)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        replies = [chat_reply(parsed) for _ in range(parsed.choices)]
        choices = _submit(engine, parsed)
        if parsed.stream:
            return _sse(_chat_chunks(rid, model_name, parsed, choices, replies), choices)
        async with aclosing(_drain(choices, http)) as stream:
            async for i, event in stream:
                replies[i].feed(event, choices.handles[i])
                if all(r.ended for r in replies):
                    break
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "message": _chat_message(rid, r), "finish_reason": r.finish_reason,
                             "logprobs": r.logprobs.whole() if r.logprobs is not None else None}
                            for i, r in enumerate(replies)],
                "usage": _usage(parsed.prompt_tokens, sum(r.tokens for r in replies), choices)}

    @app.post("/v1/responses")
    async def responses(http: HTTPRequest):
        """OpenAI's Responses API over the chat path (responses.py)."""
        body = await chat_body_of(http)
        try:
            earlier = []
            if body.get("previous_response_id") is not None:
                earlier = kept.get(body["previous_response_id"], "previous_response_id")[1]
            chat_request, conversation = chat_body(body, earlier)
            parsed = parse_chat(chat_request, tokenizer, engine.context, render)
            choices = _submit(engine, parsed)
        except APIError as exc:
            raise renamed(exc) from None
        reply = chat_reply(parsed)
        writer = ResponseWriter(model_name, body)

        def keep():  # (a failed response is not kept)
            if stored(body) and writer.status in ("completed", "incomplete"):
                kept.put(writer.response(), conversation + writer.messages())

        if parsed.stream:
            return _sse(_response_events(writer, parsed, choices, reply, keep), choices, named=True)
        async with aclosing(_drain(choices, http)) as stream:
            async for _, event in stream:
                writer.add(reply.feed(event, choices.handles[0]), _answer_logprobs(reply))
        writer.finish(reply.finish_reason, _response_usage(parsed, reply, choices))
        keep()
        return writer.response()

    @app.get("/v1/responses/{response_id}")
    async def stored_response(response_id: str):
        return kept.get(response_id)[0]

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        kept.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    return app


# -- plumbing --------------------------------------------------------------------------------------------------
LOADING_RETRY_AFTER_S = 5


class _WhileLoading:
    """ASGI middleware: until `ready` is set (the engine's model loaded) every route but /health (which says
    "loading") answers 503 with Retry-After, as llama.cpp's server does while it loads."""

    def __init__(self, app, ready: asyncio.Event):
        self.app, self.ready = app, ready

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self.ready.is_set() and scope["path"] != "/health":
            response = JSONResponse(error_body(503, "the model is loading; try again shortly", code="model_loading"),
                                    status_code=503, headers={"Retry-After": str(LOADING_RETRY_AFTER_S)})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _RequireKey:
    """ASGI middleware: the API's routes need `Authorization: Bearer <key>` (compared in constant time); the
    probes (/health, /metrics) stay open, as vLLM's are. Plain ASGI, not BaseHTTPMiddleware, which would sit
    between a streaming response and the client's disconnect."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(error_body(401, "a valid API key is required: send 'Authorization: Bearer "
                                                        "<key>'", code="invalid_api_key"), status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _json_body(http: HTTPRequest, limit: int) -> dict:
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; the limit is {limit}")
    raw = bytearray()
    async for part in http.stream():
        raw += part
        if len(raw) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


class _Choices:
    """The `n` requests of one API call (each on its own row; with a seed, choice i samples with seed + i), their
    events on one queue as (choice index, event)."""

    def __init__(self, engine, parsed: Parsed):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles = []
        try:
            for i in range(parsed.choices):  # the engine delivers on this event loop
                try:
                    self.handles.append(engine.submit(parsed.choice(i), functools.partial(self._deliver, i)))
                except (ValueError, TypeError) as exc:
                    if len(parsed.prompts) > 1:  # name the prompt at fault
                        raise invalid(getattr(exc, "field", None) or "prompt", f"prompt {i // parsed.n}: {exc}",
                                      kind=type(exc), code=getattr(exc, "code", None)) from None
                    raise
        except BaseException:
            self.cancel()  # all or none: the choices already queued give their places back
            raise
        self.running = set(range(parsed.choices))  # the choices whose last event has not come yet

    def _deliver(self, index: int, event) -> None:
        self.queue.put_nowait((index, event))

    async def next(self, timeout: float | None = None):
        """The next (choice index, event); asyncio.TimeoutError after `timeout` seconds without one."""
        index, event = await asyncio.wait_for(self.queue.get(), timeout)
        if event.finish_reason is not None:
            self.running.discard(index)
        return index, event

    def cancel(self) -> None:
        for handle in self.handles:
            if handle.finish_reason is None:
                handle.cancel()

    @property
    def reused(self) -> int:
        return self.handles[0].reused


def _submit(engine, parsed: Parsed) -> _Choices:
    if parsed.choices > engine.max_queue:  # (they are queued all or none: more could never fit)
        raise APIError(400, f"the request asks for {parsed.choices} choices ({max(len(parsed.prompts), 1)} "
                            f"prompts x n = {parsed.n}); this server queues at most {engine.max_queue} at once",
                       param="n" if len(parsed.prompts) <= 1 else "prompt")
    try:
        return _Choices(engine, parsed)
    except QueueFull as exc:
        raise APIError(429, str(exc), code="queue_full",
                       headers={"Retry-After": str(math.ceil(exc.retry_after_s))}) from None
    except RuntimeError as exc:  # the scheduler stopped after a model failure
        raise APIError(503, str(exc)) from None
    except (ValueError, TypeError) as exc:  # the request's checks (runtime/invalid.py: they name the field)
        param = getattr(exc, "field", None)
        if param in (None, "prompt") and parsed.messages is not None:
            param = "messages"
        raise APIError(400, str(exc), param=param, code=getattr(exc, "code", None)) from None


async def _drain(choices: _Choices, http: HTTPRequest):
    """(choice index, event) until every choice's last event; a client gone meanwhile cancels them all (their rows
    are freed)."""
    try:
        while choices.running:
            try:
                index, event = await choices.next(DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    return
                continue
            if event.finish_reason == "error":
                raise APIError(500, f"generation failed: {choices.handles[index].finish_reason}")
            yield index, event
    finally:
        choices.cancel()


def _sse(chunks, choices: _Choices, named: bool = False) -> StreamingResponse:
    """Server-sent events: each chunk a `data:` line, then `data: [DONE]`; `named` (the Responses API): each
    preceded by an `event:` line with its type, and no [DONE]."""
    async def body():
        try:
            async for chunk in chunks:
                name = f"event: {chunk['type']}\n" if named else ""
                yield f"{name}data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
            if not named:
                yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed) or the stream ended: free the rows either way
            choices.cancel()
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(choices: _Choices):
    """(choice index, event) until every choice's last event, or an error object when generation failed."""
    while choices.running:
        index, event = await choices.next()
        if event.finish_reason == "error":
            yield {"error": error_body(500, "generation failed")["error"]}
            return
        yield index, event


def _usage(prompt: int, completion: int, choices: _Choices) -> dict:
    """OpenAI's usage object: the prompt counted once, the completion tokens of every choice; `cached_tokens`:
    prompt tokens whose K/V a cache row still held (not prefilled), for the first choice."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": choices.reused}}


def _call_id(rid: str, index: int) -> str:
    return f"call_{rid[-12:]}_{index}"


def _parser(harmony: HarmonyTokens, tokenizer, forced: list[int]) -> HarmonyStreamParser:
    """A reply's parser, told what the prompt already wrote of the reply (a forced tool call's start)."""
    parser = HarmonyStreamParser(harmony, tokenizer.decode)
    parser.prefill(forced)
    return parser


def _chat_message(rid: str, reply: "_ChatReply") -> dict:
    parser = reply.parser
    message = {"role": "assistant", "content": reply.content or (None if parser.tool_calls else ""),
               "reasoning_content": parser.reasoning or None}
    if parser.tool_calls:
        message["tool_calls"] = [{"id": _call_id(rid, i), "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}}
                                 for i, c in enumerate(parser.tool_calls)]
    return message


class _Echo:
    """`echo`: each choice's first event brings the prompt's text first (and its tokens' figures, where
    log-probabilities are asked for)."""

    def __init__(self, parsed: Parsed):
        self.parsed = parsed
        self.pending = set(range(parsed.choices)) if parsed.echo is not None else set()

    def before(self, index: int, event, logprobs: CompletionLogprobs | None) -> str:
        if index not in self.pending:
            return ""
        self.pending.discard(index)
        prompt = index // self.parsed.n
        if logprobs is not None:
            logprobs.add_prompt(self.parsed.prompts[prompt], event.prompt_logprobs)
        return self.parsed.echo[prompt]


async def _completion_chunks(rid, model, parsed: Parsed, choices: _Choices, logprobs: list):
    tokens, echo = 0, _Echo(parsed)
    base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    async for item in _events(choices):
        if isinstance(item, dict):
            yield item
            return
        i, event = item
        tokens += event.token_id >= 0
        text = echo.before(i, event, logprobs[i]) + event.text
        if logprobs[i] is not None:
            logprobs[i].add(event)
        if text or event.finish_reason:  # (a token whose text is held back: its logprobs go with the next)
            yield {**base, "choices": [{"index": i, "text": text, "finish_reason": event.finish_reason,
                                        "logprobs": logprobs[i].take() if logprobs[i] is not None else None}]}
    if parsed.include_usage:
        yield {**base, "choices": [], "usage": _usage(parsed.prompt_tokens, tokens, choices)}


async def _chat_chunks(rid, model, parsed: Parsed, choices: _Choices, replies: list["_ChatReply"]):
    base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

    def chunk(i, delta, finish=None, logprobs=None):
        return {**base, "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

    def content_logprobs(i):  # the content tokens' since the last content chunk (their text is in this one)
        return replies[i].logprobs.take() if replies[i].logprobs is not None else None

    for i in range(parsed.choices):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for item in _events(choices):
        if isinstance(item, dict):
            yield item
            return
        i, event = item
        reply = replies[i]
        if reply.ended:  # stopped by a stop string: what its row made before it was freed is dropped
            continue
        for d in reply.feed(event, choices.handles[i]):
            if d.kind == "reasoning":
                yield chunk(i, {"reasoning_content": d.text})
            elif d.kind == "content":
                yield chunk(i, {"content": d.text}, logprobs=content_logprobs(i))
            elif d.kind == "tool_call":
                yield chunk(i, {"tool_calls": [{"index": d.index, "id": _call_id(rid, d.index), "type": "function",
                                                "function": {"name": d.name, "arguments": ""}}]})
            else:
                yield chunk(i, {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]})
        if reply.ended:
            yield chunk(i, {}, reply.finish_reason, content_logprobs(i))
            if all(r.ended for r in replies):
                break
    if parsed.include_usage:
        yield {**base, "choices": [], "usage": _usage(parsed.prompt_tokens, sum(r.tokens for r in replies),
                                                      choices)}


def _response_usage(parsed: Parsed, reply: "_ChatReply", choices: _Choices) -> dict:
    return response_usage(parsed.prompt_tokens, reply.tokens, reply.parser.reasoning_tokens, choices.reused)


def _answer_logprobs(reply: "_ChatReply"):
    return (lambda: reply.logprobs.take()["content"]) if reply.logprobs is not None else None


async def _response_events(writer: ResponseWriter, parsed: Parsed, choices: _Choices, reply: "_ChatReply",
                           keep):
    """The Responses API's stream; `keep()` stores the response once it is done."""
    for event in writer.start():
        yield event
    async for item in _events(choices):
        if isinstance(item, dict):  # generation failed
            for event in writer.failed(item["error"]["message"]):
                yield event
            return
        _, token = item
        for event in writer.add(reply.feed(token, choices.handles[0]), _answer_logprobs(reply)):
            yield event
        if reply.ended:
            break
    events = writer.finish(reply.finish_reason, _response_usage(parsed, reply, choices))
    keep()
    for event in events:
        yield event


class _ChatReply:
    """The harmony parser's deltas for one request, with the request's stop strings matched on the content the
    client sees: not on the raw text (harmony markup such as `<|channel|>final<|message|>` never stops a reply),
    nor on reasoning or tool-call arguments. The content pieces are one stream, as the client joins them. With
    `logprobs`, the content tokens' log-probabilities (the parser says which tokens the content came from).
    `tokens` counts the generated tokens taken; the reply has `ended` at its last event or a stop string."""

    def __init__(self, parser: HarmonyStreamParser, stop_strings, logprobs: ChatLogprobs | None = None):
        self.parser, self.stops, self.logprobs = parser, StopText(list(stop_strings)), logprobs
        self.content, self.tokens, self._finish = "", 0, None
        self._events = []  # every token's, in the order pushed (with logprobs only)

    @property
    def ended(self) -> bool:
        return self._finish is not None

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's: "tool_calls" when the reply ended in a call."""
        if self.parser.ended_with == "call" and self.parser.tool_calls:
            return "tool_calls"
        return self._finish

    def feed(self, event, handle) -> list[HarmonyDelta]:
        """The deltas `event` makes certain; a stop string in the content cancels `handle` (the row is freed at the
        next step). Once the reply has ended, events are ignored."""
        if self.ended:
            return []
        self.tokens += event.token_id >= 0
        self._finish = event.finish_reason
        deltas = self.parser.push(event.token_id) if event.token_id >= 0 else []
        if self.logprobs is not None and event.token_id >= 0:
            self._events.append(event)
            for at in self.parser.content_positions:  # (a header that was not harmony: all of its tokens)
                self.logprobs.add(self._events[at])
        if event.finish_reason is not None:
            deltas += self.parser.finish()
        out = []
        for d in deltas:
            if d.kind == "content":
                d = HarmonyDelta("content", self.stops.push(d.text))
                self.content += d.text
            out.append(d)
            if self.stops.hit:
                break
        if event.finish_reason is not None:
            tail = self.stops.flush()
            self.content += tail
            out.append(HarmonyDelta("content", tail))
        if self.stops.hit:
            handle.cancel()
            self._finish = "stop"
        return [d for d in out if d.text or d.kind == "tool_call"]
