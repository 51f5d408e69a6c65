"""Request bodies of /v1/completions and /v1/chat/completions checked field by field, turned into scheduler
Requests; every problem becomes an APIError naming the field."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

from .. import structured
from ..harmony import forced_call
from ..request import Request
from ..sampling_params import MAX_BIAS, MAX_LOGPROBS, MAX_PENALTY
from .errors import APIError

MAX_STOP = 4  # as the OpenAI API allows
MAX_CHOICES = 16  # `n`: each choice takes a cache row and a place in the queue


@dataclass
class Parsed:
    request: Request
    stream: bool
    include_usage: bool
    n: int = 1  # choices per prompt: as many requests, each on its own row
    # completions: every prompt of the call (`request` carries the first; choices are prompt-major: choice
    # p * n + i is prompt p's i-th), and with `echo: true` each prompt's text, to go before its choices' text
    prompts: tuple[tuple[int, ...], ...] = ()
    echo: tuple[str, ...] | None = None
    # chat only
    messages: list | None = None
    stop_strings: tuple[str, ...] = ()  # chat: matched on the parsed content by the server, not on raw markup
    tools: list | None = None
    reasoning_effort: str | None = None
    forced: list[int] = field(default_factory=list)  # the reply's start the prompt writes (a forced tool call)

    @property
    def choices(self) -> int:
        return max(len(self.prompts), 1) * self.n

    @property
    def prompt_tokens(self) -> int:
        """The call's prompt tokens, each prompt counted once (whatever `n`)."""
        return sum(len(p) for p in self.prompts) if self.prompts else len(self.request.prompt)

    def choice(self, index: int) -> Request:
        """Choice `index`'s request: its prompt, and with a seed, seed + its place among its prompt's choices."""
        request = self.request
        if self.prompts:
            request = replace(request, prompt=self.prompts[index // self.n])
        if index % self.n and request.seed is not None:
            request = replace(request, seed=request.seed + index % self.n)
        return request


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, default, *, lo=None, hi=None, lo_open=False, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = _is_int(value) if integer else (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or not math.isfinite(value):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a finite number'}, got {value!r}", name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _bad(f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {value!r}", name)
    if hi is not None and value > hi:
        raise _bad(f"'{name}' must be <= {hi}, got {value!r}", name)
    return value


def check_model(body: dict, served: str, required: bool = True) -> None:
    model = body.get("model")
    if model is None:
        if not required:
            return
        raise _bad("'model' is required", "model")
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {model!r}", "model")
    if model != served:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")


def _stop(body: dict) -> tuple:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} non-empty strings", "stop")
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
        raise _bad("'stop_token_ids' must be a list of token ids", "stop_token_ids")
    return tuple(stop) + tuple(ids)


def _choices(body: dict) -> int:
    return _number(body, "n", 1, lo=1, hi=MAX_CHOICES, integer=True)


def _completion_logprobs(body: dict) -> int | None:
    """/v1/completions: `logprobs` is how many alternatives to report at each token (0: the chosen token's only)."""
    value = body.get("logprobs")
    if value is None or value is False:
        return None
    return _number(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS, integer=True)


def _chat_logprobs(body: dict) -> int | None:
    """/v1/chat/completions: `logprobs` true reports each content token's; `top_logprobs` that many alternatives."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _bad(f"'logprobs' must be a boolean, got {wanted!r}", "logprobs")
    top = _number(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS, integer=True)
    if top is not None and not wanted:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """`logit_bias`: an object from token ids (as strings, per the OpenAI API, or integers) to biases in
    [-100, 100]. Whether the ids lie in the vocabulary is checked with the request (check_request)."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise _bad("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise _bad(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_BIAS <= value <= MAX_BIAS:
            raise _bad(f"'logit_bias' of token {key} must be a number in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got "
                       f"{value!r}", "logit_bias")
        pairs.append((token, float(value)))
    return tuple(sorted(pairs))


def _response_format(body: dict) -> dict | None:
    """OpenAI's `response_format`: text (None), `json_object` (any JSON object) or `json_schema`."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type", "text") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return structured.json_schema(None)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(schema, (dict, type(None))):
            raise _bad("'response_format' json_schema needs 'json_schema': {'name': ..., 'schema': {...}}",
                       "response_format")
        return structured.json_schema(schema)
    raise _bad(f"'response_format' must be of type 'text', 'json_object' or 'json_schema', got "
               f"{kind if kind is not None else fmt!r}", "response_format")


# vLLM's `structured_outputs` keys (and the top-level `guided_*` fields of its earlier releases)
def _json_object(flag) -> dict:
    if flag is not True:
        raise ValueError(f"json_object must be true, got {flag!r}")
    return structured.json_schema(None)


_STRUCTURED = {"json": structured.json_schema, "regex": structured.regex, "choice": structured.choice,
               "grammar": structured.lark, "json_object": _json_object}


def _structured(body: dict) -> tuple[dict, str] | None:
    """What the reply must follow, at most one way: (a grammar of `runtime.structured`, the field that asked)."""
    fmt, asked = _response_format(body), []
    if fmt is not None:
        asked.append("response_format")
    spec = body.get("structured_outputs")
    if spec is not None:
        if not isinstance(spec, dict) or len([k for k in spec if k in _STRUCTURED and spec[k] is not None]) != 1:
            raise _bad(f"'structured_outputs' must name one of {sorted(_STRUCTURED)}", "structured_outputs")
        asked.append("structured_outputs")
    asked += [f"guided_{k}" for k in _STRUCTURED if body.get(f"guided_{k}") is not None]
    if len(asked) > 1:
        raise _bad(f"ask for one structured output, not {asked}", asked[1])
    if not asked:
        return None
    field_ = asked[0]
    if field_ == "response_format":
        return fmt, field_
    key, value = (next((k, v) for k, v in spec.items() if k in _STRUCTURED and v is not None)
                  if field_ == "structured_outputs" else (field_[len("guided_"):], body[field_]))
    if key == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _bad(f"'{field_}' json must be a JSON schema (an object, or its JSON text)", field_) from None
    try:
        return _STRUCTURED[key](value), field_
    except ValueError as exc:
        raise _bad(f"'{field_}': {exc}", field_) from None


def _grammar(text: str, field_: str, tokenizer) -> str:
    try:
        structured.check(text, tokenizer)
    except ValueError as exc:
        raise _bad(f"'{field_}': {exc}", field_) from None
    return text


def _echo(body: dict) -> bool:
    echo = body.get("echo", False)
    if not isinstance(echo, bool) and echo is not None:
        raise _bad(f"'echo' must be a boolean, got {echo!r}", "echo")
    return bool(echo)


def _common(body: dict, prompt: list[int], default_max_tokens: int, max_tokens_names: tuple[str, ...],
            logprobs: int | None, echo: bool = False) -> Request:
    """`echo`: the prompt comes back in the reply, with its tokens' log-probabilities where `logprobs` asks;
    `max_tokens` may then be 0 (the prompt scored, nothing generated: how evaluation harnesses score text)."""
    max_tokens = None
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_tokens = _number(body, name, None, lo=0 if echo else 1, integer=True)
    prompt_logprobs = logprobs if echo else None
    if max_tokens == 0 and prompt_logprobs is None:
        prompt_logprobs = 0  # (the scheduler ends a request without tokens once its prompt is scored)
    for name, allowed in (("best_of", (None, 1)), ("suffix", (None,))):
        if body.get(name) not in allowed:
            raise _bad(f"'{name}' is not supported by this server", name)
    return Request(
        prompt=tuple(prompt),
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=float(_number(body, "temperature", 1.0, lo=0, hi=2)),
        top_p=_number(body, "top_p", None, lo=0, hi=1, lo_open=True),
        top_k=_number(body, "top_k", None, lo=1, integer=True) if body.get("top_k") not in (-1, 0) else None,
        seed=_number(body, "seed", None, integer=True),
        stop=_stop(body),
        ignore_eos=bool(body.get("ignore_eos", False)),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        min_p=_number(body, "min_p", None, lo=0, hi=1),
        presence_penalty=float(_number(body, "presence_penalty", 0.0, lo=-MAX_PENALTY, hi=MAX_PENALTY)),
        frequency_penalty=float(_number(body, "frequency_penalty", 0.0, lo=-MAX_PENALTY, hi=MAX_PENALTY)),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, lo=0, lo_open=True)),
        logit_bias=_logit_bias(body),
    )


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad(f"'stream' must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    return bool(stream), bool(options.get("include_usage", False))


MAX_PROMPTS = 64  # prompts in one /v1/completions call (each prompt's choices take rows and queue places)


def _prompts(body: dict) -> list:
    """`prompt`: a string, a list of token ids, or a list of either (several prompts, as the OpenAI API allows)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("'prompt' is required", "prompt")
    one = lambda p: isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p))  # noqa: E731
    if one(prompt):
        return [prompt]
    if not (isinstance(prompt, list) and prompt and all(one(p) for p in prompt)):
        raise _bad("'prompt' must be a non-empty string, a non-empty list of token ids, or a list of those",
                   "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise _bad(f"'prompt' lists {len(prompt)} prompts; at most {MAX_PROMPTS} in one request", "prompt")
    return prompt


def parse_completion(body: dict, tokenizer, context: int) -> Parsed:
    prompts = _prompts(body)
    if any(isinstance(p, str) for p in prompts) and not tokenizer.available:
        raise _bad("this checkpoint has no tokenizer: send 'prompt' as a list of token ids", "prompt")
    ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    empty = next((k for k, p in enumerate(ids) if not p), None)
    if empty is not None:
        raise _bad(f"prompt {empty} is empty: at least one token is needed", "prompt")
    stream, include_usage = _stream(body)
    echo = _echo(body)
    request = _common(body, ids[0], 16, ("max_tokens",), _completion_logprobs(body), echo)
    asked = _structured(body)
    if asked is not None:
        request = replace(request, grammar=_grammar(structured.grammar(asked[0]), asked[1], tokenizer))
    texts = tuple(p if isinstance(p, str) else tokenizer.decode(i) if tokenizer.available else ""
                  for p, i in zip(prompts, ids)) if echo else None
    return Parsed(request, stream, include_usage, n=_choices(body), prompts=tuple(tuple(i) for i in ids),
                  echo=texts)


def _chat_prompt(body: dict, tokenizer, render) -> tuple[list[int], list[int], list | None]:
    """A chat request's prompt ids (the rendered messages, then the start of a call `tool_choice` forces), the
    forced part's ids, and the tools the model is shown (none for `tool_choice: "none"`)."""
    choice = body.get("tool_choice")
    tools = None if choice == "none" else body.get("tools")
    try:
        forced = forced_call(tools, choice)
    except ValueError as exc:
        raise _bad(str(exc), "tool_choice") from None
    try:
        text = render(body["messages"], tools, body.get("reasoning_effort"))
    except ValueError as exc:
        param = "tools" if "tool" in str(exc) else (
            "reasoning_effort" if "reasoning_effort" in str(exc) else "messages")
        raise _bad(str(exc), param) from None
    forced_ids = tokenizer.encode(forced) if forced else []
    return tokenizer.encode(text) + forced_ids, forced_ids, tools


def parse_chat(body: dict, tokenizer, context: int, render) -> Parsed:
    """`render(messages, tools, reasoning_effort) -> prompt text` (raises ValueError on bad messages).

    `stop` strings are not given to the scheduler (which matches the raw text, harmony markup included): they
    are returned in `stop_strings`, for the server to match on the `content` the client sees."""
    if body.get("messages") is None:
        raise _bad("'messages' is required", "messages")
    if _echo(body):
        raise _bad("'echo' is not supported in chat completions", "echo")
    ids, forced_ids, tools = _chat_prompt(body, tokenizer, render)
    stream, include_usage = _stream(body)
    default = max(context - len(ids), 1)  # the rest of the context, as OpenAI does without max_tokens
    request = _common(body, ids, default, ("max_tokens", "max_completion_tokens"), _chat_logprobs(body))
    strings = tuple(s for s in request.stop if isinstance(s, str))
    request = replace(request, stop=tuple(s for s in request.stop if not isinstance(s, str)),
                      grammar=_chat_grammar(body, tools, bool(forced_ids), tokenizer))
    return Parsed(request, stream, include_usage, n=_choices(body), messages=body["messages"], stop_strings=strings,
                  tools=tools, reasoning_effort=body.get("reasoning_effort"), forced=forced_ids)


def _chat_grammar(body: dict, tools: list | None, forced: bool, tokenizer) -> str | None:
    """The grammar a chat reply follows: a forced tool call's arguments held to the function's schema; else the
    structured output asked for as the `final` answer (reasoning stays free; offered tools may still be
    called, their arguments held to their schemas); else, where a tool is marked `strict` (OpenAI's strict
    function calling), a free answer or a call with schema-held arguments; else none."""
    asked = _structured(body)
    if forced:
        choice = body.get("tool_choice")
        name = choice["function"]["name"] if isinstance(choice, dict) else None
        return _grammar(structured.harmony_tool_call(tools, name), "tools", tokenizer)
    if asked is not None:
        return _grammar(structured.harmony_reply(asked[0], tools), asked[1], tokenizer)
    if tools and any(t["function"].get("strict") is True for t in tools):
        return _grammar(structured.harmony_reply(None, tools), "tools", tokenizer)
    return None


def parse_tokenize(body: dict, tokenizer, render) -> list[int]:
    """/tokenize: `prompt` (a string) or chat `messages` (with `tools`, `tool_choice`, `reasoning_effort`: the
    prompt a chat request would send) -> token ids."""
    if not tokenizer.available:
        raise _bad("this checkpoint has no tokenizer.json: nothing to tokenize with")
    if body.get("messages") is not None:
        return _chat_prompt(body, tokenizer, render)[0]
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _bad("'prompt' (a string) or 'messages' is required", "prompt")
    return tokenizer.encode(prompt)


def parse_detokenize(body: dict, tokenizer, vocab_size: int) -> list[int]:
    """/detokenize: `tokens`, a list of token ids of the vocabulary."""
    if not tokenizer.available:
        raise _bad("this checkpoint has no tokenizer.json: nothing to detokenize with")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
        raise _bad("'tokens' must be a list of token ids", "tokens")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise _bad(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "tokens")
    return tokens
