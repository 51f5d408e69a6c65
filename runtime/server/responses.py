"""OpenAI's Responses API (`POST /v1/responses`, the interface GPT-OSS was published with) over the chat path.

A request becomes the chat request it means (`chat_body`): `input` items become messages (a `reasoning` item is
the next assistant turn's reasoning, `function_call` an assistant tool call, `function_call_output` its result),
`instructions` a developer message, function tools are nested as chat has them, `text.format` becomes
`response_format`, `reasoning.effort` `reasoning_effort`, `max_output_tokens` `max_tokens`, `top_logprobs` or
`include: ["message.output_text.logprobs"]` chat's `logprobs`; errors name the Responses field. The reply's
harmony deltas become output items (`ResponseWriter`): `reasoning` (its text as `reasoning_text` content: no
summaries are written), `message` (`output_text`), `function_call`; whole, or streamed as the API's typed events
(`response.created` ... `response.completed`). Responses are kept in memory (`ResponseStore`, unless sent with
`store: false`): a request continues one with `previous_response_id`, GET /v1/responses/{id} returns one and
DELETE forgets it."""
from __future__ import annotations

import time
import uuid
from collections import OrderedDict

from ..harmony import HarmonyDelta
from .errors import APIError

# chat field -> the Responses field a request sets it with (for error messages)
RESPONSES_FIELD = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text",
                   "reasoning_effort": "reasoning"}
PASSED = ("model", "temperature", "top_p", "stream", "tool_choice", "seed", "top_k", "min_p", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "logit_bias", "structured_outputs", "top_logprobs")  # in both
LOGPROBS = "message.output_text.logprobs"  # the `include` entry that asks for the answer's log-probabilities
REFUSED = {"conversation": "conversation objects are not kept: continue with 'previous_response_id' or send the "
                           "whole conversation as 'input'",
           "background": "background responses are not supported",
           "prompt": "stored prompts are not supported"}
EFFORTS = ("low", "medium", "high")


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param)


def _text(content, where: str) -> str:
    """Item content: a string, or a list of text parts (input_text, output_text, text, reasoning_text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and isinstance(part.get("text"), str)
                    and part.get("type") in ("input_text", "output_text", "text", "reasoning_text", "summary_text")):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"{where}.content[{j}]: only text parts are supported here, got {kind!r}", "input")
            out.append(part["text"])
        return "".join(out)
    raise _bad(f"{where}.content must be a string or a list of text parts", "input")


def _instructions(body: dict) -> list[dict]:
    """`instructions` as the developer message (not carried over to a continuation, as OpenAI has it)."""
    instructions = body.get("instructions")
    if instructions is None:
        return []
    if not isinstance(instructions, str):
        raise _bad("'instructions' must be a string", "instructions")
    return [{"role": "developer", "content": instructions}]


def _messages(body: dict) -> list[dict]:
    """`input` as chat messages."""
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("'input' must be a non-empty string or a non-empty list of items", "input")
    return _item_messages(items)


def _item_messages(items: list) -> list[dict]:
    """Items (a request's input, or a response's output) as chat messages: a reasoning item goes with the
    assistant turn that follows it."""
    messages, reasoning = [], None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object", "input")
        kind = item.get("type", "message")
        if kind == "reasoning":
            reasoning = _text(item.get("content") or item.get("summary") or [], where)
        elif kind == "message":
            msg = {"role": item.get("role"), "content": _text(item.get("content"), where)}
            if msg["role"] == "assistant" and reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            messages.append(msg)
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("arguments", ""), str):
                raise _bad(f"{where}: a function_call needs 'name' and 'arguments' (a string)", "input")
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item["name"], "arguments": item.get("arguments", "")}}
            msg = {"role": "assistant", "content": None, "tool_calls": [call]}
            if reasoning is not None:
                msg["reasoning_content"], reasoning = reasoning, None
            messages.append(msg)
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _text(output, where)})
        else:
            raise _bad(f"{where}: items of type {kind!r} are not supported (message, reasoning, function_call, "
                       f"function_call_output are)", "input")
    return messages


def _tools(body: dict):
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise _bad(f"tools[{i}]: only function tools are supported, got {kind!r}", "tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": fn})
    return out or None


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _format(body: dict):
    text = body.get("text")
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or not isinstance(fmt, (dict, type(None))):
        raise _bad("'text' must be {'format': {'type': 'text' | 'json_object' | 'json_schema', ...}}", "text")
    if fmt is None or fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}


def chat_body(body: dict, earlier: list[dict] = ()) -> tuple[dict, list[dict]]:
    """The /v1/chat/completions body a Responses request means (APIError naming the Responses field), and the
    conversation it continues, as chat messages: `earlier` (a stored response's, for `previous_response_id`),
    then its `input` (without `instructions`, which apply to this request only)."""
    for name, why in REFUSED.items():
        if body.get(name) is not None:
            raise _bad(f"'{name}': {why}", name)
    if body.get("truncation") not in (None, "disabled"):
        raise _bad("'truncation' must be 'disabled': a conversation longer than the context is refused, not cut",
                   "truncation")
    chat = {k: body[k] for k in PASSED if k in body}
    conversation = [*earlier, *_messages(body)]
    chat["messages"] = _instructions(body) + conversation
    tools = _tools(body)
    if tools is not None:
        chat["tools"] = tools
    if "tool_choice" in body:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _format(body)
    if fmt is not None:
        chat["response_format"] = fmt
    reasoning = body.get("reasoning")
    if reasoning is not None:
        effort = reasoning.get("effort") if isinstance(reasoning, dict) else reasoning
        if effort is not None and effort not in EFFORTS:
            raise _bad(f"'reasoning.effort' must be one of {list(EFFORTS)} for GPT-OSS, got {effort!r}",
                       "reasoning")
        if effort is not None:
            chat["reasoning_effort"] = effort
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    include = body.get("include") or []
    if not isinstance(include, list):
        raise _bad("'include' must be a list", "include")
    if LOGPROBS in include or body.get("top_logprobs") is not None:
        chat["logprobs"] = True
    return chat, conversation


def renamed(exc: APIError) -> APIError:
    """A chat-path error, naming the Responses field instead."""
    if exc.param in RESPONSES_FIELD:
        old, exc.param = exc.param, RESPONSES_FIELD[exc.param]
        exc.message = exc.message.replace(f"'{old}'", f"'{exc.param}'")
    return exc


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseWriter:
    """One response's output items, built from the reply's harmony deltas. `add` returns the stream events the
    deltas make (each numbered); `finish` closes the open item and returns the last events; `response` is the
    Response object at any point."""

    def __init__(self, model: str, body: dict):
        self.id, self.created, self.model, self.body = _new_id("resp"), int(time.time()), model, body
        self.items: list[dict] = []
        self.status, self.incomplete, self.error = "in_progress", None, None
        self.usage = None
        self._open: dict | None = None  # the item being written
        self._calls: dict[int, dict] = {}  # the parser's call index -> its item
        self._seq = 0

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def start(self) -> list[dict]:
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]

    # -- items ----------------------------------------------------------------------------------------------
    def _begin(self, item: dict, part: dict | None) -> list[dict]:
        self.items.append(item)
        self._open = item
        at = len(self.items) - 1
        out = [self._event("response.output_item.added", output_index=at, item=dict(item, content=[])
                           if "content" in item else dict(item))]
        if part is not None:
            out.append(self._event("response.content_part.added", item_id=item["id"], output_index=at,
                                   content_index=0, part=part))
        return out

    def _close(self, status: str) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        at, out = self.items.index(item), []
        item["status"] = status
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            out += [self._event("response.reasoning_text.done", item_id=item["id"], output_index=at, content_index=0,
                                text=text),
                    self._event("response.content_part.done", item_id=item["id"], output_index=at,
                                content_index=0, part={"type": "reasoning_text", "text": text})]
        elif item["type"] == "message":
            part = item["content"][0]
            out += [self._event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0,
                                text=part["text"], logprobs=part["logprobs"]),
                    self._event("response.content_part.done", item_id=item["id"], output_index=at,
                                content_index=0, part=part)]
        else:
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                                   name=item["name"], arguments=item["arguments"]))
        return out + [self._event("response.output_item.done", output_index=at, item=item)]

    def add(self, deltas: list[HarmonyDelta], logprobs=None) -> list[dict]:
        """`logprobs()`, where log-probabilities were asked for: the entries of the answer's tokens since the last
        call (ChatLogprobs), which go with the answer's next text."""
        out = []
        for d in deltas:
            if d.kind == "tool_call":
                out += self._close("completed")
                item = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress",
                        "call_id": _new_id("call"), "name": d.name, "arguments": ""}
                self._calls[d.index] = item
                out += self._begin(item, None)
            elif d.kind == "tool_arguments":
                item = self._calls[d.index]
                item["arguments"] += d.text
                out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                       output_index=self.items.index(item), delta=d.text))
            elif d.kind == "reasoning":
                if self._open is None or self._open["type"] != "reasoning":
                    out += self._close("completed")
                    out += self._begin({"id": _new_id("rs"), "type": "reasoning", "status": "in_progress",
                                        "summary": [], "content": [{"type": "reasoning_text", "text": ""}]},
                                       {"type": "reasoning_text", "text": ""})
                self._open["content"][0]["text"] += d.text
                out.append(self._event("response.reasoning_text.delta", item_id=self._open["id"],
                                       output_index=len(self.items) - 1, content_index=0, delta=d.text))
            else:
                if self._open is None or self._open["type"] != "message":
                    out += self._close("completed")
                    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    out += self._begin({"id": _new_id("msg"), "type": "message", "status": "in_progress",
                                        "role": "assistant", "content": [dict(empty)]}, empty)
                entries = logprobs() if logprobs is not None else []
                self._open["content"][0]["text"] += d.text
                self._open["content"][0]["logprobs"] += entries
                out.append(self._event("response.output_text.delta", item_id=self._open["id"],
                                       output_index=len(self.items) - 1, content_index=0, delta=d.text,
                                       logprobs=entries))
        return out

    def finish(self, finish_reason: str | None, usage: dict) -> list[dict]:
        """The reply ended ("stop", "tool_calls", "length", "cancelled"): the last events."""
        self.usage = usage
        cut = finish_reason not in ("stop", "tool_calls")
        out = self._close("incomplete" if cut else "completed")
        if cut:
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens" if finish_reason == "length" else "cancelled"}
            return out + [self._event("response.incomplete", response=self.response())]
        self.status = "completed"
        return out + [self._event("response.completed", response=self.response())]

    def failed(self, message: str) -> list[dict]:
        self.status, self.error = "failed", {"code": "server_error", "message": message}
        return self._close("incomplete") + [self._event("response.failed", response=self.response())]

    def messages(self) -> list[dict]:
        """The output items as chat messages (for a continuation), as the same items sent as input become."""
        return _item_messages(self.items)

    def response(self) -> dict:
        body = self.body
        text = body.get("text") if isinstance(body.get("text"), dict) else None
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
                "status": self.status, "output": [dict(i) for i in self.items], "error": self.error,
                "incomplete_details": self.incomplete, "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature"),
                "top_p": body.get("top_p"), "top_logprobs": body.get("top_logprobs"),
                "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
                "parallel_tool_calls": False,
                "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
                "text": text or {"format": {"type": "text"}}, "metadata": body.get("metadata") or {},
                "previous_response_id": body.get("previous_response_id"), "store": stored(body),
                "truncation": "disabled", "usage": self.usage, "user": body.get("user")}


def stored(body: dict) -> bool:
    """Whether a response is kept for `previous_response_id` and GET (OpenAI's default: yes)."""
    return body.get("store", True) is not False


class ResponseStore:
    """The last `capacity` stored responses of this server process (least recently used out), each with its
    conversation as chat messages, so a request can continue one (`previous_response_id`) and a client can
    fetch one again (GET /v1/responses/{id}). Memory only: a restart forgets them."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._kept: "OrderedDict[str, tuple[dict, list[dict]]]" = OrderedDict()

    def put(self, response: dict, conversation: list[dict]) -> None:
        self._kept[response["id"]] = (response, conversation)
        self._kept.move_to_end(response["id"])
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> tuple[dict, list[dict]]:
        found = self._kept.get(response_id) if isinstance(response_id, str) else None
        if found is None:
            raise APIError(404, f"no stored response with id {response_id!r} (responses are kept in this server's "
                                f"memory, the last {self.capacity}, unless sent with store: false)", param=param)
        self._kept.move_to_end(response_id)
        return found

    def delete(self, response_id: str) -> None:
        self.get(response_id)  # (404 for an id not kept)
        del self._kept[response_id]


def usage(prompt_tokens: int, output_tokens: int, reasoning_tokens: int, cached: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + output_tokens}
