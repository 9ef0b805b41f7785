from __future__ import annotations

import json

import pytest

from search import BlockChoice, InvalidInputError, plan_from_json, plan_to_json


@pytest.mark.parametrize("key", ["keep", "ds:m=1", "ds:m=4", "ss:r=32", "ir:t=6,k=3", "ir:t=1,k=5"])
def test_choice_key_round_trip(key: str) -> None:
    choice = BlockChoice.parse(key)
    assert choice.key == key
    assert BlockChoice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice


def test_plan_json_round_trip() -> None:
    plan = {"a.0": BlockChoice("ds", depth_multiplier=2), "b": BlockChoice("ir", exp_ratio=6.0, kernel=5)}
    assert plan_from_json(plan_to_json(plan)) == plan


@pytest.mark.parametrize(
    "bad",
    [{"kind": "xx"}, {"kind": "ds"}, {"kind": "ss", "rank": 0}, {"kind": "ir", "exp_ratio": 6, "kernel": 4},
     {"kind": "keep", "rank": 3}, {"kind": "ds", "depth_multiplier": 1, "colour": "red"}, "ds:q=1"],
)
def test_bad_choices_are_refused(bad) -> None:
    with pytest.raises(InvalidInputError):
        BlockChoice.from_dict(bad)
