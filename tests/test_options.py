"""`--model-loader-extra-config` parsing: every mistake is caught up front with a clear message."""

from __future__ import annotations

import json
import math

import pytest

from vllm_aimer.errors import AimerError
from vllm_aimer.options import AimerOptions, parse_options

VALID_KEYS = ("prune_ratio", "plan", "plan_out", "enable_multithread_load", "num_threads",
              "enable_weights_track")


def _error(extra) -> str:
    with pytest.raises(AimerError) as e:
        parse_options(extra)
    assert str(e.value).startswith("vllm-aimer: ")
    return str(e.value)


def test_ratio():
    opts = parse_options({"prune_ratio": 0.5})
    assert opts == AimerOptions(prune_ratio=0.5, plan=None, plan_out=None, parent={})
    assert isinstance(parse_options({"prune_ratio": 0}).prune_ratio, float)


def test_plan_and_plan_out():
    opts = parse_options({"plan": "p/pruned_experts.json", "plan_out": "/tmp/out"})
    assert opts.plan == "p/pruned_experts.json" and opts.plan_out == "/tmp/out"
    assert opts.prune_ratio is None


def test_json_string_is_parsed():
    opts = parse_options(json.dumps({"prune_ratio": 0.25, "num_threads": 4}))
    assert opts.prune_ratio == 0.25 and opts.parent == {"num_threads": 4}


def test_parent_keys_are_passed_through():
    extra = {"prune_ratio": 0.5, "enable_multithread_load": True, "num_threads": 8,
             "enable_weights_track": False}
    opts = parse_options(extra)
    assert opts.parent == {"enable_multithread_load": True, "num_threads": 8,
                           "enable_weights_track": False}
    # Our own keys never reach the parent loader (it rejects unknown keys).
    assert not set(opts.parent) & {"prune_ratio", "plan", "plan_out"}


def test_unknown_key_lists_the_valid_keys():
    msg = _error({"prune_ratio": 0.5, "prune_ration": 0.5})
    assert "'prune_ration'" in msg
    for key in VALID_KEYS:
        assert key in msg
    msg = _error({"ratio": 0.5})
    assert "'ratio'" in msg and "prune_ratio" in msg


def test_ratio_with_plan_is_left_to_the_plan_reader():
    """A ratio goes with a plan only for vllm-ascend's ordered expert lists, which only
    the file's content tells (tests/test_plan_formats.py checks both outcomes)."""
    opts = parse_options({"prune_ratio": 0.5, "plan": "experts.jsonl"})
    assert (opts.prune_ratio, opts.plan) == (0.5, "experts.jsonl")
    assert "[0, 1)" in _error({"prune_ratio": 1.5, "plan": "experts.jsonl"})


@pytest.mark.parametrize("extra", [None, {}, "{}", {"plan_out": "/tmp/x"}, {"num_threads": 2}])
def test_neither_ratio_nor_plan(extra):
    msg = _error(extra)
    assert "prune_ratio or plan" in msg


@pytest.mark.parametrize("ratio", ["0.5", "half", True, [0.5]])
def test_ratio_not_a_number(ratio):
    msg = _error({"prune_ratio": ratio})
    assert "prune_ratio must be a number" in msg
    assert repr(ratio) in msg


@pytest.mark.parametrize("ratio", [-0.25, -1, 1.0, 1, 2.5])
def test_ratio_out_of_range(ratio):
    msg = _error({"prune_ratio": ratio})
    assert "[0, 1)" in msg and str(ratio) in msg


def test_ratio_nan_in_a_json_string():
    # Python's json accepts NaN; the ratio check must still reject it.
    msg = _error('{"prune_ratio": NaN}')
    assert "[0, 1)" in msg
    assert math.isnan(json.loads('{"prune_ratio": NaN}')["prune_ratio"])


@pytest.mark.parametrize("text", ['{"prune_ratio": 0.5', "prune_ratio=0.5", "{'prune_ratio': 0.5}"])
def test_bad_json_string(text):
    assert "not valid JSON" in _error(text)


@pytest.mark.parametrize("text", ["[0.5]", "0.5", '"plan"'])
def test_json_that_is_not_an_object(text):
    assert "must be a JSON object" in _error(text)


@pytest.mark.parametrize("key", ["plan", "plan_out"])
@pytest.mark.parametrize("value", [3, ["a.json"], "", "   ", {"path": "x"}])
def test_plan_paths_must_be_strings(key, value):
    extra = {"plan": "p.json"} if key == "plan_out" else {}
    extra[key] = value
    msg = _error(extra)
    assert f"{key} must be a non-empty path string" in msg
