"""Every flag of every script, seen to matter, as a user passes it: through the script's command line.

For each script a table covers every field of its `Args`. A flag that changes what is computed has a value other
than its default (0 where 0 is allowed and means something: `--kl-coef 0`, `--missing-eos-penalty 0`, ...) and, where
it acts only together with another flag, the baseline it is compared with (`--lora-r` under `--use-lora`). The test
runs the baseline and each flag's run in one interpreter (tests/wrap.py --runs: one start for all of a script's short
runs) and asserts that every flag's run differs from its baseline, in the final policy's weights or in a logged value:
a flag the code ignored, or read as its default, leaves its run equal to the baseline, and the test names it. The
baseline runs twice, first and last, and must equal itself (nothing leaks from one run into the next). A field that
changes nothing computed (names, paths, logging), or must change no number (chunk sizes, micro-batches, FSDP,
activation checkpointing: the same update by design), names the test that covers it instead; the table test fails
for a field without an entry, and for an entry naming a test that does not exist."""

import dataclasses
import importlib
import json
import re
import shutil

import pytest
import torch
from conftest import REPO, read_metrics, run_script

SCRIPTS = ["ppo", "apa", "awr", "ppo_max", "grpo", "rloo", "alol", "dpo"]
ONLINE_BASE = ["--total-episodes", "8", "--rollout-batch-size", "8", "--mini-batch-size", "4", "--max-new-tokens",
               "8", "--eval-size", "4", "--eval-every", "2", "--save-every", "0"]  # fmt: skip
ALOL_BASE = ["--total-steps", "2", "--batch-size", "4", "--log-every", "1", "--eval-every", "2", "--eval-size", "4",
             "--save-every", "0", "--value-samples", "1", "--value-epochs", "1", "--max-new-tokens", "8"]  # fmt: skip
DPO_BASE = ["--total-steps", "2", "--batch-size", "4", "--log-every", "1", "--eval-every", "2", "--eval-size", "4",
            "--save-every", "0", "--max-new-tokens", "16"]  # fmt: skip
# baselines a flag is compared with where it acts only with another flag (extra flags on the script's base)
BASELINES = {
    "base": [],
    "lora": ["--use-lora"],
    "released": ["--recipe", "released"],
    "kl-variant": ["--variant", "a-lol-kl"],
    "generation-config": ["--model", "{generation_config_model}"],
    "long-responses": ["--max-new-tokens", "24"],  # responses of different lengths: the loss aggregations differ
    "sparse-evals": ["--eval-every", "2"],  # rows only where an evaluation or a log is due
    "pro": ["--variant", "pro"],
    "two-iterations": ["--total-episodes", "16"],  # (what acts from the second rollout on: controllers, evaluations)
}

# ---------------------------------------------------------------- the table
# flag -> (its value on the command line, the baseline), for the flags every script shares
SHARED = {
    "seed": (["2"], "base"),
    "reward_model": (["toy.gold:score"], "base"),
    "eval_reward": ([""], "base"),
    "dataset": (["{other_data}"], "base"),
    "train_split": (["test"], "base"),
    "eval_split": (["train"], "base"),
    "dtype": (["bfloat16"], "base"),
    "max_new_tokens": (["4"], "base"),
    "max_prompt_length": (["6"], "base"),
    "stop_strings": (["."], "base"),
    "temperature": (["0.7"], "base"),
    "use_generation_config": ([], "generation-config"),
    "reward_append_eos": (["never"], "base"),
    "missing_eos_penalty": (["0"], "base"),
    "lr": (["1e-3"], "base"),
    "adam_betas": (["0.5", "0.9"], "base"),
    "weight_decay": (["0.5"], "base"),
    "max_grad_norm": (["0.001"], "base"),
    "use_lora": ([], "base"),
    "lora_r": (["4"], "lora"),
    "lora_alpha": (["128"], "lora"),
    "lora_dropout": (["0.5"], "lora"),
    "num_layers_unfrozen": (["1"], "base"),
    "eval_every": (["1"], "two-iterations"),
    "eval_size": (["2"], "base"),
}
ONLINE = {
    "total_episodes": (["16"], "base"),
    "rollout_batch_size": (["4"], "base"),
    "mini_batch_size": (["8"], "base"),
    "update_epochs": (["1"], "base"),
}
CRITIC = {  # the scripts with a value network
    "value_lr": (["1e-3"], "base"),
    "gamma": (["0.5"], "base"),
    "gae_lambda": (["0.5"], "base"),
    "vf_coef": (["0"], "base"),
    "reward_clip": (["0.1"], "base"),
    "value_num_layers_unfrozen": (["1"], "base"),
    "value_head": (["mlp"], "base"),
}
OWN = {
    "ppo": {"kl_coef": (["0"], "base"), "kl_target": (["0"], "two-iterations"),
            "kl_horizon": (["100"], "two-iterations"),
            "kl_control": (["apa-authors"], "base"), "clip_eps": (["0.01"], "base"), "value_clip": (["0.01"], "base")},
    "apa": {"lam": (["0.5"], "base")},
    "awr": {"beta": (["0.5"], "base"), "max_weight": (["1.5"], "base")},
    "ppo_max": {"update_epochs": (["2"], "base"),  # (its default epochs: 1)
                # a scoring function as the reward needs a critic model:
                "reward_model": (["toy.gold:score", "--critic-model", "toy/reward_model"], "base"),
                "recipe": (["released"], "base"), "kl_coef": (["0"], "base"), "clip_eps": (["0.01"], "base"),
                "value_clip": (["0.01"], "base"), "norm_adv": ([], "base"), "critic_model": (["toy/policy"], "base"),
                "critic_warmup_steps": (["1"], "base"), "lr_warmup_steps": (["1"], "released"),
                "ptx_coef": (["0.5"], "base")},
    "grpo": {"group_size": (["2"], "base"), "scale_rewards": (["none"], "base"),
             "loss_agg": (["token-mean"], "long-responses"), "kl_coef": (["0"], "base"), "kl_term": (["k3"], "base"),
             "ratio_level": (["sequence"], "base"),
             "clip_eps": (["0.01"], "base"), "clip_eps_high": (["0.001"], "base")},
    "rloo": {"group_size": (["2"], "base"), "kl_coef": (["0"], "base"), "clip_eps": (["0.01"], "base")},
    "alol": {"response_column": (["rejected"], "base"), "total_steps": (["1"], "base"), "batch_size": (["8"], "base"),
             "reward_transform": (["sigmoid"], "base"), "variant": (["nll"], "base"), "clip_eps": (["0.1"], "base"),
             "kl_beta": (["2"], "kl-variant"), "sampling": (["uniform"], "base"), "value_samples": (["2"], "base"),
             "value_size": (["8"], "base"), "value_greedy": ([], "base"), "value_epochs": (["3"], "base"),
             "value_lr": (["1e-2"], "base"), "log_every": (["2"], "sparse-evals")},
    "dpo": {"chosen_column": (["better"], "base"), "rejected_column": (["worse"], "base"),
            "total_steps": (["1"], "base"), "batch_size": (["8"], "base"), "max_new_tokens": (["12"], "base"),
            "variant": (["dpo-ref-free"], "base"), "beta": (["0.5"], "base"), "sft_weight": (["0.5"], "pro"),
            "missing_eos_penalty": (["0"], "pro"),  # (PRO's rewards of the pairs the limit cuts)
            "log_every": (["2"], "sparse-evals")},
}  # fmt: skip
# fields whose effect this test does not observe: the test that covers each, or why it computes nothing
ELSEWHERE = {
    "exp_name": "names the run's default output directory only",
    "output_dir": "where the run is written: every end-to-end test passes it",
    "resume": "tests/test_configurations.py::test_killed_and_resumed_equals_uninterrupted",
    "trust_remote_code": "passed to from_pretrained only (no toy model ships code of its own)",
    "dist_timeout": "how long a rank waits for the others: nothing computed",
    "track": "logs to Weights & Biases: nothing computed",
    "wandb_project": "names the Weights & Biases project: nothing computed",
    "push_to_hub": "tests/test_outputs.py::test_push_to_hub_uploads_policy_and_adapter_folders",
    "save_every": "tests/test_configurations.py::test_killed_and_resumed_equals_uninterrupted",
    "model": "tests/test_architectures.py::test_policy_value_net_lora_and_layers_on_each_architecture",
    "chat_template": "tests/test_chat.py::test_chat_template_applied_once_with_one_bos",
    "reward_input": "tests/test_real_checkpoints.py::test_encoder_reward_model_reads_prompt_and_response_as_a_pair",
    # the prompt reaches a scorer decoded without special tokens: an EOS before the input's end (where trlX's read at
    # the first EOS differs from the last token) comes only from another tokenizer's text, as in the APA recipe's
    "reward_score_at": "tests/test_recipes.py::test_trlx_reward_checkpoint_converted_scores_as_the_authors_model",
    "reward_truncate": "tests/test_real_checkpoints.py::test_reward_model_input_gets_eos_and_is_left_truncated",
    # the same numbers by design: an equivalence test compares them
    "rollout_forward_batch_size": (
        "tests/test_common.py::test_sorted_trimmed_passes_and_micro_batches_compute_the_full_width_update"
    ),
    "micro_batch_size": "tests/test_configurations.py::test_two_ranks_with_uneven_work_train_as_one",
    "fsdp": "tests/test_configurations.py::test_two_ranks_with_uneven_work_train_as_one",
    "activation_checkpointing": "tests/test_scale.py::test_activation_checkpointing_same_gradients_less_memory",
}  # fmt: skip


def table(script: str) -> dict:
    """Every field of the script's Args: (value, baseline) or the test / reason that covers it."""
    fields = [f.name for f in dataclasses.fields(importlib.import_module(script).Args)]
    online, critic = script not in ("alol", "dpo"), script in ("ppo", "apa", "awr", "ppo_max")
    own = {**SHARED, **(ONLINE if online else {}), **(CRITIC if critic else {}), **OWN[script]}
    return {name: own.get(name, ELSEWHERE.get(name)) for name in fields}


def test_the_table_covers_every_flag_and_names_existing_tests():
    """A field without an entry fails here; so does an entry naming a file or a test function that does not exist,
    or a flag entry for a field the script does not have."""
    for script in SCRIPTS:
        fields = {f.name for f in dataclasses.fields(importlib.import_module(script).Args)}
        rows = table(script)
        assert [name for name, entry in rows.items() if entry is None] == [], script
        assert set(OWN[script]) <= fields, script
        defaults = {f.name: f.default for f in dataclasses.fields(importlib.import_module(script).Args)}
        for name, entry in rows.items():
            if isinstance(entry, tuple):  # a value other than the default (a boolean flag: off by default)
                value = entry[0]
                assert value != [] or defaults[name] is False, (script, name)
                assert value == [] or not matches(value[0], defaults[name]), (script, name, value)
            if isinstance(entry, str) and entry.startswith("tests/"):
                path, name = entry.split("::")
                assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), entry


def baseline(key: str, script: str) -> list[str]:
    """A baseline's flags on the script's base run (the offline scripts' base already evaluates twice)."""
    return [] if key == "two-iterations" and script in ("alol", "dpo") else BASELINES[key]


def matches(value: str, default) -> bool:
    """Whether a command-line value is the field's default (numbers compared as numbers)."""
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return float(value) == float(default)
    if isinstance(default, tuple):
        return False  # (a tuple's entry lists its first element only: compared in the run)
    return value == str(default)


def test_a_flag_without_an_entry_fails_the_table(monkeypatch):
    """The table test itself: removing one entry (PPO's --kl-coef), or naming a test that does not exist, fails it."""
    monkeypatch.setitem(OWN, "ppo", {k: v for k, v in OWN["ppo"].items() if k != "kl_coef"})
    with pytest.raises(AssertionError):
        test_the_table_covers_every_flag_and_names_existing_tests()
    monkeypatch.undo()
    monkeypatch.setitem(ELSEWHERE, "resume", "tests/test_configurations.py::test_no_such_test")
    with pytest.raises(AssertionError):
        test_the_table_covers_every_flag_and_names_existing_tests()


def flag_args(name: str, entry) -> list[str]:
    value, _ = entry
    flag = "--" + name.replace("_", "-")
    return [flag, *value] if value or name not in BOOLEAN else [flag]


BOOLEAN = {"use_generation_config", "use_lora", "norm_adv", "value_greedy"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two small datasets and a copy of the toy policy whose generation_config.json
    sets a repetition penalty."""
    root = tmp_path_factory.mktemp("flag_inputs")
    rows = [line for line in open(REPO / "toy" / "data" / "train.jsonl")]
    test_rows = [line for line in open(REPO / "toy" / "data" / "test.jsonl")]
    for name, start in (("data", 0), ("other_data", 64)):  # (with two more response columns, for dpo.py's flags)
        (root / name).mkdir()
        for split, lines in (("train", rows[start : start + 64]), ("test", test_rows[start : start + 16])):
            more = [
                {**r, "better": r["chosen"] + " yes.", "worse": r["rejected"] + " no."} for r in map(json.loads, lines)
            ]
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in more))
    model = root / "generation_config_model"  # a setting the scripts leave unset, which generate() then reads
    shutil.copytree(REPO / "toy" / "policy", model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 3.0}))
    return {"data": str(root / "data"), "other_data": str(root / "other_data"),
            "generation_config_model": str(model)}  # fmt: skip


def final_state(output_dir) -> tuple[list[dict], dict]:
    from safetensors.torch import load_file

    rows = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(output_dir)]
    return rows, load_file(str(output_dir / "policy" / "model.safetensors"))


def same(a, b) -> bool:
    (rows_a, weights_a), (rows_b, weights_b) = a, b
    if [sorted(r) for r in rows_a] != [sorted(r) for r in rows_b] or weights_a.keys() != weights_b.keys():
        return False
    values = all(x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-12) for x, y in zip(rows_a, rows_b) for k in x)
    return values and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_changes_what_its_run_computes(script, inputs, tmp_path):
    base = [*{"alol": ALOL_BASE, "dpo": DPO_BASE}.get(script, ONLINE_BASE), "--dataset", inputs["data"]]
    if script == "ppo_max":  # no critic warm-up (the paper recipe's 4 would be every rollout: no policy update)
        base += ["--critic-warmup-steps", "0"]
    flags = {name: entry for name, entry in table(script).items() if isinstance(entry, tuple)}
    baselines = ["base", *sorted({against for _, against in flags.values()} - {"base"}), "base"]  # base twice
    runs = []
    for i, key in enumerate(baselines):
        extra = [a.format(**inputs) for a in baseline(key, script)]
        runs.append([*base, *extra, "--output-dir", str(tmp_path / f"baseline-{key}-{i}")])
    for name, entry in flags.items():
        extra = [a.format(**inputs) for a in baseline(entry[1], script) + flag_args(name, entry)]
        runs.append([*base, *extra, "--output-dir", str(tmp_path / name)])
    run_script("tests/wrap.py", "--runs", json.dumps(runs), script, timeout=900)
    states = {key: final_state(tmp_path / f"baseline-{key}-{i}") for i, key in enumerate(baselines[:-1])}
    assert same(states["base"], final_state(tmp_path / f"baseline-base-{len(baselines) - 1}"))  # nothing leaks
    ignored = [name for name, (_, against) in flags.items() if same(states[against], final_state(tmp_path / name))]
    assert ignored == []  # flags whose run equals its baseline: as if the flag were not passed
