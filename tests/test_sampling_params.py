import pytest

from tpserve import SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"seed": -3}, "seed"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**kwargs)


def test_dict_roundtrip():
    p = SamplingParams(max_tokens=5, temperature=0.7, top_k=3, top_p=0.9, seed=11, stop_token_ids=[4, 5])
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert SamplingParams(temperature=0).greedy


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_k": 18446744073709551616}, "top_k"),
        ({"top_k": 10**30}, "top_k"),
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"stop_token_ids": [2**64]}, "stop_token_ids"),
        ({"stop_token_ids": [2**31]}, "stop_token_ids"),
        ({"stop_token_ids": "abc"}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"seed": 2**64}, "seed"),
        ({"temperature": 10**400}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 10**400}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_huge_values_raise_value_error_naming_the_field(kwargs, field):
    """Not OverflowError (which left the request pending), not msgpack's error at send time."""
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [0, 0.0, 1e-40, 1e-300, 5e-324, 9.9e-6])
def test_tiny_temperatures_are_greedy(temperature):
    assert SamplingParams(temperature=temperature).greedy
    assert not SamplingParams(temperature=1e-4).greedy


@pytest.mark.parametrize("bad", [None, [1, 2], "x", 3])
def test_from_dict_rejects_what_is_not_a_dict(bad):
    with pytest.raises(ValueError, match="expected a dict"):
        SamplingParams.from_dict(bad)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"logprobs": True}, "logprobs"),
        ({"prompt_logprobs": 2**64}, "prompt_logprobs"), ({"prompt_logprobs": 1.0}, "prompt_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"), ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": -10**400}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 11}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
        ({"logit_bias": {1: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {"1": 1}}, "logit_bias"), ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias"),
        ({"logit_bias": [(1, 2)]}, "logit_bias"), ({"logit_bias": {1: float("inf")}}, "logit_bias"),
    ],
)
def test_new_fields_are_bounded(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}"):
        SamplingParams(**kwargs)


def test_new_fields_roundtrip_through_the_wire_form():
    p = SamplingParams(logprobs=0, prompt_logprobs=20, presence_penalty=-2, frequency_penalty=1.5,
                       repetition_penalty=1.2, min_p=0.05, logit_bias={5: -100, 7: 2.5})
    d = p.to_dict()
    assert all(not isinstance(v, dict) for v in d.values())  # flat: the wire takes no nested dicts
    assert SamplingParams.from_dict(d) == p
    assert p.penalized and not SamplingParams(min_p=0.5).penalized
    assert hash(p) == hash(SamplingParams.from_dict(d)) and len({p, SamplingParams.from_dict(d)}) == 1
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams.from_dict({"logit_bias_token_ids": [1, 2], "logit_bias_values": [1.0]})
