"""OpenAI's Responses API (`/v1/responses`) through the real `openai` client: the same prompt and reply as the
chat request it means, output items built from the harmony reply (reasoning, message, function_call), the typed
stream events in order, input items (reasoning, function calls and their outputs) rendered as chat renders them,
and errors naming the Responses field."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import openai
import pytest

from gptoss.runtime import Runtime
from gptoss.runtime.harmony import render_chat
from gptoss.runtime.scheduler import Scheduler
from gptoss.runtime.server import create_app
from gptoss.runtime.server.background import LiveServer
from gptoss.runtime.server.local_engine import LocalEngine
from gptoss.runtime.tokenizer import TextTokenizer
from gptoss.tools.make_checkpoint import make_checkpoint
from test_serve import TOOLS_TEMPLATE, ScriptedScheduler

NAME = "tiny"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "color"], "additionalProperties": False}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("responses") / NAME, "tiny")


@pytest.fixture(scope="module")
def served(ckpt):
    rt = Runtime.from_pretrained(ckpt, progress=False, max_batch_size=4, max_seq_len=512, prefill_chunk=64)
    scheduler = Scheduler(rt).start()
    with LiveServer(create_app(LocalEngine(scheduler), NAME)) as server:
        server.rt = rt
        server.client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        yield server
    scheduler.stop()


def test_response_equals_the_chat_it_means(served):
    """The same messages through both APIs: the same prompt tokens and the same greedy answer (here under a JSON
    schema, so the random model's reply completes); streamed, the events are numbered from 0 without gaps, and
    the final response is the whole one."""
    client = served.client
    fmt = {"type": "json_schema", "name": "answer", "schema": SCHEMA}
    whole = client.responses.create(model=NAME, instructions="Answer in JSON.", input="Colour?",
                                    max_output_tokens=100, temperature=0, text={"format": fmt}, top_logprobs=2)
    chat = client.chat.completions.create(
        model=NAME, max_tokens=100, temperature=0, logprobs=True, top_logprobs=2,
        messages=[{"role": "developer", "content": "Answer in JSON."}, {"role": "user", "content": "Colour?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    assert whole.status == "completed" and whole.output_text == chat.choices[0].message.content
    assert set(json.loads(whole.output_text)) == {"ok", "color"}
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                    chat.usage.completion_tokens)
    assert [item.type for item in whole.output] == ["message"] and whole.store is True
    # (to rounding: the second request may reuse the first's prompt K/V, computed in other steps)
    figures = lambda entries: [(e.token, [t.token for t in e.top_logprobs]) for e in entries]  # noqa: E731
    values = lambda entries: [v for e in entries for v in (e.logprob, *(t.logprob for t in e.top_logprobs))]  # noqa
    answer = whole.output[0].content[0].logprobs
    assert answer and figures(answer) == figures(chat.choices[0].logprobs.content)
    assert values(answer) == pytest.approx(values(chat.choices[0].logprobs.content), abs=1e-4)
    events = []
    with client.responses.stream(model=NAME, instructions="Answer in JSON.", input="Colour?", max_output_tokens=100,
                                 temperature=0, text={"format": fmt},
                                 include=["message.output_text.logprobs"]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert final.output_text == whole.output_text and final.status == "completed"
    streamed = [e for event in events if event.type == "response.output_text.delta" for e in event.logprobs]
    assert [e.token for e in streamed] == [e.token for e in answer]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in answer], abs=1e-4)


def test_cut_off_response_is_incomplete(served):
    client = served.client
    cut = client.responses.create(model=NAME, input=[{"role": "user", "content": [{"type": "input_text",
                                                                                    "text": "Colour?"}]}],
                                  max_output_tokens=20, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 20
    r = httpx.post(served.url + "/v1/responses", json={"model": NAME, "input": "Colour?", "max_output_tokens": 20,
                                                       "temperature": 0, "stream": True})
    lines = r.text.splitlines()
    assert lines[0] == "event: response.created" and "data: [DONE]" not in lines
    assert [line for line in lines if line.startswith("event: ")][-1] == "event: response.incomplete"


def test_responses_bad_requests(served):
    for body, param in (({"conversation": "conv_1"}, "conversation"), ({"tools": [{"type": "web_search"}]}, "tools"),
                        ({"max_output_tokens": 0}, "max_output_tokens"),
                        ({"reasoning": {"effort": "minimal"}}, "reasoning"),
                        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
                        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
                        ({"input": []}, "input"), ({"text": {"format": {"type": "xml"}}}, "text"),
                        ({"tool_choice": "required"}, "tool_choice"), ({"truncation": "auto"}, "truncation"),
                        ({"temperature": 5}, "temperature")):
        r = httpx.post(served.url + "/v1/responses", json={"model": NAME, "input": "hi", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.post(served.url + "/v1/responses", json={"model": NAME, "input": "hi", "max_output_tokens": 0})
    assert "'max_output_tokens'" in r.json()["error"]["message"]
    assert httpx.post(served.url + "/v1/responses", json={"model": "other", "input": "hi"}).status_code == 404
    r = httpx.post(served.url + "/v1/responses", json={"model": NAME, "input": "hi", "previous_response_id": "resp_1"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    ok = served.client.responses.create(model=NAME, input="hi", max_output_tokens=3)
    assert ok.usage.output_tokens == 3  # still serving


@pytest.fixture(scope="module")
def tools_dir(ckpt, tmp_path_factory):
    """The checkpoint's tokenizer with a chat template that shows tools (as the published one does)."""
    out = tmp_path_factory.mktemp("responses-tools")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (ckpt / name).exists():
            shutil.copy(ckpt / name, out / name)
    (out / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    return out


def scripted_server(served, tok, tokens):
    ref = SimpleNamespace(tokenizer=tok, config=served.rt.config, shapes=served.rt.shapes)
    scripted = ScriptedScheduler(ref, tokens)
    return scripted, LiveServer(create_app(LocalEngine(scripted), NAME))


def harmony(tok, text: str) -> list[int]:
    return tok.encode(text)


CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>')
TOOLS = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
ANSWER = "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>"


@contextmanager
def scripted_client(served, tok, reply: str):
    """A server whose every request 'generates' `reply`'s tokens, and a client of it."""
    scripted, live = scripted_server(served, tok, harmony(tok, reply))
    with live as server:
        yield scripted, openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_output_items_from_a_harmony_reply(served, tools_dir):
    """Reasoning then a tool call: a reasoning item (its text as reasoning_text) and a function_call item with a
    call id; streamed, each item's events in the API's order, and the deltas join to the whole. Reasoning then an
    answer: a reasoning item and a message. `reasoning_tokens` counts the reasoning's tokens."""
    tok, tools = TextTokenizer(tools_dir), TOOLS
    with scripted_client(served, tok, CALL) as (scripted, client):
        whole = client.responses.create(model=NAME, input="Weather in Oslo?", tools=tools)
        assert whole.status == "completed" and [i.type for i in whole.output] == ["reasoning", "function_call"]
        reasoning, fc = whole.output
        assert reasoning.content[0].text == "Need the weather." and reasoning.summary == []
        assert (fc.name, json.loads(fc.arguments)) == ("get_weather", {"city": "Oslo"}) and fc.call_id
        assert whole.usage.output_tokens_details.reasoning_tokens == len(tok.encode("Need the weather."))
        with client.responses.stream(model=NAME, input="Weather in Oslo?", tools=tools) as stream:
            events = list(stream)
        kinds = [e.type for e in events]
        assert [k for k in kinds if "delta" not in k] == [
            "response.created", "response.in_progress",
            "response.output_item.added", "response.content_part.added", "response.reasoning_text.done",
            "response.content_part.done", "response.output_item.done",
            "response.output_item.added", "response.function_call_arguments.done", "response.output_item.done",
            "response.completed"]
        assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Need the weather."
        assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == \
            fc.arguments
        # the output items go back as the next request's input, with the call's output
        again = client.responses.create(model=NAME, tools=tools, input=[
            {"role": "user", "content": "Weather in Oslo?"}, *whole.output,
            {"type": "function_call_output", "call_id": fc.call_id, "output": '{"sky": "clear"}'}])
        assert again.status == "completed"
        rendered = tok.decode(list(scripted.requests[-1].prompt))
        assert "Need the weather." in rendered and '{"sky": "clear"}' in rendered and "get_weather" in rendered
    with scripted_client(served, tok, ANSWER) as (scripted, client):
        whole = client.responses.create(model=NAME, input="Weather?")
        assert [i.type for i in whole.output] == ["reasoning", "message"] and whole.output_text == "It is sunny."


def test_input_items_render_as_chat(served, tools_dir):
    """A conversation sent as Responses items (instructions, a user message, the model's reasoning and call, the
    call's output) becomes the prompt the same conversation gets as chat messages; a named tool_choice opens
    that call as chat's does."""
    tok = TextTokenizer(tools_dir)
    scripted, live = scripted_server(served, tok, harmony(tok, "<|channel|>final<|message|>Sunny.<|return|>"))
    items = [{"role": "user", "content": "Weather in Oslo?"},
             {"type": "reasoning", "id": "rs_1", "summary": [],
              "content": [{"type": "reasoning_text", "text": "Need the weather."}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": '{"sky": "clear"}'}]
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "reasoning_content": "Need the weather.",
                 "tool_calls": [{"id": "call_1", "type": "function", "function": {
                     "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}]
    chat_tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with live as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        r = client.responses.create(model=NAME, instructions="Be brief.", input=items, tools=tools,
                                    reasoning={"effort": "low"})
        assert r.output_text == "Sunny."
        want = tok.encode(render_chat(tok, messages, tools=chat_tools, reasoning_effort="low"))
        assert list(scripted.requests[0].prompt) == want and r.usage.input_tokens == len(want)
        client.responses.create(model=NAME, input="Weather in Oslo?", tools=tools,
                                tool_choice={"type": "function", "name": "get_weather"})
        forced = list(scripted.requests[1].prompt)
        opened = tok.encode(render_chat(tok, [{"role": "user", "content": "Weather in Oslo?"}], tools=chat_tools))
        assert forced[:len(opened)] == opened and scripted.requests[1].grammar is not None


def test_previous_response_continues_the_conversation(served, tools_dir):
    """A stored response (the default) is fetched again by id, and `previous_response_id` continues it: the
    prompt is the chat rendering of the earlier input, the earlier output (reasoning with its turn), and the new
    input, without the earlier `instructions`; a tool call's output answers the stored call by its call_id.
    `store: false` keeps nothing."""
    tok = TextTokenizer(tools_dir)
    with scripted_client(served, tok, ANSWER) as (scripted, client):
        first = client.responses.create(model=NAME, instructions="Be brief.", input="Weather?")
        assert first.store and client.responses.retrieve(first.id).output_text == "It is sunny."
        second = client.responses.create(model=NAME, previous_response_id=first.id, input="And tomorrow?")
        assert second.previous_response_id == first.id
        want = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "It is sunny.", "reasoning_content": "Easy."},
                {"role": "user", "content": "And tomorrow?"}]
        assert list(scripted.requests[1].prompt) == tok.encode(render_chat(tok, want))
        third = client.responses.create(model=NAME, previous_response_id=second.id, input="Thanks.")
        assert len(scripted.requests[2].prompt) > len(scripted.requests[1].prompt)  # the chain goes on
        unkept = client.responses.create(model=NAME, input="Weather?", store=False)
        assert not unkept.store
        for call in (lambda: client.responses.retrieve(unkept.id),
                     lambda: client.responses.create(model=NAME, previous_response_id=unkept.id, input="x")):
            with pytest.raises(openai.NotFoundError):
                call()
        assert third.status == "completed"
        assert client.responses.delete(third.id) is None  # (the client returns nothing for a deletion)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(third.id)
    tools = TOOLS
    with scripted_client(served, tok, CALL) as (scripted, client):
        first = client.responses.create(model=NAME, input="Weather in Oslo?", tools=tools)
        fc = first.output[-1]
        client.responses.create(model=NAME, previous_response_id=first.id, tools=tools, input=[
            {"type": "function_call_output", "call_id": fc.call_id, "output": '{"sky": "clear"}'}])
        want = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": None, "reasoning_content": "Need the weather.", "tool_calls": [
                    {"id": fc.call_id, "type": "function", "function": {"name": "get_weather",
                                                                         "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": fc.call_id, "content": '{"sky": "clear"}'}]
        chat_tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
        assert list(scripted.requests[1].prompt) == tok.encode(render_chat(tok, want, tools=chat_tools))


def test_response_store_keeps_the_most_recently_used():
    from gptoss.runtime.server.errors import APIError
    from gptoss.runtime.server.responses import ResponseStore

    kept = ResponseStore(capacity=2)
    for rid in ("a", "b"):
        kept.put({"id": rid}, [{"role": "user", "content": rid}])
    kept.get("a")  # a used again: b is now the oldest
    kept.put({"id": "c"}, [])
    assert kept.get("a")[1] == [{"role": "user", "content": "a"}] and kept.get("c")[0] == {"id": "c"}
    with pytest.raises(APIError) as e:
        kept.get("b")
    assert e.value.status == 404 and "last 2" in e.value.message


def test_failed_generation_ends_the_stream_with_response_failed(served, tools_dir):
    """The engine failing mid-reply: a stream ends with `response.failed` (the status and an error object), a
    whole request gets a 500."""
    from gptoss.runtime import TokenEvent

    tok = TextTokenizer(tools_dir)

    class Failing(ScriptedScheduler):
        def submit(self, request, on_event):
            handle = super().submit(request, lambda event: None)  # (the script is dropped)
            on_event(TokenEvent(0, tok.token_id("<|channel|>"), "", None))
            on_event(TokenEvent(0, -1, "", "error"))
            return handle

    ref = SimpleNamespace(tokenizer=tok, config=served.rt.config, shapes=served.rt.shapes)
    with LiveServer(create_app(LocalEngine(Failing(ref, tok.encode("x"))), NAME)) as server:
        r = httpx.post(server.url + "/v1/responses", json={"model": NAME, "input": "hi", "stream": True})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "response.failed" and events[-1]["response"]["status"] == "failed"
        assert events[-1]["response"]["error"]["code"] == "server_error"
        assert httpx.post(server.url + "/v1/responses", json={"model": NAME, "input": "hi"}).status_code == 500
