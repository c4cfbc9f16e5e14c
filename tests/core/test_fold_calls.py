"""The fold workflow's view of a recorded denoiser call (``act_core.distill.DenoiserCall``): which rows hold
each prompt's cond and uncond predictions, the rows of a subset of prompts, and the guided prediction of an
output, for every row layout a host records (diffusers' [uncond; cond], Z-Image's [cond; uncond], no CFG)."""

from __future__ import annotations

import pytest
import torch

from act_core.distill import DenoiserCall, cfg_rows, take_rows


def _call(layout: str, prompts: int = 4, scale: float = 3.0) -> DenoiserCall:
    cond, uncond = cfg_rows(prompts, layout)
    batch = prompts if uncond is None else 2 * prompts
    return DenoiserCall((), {}, 0.5, batch, cond, uncond, scale)


@pytest.mark.parametrize("layout", ["uncond_first", "cond_first", "all"])
def test_guided_predictions_of_whole_calls_and_of_subsets(layout):
    call = _call(layout)
    output = torch.randn(call.batch, 2, 3)
    cond, uncond = output[call.cond], None if call.uncond is None else output[call.uncond]
    expected = cond if uncond is None else uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(call.guided(output), expected, rtol=0, atol=0)
    picked = torch.tensor([1, 3])
    rows = call.rows(picked)
    assert rows.tolist() == sorted(rows.tolist())  # the call's own order
    torch.testing.assert_close(call.guided(output[rows], picked), expected[picked], rtol=0, atol=0)


def test_rows_of_a_subset_keep_the_calls_halves():
    assert _call("uncond_first").rows(torch.tensor([0, 2])).tolist() == [0, 2, 4, 6]
    assert _call("cond_first").rows(torch.tensor([1])).tolist() == [1, 5]
    assert _call("all").rows(torch.tensor([1, 2])).tolist() == [1, 2]


def test_take_rows_indexes_per_row_values_only():
    rows = torch.tensor([1, 3])
    value = {"x": torch.arange(4), "t": torch.tensor(5.0), "sizes": [(8, 8)], "per_row": [torch.ones(1)] * 4}
    taken = take_rows(value, rows, 4)
    assert taken["x"].tolist() == [1, 3] and taken["t"].item() == 5.0 and taken["sizes"] == [(8, 8)]
    assert len(taken["per_row"]) == 2 and taken is not value
