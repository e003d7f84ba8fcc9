"""The comparison helpers the equivalence tests rest on: they must fail where values differ."""

import torch
from helpers import rel_err

INF, NAN = float("inf"), float("nan")


def test_rel_err_measures_finite_entries():
    assert rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert abs(rel_err(torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0])) - 0.05) < 1e-6  # 2.1 in float32


def test_rel_err_non_finite_entries_agree_only_when_identical():
    assert rel_err(torch.tensor([INF, -INF, NAN, 1.0]), torch.tensor([INF, -INF, NAN, 1.0])) == 0.0
    assert rel_err(torch.tensor([INF, 1.5]), torch.tensor([INF, 1.0])) == 0.5
    for actual, expected in (
        ([INF, 1.0], [-INF, 1.0]),  # the other sign
        ([INF, 1.0], [1.0, 1.0]),  # an infinity against a number
        ([1.0, 1.0], [INF, 1.0]),
        ([NAN, 1.0], [INF, 1.0]),  # NaN against an infinity
        ([NAN, 1.0], [1.0, 1.0]),
        ([1.0, NAN], [NAN, 1.0]),  # NaN at other places
    ):
        assert rel_err(torch.tensor(actual), torch.tensor(expected)) == INF, (actual, expected)
