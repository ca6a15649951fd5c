"""The simulated client gate hints of bench/hint_sensitivity.py hint what they claim to."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from test_replay import tiny_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
simulated_hints = importlib.import_module("hint_sensitivity").simulated_hints

# Two tokens of four layers, one expert each.
ROWS = [(0, [0]), (1, [1]), (2, [2]), (3, [3]), (0, [3]), (1, [2]), (2, [1]), (3, [0])]


def test_exact_hints_name_the_layer_ahead_and_stay_within_the_token():
    hints = simulated_hints(tiny_trace(ROWS, layers=4, experts=4), ahead=2, accuracy=1.0)
    assert hints[0] == [(1, [1]), (2, [2])]  # a token's first layer hints both layers ahead
    assert hints[1] == [(3, [3])]  # then one new layer per row
    assert hints[2] == [] and hints[3] == []  # never the next token's layers
    assert hints[4] == [(1, [2]), (2, [1])]


def test_whole_token_hints_come_at_its_first_layer():
    hints = simulated_hints(tiny_trace(ROWS, layers=4, experts=4), ahead=None, accuracy=1.0)
    assert hints[0] == [(1, [1]), (2, [2]), (3, [3])]
    assert all(h == [] for h in hints[1:4])


@pytest.mark.parametrize("accuracy", [0.0, 0.5])
def test_a_wrong_hint_names_another_expert_of_the_same_layer(accuracy):
    rng = np.random.default_rng(1)
    rows = [(layer, rng.choice(8, size=2, replace=False).tolist()) for _ in range(200) for layer in range(4)]
    trace = tiny_trace(rows, layers=4, experts=8)
    hints = simulated_hints(trace, ahead=1, accuracy=accuracy, seed=3)
    right = total = 0
    for row, out in enumerate(hints):
        for layer, experts in out:
            assert layer == rows[row + 1][0] and len(set(experts)) == 2
            right += len(set(experts) & set(rows[row + 1][1]))
            total += 2
    assert total == 200 * 3 * 2  # three of each token's four layers are hinted, two experts each
    assert right / total == pytest.approx(accuracy, abs=0.05)
