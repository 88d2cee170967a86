"""Mutation check: would the tests notice a wrong line in the algorithms?

Each mutant below changes one critical line (a sign, a mask, an index, a missing detach or reduction) the way a
plausible bug would. For each, the repository is copied, the line is changed in the copy, and the tests named for it
(fast ones: unit tests, the recorded-run invariants, the two-rank checks) run there, under a time limit. pytest's
report (JUnit XML) says how it died: killed (a test's assertion failed: the wrong behaviour was noticed; a script's
own one-line error counts too), crashed (an exception other than a failed assertion, in a test or in a script it ran,
or an error in a test's setup), timed out, or survived (every test passed). Each mutant's own test selection must
pass on the unmutated copy alone first, so a death means the mutation was noticed, not a broken setup.

    python bench/mutants.py                   # every mutant, two at a time: 4-12 minutes on 2 CPU cores
    python bench/mutants.py --only ppo-kl-sign apa-anchor-pi-old
    python bench/mutants.py --list

Writes bench/results/mutants.md (one row per mutant: file, tests, how it died, the failing test, seconds).
"""

import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent
REWARDS, PPO, APA_AWR, COMMON = (f"tests/{f}.py" for f in ("test_rewards", "test_ppo", "test_apa_awr", "test_common"))
ALOL = tuple(f"tests/test_alol.py::test_{t}" for t in ("variant_losses_and_gradients_hand_computed",
             "importance_weight_is_clipped_from_both_sides", "rewards_transform_then_missing_eos_penalty",
             "advantages_and_the_weights_each_variant_trains_with",
             "priority_sampling_follows_positive_advantages"))  # fmt: skip
INVARIANTS = "tests/test_invariants.py::test_what_main_passes_to_the_algorithm_and_the_first_minibatch"
MODELS, SCORERS, CHECKPOINTS, DATA = (
    "plumbing/models.py",
    "plumbing/scorers.py",
    "plumbing/checkpoints.py",
    "plumbing/data.py",
)
TWO_RANKS = "tests/test_common.py::test_statistics_over_the_whole_batch_on_two_ranks"
SPLITS = "tests/test_configurations.py::test_two_ranks_with_uneven_work_train_as_one"
RESUMED = "tests/test_configurations.py::test_killed_and_resumed_equals_uninterrupted"
RELEASED = "tests/test_ppo_max.py::test_released_recipe_end_to_end"
ALOL_RUNS = "tests/test_invariants.py::test_alol_variants_train_on_the_weights_they_define"
ARCHITECTURES = "tests/test_architectures.py::test_policy_value_net_lora_and_layers_on_each_architecture"
CHAT_RM = "tests/test_chat.py::test_reward_model_sees_its_own_chat_template_or_plain_text"
PAIR = "tests/test_real_checkpoints.py::test_encoder_reward_model_reads_prompt_and_response_as_a_pair"
SENTENCEPIECE = "tests/test_real_checkpoints.py::test_response_text_keeps_its_space_with_sentencepiece"
TRLX = "tests/test_recipes.py::test_trlx_reward_checkpoint_converted_scores_as_the_authors_model"
STOP_CUT = "tests/test_recipes.py::test_stop_strings_cut_at_the_first_one_strip_and_end_with_one_eos"
STOP_RUN = "tests/test_recipes.py::test_stop_string_rollout_trains_on_the_cut_response"
TEMPERATURE = "tests/test_invariants.py::test_every_pass_divides_by_the_sampling_temperature"
FSDP_RESUME = "tests/test_scale.py::test_fsdp_checkpoint_is_sharded_and_resumes_on_another_number_of_ranks"
MALFORMED = "tests/test_chat.py::test_malformed_conversations_are_one_line_errors"
CUT_TEMPLATE = "tests/test_chat.py::test_a_cut_response_gets_no_end_of_turn_from_the_reward_models_template"
WHOLE_TEXT = (
    "tests/test_real_checkpoints.py::test_prompt_and_response_ids_are_the_ids_of_the_whole_text_with_sentencepiece"
)
AUTHORS_KL = "tests/test_invariants.py::test_apa_authors_controller_input_and_schedule"
AUTHORS_N = "tests/test_ppo.py::test_apa_authors_controller_steps_with_the_global_minibatch_on_any_number_of_ranks"
LORA = (
    "tests/test_architectures.py::test_lora_alpha_and_dropout_reach_peft_and_dropout_acts_in_the_training_forward_only"
)
VALUE_NET = "tests/test_scale.py::test_value_network_with_its_own_frozen_layers_and_an_mlp_head"
VALUE_SIZE = "tests/test_invariants.py::test_alol_fits_v_ref_on_exactly_value_size_prompts"
OASST = "tests/test_recipes.py::test_oasst_reward_head_bias_is_folded_into_the_final_norm"
GR = "tests/test_grpo_rloo.py::test_"
GROUPS = f"{GR}group_advantages_and_the_three_scalings"
LOO = f"{GR}leave_one_out_baseline"
AGG = f"{GR}each_loss_aggregation_weighs_the_tokens_of_short_and_long_responses"
EQUAL = f"{GR}a_group_of_equal_rewards_gives_no_policy_gradient_and_no_nan"
K3, CLIP_HIGH = f"{GR}k3_value_and_gradient", f"{GR}clip_higher_lets_a_positive_advantage_raise_the_ratio_further"
REINFORCE = f"{GR}rloo_loss_is_reinforce_on_the_sequence_log_prob"
GR_MAIN = f"{GR}what_main_passes_groups_advantages_and_the_first_minibatch"
KL_ONE_TOKEN = f"{GR}each_kl_term_has_the_gradient_it_claims_one_token"
KL_TWO_TOKENS = f"{GR}per_token_kl_terms_leave_the_state_distribution_alone_the_reward_penalty_does_not"
GSPO = f"{GR}gspo_sequence_ratio_is_the_geometric_mean_of_the_token_ratios"
STALE = f"{GR}rloo_weights_stale_samples_by_their_clipped_sequence_ratio"
VERIFIABLE = "tests/test_verifiable.py::"


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
    Mutant("token-count-not-all-reduced", "plumbing/padding.py", "tensors.all_reduce_sum(counts[len(plans) :])]",
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
    Mutant("ppo-running-stats-not-updated", "ppo.py", "        score_stats.update(scores)  # the running",
           "        # the running", (f"{INVARIANTS}[ppo]",)),
    Mutant("gae-lambda-ignored", "ppo.py", "last_gae = delta + gamma * gae_lambda * last_gae",
           "last_gae = delta + gamma * last_gae", (PPO,)),
    Mutant("gae-bootstraps-from-padding", "ppo.py", "    values = torch.where(mask, values, 0.0)\n", "", (PPO,)),
    Mutant("kl-sign-in-main", "ppo.py", "kl = torch.where(r.response_mask, logprobs - ref_logprobs, 0.0)  # k1",
           "kl = torch.where(r.response_mask, ref_logprobs - logprobs, 0.0)  # k1", (f"{INVARIANTS}[ppo]",)),
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
    Mutant("ppo-ptx-rollout-token-share", "ppo_max.py", "(loss + args.ptx_coef * ptx * ptx_weight).backward()",
           "(loss + args.ptx_coef * ptx * loss_weight).backward()", (f"{SPLITS}[ppo_max]",)),
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
    # (noticed only as a crash: LLaMA-family classifiers return no last_hidden_state; on GPT-NeoX the wrong line
    # behaves like the right one, so no assertion can tell them apart there)
    Mutant("value-net-lora-backbone", MODELS, "model = hf_model(self.model)  #", "model = self.model  #",
           (ARCHITECTURES,)),
    Mutant("chat-rm-extra-eos", SCORERS, "if wants_eos and not templated and", "if wants_eos and", (CHAT_RM,)),
    Mutant("encoder-pair-ignored", SCORERS, 'self.input_format = "pair" if encoder',
           'self.input_format = "text" if encoder', (PAIR,)),
    Mutant("pad-eos-read-before-eos", SCORERS, "pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id",
           "pad = self.tokenizer.pad_token_id if True or self.tokenizer.pad_token_id", (TRLX,)),
    Mutant("first-eos-ignored", SCORERS, "ids = ids[: ids.index(eos) + 1]", "ids = ids", (TRLX,)),
    Mutant("response-text-decoded-alone", DATA, "return [f[len(p) :] if f.startswith(p) else a",
           "return [a if f.startswith(p) else a", (SENTENCEPIECE,)),
    Mutant("stop-string-not-stripped", DATA, "text[: min(cuts)].rstrip()", "text[: min(cuts)]", (STOP_CUT,)),
    Mutant("stop-string-no-eos", DATA, '["input_ids"] + [eos]', '["input_ids"]', (STOP_CUT,)),
    Mutant("stop-strings-not-applied", "ppo.py", "if args.stop_strings:  # trlX's", "if False:  # trlX's",
           (STOP_RUN,)),
    # ---- the temperature in every pass, A-LoL's clip, resume, data and the recipes' settings
    *[Mutant(f"{script[:-3]}-update-at-t1", script, "attention_mask[seq], context, args.temperature",
             "attention_mask[seq], context, 1.0", (f"{TEMPERATURE}[{script[:-3]}]",))
      for script in ("ppo.py", "apa.py", "awr.py", "ppo_max.py")],
    *[Mutant(f"{script[:-3]}-reference-at-t1", script, "chunked_logprobs(ref_model, **batch, temperature=temp,",
             "chunked_logprobs(ref_model, **batch, temperature=1.0,", (f"{TEMPERATURE}[{script[:-3]}]",))
      for script in ("ppo.py", "apa.py", "awr.py", "ppo_max.py")],
    Mutant("alol-evaluation-at-t1", "alol.py", "temp, lengths = args.temperature, padding",
           "temp, lengths = 1.0, padding", (f"{TEMPERATURE}[alol]",)),
    Mutant("alol-clip-above-only", "alol.py", "rho = seq_log_ratio.detach().exp().clamp(1 - clip_eps, 1 + clip_eps)",
           "rho = seq_log_ratio.detach().exp().clamp(max=1 + clip_eps)", ALOL),
    Mutant("alol-seq-clip-above-only", "alol.py", "ref_logprobs).detach().exp().clamp(1 - clip_eps, 1 + clip_eps)",
           "ref_logprobs).detach().exp().clamp(max=1 + clip_eps)", ALOL),
    # (not `set_optimizer_state_dict(...)` -> `pass`: dcp.load already fills the optimizer's own state tensors in
    # place, and a fresh AdamW has the same hyperparameters, so that change is equivalent; reading no optimizer
    # shards is the bug)
    Mutant("fsdp-resume-optimizer-not-read", CHECKPOINTS, "dcp.load(sharded, checkpoint_id=directory)",
           'dcp.load({k: v for k, v in sharded.items() if not k.endswith("_optimizer")}, checkpoint_id=directory)',
           (FSDP_RESUME,)),
    Mutant("unknown-roles-accepted", DATA, 'if m["role"] not in ROLES:', "if False:", (MALFORMED,)),
    Mutant("cut-response-end-of-turn", SCORERS, "if ended is False and self.options.append_eos",
           "if False and self.options.append_eos", (CUT_TEMPLATE,)),
    Mutant("response-tokenized-alone", DATA, "if full_ids[: len(head_ids)] == head_ids:", "if False:", (WHOLE_TEXT,)),
    Mutant("authors-controller-local-n", "ppo.py", "args.kl_target, args.mini_batch_size, args.kl_horizon",
           "args.kl_target, local_mini_batch, args.kl_horizon", (AUTHORS_N,)),
    Mutant("authors-controller-whole-batch", "ppo.py", "start, context = (len(logprobs) - 1) // chunk_size *",
           "start, context = 0 * chunk_size *", (AUTHORS_KL,)),
    Mutant("lora-alpha-ignored", MODELS, "lora_alpha=alpha or 2 * r", "lora_alpha=2 * r", (LORA,)),
    Mutant("lora-dropout-in-no-grad-passes", MODELS, "training=torch.is_grad_enabled())", "training=True)", (LORA,)),
    Mutant("value-layers-as-the-policys", MODELS, "num_layers_unfrozen=unfrozen)",
           "num_layers_unfrozen=None)", (VALUE_NET,)),
    # ---- the critic-free successors
    Mutant("grpo-baseline-batch-mean", "grpo.py", "centred = (grouped - grouped.mean(1, keepdim=True))",
           "centred = (grouped - grouped.mean())", (GROUPS,)),
    Mutant("grpo-group-std-not-divided", "grpo.py", "return centred / (grouped.std(1).repeat_interleave(group_size)",
           "return centred / (1 + 0 * grouped.std(1).repeat_interleave(group_size)", (GROUPS,)),
    Mutant("grpo-batch-std-of-this-rank", "grpo.py", "common.all_reduce_sum(torch.stack([x.sum(),",
           "(torch.stack([x.sum(),", (f"{SPLITS}[grpo]",)),
    Mutant("grpo-equal-group-nan", "grpo.py", "grouped.std(1).repeat_interleave(group_size) + 1e-4)",
           "grouped.std(1).repeat_interleave(group_size) + 0)", (GROUPS, EQUAL)),
    Mutant("grpo-seq-mean-per-micro-batch", "grpo.py", "return per_sequence.sum() * world_size / n_sequences",
           "return per_sequence.mean()", (AGG, f"{SPLITS}[grpo]")),
    Mutant("grpo-seq-mean-as-token-mean", "grpo.py", "losses, 0.0).sum(1) / mask.sum(1).clamp(min=1)",
           "losses, 0.0).sum(1) / mask.sum().clamp(min=1) * len(mask)", (AGG,)),
    Mutant("grpo-constant-is-token-count", "grpo.py", "world_size / (n_sequences * max_new_tokens)",
           "world_size / mask.sum()", (AGG,)),
    Mutant("grpo-clip-high-ignored", "grpo.py", "ratio.clamp(1 - clip_eps, 1 + clip_eps_high)",
           "ratio.clamp(1 - clip_eps, 1 + clip_eps)", (CLIP_HIGH,)),
    Mutant("grpo-k3-reversed", "grpo.py", "log_ratio = ref_logprobs - logprobs", "log_ratio = logprobs - ref_logprobs",
           (K3,)),
    Mutant("grpo-kl-anchor-pi-old", "grpo.py", "kl_loss(new_logprobs, logprobs[mb], ref_logprobs[mb], args.kl_term)",
           "kl_loss(new_logprobs, logprobs[mb], logprobs[mb], args.kl_term)", (GR_MAIN + "[grpo]",)),
    Mutant("grpo-kl-ratio-detached", "grpo.py", "return torch.exp(logprobs - old_logprobs) * k3(",
           "return torch.exp(logprobs - old_logprobs).detach() * k3(", (KL_ONE_TOKEN, KL_TWO_TOKENS)),
    Mutant("grpo-kl-default-published-k3", "grpo.py", 'kl_term: Literal["k3-ratio", "k3", "k2"] = "k3-ratio"',
           'kl_term: Literal["k3-ratio", "k3", "k2"] = "k3"', (GR_MAIN + "[grpo]",)),
    Mutant("grpo-k2-halved-twice", "grpo.py", "return 0.5 * (logprobs - ref_logprobs) ** 2",
           "return 0.25 * (logprobs - ref_logprobs) ** 2", (KL_ONE_TOKEN,)),
    Mutant("gspo-ratio-of-the-sum", "grpo.py", "0.0).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)",
           "0.0).sum(1, keepdim=True) / 1", (GSPO,)),
    Mutant("grpo-groups-not-consecutive", "grpo.py", "indices = [i for i in indices for _ in range(args.group_size)]",
           "indices = indices * args.group_size", (GR_MAIN + "[grpo]",)),
    Mutant("rloo-baseline-includes-itself", "rloo.py", "baseline = (grouped.sum(1, keepdim=True) - grouped) / (",
           "baseline = grouped.mean(1, keepdim=True) + 0 * (", (LOO,)),
    Mutant("rloo-kl-not-in-reward", "rloo.py", "rewards = scores - args.kl_coef * kl.sum(1)", "rewards = scores",
           (GR_MAIN + "[rloo]",)),
    Mutant("rloo-token-mean-log-prob", "rloo.py", "ratio = torch.where(mask, logprobs - old_logprobs, 0.0).sum(1)",
           "ratio = (torch.where(mask, logprobs - old_logprobs, 0.0).sum(1) / mask.sum(1))", (REINFORCE,)),
    Mutant("rloo-loss-sign", "rloo.py", "losses = torch.max(-advantages * ratio, -advantages * clipped_ratio)",
           "losses = torch.max(advantages * ratio, advantages * clipped_ratio)", (REINFORCE,)),
    Mutant("rloo-stale-samples-uncorrected", "rloo.py", "(mask, logprobs - old_logprobs, 0.0)",
           "(mask, logprobs - logprobs.detach(), 0.0)", (STALE, "tests/test_conformance.py")),
    Mutant("rloo-ratio-not-clipped", "rloo.py", "clipped_ratio = ratio.clamp(1 - clip_eps, 1 + clip_eps)",
           "clipped_ratio = ratio.clamp(1 - clip_eps, 1 + 1e9)", (STALE,)),
    Mutant("alol-value-size-ignored", "alol.py", "value_end = args.eval_size + args.value_size if args.value_size else",
           "value_end = len(held_out_prompts) if True else", (VALUE_SIZE,)),
    Mutant("mean-pooling-converted", "recipes/convert_reward_model.py", 'if fields.get("pooling", "last") != "last":',
           "if False:", (OASST,)),

    # ---- configurations (issue 45's kinds): a pairing, a statistic of one rank, uneven work, a resume
    Mutant("alol-v-ref-targets-unpaired", "alol.py", "sample_scores.view(args.value_samples, -1).T.tolist()",
           "sample_scores.view(-1, args.value_samples).tolist()", (VALUE_SIZE,)),
    Mutant("ppo-returns-mean-one-rank", "ppo.py",
           "returns_mean = common.masked_mean(returns, r.response_mask, global_batch=True)",
           "returns_mean = common.masked_mean(returns, r.response_mask, global_batch=False)", (f"{SPLITS}[ppo]",)),
    Mutant("micro-batch-tokens-of-one-rank", "plumbing/padding.py",
           "tensors.all_reduce_sum(counts[len(plans) :])])", "counts[len(plans) :]])", (f"{SPLITS}[awr]",)),
    # ---- dpo.py
    Mutant("dpo-reference-sign", "dpo.py", "else ref_chosen - ref_rejected)", "else ref_rejected - ref_chosen)",
           ("tests/test_dpo.py::test_dpo_loss_and_gradient_by_hand",)),
    Mutant("dpo-pairs-swapped", "dpo.py", "chosen, rejected = logprobs.chunk(2)",
           "rejected, chosen = logprobs.chunk(2)",
           ("tests/test_dpo.py::test_each_variant_runs_on_hh_dialogues_and_learns_the_preferences",)),
    Mutant("pro-sft-on-the-rejected", "dpo.py", "sft = -torch.where(chosen_mask, chosen, 0.0).sum(1)",
           "sft = -torch.where(rejected_mask, rejected, 0.0).sum(1)",
           ("tests/test_dpo.py::test_pro_two_candidate_loss_by_hand",)),
    Mutant("fsdp-checkpoint-steps-a-fresh-optimizer", "plumbing/checkpoints.py",
           "    if fresh:\n        optimizer.state.clear()\n    return", "    return", (f"{SPLITS}[ppo_max]",)),
    Mutant("apa-resume-forgets-score-stats", "apa.py", '        score_stats.load_state_dict(checkpoint["score_stats"])',
           "        pass", (f"{RESUMED}[apa]",)),
    # ---- verifiable rewards (issue 43) and the prepared attention mask (issue 40)
    Mutant("grpo-scorer-without-columns", "grpo.py", "raw_scores = score_fn(r.prompt_texts, r.response_texts, r.ended, "
           "r.columns)", "raw_scores = score_fn(r.prompt_texts, r.response_texts, r.ended)",
           ("tests/test_learning.py::test_grpo_raises_the_verifiable_tasks_accuracy_a_reversed_checker_lowers_it",)),
    Mutant("grpo-columns-of-other-rows", "grpo.py", "for x in (train_prompts, train_rows, train_columns)))",
           "for x in (train_prompts, train_rows, train_columns[::-1])))",
           ("tests/test_learning.py::test_grpo_raises_the_verifiable_tasks_accuracy_a_reversed_checker_lowers_it",)),
    Mutant("checker-if-any-score-is-binary", "plumbing/scorers.py", "((tensor == 0) | (tensor == 1)).all())",
           "((tensor == 0) | (tensor == 1)).any())",
           (f"{VERIFIABLE}test_the_checker_is_a_checker_and_the_gold_scorer_is_not",)),
    Mutant("gsm8k-first-final-answer", "recipes/gsm8k_reward.py", "minus, minus_after_dollar, number = final[-1]",
           "minus, minus_after_dollar, number = final[0]",
           (f"{VERIFIABLE}test_the_gsm8k_answer_extractor_on_tricky_strings",)),
    Mutant("prepared-mask-anti-causal", "plumbing/tensors.py", "dtype=torch.bool, device=attention_mask.device).tril()",
           "dtype=torch.bool, device=attention_mask.device).triu()",
           ("tests/test_architectures.py::test_the_prepared_mask_only_where_it_means_what_the_2d_mask_does",)),
]  # fmt: skip


@dataclass
class Args:
    only: tuple[str, ...] = ()  # mutant names to run (default: all)
    list: bool = False  # print the mutants and exit
    workers: int = 2  # mutants tested at once (each test process single-threaded)
    timeout: float = 300  # seconds a mutant's tests may take (a hang is a death, but not a kill)
    output: str = "bench/results/mutants.md"  # the results table


IGNORE = shutil.ignore_patterns(".git", ".venv", ".whl", "runs", "results", "__pycache__", ".pytest_cache",
                                ".ruff_cache")  # fmt: skip


def copy_repo(dest: Path, source: Path):
    shutil.copytree(source, dest, ignore=IGNORE)


def apply(mutant: Mutant, root: Path):
    path = root / mutant.file
    source = path.read_text()
    if source.count(mutant.original) != 1:
        raise SystemExit(f"error: mutant {mutant.name}: its line occurs {source.count(mutant.original)} times in "
                         f"{mutant.file}; update it in bench/mutants.py")  # fmt: skip
    path.write_text(source.replace(mutant.original, mutant.mutated))
    compile(path.read_text(), str(path), "exec")  # a mutant must be valid Python: a SyntaxError is not a kill


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, detail) of the tests in the tree at `root`, one process, one thread: outcome "passed",
    "assertion" (a test's assertion failed), "crashed" (another exception in a test or in a script it ran, or an
    error in a test's setup) or "timed out"; detail names the first failing test and its first line."""
    env = {**os.environ, "RLHF_TEST_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    report = root / "report.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", f"--junitxml={report}", *tests]
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timed out", time.perf_counter() - start, f"over {timeout:.0f} s"
    seconds = time.perf_counter() - start
    if result.returncode == 0:
        return "passed", seconds, ""
    outcomes = []
    if report.exists():
        for case in ET.parse(report).iter("testcase"):
            for child in case:
                if child.tag in ("failure", "error"):
                    message = child.get("message") or ""
                    text = message + (child.text or "")
                    # pytest reports a failed `assert` as "assert ..." (its rewritten message) or "AssertionError:
                    # ..." (pytest.fail, raise AssertionError); a script's traceback quoted in it is a crash
                    assertion = (
                        child.tag == "failure"
                        and message.lstrip().startswith(("assert", "AssertionError", "Failed:"))
                        and "Traceback (most recent call last)" not in text
                    )
                    first = message.strip().splitlines()[0][:100] if message.strip() else child.tag
                    outcomes.append(("assertion" if assertion else "crashed", f"{case.get('name')}: {first}"))
    if not outcomes:
        return "crashed", seconds, (result.stdout + result.stderr).strip().splitlines()[-1][:100]
    outcome = "assertion" if any(o == "assertion" for o, _ in outcomes) else "crashed"
    return outcome, seconds, next(d for o, d in outcomes if o == outcome)


def check(mutant: Mutant | None, tests: tuple[str, ...], timeout: float, source: Path) -> tuple[str, float, str]:
    with tempfile.TemporaryDirectory(prefix="mutant_") as tmp:
        root = Path(tmp) / "repo"
        copy_repo(root, source)
        if mutant is not None:
            apply(mutant, root)
        return run_tests(root, tests, timeout)


RESULT = {"assertion": "killed", "crashed": "crashed", "timed out": "timed out", "passed": "**survived**"}


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
    snapshot = Path(tempfile.mkdtemp(prefix="mutants_snapshot_")) / "repo"
    copy_repo(snapshot, REPO)  # every copy is of the tree as it was now (the repository may change meanwhile)
    selections = list(dict.fromkeys(m.tests for m in mutants))  # each mutant's own tests, alone, unmutated
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        checks = pool.map(lambda tests: check(None, tests, args.timeout, snapshot), selections)
        baseline = dict(zip(selections, checks))
    broken = {tests: result for tests, result in baseline.items() if result[0] != "passed"}
    if broken:
        lines = [f"{' '.join(t)}: {outcome} ({detail})" for t, (outcome, _, detail) in broken.items()]
        raise SystemExit("error: on the unmutated copy these selections do not pass, so no kill would mean anything:\n"
                         + "\n".join(lines))  # fmt: skip
    print(f"unmutated: {len(selections)} test selections pass, each alone ({time.perf_counter() - start:.0f} s)",
          flush=True)  # fmt: skip
    rows = []
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        futures = {pool.submit(check, m, m.tests, args.timeout, snapshot): m for m in mutants}
        for future in concurrent.futures.as_completed(futures):
            m = futures[future]
            outcome, seconds, detail = future.result()
            rows.append((m, outcome, seconds, detail))
            print(f"{m.name:38s} {RESULT[outcome].strip('*'):9s} {seconds:5.1f} s  {detail}", flush=True)
    rows.sort(key=lambda row: MUTANTS.index(row[0]))
    counts = {result: sum(RESULT[o] == result for _, o, _, _ in rows) for result in RESULT.values()}
    wall = time.perf_counter() - start
    title = (f"# Mutation check: {len(rows)} mutants, {counts['killed']} killed by a failed assertion, "
             f"{counts['crashed']} crashed, {counts['timed out']} timed out, {counts['**survived**']} survived "
             f"({wall / 60:.1f} min, {args.workers} at a time)")  # fmt: skip
    lines = [title, "", "| mutant | file | tests | result | how | s |", "|---|---|---|---|---|---|"]
    for m, outcome, seconds, detail in rows:
        tests = ", ".join(t.replace("tests/", "") for t in m.tests)
        how = detail.replace("|", "/")
        lines.append(f"| {m.name} | {m.file} | {tests} | {RESULT[outcome]} | {how} | {seconds:.0f} |")
    shutil.rmtree(snapshot.parent, ignore_errors=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"{title.removeprefix('# ')}; wrote {args.output}")
    if counts["killed"] < len(rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
