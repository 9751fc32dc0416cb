"""`bitlm serve` at its limits: the API key, a full queue (429), and draining on SIGTERM.

One server with one sequence and a queue of one, on a tiny model with a long context (8192 positions),
so that a request of thousands of tokens holds the only sequence for seconds while the test looks; its
KV cache holds 300 blocks of 16 positions (4,800), less than one full context.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import time

import httpx
import openai
import pytest

from helpers import make_tiny_model_dir

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory, tiny_tokenizer_dir):
    model = make_tiny_model_dir(tmp_path_factory.mktemp("long_ctx"), tiny_tokenizer_dir, max_position_embeddings=8192)
    return start_server(model, "--max-seqs", 1, "--max-queue", 1, "--api-key", KEY, "--drain-timeout", 20,
                        "--kv-blocks", 300)


def gauge(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def wait_for(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_api_key(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            r = http.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = http.post("/v1/completions", json={"model": server.model, "prompt": "x"}, headers=headers)
            assert r.status_code == 401
        assert http.get("/health").status_code == 200  # no key needed for the probes
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="nope").models.list()
    r = server.client(api_key=KEY).completions.create(model=server.model, prompt="To be", max_tokens=3,
                                                      extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_queue_full_then_disconnect_frees(server):
    """A holds the only sequence, B waits in the queue of one, C is refused with 429; A's client leaves,
    its sequence is freed and B runs to its end."""
    client = server.client(api_key=KEY)
    a = client.completions.create(model=server.model, prompt="To be", max_tokens=4000, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    next(iter(a))  # A is running
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        b = pool.submit(client.completions.create, model=server.model, prompt="Now is", max_tokens=5,
                        extra_body={"ignore_eos": True})
        wait_for(lambda: gauge(server, "bitlm_requests_waiting") == 1)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=server.model, prompt="Shall I", max_tokens=5)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        assert gauge(server, "bitlm_requests_running") == 1
        a.close()  # A's client leaves
        assert b.result(timeout=30).usage.completion_tokens == 5
    wait_for(lambda: gauge(server, "bitlm_kv_blocks_used") == 0 and gauge(server, "bitlm_requests_running") == 0)
    cancelled = 'bitlm_requests_finished_total{reason="cancelled"}'
    assert gauge(server, re.escape(cancelled)) == 1  # A


def test_request_larger_than_the_kv_cache(server):
    """Within the context (8192) but beyond the whole KV cache (4800 positions): 400 before any work."""
    with pytest.raises(openai.BadRequestError) as e:
        server.client(api_key=KEY).completions.create(model=server.model, prompt="To be", max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded" and "KV blocks" in e.value.body["message"]
    # a chat without max_tokens may take what the cache holds (4800 positions), not the context (8192):
    # accepted (the client leaves after the first chunk)
    stream = server.client(api_key=KEY).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Hi"}], stream=True)
    assert next(iter(stream)).choices[0].delta.role == "assistant"
    stream.close()
    wait_for(lambda: gauge(server, "bitlm_requests_running") == 0)


def test_sigterm_drains(server):
    """SIGTERM: a stream already running goes on to its end; the server then exits as SIGTERM asks."""
    client = server.client(api_key=KEY)
    stream = client.completions.create(model=server.model, prompt="To be", max_tokens=3000, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    server.proc.send_signal(signal.SIGTERM)

    def refused():  # the listening socket closes at once; the stream goes on meanwhile
        try:
            httpx.get(server.url + "/health", timeout=5)
            return False
        except httpx.TransportError:
            return True

    wait_for(refused)
    assert server.proc.poll() is None
    rest = list(chunks)
    assert rest[-1].usage.completion_tokens == 3000
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert server.proc.wait(30) == -signal.SIGTERM
    log = server.log()
    assert "draining" in log and "stopped:" in log and "Traceback" not in log
