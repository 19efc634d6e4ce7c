"""A bounded burst against the pruned server on 127.0.0.1: 32 concurrent clients,
200 mixed requests, no failures, every stream complete, and a client that hangs up
mid-stream does not disturb the others."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from tests.conftest import SERVED_NAME

pytestmark = pytest.mark.engine

CLIENTS = 32
REQUESTS = 200


def one_request(client: OpenAI, i: int) -> str:
    kind = ("completion", "chat", "stream-completion", "stream-chat")[i % 4]
    max_tokens = 4 + i % 5
    if kind == "completion":
        out = client.completions.create(model=SERVED_NAME, prompt=f"request {i}",
                                        max_tokens=max_tokens, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop")
        assert out.usage.completion_tokens >= 1
    elif kind == "chat":
        out = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": f"hi {i}"}],
            max_tokens=max_tokens, temperature=0.7, seed=i)
        assert out.choices[0].finish_reason in ("length", "stop")
    elif kind == "stream-completion":
        chunks = list(client.completions.create(model=SERVED_NAME, prompt=f"stream {i}",
                                                max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}))
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish in (["length"], ["stop"]), finish
        assert chunks[-1].usage is not None  # the final usage chunk arrived
    else:
        chunks = list(client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": f"stream {i}"}],
            max_tokens=max_tokens, stream=True))
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish in (["length"], ["stop"]), finish
    return kind


def test_burst_of_mixed_requests_with_a_disconnecting_client(pruned_server):
    client = OpenAI(base_url=pruned_server.base_url + "/v1", api_key="test", max_retries=0,
                    timeout=120)
    hung_up = threading.Event()

    def disconnecting_client() -> None:
        stream = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "tell me a long story"}],
            max_tokens=400, stream=True)
        for n, _ in enumerate(stream):
            if n == 2:
                stream.close()  # hang up mid-stream
                hung_up.set()
                return

    failures: list[BaseException] = []
    with ThreadPoolExecutor(CLIENTS) as pool:
        rude = pool.submit(disconnecting_client)
        futures = [pool.submit(one_request, client, i) for i in range(REQUESTS)]
        kinds = []
        for f in futures:
            try:
                kinds.append(f.result(timeout=300))
            except BaseException as e:  # collect every failure, then report them all
                failures.append(e)
        rude.result(timeout=300)
    assert hung_up.is_set()
    assert not failures, f"{len(failures)} of {REQUESTS} failed; first: {failures[0]!r}"
    assert len(kinds) == REQUESTS and len(set(kinds)) == 4
    # The server is still healthy and serves a fresh request after the burst.
    assert pruned_server.get("/health") == ""
    one_request(client, 0)
