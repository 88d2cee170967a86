import os
import sys
from pathlib import Path

import pytest
import runs
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist (pyproject: -n 2) runs two tests at once: one torch thread per process then, as two single-threaded
# processes on 2 cores do more work than one with 2 threads (these models are too small to use 2 threads well)
# (bench/mutants.py runs two test processes at once and sets RLHF_TEST_THREADS=1)
THREADS = os.environ.get("RLHF_TEST_THREADS") or ("1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
torch.set_num_threads(int(THREADS))
os.environ["OMP_NUM_THREADS"] = THREADS  # the scripts the tests start (bench/ starts them itself) inherit it

# The longest tests, longest first: pytest-xdist hands tests out one at a time in collection order (pyproject: --dist
# load --maxschedchunk 1), so starting these first lets the two workers finish together. (Order only: a name missing
# here runs in its file's place.)
LONGEST_FIRST = [
    "test_two_ranks_with_uneven_work_train_as_one",
    "test_killed_and_resumed_equals_uninterrupted",
    "test_short_default_run_reaches_a_gold_reward_broken_variants_do_not",
    "test_short_alol_run_reaches_a_gold_reward_plain_sft_does_not",
    "test_short_dpo_run_reaches_a_gold_reward_reversed_preferences_do_not",
    "test_grpo_raises_the_verifiable_tasks_accuracy_a_reversed_checker_lowers_it",
    "test_gsm8k_recipe_prints_its_runs_and_trains_on_stand_ins",
    "test_fsdp_checkpoint_is_sharded_and_resumes_on_another_number_of_ranks",
    "test_value_head_beats_the_mean_on_unseen_prompts",
    "test_alol_variants_train_on_the_weights_they_define",
    "test_alol_recipe_runs_on_stand_ins",
    "test_large_vocabulary_pass_memory_does_not_grow_with_the_rows",
    "test_torchrun_run_writes_samples_and_model_card_and_evaluate_reproduces_it",
    "test_smoke_comparison_writes_the_table_and_every_plot",
    "test_ppo_max_recipe_runs_on_stand_ins",
    "test_frontier_smoke_writes_table_json_and_plot",
    "test_apa_recipe_runs_on_stand_ins",
    "test_run_writes_the_contract_and_ppo_resumes_exactly_after_a_kill",
    "test_alol_trains_on_a_messages_dataset",
    "test_fsdp_keeps_gradients_sharded_through_micro_batches",
    "test_bf16_reference_computes_what_the_policy_computes",
]


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.originalname) if item.originalname in LONGEST_FIRST else 99)


# A few iterations of the toy task with small batches: what every end-to-end test runs.
FAST = [
    "--total-episodes",
    "32",
    "--rollout-batch-size",
    "16",
    "--mini-batch-size",
    "8",
    "--max-new-tokens",
    "24",
    "--eval-size",
    "16",
    "--eval-every",
    "1",
    "--save-every",
    "1",
]


@pytest.fixture
def one_thread():
    """torch on one thread for a test whose numbers were measured at one (they depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_lm():
    """A randomly initialised 2-layer GPT-NeoX on the toy tokenizer (no download)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        rotary_pct=0.25,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return GPTNeoXForCausalLM(config).eval()


def skip_without_devices(nproc: int):
    """On a CUDA machine each rank takes cuda:LOCAL_RANK: a run of more ranks than GPUs is skipped, with the reason."""
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        pytest.skip(f"needs {nproc} GPUs (each rank takes its own), {torch.cuda.device_count()} here")


def run_script(
    script: str, *args: str, nproc: int = 1, check: bool = True, timeout: int = 600, env: dict | None = None, cwd=REPO,
    torchrun: bool = False,
):  # fmt: skip
    """Run a script (a path from the repository root) as `python SCRIPT ARGS` or, with nproc > 1 or `torchrun`, as
    `torchrun --nproc_per_node nproc --standalone SCRIPT ARGS` (tests/runs.py); returns the CompletedProcess."""
    skip_without_devices(nproc)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if nproc > 1 else THREADS, **(env or {})}
    result = runs.run(script, list(args), env, cwd, nproc, timeout, torchrun)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def main_error(script: str, *args: str) -> str:
    """The one-line error SCRIPT's main() stops with on these flags, called in this process with the sys.argv that
    `python SCRIPT ARGS` gives it (no interpreter start per bad input): for the errors that must come before any
    model is loaded, so loading one fails the test, as does any exception but the one-line SystemExit (a traceback).
    The random state is left as it was. (Errors that come later, such as a NaN, are tested as real processes.)"""
    import importlib
    from unittest import mock

    from plumbing import models

    def no_model(loader, path, flag, *rest, **kwargs):
        raise AssertionError(f"{script} loaded {flag} '{path}' before stopping")

    module = importlib.import_module(script.removesuffix(".py"))
    with mock.patch.object(sys, "argv", [script, *args]), mock.patch.object(models, "load_model", no_model):
        with torch.random.fork_rng(devices=[]):
            try:
                module.main()
            except SystemExit as stop:
                message = stop.code
            else:
                raise AssertionError(f"{script} {' '.join(args)} ran to the end")
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def kill_at_first_checkpoint(
    script: str, args: list[str], output_dir, nproc: int = 1, checkpoint: str = "checkpoint.pt", wrap=()
):
    """Start a run, kill every process of it once its first checkpoint is written (tests/wrap.py --pause holds every
    rank there: no race with the next iteration), and return that checkpoint (under --fsdp its state.pt). `wrap`:
    more tests/wrap.py options (e.g. --rollouts fixed)."""
    import time

    skip_without_devices(nproc)
    paused = Path(output_dir).parent / f"{Path(output_dir).name}.paused"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1" if nproc > 1 else THREADS}
    argv = ["--pause", str(paused), *wrap, script.removesuffix(".py"), *args, "--output-dir", str(output_dir)]
    started = runs.start("tests/wrap.py", argv, env, REPO, nproc)
    deadline = time.time() + 300
    while not paused.exists() and time.time() < deadline and started.popen.poll() is None:
        time.sleep(0.05)
    started.kill()
    result = started.result()
    if not paused.exists():
        raise AssertionError(f"{script} wrote no checkpoint ({result.returncode}):\n{result.stderr[-3000:]}")
    return torch.load(Path(output_dir) / checkpoint, weights_only=True)


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> runs.Shared:
    """The runs several tests read, each made once per session (tests/runs.py)."""
    return runs.Shared(runs.session_root(tmp_path_factory.getbasetemp()) / "shared-runs")


def assert_adapter_merges_to_the_policy(output_dir, base) -> None:
    """A LoRA run's outputs: OUT/adapter on the base model, merged, is OUT/policy (the merged policy it saved), and
    that policy trained (it is not the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def params(model) -> dict:
        return {k: v.float() for k, v in model.state_dict().items()}

    merged = params(AutoModelForCausalLM.from_pretrained(Path(output_dir) / "policy"))
    initial = params(AutoModelForCausalLM.from_pretrained(base))
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), Path(output_dir) / "adapter")
    reloaded = params(adapter.merge_and_unload())
    assert reloaded.keys() == merged.keys()
    for k, v in reloaded.items():
        assert torch.allclose(v, merged[k], atol=1e-3), k
    assert any(not torch.allclose(merged[k], initial[k]) for k in merged)


def shared_runs(shared, script: str, runs: dict, record: bool = False) -> dict:
    """name -> output directory of each run of `runs` (name -> flags, without --output-dir), all made in one process
    (tests/wrap.py --runs) once per test session, for every test that reads one of them (tests/runs.py's Shared).
    `record`: with tests/wrap.py --record, every run's events in events.pt beside the runs' directories."""
    import json

    def make(directory):
        flags = [[*f, "--output-dir", str(directory / name)] for name, f in runs.items()]
        record_to = ["--record", str(directory / "events.pt")] if record else []
        run_script("tests/wrap.py", *record_to, "--runs", json.dumps(flags), script)

    directory = shared.get(("recorded-" if record else "") + f"{script}-" + "-".join(runs), make)
    return {name: directory / name for name in runs}


def read_metrics(output_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]


def toy_rows(source: Path, out: Path, train: int, test: int) -> str:
    """The first `train` and `test` rows of a toy dataset directory, written to `out` (A-LoL scores every row first)."""
    out.mkdir(exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        (out / f"{split}.jsonl").write_text("".join(open(source / f"{split}.jsonl").readlines()[:rows]))
    return str(out)


@pytest.fixture(scope="session")
def small_toy_data(tmp_path_factory):
    """The first 256 train and 80 test rows of the toy dataset: fast offline (A-LoL) runs."""
    return toy_rows(REPO / "toy" / "data", tmp_path_factory.mktemp("small_toy_data"), 256, 80)
