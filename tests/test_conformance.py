"""This project's maths against a peer's own code: tests/fixtures/conformance.json holds what Hugging Face TRL's
trainers computed on fixed inputs (`python bench/conformance.py` regenerates it in TRL's environments: GRPO and RLOO
in 1.16, PPO in 1.12), and each row's values and gradients are compared with this project's functions on the same
inputs (no TRL needed here). Where the two differ by design the row names the convention: the difference must then
be real, and TRL's convention applied to this project's numbers must give TRL's."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import conformance  # noqa: E402

ROWS = json.loads(conformance.FIXTURE.read_text())["rows"]


def test_the_fixture_covers_each_algorithms_pieces():
    kinds = {row["kind"] for row in ROWS}
    assert kinds == {"grpo_advantages", "grpo_loss", "rloo_advantages", "rloo_loss", "ppo_rewards", "ppo_gae",
                     "ppo_whiten", "ppo_policy_loss", "ppo_value_loss", "dpo_loss"}  # fmt: skip
    losses = [row for row in ROWS if row["kind"] == "grpo_loss"]
    assert {row["config"]["loss_type"] for row in losses} == {"grpo", "bnpo", "dapo", "dr_grpo"}
    assert {row["config"]["level"] for row in losses} == {"token", "sequence"}
    assert {row["config"]["correction"] for row in losses} == {True, False}


@pytest.mark.parametrize("row", ROWS, ids=[row["name"] for row in ROWS])
def test_each_row_matches_trl_values_and_gradients(row):
    exact, converted = conformance.compare(row)
    if conformance.convention(row) is None:
        assert exact < 1e-5, f"{row['name']}: differs from TRL by {exact:.2g}"
    else:  # a convention: a real difference, which TRL's convention applied removes
        assert exact > 1e-4 and converted < 1e-5, (exact, converted)
    if "grad" in row["outputs"]:  # the gradient was compared, and it is not trivially zero
        assert any(abs(g) > 1e-3 for line in row["outputs"]["grad"] for g in line)
