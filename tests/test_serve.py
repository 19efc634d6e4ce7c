"""The pruned model behind vLLM's OpenAI API: a real `vllm serve` on 127.0.0.1 and the
official `openai` client."""

from __future__ import annotations

import os

import pytest
from openai import OpenAI

from tests.conftest import SERVED_NAME
from tests.helpers.reference import run_probe

pytestmark = pytest.mark.engine

PROMPT_IDS = [5, 17, 42, 9, 100, 33]


@pytest.fixture(scope="module")
def client(pruned_server):
    return OpenAI(base_url=pruned_server.base_url + "/v1", api_key="test", max_retries=0)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]


def test_completion(client):
    out = client.completions.create(model=SERVED_NAME, prompt="the quick brown fox",
                                    max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.completion_tokens >= 1
    assert out.choices[0].text


def test_chat_uses_the_chat_template(client):
    out = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=6,
        temperature=0)
    assert out.choices[0].message.role == "assistant"
    # "<|user|> hello\n<|assistant|> " tokenizes to more tokens than "hello" alone.
    assert out.usage.prompt_tokens > 3


def test_streaming_chat_is_complete(client):
    chunks = list(client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "count to three"}],
        max_tokens=10, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] and text
    whole = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "count to three"}],
        max_tokens=10, temperature=0)
    assert text == whole.choices[0].message.content


def test_served_logprobs_equal_the_offline_engine(client, pruned_server, tmp_path):
    served = client.completions.create(
        model=SERVED_NAME, prompt=PROMPT_IDS, max_tokens=1, temperature=0, logprobs=20,
        extra_body={"return_tokens_as_token_ids": True})
    top = served.choices[0].logprobs.top_logprobs[0]
    got = {int(k.split(":")[1]): v for k, v in top.items()}
    env = dict(os.environ, TMPDIR=str(tmp_path), AIMER_STATE_DIR=str(tmp_path / "state"))
    offline = run_probe({"model": str(pruned_server.model), "prompts": [PROMPT_IDS],
                         "extra": {"plan": str(pruned_server.plan_out / "pruned_experts.json")}},
                        env=env)["logprobs"][0]
    assert len(got) == 20
    for tok, lp in got.items():
        assert abs(lp - offline[str(tok)]) <= 1e-4, (tok, lp, offline.get(str(tok)))


def test_logprobs_are_a_distribution(client):
    # Token ids as keys: byte-level pieces of a random model often decode alike.
    out = client.completions.create(model=SERVED_NAME, prompt="hello world", max_tokens=3,
                                    temperature=0, logprobs=5,
                                    extra_body={"return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 3
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) >= 5 for t in lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen >= max(top.values()) - 1e-6  # greedy picks the most likely token
