"""Mutation check: would the tests notice a wrong line in the algorithms?

Each mutant below changes one critical line (a sign, a mask, an index, a missing detach or reduction) the way a
plausible bug would. For each, the repository is copied, the line is changed in the copy, and the tests named for it
(fast ones: unit tests, the recorded-run invariants, the two-rank checks) run there. A mutant is killed when they fail.
The unmutated copy must pass the same tests first, so a kill means the mutation was noticed, not a broken setup.

    python bench/mutants.py                   # every mutant, two at a time: 4-12 minutes on 2 CPU cores
    python bench/mutants.py --only ppo-kl-sign apa-anchor-pi-old
    python bench/mutants.py --list

Writes bench/results/mutants.md (one row per mutant: file, tests, killed or survived, seconds).
"""

import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent
REWARDS, PPO, APA_AWR, COMMON = (f"tests/{f}.py" for f in ("test_rewards", "test_ppo", "test_apa_awr", "test_common"))
ALOL = tuple(f"tests/test_alol.py::test_{t}" for t in ("variant_losses_and_gradients_hand_computed",
             "rewards_transform_then_missing_eos_penalty", "advantages_and_the_weights_each_variant_trains_with",
             "priority_sampling_follows_positive_advantages"))  # fmt: skip
INVARIANTS = "tests/test_invariants.py::test_what_main_passes_to_the_algorithm_and_the_first_minibatch"
MODELS, DATA = "plumbing/models.py", "plumbing/data.py"
TWO_RANKS = "tests/test_common.py::test_statistics_over_the_whole_batch_on_two_ranks"
SPLITS = "tests/test_scale.py::test_one_update_for_any_split_into_ranks_and_micro_batches"
RELEASED = "tests/test_ppo_max.py::test_released_recipe_end_to_end"
ALOL_RUNS = "tests/test_invariants.py::test_alol_variants_train_on_the_weights_they_define"
ARCHITECTURES = "tests/test_architectures.py::test_policy_value_net_lora_and_layers_on_each_architecture"
CHAT_RM = "tests/test_chat.py::test_reward_model_sees_its_own_chat_template_or_plain_text"
PAIR = "tests/test_real_checkpoints.py::test_encoder_reward_model_reads_prompt_and_response_as_a_pair"
SENTENCEPIECE = "tests/test_real_checkpoints.py::test_response_text_keeps_its_space_with_sentencepiece"
TRLX = "tests/test_recipes.py::test_trlx_reward_checkpoint_converted_scores_as_the_authors_model"
STOP_CUT = "tests/test_recipes.py::test_stop_strings_cut_at_the_first_one_strip_and_end_with_one_eos"
STOP_RUN = "tests/test_recipes.py::test_stop_string_rollout_trains_on_the_cut_response"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str  # occurs exactly once in `file`
    mutated: str
    tests: tuple[str, ...]  # pytest node ids or files


MUTANTS = [
    # ---- the eight of the mutation study that motivated this check
    Mutant("apa-advantage-sign", "apa.py", "(log_ratio_ref - scaled_advantages) ** 2",
           "(log_ratio_ref + scaled_advantages) ** 2", (APA_AWR,)),
    Mutant("awr-weights-not-detached", "awr.py", "-logprobs * clipped.detach()", "-logprobs * clipped", (APA_AWR,)),
    Mutant("response-mask-without-eos", "common.py", "return (is_stop.cumsum(1) - is_stop.long()) == 0",
           "return is_stop.cumsum(1) == 0", (COMMON,)),
    Mutant("ppo-score-at-token-0", "ppo.py", "rewards[torch.arange(len(scores), device=mask.device), mask.sum(1) - 1]",
           "rewards[torch.arange(len(scores), device=mask.device), 0]", (REWARDS,)),
    Mutant("ppo-no-whitening", "ppo.py", "return common.masked_whiten(advantages, mask), returns",
           "return advantages, returns", (REWARDS,)),
    Mutant("apa-anchor-pi-old", "apa.py", "policy_loss(new_logprobs, ref_logprobs[mb],",
           "policy_loss(new_logprobs, logprobs[mb],", (f"{INVARIANTS}[apa]",)),
    Mutant("token-count-not-all-reduced", "common.py", "all_reduce_sum(counts[len(plans) :])]",
           "counts[len(plans) :]]", (TWO_RANKS,)),
    Mutant("row-count-of-this-rank-only", "common.py", "total = counts[rows].sum().item()",
           "total = counts[rows[rank::world_size]].sum().item()", (TWO_RANKS,)),
    Mutant("ppo-kl-penalty-sign", "ppo.py", "rewards = torch.where(mask, -kl_coef * kl, 0.0)",
           "rewards = torch.where(mask, kl_coef * kl, 0.0)", (REWARDS,)),
    # ---- PPO and the shared template
    Mutant("ppo-one-sided-clip", "ppo.py", "ratio.clamp(1 - clip_eps, 1 + clip_eps)", "ratio.clamp(max=1 + clip_eps)",
           (PPO,)),
    Mutant("ppo-value-clip-min", "ppo.py", "losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)",
           "losses = torch.min((values - returns) ** 2, (clipped - returns) ** 2)", (PPO,)),
    Mutant("ppo-kl-controller-sign", "ppo.py", "error = min(max(kl / kl_target - 1, -0.2), 0.2)",
           "error = min(max(1 - kl / kl_target, -0.2), 0.2)", (PPO,)),
    Mutant("ppo-score-not-scaled", "ppo.py", "scaled_scores = (scores / score_stats.std).clamp(",
           "scaled_scores = (scores / 1.0).clamp(", (REWARDS,)),
    Mutant("ppo-running-stats-not-updated", "ppo.py", "    score_stats.update(scores)\n    scaled_scores",
           "    scaled_scores", (REWARDS,)),
    Mutant("gae-lambda-ignored", "ppo.py", "last_gae = delta + gamma * gae_lambda * last_gae",
           "last_gae = delta + gamma * last_gae", (PPO,)),
    Mutant("gae-bootstraps-from-padding", "ppo.py", "    values = torch.where(mask, values, 0.0)\n", "", (PPO,)),
    Mutant("kl-sign-in-main", "ppo.py", "kl = torch.where(response_mask, logprobs - ref_logprobs, 0.0)  # k1",
           "kl = torch.where(response_mask, ref_logprobs - logprobs, 0.0)  # k1", (f"{INVARIANTS}[ppo]",)),
    Mutant("ppo-returns-as-advantages", "ppo.py", "policy_loss(new_logprobs, logprobs[mb], advantages[mb],",
           "policy_loss(new_logprobs, logprobs[mb], returns[mb],", (f"{INVARIANTS}[ppo]",)),
    Mutant("ppo-value-slice-one-late", "ppo.py", "attention_mask[seq])[:, context - 1 : -1]",
           "attention_mask[seq])[:, context:]", (f"{INVARIANTS}[ppo]",)),
    Mutant("ended-all-instead-of-any", "ppo.py", "ended = torch.isin(responses, stop_ids).any(1)",
           "ended = torch.isin(responses, stop_ids).all(1)", (f"{INVARIANTS}[ppo]",)),
    Mutant("missing-eos-penalty-sign", "common.py", "return scores - penalty * (~ended).float()",
           "return scores + penalty * (~ended).float()", (REWARDS,)),
    Mutant("missing-eos-penalty-on-ended", "common.py", "return scores - penalty * (~ended).float()",
           "return scores - penalty * ended.float()", (REWARDS,)),
    # ---- log-probs, masks and statistics (common.py)
    Mutant("logprob-shift-off-by-one", "common.py", "return logits[:, -(response_length + 1) : -1].float()",
           "return logits[:, -response_length:].float()", (COMMON,)),
    Mutant("no-position-ids", "common.py", "position_ids=position_ids(attention_mask))",
           "position_ids=None)", (COMMON,)),
    Mutant("no-temperature-in-logprobs", "common.py", ".float() / temperature  # (B, R, V)", ".float()  # (B, R, V)",
           (COMMON,)),
    Mutant("whitening-over-padding", "common.py", "mean = masked_mean(values, mask, global_batch=True)",
           "mean = values.mean()", (COMMON,)),
    Mutant("masked-means-one-rank", "common.py", "total = all_reduce_sum(total) if global_batch else total",
           "total = total", (TWO_RANKS,)),
    # ---- APA and AWR
    Mutant("apa-value-target-values", "apa.py", "value_loss(new_values, returns[mb], mb_mask)",
           "value_loss(new_values, values[mb], mb_mask)", (f"{INVARIANTS}[apa]",)),
    Mutant("awr-weights-unclipped", "awr.py", "clipped = weights.clamp(max=max_weight) if max_weight > 0 else weights",
           "clipped = weights", (APA_AWR,)),
    # ---- PPO-max
    Mutant("ppo-max-whitens-by-default", "ppo_max.py",
           "return (common.masked_whiten(advantages, mask) if norm_adv else advantages), returns",
           "return common.masked_whiten(advantages, mask), returns", (REWARDS,)),
    Mutant("ppo-max-main-norm-adv-on", "ppo_max.py", "args.gamma, args.gae_lambda, args.norm_adv",
           "args.gamma, args.gae_lambda, True", (f"{INVARIANTS}[ppo_max]",)),
    Mutant("ppo-max-score-not-centred", "ppo_max.py", "((scores - score_stats.mean) / score_stats.std)",
           "(scores / score_stats.std)", (REWARDS,)),
    Mutant("ppo-max-separate-clips", "ppo_max.py",
           "torch.nn.utils.clip_grad_norm_([*policy.parameters(), *value_model.parameters()], args.max_grad_norm)",
           "torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)\n"
           "            torch.nn.utils.clip_grad_norm_(value_model.parameters(), args.max_grad_norm)",
           (f"{INVARIANTS}[ppo_max]",)),
    Mutant("ppo-max-release-eps", "ppo_max.py", "lr=args.lr, eps=1e-6, **adamw", "lr=args.lr, **adamw", (RELEASED,)),
    Mutant("ppo-ptx-rollout-token-share", "ppo_max.py", "(loss + args.ptx_coef * ptx * ptx_share).backward()",
           "(loss + args.ptx_coef * ptx * token_share).backward()", (f"{SPLITS}[ppo_max]",)),
    # ---- A-LoL
    Mutant("alol-rho-not-detached", "alol.py", "rho = seq_log_ratio.detach().exp()", "rho = seq_log_ratio.exp()",
           ALOL),
    Mutant("alol-no-value-baseline", "alol.py", "advantages = rewards - ref_values", "advantages = rewards", ALOL),
    Mutant("alol-rlol-weighted-by-advantage", "alol.py", '{"r-lol": rewards, "wbc": rewards,', '{"wbc": rewards,',
           ALOL),
    Mutant("alol-sigmoid-ignored", "alol.py", "scores = torch.sigmoid(scores)", "scores = scores", ALOL),
    Mutant("alol-priority-is-uniform", "alol.py", "probs = weights.clamp(min=0) if priority else",
           "probs = (weights > 0).float() if priority else", ALOL),
    Mutant("alol-kl-term-sign", "alol.py", "losses = weights * nll + kl_beta * seq_log_ratio",
           "losses = weights * nll - kl_beta * seq_log_ratio", ALOL),
    Mutant("alol-main-always-priority", "alol.py", 'priority = args.sampling == "priority" or (',
           "priority = True or (", (ALOL_RUNS,)),
    # ---- real checkpoints: reward-model input, stop strings, architectures
    Mutant("value-net-lora-backbone", MODELS, "model = hf_model(self.model)  #", "model = self.model  #",
           (ARCHITECTURES,)),
    Mutant("chat-rm-extra-eos", MODELS, "if wants_eos and not templated and", "if wants_eos and", (CHAT_RM,)),
    Mutant("encoder-pair-ignored", MODELS, 'self.input_format = "pair" if encoder',
           'self.input_format = "text" if encoder', (PAIR,)),
    Mutant("pad-eos-read-before-eos", MODELS, "pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id not in",
           "pad = self.tokenizer.pad_token_id if True or self.tokenizer.pad_token_id not in", (TRLX,)),
    Mutant("first-eos-ignored", MODELS, "ids = ids[: ids.index(eos) + 1]", "ids = ids", (TRLX,)),
    Mutant("response-text-decoded-alone", DATA, "return [f[len(p) :] if f.startswith(p) else a",
           "return [a if f.startswith(p) else a", (SENTENCEPIECE,)),
    Mutant("stop-string-not-stripped", DATA, "text[: min(cuts)].rstrip()", "text[: min(cuts)]", (STOP_CUT,)),
    Mutant("stop-string-no-eos", DATA, '["input_ids"] + [eos]', '["input_ids"]', (STOP_CUT,)),
    Mutant("stop-strings-not-applied", "ppo.py", "if args.stop_strings:  # trlX's", "if False:  # trlX's",
           (STOP_RUN,)),
]  # fmt: skip


@dataclass
class Args:
    only: tuple[str, ...] = ()  # mutant names to run (default: all)
    list: bool = False  # print the mutants and exit
    workers: int = 2  # mutants tested at once (each test process single-threaded)
    output: str = "bench/results/mutants.md"  # the results table


def copy_repo(dest: Path):
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "results", "__pycache__", ".pytest_cache", ".ruff_cache")
    shutil.copytree(REPO, dest, ignore=ignore)


def apply(mutant: Mutant, root: Path):
    path = root / mutant.file
    source = path.read_text()
    if source.count(mutant.original) != 1:
        raise SystemExit(f"error: mutant {mutant.name}: its line occurs {source.count(mutant.original)} times in "
                         f"{mutant.file}; update it in bench/mutants.py")  # fmt: skip
    path.write_text(source.replace(mutant.original, mutant.mutated))
    compile(path.read_text(), str(path), "exec")  # a mutant must be valid Python: a SyntaxError is not a kill


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[bool, float, str]:
    """(passed, seconds, last lines of the output) of the tests in the tree at `root`, one process, one thread."""
    env = {**os.environ, "RLHF_TEST_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    return result.returncode == 0, time.perf_counter() - start, result.stdout[-600:]


def check(mutant: Mutant | None, tests: tuple[str, ...]) -> tuple[bool, float, str]:
    with tempfile.TemporaryDirectory(prefix="mutant_") as tmp:
        root = Path(tmp) / "repo"
        copy_repo(root)
        if mutant is not None:
            apply(mutant, root)
        return run_tests(root, tests)


def main():
    args = tyro.cli(Args)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"error: unknown mutants {sorted(unknown)}; see --list")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34s} {m.file:11s} {' '.join(m.tests)}")
        return
    for m in mutants:  # every line still exists: fail fast, before any test runs
        apply_check = (REPO / m.file).read_text().count(m.original)
        if apply_check != 1:
            raise SystemExit(f"error: mutant {m.name}: its line occurs {apply_check} times in {m.file}")
    start = time.perf_counter()
    all_tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    passed, seconds, output = check(None, all_tests)
    if not passed:
        raise SystemExit(f"error: the unmutated tests fail, so no kill would mean anything:\n{output}")
    print(f"unmutated: {len(all_tests)} test targets pass ({seconds:.0f} s)", flush=True)
    rows = []
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(check, m, m.tests): m for m in mutants}
        for future in concurrent.futures.as_completed(futures):
            m = futures[future]
            survived, seconds, output = future.result()
            rows.append((m, not survived, seconds))
            print(f"{m.name:34s} {'SURVIVED' if survived else 'killed':8s} {seconds:5.1f} s", flush=True)
    rows.sort(key=lambda row: MUTANTS.index(row[0]))
    killed = sum(k for _, k, _ in rows)
    wall = time.perf_counter() - start
    title = f"# Mutation check: {killed} of {len(rows)} mutants killed ({wall / 60:.1f} min, {args.workers} at a time)"
    lines = [title, "", "| mutant | file | tests | result | s |", "|---|---|---|---|---|"]
    for m, k, seconds in rows:
        tests = ", ".join(t.replace("tests/", "") for t in m.tests)
        lines.append(f"| {m.name} | {m.file} | {tests} | {'killed' if k else '**survived**'} | {seconds:.0f} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"{killed} of {len(rows)} mutants killed in {wall:.0f} s; wrote {args.output}")
    if killed < len(rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
