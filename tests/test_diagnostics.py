"""Value diagnostics on a batch worked out by hand, NaN-safety, and the offline path from rollouts."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from stages.critic.diagnostics import (
    LENGTH_BINS,
    scalar_metrics,
    value_diagnostics,
    value_diagnostics_from_rollouts,
)

NAN = float("nan")
# Row 0 (correct): 4 tokens, values 1..4. Row 1 (incorrect): 2 tokens, values 5, 6; padding holds NaN.
VALUES = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, NAN, NAN]])
MASK = torch.tensor([[True, True, True, True], [True, True, False, False]])
ADVANTAGES = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 4.0, NAN, NAN]])
CORRECT = torch.tensor([True, False])


def test_hand_computed_diagnostics():
    d = value_diagnostics(VALUES, VALUES, ADVANTAGES, MASK, CORRECT)
    # Means over each group's tokens: (1+2+3+4)/4 = 2.5 and (5+6)/2 = 5.5.
    assert d["value_correct"] == pytest.approx(2.5) and d["value_incorrect"] == pytest.approx(5.5)
    assert d["value_mean"] == pytest.approx(21 / 6)
    # Advantages: correct [1,1,1,1] -> mean 1, std 0; incorrect [2, 4] -> mean 3, std 1.
    assert (d["adv_mean_correct"], d["adv_std_correct"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert (d["adv_mean_incorrect"], d["adv_std_incorrect"]) == (pytest.approx(3.0), pytest.approx(1.0))
    assert d["value_correct_by_position"] == [1.0, 2.0, 3.0, 4.0]
    assert d["value_incorrect_by_position"] == [5.0, 6.0, None, None]
    # Length bins floor(20 t / L): row 0 (L=4) -> bins 0, 5, 10, 15; row 1 (L=2) -> bins 0, 10.
    by_bin = d["value_correct_by_length_bin"]
    assert len(by_bin) == LENGTH_BINS
    assert [by_bin[i] for i in (0, 5, 10, 15)] == [1.0, 2.0, 3.0, 4.0]
    assert sum(v is not None for v in by_bin) == 4
    assert d["value_incorrect_by_length_bin"][0] == 5.0 and d["value_incorrect_by_length_bin"][10] == 6.0
    # Values equal to returns: a perfect critic.
    assert d["explained_var"] == pytest.approx(1.0) and d["value_return_corr"] == pytest.approx(1.0)
    assert d["value_correct_pos0"] == 1.0 and d["value_incorrect_pos2"] is None


def test_empty_groups_give_none_and_nothing_is_nan():
    d = value_diagnostics(VALUES, VALUES, ADVANTAGES, MASK, torch.tensor([True, True]))
    assert d["value_incorrect"] is None and d["adv_mean_incorrect"] is None
    scalars = scalar_metrics(d, "ppo")
    assert "ppo/value_incorrect" not in scalars and scalars["ppo/value_correct"] == pytest.approx(
        21 / 6
    )  # (1+2+3+4+5+6)/6
    assert all(math.isfinite(v) for v in scalars.values())
    empty = value_diagnostics(VALUES, VALUES, ADVANTAGES, torch.zeros_like(MASK), CORRECT)
    assert empty["explained_var"] is None and empty["value_mean"] is None


def test_constant_returns_give_no_correlation_instead_of_nan():
    d = value_diagnostics(VALUES, torch.ones_like(VALUES), ADVANTAGES, MASK, CORRECT)
    assert d["value_return_corr"] is None


def test_offline_from_rollouts_equals_online():
    table = pa.table(
        {
            "values": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0], []],  # the last row has no critic (GRPO)
            "returns": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0], []],
            "advantages": [[1.0, 1.0, 1.0, 1.0], [2.0, 4.0], []],
            "is_correct": [True, False, True],
        }
    )
    offline = value_diagnostics_from_rollouts(table)
    online = value_diagnostics(VALUES, VALUES, ADVANTAGES, MASK, CORRECT)
    assert offline == online
