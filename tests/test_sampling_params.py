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
