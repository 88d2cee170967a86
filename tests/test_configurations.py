"""Every script in the configurations no single-purpose test runs, on data that gives the two ranks different work:
two runs of each, an uninterrupted one on two ranks (DDP, or FSDP2, with micro-batches) and one on one rank, killed
after its first checkpoint and resumed with --resume, must agree:
- one rank against two: every logged statistic (the controllers' inputs and coefficients included) up to the kill,
  and the final weights;
- the killed-and-resumed run against the uninterrupted one: every logged row after the resume too.
(A bug in either mechanism breaks the agreement: one between ranks shows in the rows before the kill, one in
resuming only in those after it; both change the final weights.)
The data: multi-turn prompts (60-90 tokens) wherever rank 0 draws a prompt and one-turn prompts (about 15 tokens)
wherever rank 1 does (plumbing/data.py's prompt_indices, the scripts' own draw), so the ranks' length groups,
chunks and micro-batch plans differ before the update equalises them; rollouts fixed per prompt (tests/wrap.py
--rollouts fixed), so that every configuration trains on the same samples. Each script's runs are made once per
session (tests/runs.py's Shared) and read by both tests."""

import json
import random

import pytest
from conftest import REPO, kill_at_first_checkpoint, read_metrics, run_script

from plumbing import data

ONLINE = [  # 2 iterations of 16 rows, one minibatch per epoch (its composition cannot depend on the ranks' shuffle)
    "--total-episodes", "32", "--rollout-batch-size", "16", "--mini-batch-size", "16", "--max-new-tokens", "16",
    "--eval-size", "4", "--eval-every", "2", "--save-every", "1", "--lr", "5e-5", "--max-prompt-length", "128",
]  # fmt: skip
OFFLINE = ["--total-steps", "2", "--batch-size", "8", "--log-every", "1", "--eval-every", "2", "--save-every", "1",
           "--value-epochs", "2", "--value-samples", "2", "--eval-size", "8", "--lr", "2e-5"]  # fmt: skip
PAIRS = ["--total-steps", "2", "--batch-size", "8", "--log-every", "1", "--eval-every", "2", "--save-every", "1",
         "--eval-size", "8", "--lr", "2e-5", "--max-new-tokens", "16"]  # fmt: skip
# per script: its flags at values other than their defaults, and the two-rank split
SCRIPTS = {
    "ppo": (["--value-lr", "5e-5", "--kl-coef", "0.1", "--kl-target", "1.0", "--kl-horizon", "2000"],
            ["--fsdp", "--micro-batch-size", "4"]),
    "apa": (["--lam", "0.5", "--update-epochs", "1", "--use-lora", "--lora-r", "4", "--lr", "1e-3",
             "--value-lr", "1e-3"], ["--fsdp", "--micro-batch-size", "4"]),  # (LoRA under FSDP, and its resume)
    "awr": (["--value-lr", "5e-5", "--beta", "0.5", "--max-weight", "10"], ["--micro-batch-size", "2"]),
    "ppo_max": (["--value-lr", "5e-5", "--critic-warmup-steps", "1", "--ptx-coef", "0.5", "--kl-coef", "0.02"],
                ["--fsdp", "--micro-batch-size", "4"]),
    "grpo": (["--scale-rewards", "batch", "--kl-coef", "0.1", "--loss-agg", "token-mean"],
             ["--fsdp", "--micro-batch-size", "2"]),
    "rloo": (["--kl-coef", "0.1", "--update-epochs", "2", "--clip-eps", "0.1"], ["--micro-batch-size", "4"]),
    "alol": (["--variant", "a-lol-seq", "--clip-eps", "0.5"], ["--fsdp", "--micro-batch-size", "2"]),
    "dpo": (["--beta", "0.2", "--lr", "1e-4"], ["--fsdp", "--micro-batch-size", "2"]),
}  # fmt: skip
NOT_COMPARED = ("time/", "dist/")  # wall times, memory and the padding meter are per run; dist/ only on 2 ranks


def uneven_data(directory) -> None:
    """48 train rows whose prompts are long where rank 0 of 2 draws them and short where rank 1 does (seed 1), and
    16 test rows alternating long and short."""
    rows = [json.loads(line) for line in open(REPO / "toy" / "data" / "train.jsonl")][:200]
    rng = random.Random(0)

    def long_prompt(row):
        turns = rng.sample(rows, 3)
        history = "".join(t["prompt"] + t["chosen"] for t in turns)
        return {**row, "prompt": history + row["prompt"]}

    n = 48
    stream = [i for b in range(3) for i in data.prompt_indices(n, 16, b, 1, 0, 1)]  # the draw, one rank (3 batches)
    train = [None] * n
    for position, index in enumerate(stream):
        train[index] = long_prompt(rows[index]) if position % 2 == 0 else rows[index]
    for index in range(n):
        train[index] = train[index] or rows[index]
    ranks = [[i for b in range(3) for i in data.prompt_indices(n, 16, b, 1, r, 2)] for r in range(2)]
    length = [sum(len(train[i]["prompt"]) for i in r) / len(r) for r in ranks]
    assert length[0] > 3 * length[1]  # rank 0's work is the long prompts
    test = [long_prompt(r) if i % 2 == 0 else r for i, r in enumerate(rows[100:116])]
    directory.mkdir(parents=True, exist_ok=True)
    for split, split_rows in (("train", train), ("test", test)):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))


def flags(script: str, dataset) -> list[str]:
    own, _ = SCRIPTS[script]
    base = {"alol": OFFLINE, "dpo": PAIRS}.get(script, ONLINE)
    return [*base, *own, "--dataset", str(dataset)]


def runs(script: str, shared) -> dict:
    """The script's uninterrupted run on two ranks and its run on one rank, killed at its first checkpoint and resumed
    (each made once): every statistic and the weights of each must equal the other's."""
    dataset = shared.get("uneven-data", uneven_data)
    fixed = ["tests/wrap.py", "--rollouts", "fixed", script]
    made = {}
    made["two"] = shared.get(f"{script}-two", lambda d: run_script(*fixed, *flags(script, dataset), *SCRIPTS[script][1],
                                                                  "--output-dir", str(d / "run"), nproc=2))  # fmt: skip

    def kill_and_resume(d):
        kill_at_first_checkpoint(script, flags(script, dataset), d / "run", wrap=("--rollouts", "fixed"))
        run_script(*fixed, *flags(script, dataset), "--output-dir", str(d / "run"), "--resume")

    made["resumed"] = shared.get(f"{script}-resumed", kill_and_resume)
    return {k: v / "run" for k, v in made.items()}


def policy(path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def compared(row: dict) -> dict:
    """The logged values to compare; not DPO's implicit reward accuracy, a count of signs: while pi = pi_ref each
    margin is 0 up to rounding, whose sign another batching of the same numbers may flip (the margin is compared)."""
    numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    return {k: v for k, v in numbers.items() if not k.startswith(NOT_COMPARED) and not k.endswith("accuracy")}


def assert_same_rows(expected: list[dict], got: list[dict]):
    assert [r["iteration"] for r in expected] == [r["iteration"] for r in got]
    for a, b in zip(expected, got):
        a, b = compared(a), compared(b)
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=2e-5), (key, a[key], b[key])


def assert_same_weights(a_dir, b_dir):
    """The same weights but where rounding flipped an Adam step: a parameter whose gradient is within rounding of 0
    moves by +-lr either way, so a few entries may differ by up to 2 lr; a wrong update moves nearly all of them."""
    a, b = policy(a_dir / "policy"), policy(b_dir / "policy")
    initial = policy(REPO / "toy" / "policy")
    assert max((a[k] - initial[k]).abs().max().item() for k in a) > 1e-5  # it trained
    differing = sum(((a[k] - b[k]).abs() > 1e-5).sum().item() for k in a)
    assert differing <= 1e-4 * sum(v.numel() for v in a.values()), differing


FIRST_CHECKPOINT = 1  # (--save-every 1): the rows up to it are the killed process's, one rank, uninterrupted


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_two_ranks_with_uneven_work_train_as_one(script, shared):
    """One rank's rows up to its first checkpoint (before the kill) against two ranks'; the final weights after."""
    made = runs(script, shared)
    one = [r for r in read_metrics(made["resumed"]) if r["iteration"] <= FIRST_CHECKPOINT]
    two = [r for r in read_metrics(made["two"]) if r["iteration"] <= FIRST_CHECKPOINT]
    assert len(one) == len(two) >= 2
    assert_same_rows(two, one)
    assert_same_weights(made["two"], made["resumed"])


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_killed_and_resumed_equals_uninterrupted(script, shared):
    """Every row of the killed-and-resumed run, those after the resume included, against the uninterrupted run's
    (on two ranks: equal to one rank's by the test above)."""
    made = runs(script, shared)
    uninterrupted, resumed = read_metrics(made["two"]), read_metrics(made["resumed"])
    # one row per iteration: the resumed run started after the checkpoint, it did not train again from the start
    assert [r["iteration"] for r in resumed] == [r["iteration"] for r in uninterrupted]
    assert max(r["iteration"] for r in resumed) > FIRST_CHECKPOINT
    assert_same_rows(uninterrupted, resumed)
    assert_same_weights(made["two"], made["resumed"])
