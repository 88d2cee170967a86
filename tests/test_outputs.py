"""What a user reads and keeps after a run: samples.jsonl, the model card, the progress line, bench/evaluate.py
reproducing a run's final evaluation, win rates, --push-to-hub, and the notice when a real model meets toy data."""

import json
import os
import re
import shutil

import pytest
from conftest import FAST, REPO, read_metrics, run_script

from plumbing import checkpoints

SAMPLE_FIELDS = {"iteration", "index", "prompt", "response", "reward", "gold_reward", "kl", "length", "ended"}


def test_torchrun_run_writes_samples_and_model_card_and_evaluate_reproduces_it(tmp_path):
    out = tmp_path / "run"
    result = run_script("ppo.py", *FAST, "--output-dir", str(out), nproc=2)  # 2 iterations, 16 held-out prompts
    assert "notice:" not in result.stdout  # the toy defaults need no notice
    assert re.search(r"iteration 2/2 .*elapsed 0:0\d:\d\d, remaining 0:00:00\n", result.stdout), result.stdout
    rows = read_metrics(out)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [0] * 16 + [1] * 16 + [2] * 16  # every held-out prompt, each eval
    for row in rows:
        batch = [s for s in samples if s["iteration"] == row["iteration"]]
        assert set(batch[0]) == SAMPLE_FIELDS and [s["index"] for s in batch] == list(range(16))  # prompt order
        for key in ("reward", "gold_reward", "kl"):  # the logged means are the means of these samples
            assert sum(s[key] for s in batch) / 16 == pytest.approx(row[f"eval/{key}"], abs=1e-5)
        assert sum(s["length"] for s in batch) / 16 == pytest.approx(row["eval/response_length"])
        assert sum(s["ended"] for s in batch) / 16 == pytest.approx(row["eval/eos_rate"])
        assert all(s["ended"] == (s["length"] < 24) or s["ended"] for s in batch)
    assert samples[0]["kl"] == 0.0 and samples[-1]["response"] != samples[15]["response"]
    # each row's scores are its own prompt and response's (not another row's): the gold scorer, recomputed
    from toy.gold import score

    gold = score([s["prompt"] for s in samples], [s["response"] for s in samples])
    assert gold == pytest.approx([s["gold_reward"] for s in samples], abs=1e-5) and len(set(gold)) > 1

    card = (out / "policy" / "README.md").read_text()
    assert "ppo.py" in card and "torchrun --nproc_per_node 2 ppo.py" in card and "toy/reward_model" in card
    assert f"| `eval/gold_reward` | {rows[-1]['eval/gold_reward']:.4g} |" in card
    saved = json.loads((out / "policy" / "training_args.json").read_text())
    assert saved["script"] == "ppo.py" and saved["world_size"] == 2 and saved["args"]["max_new_tokens"] == 24

    # the saved policy, evaluated again on the same 2 ranks: the run's final numbers
    evaluation = tmp_path / "evaluation"
    run_script("bench/evaluate.py", str(out / "policy"), "--output-dir", str(evaluation), nproc=2)
    metrics = json.loads((evaluation / "evaluation.json").read_text())["policies"][0]["metrics"]
    for key in ("eval/gold_reward", "eval/reward", "eval/kl", "eval/response_length", "eval/distinct_1"):
        assert metrics[key] == pytest.approx(rows[-1][key], abs=1e-4), key
    assert (evaluation / "samples_0.jsonl").read_text().count("\n") == 16


def test_evaluate_win_rate_of_a_policy_against_itself_is_one_half(tmp_path):
    out = tmp_path / "evaluation"
    flags = ["--eval-size", "48", "--max-new-tokens", "24", "--output-dir", str(out)]
    result = run_script("bench/evaluate.py", "toy/policy", "toy/policy", *flags)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert [p["seed"] for p in evaluation["policies"]] == [1, 2]  # independent samples
    for key in ("reward", "gold_reward"):
        rate = evaluation["win_rates"][key]["0 vs 1"]
        assert 0.02 < rate["standard_error"] < 0.1
        assert abs(rate["win_rate"] - 0.5) < 3 * rate["standard_error"]  # one half, within its noise
        assert (
            f"win rate by {key}: [0] over [1] {rate['win_rate']:.3f} +- {rate['standard_error']:.3f}" in result.stdout
        )
    sft = evaluation["policies"][0]["metrics"]
    assert sft["eval/kl"] == 0.0 and 1 <= sft["eval/response_length"] <= 24


def test_real_model_on_toy_data_gets_a_one_line_notice(tmp_path, capsys):
    import dataclasses

    import apa
    from plumbing.run import check_flags

    shutil.copytree(REPO / "toy" / "policy", tmp_path / "tiny")  # a model outside toy/ (what a user's would be)
    flags = ["--total-episodes", "16", "--eval-size", "8", "--max-new-tokens", "8", "--save-every", "0"]
    result = run_script("apa.py", *FAST, *flags, "--model", str(tmp_path / "tiny"), "--output-dir", str(tmp_path / "o"))
    notices = [line for line in result.stdout.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "--dataset toy/data" in notices[0] and "--reward-model toy/reward_model" in notices[0]
    assert "--lr 0.0003" in notices[0] and "recipes/" in notices[0]
    # what is no longer the toy's is not named; with nothing of the toy's left, no notice
    own = dict(model="my/model", reward_model="my/rm", eval_reward="", lr=1e-6)
    check_flags(dataclasses.replace(apa.Args(), **own), 1, 16, apa.POSITIVE_FLAGS, apa.NON_NEGATIVE_FLAGS)
    out = capsys.readouterr().out
    assert (
        out.count("notice:") == 1 and "--dataset toy/data" in out and "--reward-model" not in out and "--lr" not in out
    )
    check_flags(dataclasses.replace(apa.Args(), **own, dataset="my/data"), 1, 16, apa.POSITIVE_FLAGS, "")
    assert "notice:" not in capsys.readouterr().out


class FakeHub:
    """huggingface_hub.HfApi's two calls, recorded (the hub cannot be reached from the test machines)."""

    calls: list = []
    fail = False

    def create_repo(self, repo_id, exist_ok=False):
        self.calls.append(("create_repo", repo_id, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, commit_message=None):
        if self.fail:
            raise ConnectionError("the hub cannot be reached\nsecond line")
        self.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), path_in_repo))


def test_push_to_hub_uploads_policy_and_adapter_folders(tmp_path, monkeypatch):
    import huggingface_hub

    for folder, files in (("policy", ["config.json", "model.safetensors", "README.md"]), ("adapter", ["a.json"])):
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).write_text("{}")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    checkpoints.push_to_hub(str(tmp_path), "me/ppo-toy")
    assert FakeHub.calls == [
        ("create_repo", "me/ppo-toy", True),
        ("upload_folder", "me/ppo-toy", ["README.md", "config.json", "model.safetensors"], None),
        ("upload_folder", "me/ppo-toy", ["a.json"], "adapter"),
    ]
    FakeHub.fail = True
    with pytest.raises(SystemExit) as error:
        checkpoints.push_to_hub(str(tmp_path), "me/ppo-toy")
    message = str(error.value)
    assert "\n" not in message and "the upload failed (ConnectionError: the hub cannot be reached)" in message
    assert f"hf upload me/ppo-toy {tmp_path}/policy" in message
    FakeHub.fail = False
