"""The server under tensor parallelism 2 (gloo on CPU, torchrun): rank 0 serves HTTP, rank 1 replays the schedule;
greedy output through the openai client equals a one-process Runtime.generate. Slow: two processes start."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from gptoss.runtime import Runtime, structured
from gptoss.runtime.server.background import free_port
from gptoss.tools.make_checkpoint import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(max_batch_size=4, max_seq_len=256, prefill_chunk=64)


@pytest.mark.slow
def test_tp2_server_equals_generate(tmp_path):
    ckpt = make_checkpoint(tmp_path / "tiny", "tiny")
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "gptoss.tools.serve", "--model", str(ckpt), "--tp", "2", "--port", str(port), "--max-batch-size", "4",
           "--max-seq-len", "256", "--prefill-chunk", "64"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.environ.get("PYTHONPATH", str(ROOT)))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "the TP server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        ref = Runtime.from_pretrained(ckpt, progress=False, **SETTINGS)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        prompts = ["The small model reads", "Hello, world!", "Numbers such as"]
        for p in prompts:
            want = ref.generate([p], max_new_tokens=10)[0].text
            got = client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0)
            assert got.choices[0].text == want
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt=p, max_tokens=10, temperature=0, stream=True))
            assert streamed == want
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, temperature=0)
        assert chat.usage.completion_tokens == 5
        # a next turn resumes on the row that holds the first: every rank picks that row and restores the same
        first = [(7 * i) % 900 + 3 for i in range(70)]
        client.completions.create(model="tiny", prompt=first, max_tokens=10, temperature=0)
        turn = first + ref.generate([first], max_new_tokens=10)[0].token_ids + [11, 12, 13]
        got = client.completions.create(model="tiny", prompt=turn, max_tokens=8, temperature=0)
        assert got.choices[0].text == ref.generate([turn], max_new_tokens=8)[0].text
        assert got.usage.prompt_tokens_details.cached_tokens == 79  # all it holds: prompt and reply but the last
        # a scored prompt: every rank runs the scored prefill (its logits gathered across ranks), rank 0 reports
        scored = client.completions.create(model="tiny", prompt=turn, max_tokens=0, echo=True,
                                           logprobs=1).choices[0].logprobs
        exact = torch.log_softmax(ref.logits([turn[:40], turn[:80]]), -1)
        assert scored.token_logprobs[40] == pytest.approx(exact[0, turn[40]].item(), abs=1e-4)
        assert scored.token_logprobs[80] == pytest.approx(exact[1, turn[80]].item(), abs=1e-4)
        # and the logit adjustments (a bias forcing one token), the same on every rank
        forced = client.completions.create(model="tiny", prompt=first, max_tokens=3, temperature=0,
                                           logit_bias={"77": 100}, extra_body={"ignore_eos": True})
        assert forced.choices[0].text == ref.tokenizer.decode([77, 77, 77])
        # a grammar: every rank masks and advances its own copy, rank 0's choice broadcast
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["on", "off", "auto mode"]}}}
        held = client.completions.create(model="tiny", prompt=first, max_tokens=20, temperature=0,
                                         extra_body={"response_format": fmt})
        want = ref.generate([first], max_new_tokens=20, grammar=structured.json_schema(fmt["json_schema"]["schema"]))
        assert held.choices[0].text == want[0].text and want[0].finish_reason == "stop"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
