"""`bitlm serve` as a black box: a real server process on a tiny model, the official openai client.

The reference for every output is bitlm.engine.generate run in this process on the same model file
(greedy, or the same seed): the server's scheduler, chunked prefill and engine must give the same
tokens. Every loop here is bounded in count and time; everything runs on 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import re
import threading
import time

import httpx
import openai
import pytest

from bitlm.engine.generate import generate, generate_text
from bitlm.engine.native import NativeLM
from bitlm.io.native import load_native

PROMPTS = ["To be, or not to be", "Now is the winter", "Shall I compare thee", "The quick brown fox",
           "And all the clouds", "whether 'tis nobler", "0123456789", "Thou art more lovely"]
LONG_PROMPT = " ".join(PROMPTS) * 3  # ~100 tokens: several prefill chunks of 16


ENGINES = ["sequential"] + (["batch"] if importlib.util.find_spec("bitlm.engine.batch") else [])


@pytest.fixture(scope="module", params=ENGINES)
def server(request, start_server, tiny_model_dir):
    """The server on each engine the tree has."""
    # a small prefill chunk, so that prompts take several steps beside the decodes of others; a KV cache of
    # 40 blocks of 16 positions (2.5 full contexts of 256), so that 16 requests compete for it
    return start_server(tiny_model_dir, "--max-seqs", 16, "--prefill-chunk", 16, "--max-queue", 64,
                        "--kv-blocks", 40, "--engine", request.param)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    """The same model, in this process, for bitlm.engine.generate."""
    return NativeLM(load_native(tiny_model_dir))


def reference(ref, ids, max_tokens, **kw):
    """(text, n tokens, finish_reason) of bitlm.engine.generate."""
    kw.setdefault("temperature", 0)
    it = generate(ref, ids, max_new_tokens=max_tokens, **kw)
    tokens = []
    while True:
        try:
            tokens.append(next(it))
        except StopIteration as stop:
            return ref.tokenizer.decode(tokens), len(tokens), stop.value


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def test_weights_auto_follows_the_engine(server):
    # --weights auto: the batch engine decodes up to --max-seqs rows a step, where i2v's kernels are the
    # faster; the sequential engine decodes one row at a time, as generate does (engine/native.resolve_weights)
    from bitlm.engine.native import resolve_weights
    batch = "BatchEngine" in server.log()
    want = "i2v" if batch else resolve_weights("auto", rows=1)
    assert re.search(rf"serving \S+ at http://\S+ \((Batch|Sequential)Engine, {want} weights, 16 sequences", server.log())


def test_models(client, server):
    assert [m.id for m in client.models.list().data] == [server.model]
    r = httpx.get(server.url + "/v1/models/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("prompt", [PROMPTS[0], LONG_PROMPT])
def test_completion_equals_generate(client, server, ref, prompt):
    ids = ref.tokenizer.encode(prompt)
    text, n, finish = reference(ref, ids, 24)
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
    # the same prompt as token ids
    r2 = client.completions.create(model=server.model, prompt=ids, max_tokens=24, temperature=0)
    assert r2.choices[0].text == text


def test_completion_stream(client, server, ref):
    ids = ref.tokenizer.encode(PROMPTS[1])
    text, n, finish = reference(ref, ids, 30, ignore_eos=True)
    chunks = list(client.completions.create(model=server.model, prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length" == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n == 30
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_equals_generate(client, server, ref):
    messages = [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": "Shall I compare thee?"}]
    ids = ref.tokenizer.encode_chat(messages)
    text, n, finish = reference(ref, ids, 20)
    r = client.chat.completions.create(model=server.model, messages=messages, max_completion_tokens=20,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, finish)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-2].choices[0].finish_reason == finish and chunks[-1].usage.completion_tokens == n


def test_stop_string(client, server, ref):
    """The text stops before the stop string, as engine.generate's stream_text cuts it."""
    full = generate_text(ref, PROMPTS[2], max_new_tokens=30, temperature=0, ignore_eos=True)
    stop = full[10:13]
    expected = generate_text(ref, PROMPTS[2], max_new_tokens=30, temperature=0, ignore_eos=True,
                             stop_strings=[stop])
    assert len(expected) < len(full)
    r = client.completions.create(model=server.model, prompt=PROMPTS[2], max_tokens=30, temperature=0,
                                  stop=[stop, "never appears \u2603"], extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")


def test_seeded_sampling_equals_generate(client, server, ref):
    ids = ref.tokenizer.encode(PROMPTS[3])
    text, _, _ = reference(ref, ids, 25, temperature=0.9, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    kw = dict(model=server.model, prompt=PROMPTS[3], max_tokens=25, temperature=0.9, top_p=0.9, seed=7,
              extra_body={"top_k": 20, "ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == text
    assert client.completions.create(**kw).choices[0].text == text
    greedy, _, _ = reference(ref, ids, 25, ignore_eos=True)
    assert text != greedy  # the sampling really sampled


def test_context_limits(client, server, ref):
    """Over the context: 400 before any work (256 positions in the tiny model)."""
    ids = ref.tokenizer.encode(PROMPTS[0])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=256 - len(ids) + 1)
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=[5] * 256, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    # exactly full: accepted, and ends at the context with "length"
    r = client.completions.create(model=server.model, prompt=[5] * 250, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (6, "length")


BAD = [  # (path, raw body or JSON object, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b'{"model": "M", "prompt": "x", "temperature": NaN}', 400, None),
    ("/v1/completions", b"[" * 100000, 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "M"}, 400, "prompt"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": "M", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "x", "max_tokens": 10 ** 12}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "x", "max_tokens": 5.0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": "M", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "M", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "M", "prompt": "x", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"model": "M", "prompt": "x", "seed": "s"}, 400, "seed"),
    ("/v1/completions", {"model": "M", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": "M", "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "M", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": "M", "prompt": "x", "frequency_penalty": 1.0}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": "M", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "M", "prompt": "x", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"model": "M", "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"model": "M", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"model": "M", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "M", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "M", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "prompt": "x"}, 400,
     "prompt"),
]


def test_bad_requests_get_4xx(server):
    """Each bad request gets its 4xx and an OpenAI error body; none is a 500, and the server stays up."""
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for path, body, status, param in BAD:
            if isinstance(body, dict):
                body = json.dumps({k: (server.model if v == "M" and k == "model" else v) for k, v in body.items()})
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (body[:200], r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
            if param is not None:
                assert err["param"] == param, (body, r.text)
        r = http.post("/v1/completions", content=b"x" * (2 << 20))  # over the 1 MiB cap
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = http.get("/v1/completions")
        assert r.status_code == 405 and "error" in r.json()
        r = http.get("/v2/nothing")
        assert r.status_code == 404 and "error" in r.json()
        assert http.get("/health").json()["status"] == "ok"
    assert metrics(server).get('bitlm_requests_total{endpoint="/v1/completions",status="500"}') is None


def test_concurrent_streams_with_disconnects(client, server, ref):
    """16 streaming clients, 40 requests in all; every 5th reads 3 chunks and leaves. Every completed
    greedy output equals the same request served alone (and engine.generate); /health answers all along;
    afterwards every sequence and KV block is free."""
    jobs = [(PROMPTS[i % len(PROMPTS)] * (1 + i % 3), 8 + (i * 7) % 33, i % 5 == 4) for i in range(40)]
    alone = {}
    for prompt, max_tokens, leaves in jobs:
        if not leaves and (prompt, max_tokens) not in alone:
            r = client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0)
            alone[prompt, max_tokens] = r.choices[0].text
            assert r.choices[0].text == reference(ref, ref.tokenizer.encode(prompt), max_tokens)[0]
    before = metrics(server)

    def run(job):
        prompt, max_tokens, leaves = job
        stream = client.completions.create(model=server.model, prompt=prompt, temperature=0, stream=True,
                                           max_tokens=200 if leaves else max_tokens,
                                           extra_body={"ignore_eos": True} if leaves else None)
        pieces = []
        for i, chunk in enumerate(stream):
            if leaves and i == 3:
                stream.close()
                return None
            if chunk.choices:
                pieces.append(chunk.choices[0].text)
        return "".join(pieces)

    health, stop = [], threading.Event()

    def watch():
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while not stop.is_set() and len(health) < 2000:
                r = http.get("/health")
                health.append((r.status_code, r.json()["running"]))
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(run, jobs, timeout=120))
    finally:
        stop.set()
        watcher.join(30)
    for (prompt, max_tokens, leaves), text in zip(jobs, results):
        if not leaves:
            assert text == alone[prompt, max_tokens], (prompt, max_tokens)
    assert health and {code for code, _ in health} == {200}
    assert max(running for _, running in health) >= 2  # the requests really ran side by side
    deadline = time.monotonic() + 15
    while True:  # the last cancellations free their sequences at the scheduler's next iteration
        m = metrics(server)
        freed = m["bitlm_requests_running"] == 0 and m["bitlm_kv_blocks_used"] == 0
        if freed or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert freed and m["bitlm_requests_waiting"] == 0, m
    cancelled = 'bitlm_requests_finished_total{reason="cancelled"}'
    assert m.get(cancelled, 0) - before.get(cancelled, 0) >= 1  # some leavers were cut mid-generation
    done = sum(m.get(f'bitlm_requests_finished_total{{reason="{r}"}}', 0) -
               before.get(f'bitlm_requests_finished_total{{reason="{r}"}}', 0) for r in ("stop", "length"))
    assert done >= sum(1 for j in jobs if not j[2])


def test_preemption_keeps_outputs(client, server, ref):
    """4 requests of 230 positions want 60 blocks of the 40: the last admitted are preempted and
    recomputed later, and each output is still exactly engine.generate's."""
    before = metrics(server)["bitlm_preemptions_total"]
    prompts = [[(7 * i + j) % 500 + 3 for j in range(30)] for i in range(4)]
    expected = [reference(ref, p, 200, ignore_eos=True)[0] for p in prompts]

    def run(p):
        return client.completions.create(model=server.model, prompt=p, max_tokens=200, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, prompts, timeout=120)) == expected
    assert metrics(server)["bitlm_preemptions_total"] > before
