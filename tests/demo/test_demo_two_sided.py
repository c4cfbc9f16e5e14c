"""The two-sided harness (``python -m demo.two_sided``) on the shipped model: one map, both sides steer."""

from __future__ import annotations

import pytest

from demo.two_sided import main, side_tasks


def test_side_tasks_share_the_neutral_prompts_and_keep_every_shape():
    tasks = side_tasks(pairs=6)
    assert tasks["more"].source == tasks["less"].source and len(tasks["more"].source) == 6
    assert all(p.endswith(", outlined") for p in tasks["less"].target)
    assert set(tasks["more"].shapes) == set(tasks["less"].shapes) and len(set(tasks["more"].shapes)) >= 3


@pytest.mark.slow
def test_a_two_sided_map_steers_the_shipped_model_both_ways(tmp_path):
    results = main(["--models", "shipped", "--pairs", "8", "--output", str(tmp_path)])
    sides = results["shipped"]["sides"]
    for side in ("less", "more"):
        assert sides[side]["passes"], (side, sides[side])
        assert sides[side]["at_lambda"]["effect"] >= 0.8
    assert (tmp_path / "table.md").read_text().count("2/2") == 1
