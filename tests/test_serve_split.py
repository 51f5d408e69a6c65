"""The server split over two processes, as `tools.serve` runs it: the engine (scheduler) in this process, HTTP in a
front-end process. Results equal `Runtime.generate`; the queue bound, cancellation and metrics cross the pipe; and
neither process outlives the other."""
from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from gptoss.runtime import Runtime, structured
from gptoss.runtime.scheduler import QueueFull, Request, Scheduler
from gptoss.runtime.server.background import SplitServer
from gptoss.runtime.server.engine_client import EngineClient
from gptoss.runtime.server.engine_core import EngineInfo
from gptoss.runtime.server.frontend import FrontendSpec, start_frontend
from gptoss.runtime.tokenizer import TextTokenizer
from gptoss.tools.make_checkpoint import make_checkpoint

SETTINGS = dict(max_batch_size=4, max_seq_len=256, prefill_chunk=64)
NAME = "tiny"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("split") / NAME, "tiny")


@pytest.fixture(scope="module")
def ref(ckpt):
    return Runtime.from_pretrained(ckpt, progress=False, window_cache="full", **SETTINGS)


@pytest.fixture(scope="module")
def split(ckpt):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    scheduler = Scheduler(Runtime.from_pretrained(ckpt, progress=False, **SETTINGS))
    with SplitServer(scheduler, ckpt, NAME) as server:
        server.client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        yield server
    torch.set_num_threads(threads)


def test_split_server_equals_generate(split, ref):
    client = split.client
    for prompt, n in (("The small model reads", 12), ([5, 17, 300, 2], 7)):
        want = ref.generate([prompt], max_new_tokens=n)[0]
        whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0)
        assert whole.choices[0].text == want.text and whole.usage.completion_tokens == len(want.token_ids)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True))
        assert streamed == want.text
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.usage.completion_tokens == 5
    two = client.completions.create(model=NAME, prompt="The small model reads", max_tokens=12, temperature=0, n=2)
    assert [c.text for c in two.choices] == [ref.generate(["The small model reads"], max_new_tokens=12)[0].text] * 2
    # log-probabilities cross the pipe with their tokens
    want = ref.generate([[5, 17, 300, 2]], max_new_tokens=4)[0]
    lp = client.completions.create(model=NAME, prompt=[5, 17, 300, 2], max_tokens=4, temperature=0,
                                   logprobs=2).choices[0].logprobs
    exact = torch.log_softmax(ref.logits([[5, 17, 300, 2]])[0], -1)
    assert len(lp.token_logprobs) == len(want.token_ids) and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.token_logprobs[0] == pytest.approx(exact[want.token_ids[0]].item(), abs=1e-4)
    # and a scored prompt's (echo, nothing generated)
    echoed = client.completions.create(model=NAME, prompt=[5, 17, 300, 2], max_tokens=0, echo=True,
                                       logprobs=1).choices[0].logprobs
    assert echoed.token_logprobs[0] is None and len(echoed.token_logprobs) == 4
    exact = torch.log_softmax(ref.logits([[5, 17, 300]])[0], -1)
    assert echoed.token_logprobs[3] == pytest.approx(exact[2].item(), abs=1e-4)
    # so do the logit adjustments (a bias forcing one token), and one outside the vocabulary is refused up front
    forced = client.completions.create(model=NAME, prompt=[5, 17, 300, 2], max_tokens=3, temperature=0,
                                       logit_bias={"77": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == ref.tokenizer.decode([77, 77, 77])
    # and a grammar (the engine's own vocabulary for it), a bad one refused by the front end
    choices = structured.choice(["alpha", "beta gamma"])
    held = client.completions.create(model=NAME, prompt="Pick:", max_tokens=20, temperature=0,
                                     extra_body={"structured_outputs": {"choice": ["alpha", "beta gamma"]}})
    assert held.choices[0].text == ref.generate(["Pick:"], max_new_tokens=20, grammar=choices)[0].text
    # the Responses API is the front end's too: the same tokens as the chat request it means
    resp = client.responses.create(model=NAME, input="hi", max_output_tokens=5, temperature=0)
    assert resp.status == "incomplete" and resp.usage.output_tokens == 5
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    bad = httpx.post(split.url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2,
                                                          "guided_regex": "[a-"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex"
    bad = httpx.post(split.url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2,
                                                          "logit_bias": {"99999999": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
    bad = httpx.post(split.url + "/v1/completions", json={"model": NAME, "prompt": [1] * 300, "max_tokens": 2})
    assert bad.status_code == 400 and "256" in bad.json()["error"]["message"]  # checked in the front end
    metrics = httpx.get(split.url + "/metrics").text  # the engine's counters, fetched over the pipe
    generated = next(int(line.split()[1]) for line in metrics.splitlines()
                     if line.startswith("gptoss_generated_tokens_total"))
    assert generated >= 2 * (12 + 7) + 5


def test_split_concurrent_clients_equal_generate(split, ref):
    import random
    rng = random.Random(7)
    requests = [([rng.randrange(1000) for _ in range(rng.randint(1, 120))], rng.randint(1, 20)) for _ in range(12)]

    async def main():
        async with httpx.AsyncClient(base_url=split.url, timeout=120) as http:
            async def one(prompt, n):
                r = await http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": n,
                                                             "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(p, n) for p, n in requests))

    got = asyncio.run(main())
    assert got == [ref.generate([p], max_new_tokens=n)[0].text for p, n in requests]


def test_split_disconnect_frees_row(split):
    scheduler = split.scheduler
    finished = scheduler.metrics.requests_finished
    with httpx.stream("POST", split.url + "/v1/completions",
                      json={"model": NAME, "prompt": "Go on", "max_tokens": 200, "temperature": 0,
                            "stream": True, "ignore_eos": True}, timeout=60) as r:
        assert next(line for line in r.iter_lines() if line.startswith("data:"))
    deadline = time.monotonic() + 20
    while scheduler.metrics.requests_finished == finished or scheduler.busy:
        assert time.monotonic() < deadline, "the disconnected request kept its row"
        time.sleep(0.05)
    assert not split.core._handles and not split.core._ended


def test_serve_while_steps_in_the_calling_thread(ckpt, ref):
    """`serve_while` (the load tool's arrangement, as tools.serve runs): the engine steps in the caller's thread
    while the work runs beside it; the work's result comes back, its error is raised, and the front end stops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rt = Runtime.from_pretrained(ckpt, progress=False, **SETTINGS)
        scheduler = Scheduler(rt)
        stepped_in = set()
        compute = scheduler._compute
        scheduler._compute = lambda: (stepped_in.add(threading.get_ident()), compute())

        def work():
            r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": [5, 17, 300],
                                                                  "max_tokens": 6, "temperature": 0}, timeout=60)
            return threading.get_ident(), r.json()["choices"][0]["text"]

        server = SplitServer(scheduler, ckpt, NAME)
        worker, text = server.serve_while(work)
        assert text == ref.generate([[5, 17, 300]], max_new_tokens=6)[0].text
        assert stepped_in == {threading.get_ident()} != {worker}
        assert server.frontend.process.poll() is not None

        def fails():
            raise ValueError("the work's own error")

        server = SplitServer(Scheduler(rt), ckpt, NAME)
        with pytest.raises(ValueError, match="the work's own error"):
            server.serve_while(fails)
        assert server.frontend.process.poll() is not None
    finally:
        torch.set_num_threads(threads)


# -- the front end against a scripted engine: the test holds the engine's end of the pipe -------------------------
class ScriptedEngine:
    def __init__(self, ckpt, max_queue):
        self.frontend = start_frontend(FrontendSpec(str(ckpt), NAME, port=0, log_level="error"))
        self.conn = self.frontend.conn
        self.conn.send(("ready", EngineInfo(1000, 256, max_queue, max_batch_size=2, tp_size=1)))
        assert self.conn.poll(60) and self.conn.recv() == ("serving",)

    def recv(self, timeout=10):
        assert self.conn.poll(timeout), "the front end sent nothing"
        return self.conn.recv()


def test_frontend_bounds_the_queue_until_the_engine_admits(ckpt):
    engine = ScriptedEngine(ckpt, max_queue=2)
    url = engine.frontend.url + "/v1/completions"
    try:
        async def main():
            async with httpx.AsyncClient(timeout=30) as http:
                body = {"model": NAME, "prompt": [1, 2], "max_tokens": 3}
                waiting = [asyncio.create_task(http.post(url, json=body)) for _ in range(2)]
                submits = [await asyncio.to_thread(engine.recv) for _ in range(2)]
                assert [m[0] for m in submits] == ["submit", "submit"]
                full = await http.post(url, json=body)
                assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
                # the engine admits the first: a place frees in the queue, though it has not finished
                engine.conn.send(("step", [], [(submits[0][1], 0)]))
                third = asyncio.create_task(http.post(url, json=body))
                assert (await asyncio.to_thread(engine.recv))[0] == "submit"
                rids = [m[1] for m in submits]
                engine.conn.send(("step", [(rid, 7, "x", None) for rid in rids] +
                                  [(rid, 8, "y", "length") for rid in rids], []))
                done = await asyncio.gather(*waiting)
                assert [r.json()["choices"][0]["text"] for r in done] == ["xy", "xy"]
                third.cancel()
                metrics_task = asyncio.create_task(http.get(engine.frontend.url + "/metrics"))
                ask = await asyncio.to_thread(engine.recv)
                while ask[0] != "metrics":  # the cancelled request's cancellation may come first
                    ask = await asyncio.to_thread(engine.recv)
                from gptoss.runtime.metrics import ServingMetrics
                engine.conn.send(("metrics", ask[1], ServingMetrics()))
                text = (await metrics_task).text
                assert "gptoss_requests_rejected_total 1" in text
        asyncio.run(main())
    finally:
        engine.frontend.stop()


def test_frontend_answers_503_while_the_model_loads(ckpt):
    """The front end listens before the engine's model has loaded: until the engine says it is ready, /health says
    "loading" and every other route 503 with Retry-After (an OpenAI error object); then requests go through, with
    the limits the engine sent."""
    frontend = start_frontend(FrontendSpec(str(ckpt), NAME, port=0, log_level="error"))
    conn = frontend.conn
    try:
        deadline = time.monotonic() + 60
        while True:  # connections wait in the backlog until the front end accepts: poll for its first answer
            try:
                health = httpx.get(frontend.url + "/health", timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and frontend.alive()
                time.sleep(0.1)
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/metrics"), ("POST", "/tokenize")):
            r = httpx.request(method, frontend.url + path, json={"model": NAME, "prompt": [1], "max_tokens": 2})
            assert r.status_code == 503 and r.headers["retry-after"] == "5", path
            assert r.json()["error"]["code"] == "model_loading"
        with pytest.raises(openai.InternalServerError, match="loading"):
            openai.OpenAI(base_url=frontend.url + "/v1", api_key="x", max_retries=0).completions.create(
                model=NAME, prompt=[1], max_tokens=2)
        assert not conn.poll(0.2)  # nothing reached the engine
        conn.send(("ready", EngineInfo(1000, 256, 4, max_batch_size=2, tp_size=1)))
        assert conn.poll(30) and conn.recv() == ("serving",)
        assert httpx.get(frontend.url + "/health").json() == {"status": "ok"}
        assert httpx.get(frontend.url + "/v1/models").json()["data"][0]["max_model_len"] == 256
        too_long = httpx.post(frontend.url + "/v1/completions", json={"model": NAME, "prompt": [1] * 300,
                                                                      "max_tokens": 2})
        assert too_long.status_code == 400 and "256" in too_long.json()["error"]["message"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reply = pool.submit(httpx.post, frontend.url + "/v1/completions",
                                json={"model": NAME, "prompt": [1], "max_tokens": 2}, timeout=30)
            assert conn.poll(30)
            kind, rid, request = conn.recv()
            assert kind == "submit" and request.prompt == (1,) and request.max_tokens == 2
            conn.send(("step", [(rid, 7, "x", None), (rid, 8, "y", "length")], [(rid, 0)]))
            assert reply.result().json()["choices"][0]["text"] == "xy"
        chat = httpx.post(frontend.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.json()["count"] > 0  # the chat template, rendered here
        with open(f"/proc/{frontend.process.pid}/maps") as maps:  # the front end never loads torch (the engine's)
            assert "libtorch" not in maps.read()
    finally:
        frontend.stop()


def test_frontend_exits_when_the_engine_goes(ckpt):
    engine = ScriptedEngine(ckpt, max_queue=4)
    url = engine.frontend.url
    result = {}

    def request():
        try:
            result["r"] = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": [1], "max_tokens": 3},
                                     timeout=30)
        except httpx.HTTPError as exc:
            result["r"] = exc

    t = threading.Thread(target=request)
    t.start()
    assert engine.recv()[0] == "submit"
    engine.conn.close()  # as if the engine's process died
    t.join(30)
    assert isinstance(result["r"], httpx.HTTPError) or result["r"].status_code in (500, 503)
    assert engine.frontend.process.wait(20) is not None  # it shut down without being asked


def test_engine_stops_when_the_frontend_goes(ckpt):
    scheduler = Scheduler(Runtime.from_pretrained(ckpt, progress=False, **SETTINGS))
    server = SplitServer(scheduler, ckpt, NAME).__enter__()
    server.frontend.process.kill()
    server.thread.join(20)
    assert not server.thread.is_alive()
    server.frontend.stop()


def test_engine_client_counts_waiting_requests(ckpt):
    ours, theirs = socket.socketpair()
    from multiprocessing.connection import Connection
    engine, front = Connection(ours.detach()), Connection(theirs.detach())
    client = EngineClient(front, TextTokenizer(ckpt))
    with pytest.raises(RuntimeError, match="loading"):
        client.submit(Request((1, 2), 3), [].append)
    engine.send(("ready", EngineInfo(1000, 256, max_queue=2, max_batch_size=2, tp_size=1)))
    client._readable()
    assert client.ready.is_set() and client.context == 256
    seen = []
    a = client.submit(Request((1, 2), 3), seen.append)
    client.submit(Request((1, 2), 3), seen.append)
    with pytest.raises(QueueFull):
        client.submit(Request((1, 2), 3), seen.append)
    with pytest.raises(ValueError, match="vocabulary"):
        client.submit(Request((1000,), 3), seen.append)
    engine.send(("step", [(a.id, -1, "", "cancelled")], []))  # ended while waiting: its place frees
    client._readable()
    assert a.finish_reason == "cancelled" and seen[-1].finish_reason == "cancelled"
    client.submit(Request((1, 2), 3), seen.append)
    engine.close()
    client._readable()
    assert client.error and all(e.finish_reason for e in seen[-2:])
    with pytest.raises(RuntimeError, match="engine"):
        client.submit(Request((1, 2), 3), seen.append)


def test_serve_refuses_a_port_in_use_before_loading(ckpt, tmp_path):
    """The port is bound before the model loads: one in use fails at once, naming it (the model is not loaded:
    a missing weights file would have been reported otherwise)."""
    unloadable = tmp_path / "unloadable"
    unloadable.mkdir()
    for f in ckpt.iterdir():
        if not f.name.endswith(".safetensors"):
            (unloadable / f.name).write_bytes(f.read_bytes())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "gptoss.tools.serve", "--model", str(unloadable), "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr, proc.stderr[-2000:]


def test_serve_stops_its_front_end_when_the_model_cannot_load(tmp_path):
    """The front end listens while the model loads; a model that fails to load ends both processes with the
    loader's one-line error."""
    broken = make_checkpoint(tmp_path / "broken", "tiny")
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # its header promises more than the file holds
    proc = subprocess.run([sys.executable, "-m", "gptoss.tools.serve", "--model", str(broken), "--port", "0",
                           "--log-level", "error"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_model_failure_fails_requests_and_health_keeps_serving(ckpt):
    """The model raising mid-request: that request gets a server error, /health says 503 with the cause, new
    requests get 503 at once, and the front end keeps answering until it is stopped."""
    rt = Runtime.from_pretrained(ckpt, progress=False, **SETTINGS)

    def broken(*args):
        raise RuntimeError("injected decode failure")

    rt.graphs.decode = broken
    with SplitServer(Scheduler(rt), ckpt, NAME) as server:
        r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": [1, 2], "max_tokens": 4},
                       timeout=30)
        assert r.status_code == 500 and "generation failed" in r.json()["error"]["message"]
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "injected decode failure" in health.json()["error"]
        again = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": [1], "max_tokens": 2})
        assert again.status_code == 503 and again.json()["error"]["type"] == "server_error"
    server.thread.join(10)
    assert not server.thread.is_alive() and "injected" in str(server.engine_error)


def test_split_next_turn_reuses_the_row(split, ref):
    """A prompt that continues an earlier one (the conversation so far plus a new message) is served from the row
    that still holds it: usage counts the cached tokens, streamed and whole alike, and the text is unchanged."""
    client = split.client
    first = [(7 * i) % 900 + 3 for i in range(70)]
    reply = client.completions.create(model=NAME, prompt=first, max_tokens=10, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    turn = first + ref.generate([first], max_new_tokens=10)[0].token_ids + [11, 12, 13, 14, 15, 16]
    want = ref.generate([turn], max_new_tokens=8)[0]
    got = client.completions.create(model=NAME, prompt=turn, max_tokens=8, temperature=0)
    assert got.choices[0].text == want.text
    assert got.usage.prompt_tokens_details.cached_tokens == 79  # the first prompt and reply but the reply's last
    #                                                             token (sampled, never fed back)
    chunks = list(client.completions.create(model=NAME, prompt=turn, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(turn) - 1  # the same prompt again


def test_api_key_guards_the_api(ckpt):
    """With an API key every route but the probes needs `Authorization: Bearer <key>` (401 otherwise, an OpenAI
    error object the client raises as AuthenticationError), streams included; the key reaches the front end in
    its environment, not on its command line."""
    scheduler = Scheduler(Runtime.from_pretrained(ckpt, progress=False, **SETTINGS))
    with SplitServer(scheduler, ckpt, NAME, api_key="s3cret") as server:
        assert not any("s3cret" in str(a) for a in server.frontend.process.args)
        for key in ("wrong", ""):
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
            with pytest.raises(openai.AuthenticationError) as e:
                client.completions.create(model=NAME, prompt="hi", max_tokens=2)
            assert e.value.body["code"] == "invalid_api_key"
        assert httpx.post(server.url + "/tokenize", json={"prompt": "hi"}).status_code == 401
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 200
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model=NAME, prompt="hi", max_tokens=2, extra_body={
            "ignore_eos": True}).usage.completion_tokens == 2
        streamed = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=3, stream=True)
        assert [c for c in streamed]
