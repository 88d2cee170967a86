"""Verifiable rewards: scoring functions that read the dataset's columns by name (TRL's reward-function form), the
toy's arithmetic checker, GSM8K's answer extraction and math-verify's subprocess, and recipes/grpo_gsm8k.sh end to
end on stand-ins (a GSM8K-format file and a tiny random Qwen2 with a chat template)."""

import json
import sys
import types

import pytest
import torch
from conftest import REPO, read_metrics
from test_recipes import check_dry_runs, run_recipe

from plumbing import scorers
from recipes import gsm8k_reward
from toy import arith


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def scorer_args(data, reward_model, eval_reward=""):
    return types.SimpleNamespace(dataset=data, reward_model=reward_model, eval_reward=eval_reward)


def test_a_scoring_function_reads_the_columns_it_names(tmp_path):
    rows = [{"prompt": "p1", "answer": 3, "topic": "x", "other": 1}, {"prompt": "p2", "answer": 4, "topic": "none",
                                                                      "other": 2}]  # fmt: skip
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    # named parameters: the columns it reads; one with a default is passed when the dataset has it
    spec = "tests.bad_scorers:answer_and_maybe_topic"
    columns = scorers.dataset_columns(scorer_args(data, spec), "train")
    assert columns == [{"answer": 3, "topic": "x"}, {"answer": 4, "topic": "none"}]  # only what it reads
    score = scorers.load_scorer(spec, "--reward-model", torch.device("cpu"), torch.float32)
    assert score(["p1", "p2"], ["it is 3", "it is 5"], None, columns).tolist() == [1.5, 0.0]
    # **columns: every column but the prompt
    every = "tests.bad_scorers:every_column"
    columns = scorers.dataset_columns(scorer_args(data, "toy/reward_model", every), "train")
    assert columns[1] == {"answer": 4, "topic": "none", "other": 2}
    score = scorers.load_scorer(every, "--eval-reward", torch.device("cpu"), torch.float32)
    assert score(["p1", "p2"], ["a", "b"], None, columns).tolist() == [3.0, 3.0]
    # the two-argument form as before: it reads nothing, and gets nothing
    two = "tests.bad_scorers:response_length"
    assert scorers.dataset_columns(scorer_args(data, two), "train") == [{}, {}]
    assert scorers.load_scorer(two, "x", torch.device("cpu"), torch.float32)(["p"], ["abc"], None, [{}]).tolist() == [
        3.0
    ]


@pytest.mark.parametrize(
    "name, expected",
    [("needs_answer", "reads the column 'answer', which split 'train' of --dataset"),
     ("takes_nothing", "must take (prompts, responses)")],
)  # fmt: skip
def test_a_scoring_function_the_data_cannot_serve_is_one_line(name, expected, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(SystemExit, match="scoring function --reward-model") as info:
        scorers.dataset_columns(scorer_args(data, f"tests.bad_scorers:{name}"), "train")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_the_toy_checker_scores_the_final_answer_only():
    responses = [" 3 + 4 = 7. #### 7", " 3 + 4 = 7. #### 8", " 3 + 4 = 7.", " #### 7 #### -7", "####7"]
    assert arith.score([""] * 5, responses, [7, 7, 7, -7, "7"]) == [1.0, 0.0, 0.0, 1.0, 1.0]


def test_the_checker_is_a_checker_and_the_gold_scorer_is_not():
    checker = scorers.load_scorer("toy.arith:score", "--reward-model", torch.device("cpu"), torch.float32)
    checker(["p", "p"], ["#### 1", "#### 2"], None, [{"answer": 1}, {"answer": 1}])
    gold = scorers.load_scorer("toy.gold:score", "--eval-reward", torch.device("cpu"), torch.float32)
    assert gold(
        ["\n\nHuman: chess?\n\nAssistant:"] * 2, [" watch the bishop.", " sure! watch the bishop."]
    ).tolist() == [1.0, 1.5]  # one score of 1, one not: a checker's scores are all 0 or 1
    assert checker.is_checker and not gold.is_checker


@pytest.mark.parametrize(
    "response, answer, right",
    [
        ("so the total is 18. #### 18", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs... #### 18", True),
        ("#### 1,234", "#### 1234", True),  # thousands separators
        ("The answer is $1,234.00", "1234", True),  # "$", the last number, trailing zeros
        ("#### 72.0", "72", True),
        ("#### -3", "#### -3", True),  # negative
        ("she ends with \u22123 dollars", "-3", True),  # a Unicode minus
        ("#### 3", "#### -3", False),
        ("\\boxed{42} and then 7 more words 9", "42", True),  # \boxed before the last number
        ("#### 18 but wait, 20", "18", True),  # "####" before a later number
        ("first #### 5 then #### 6", "6", True),  # the last "####"
        ("I cannot tell", "5", False),  # no number at all
        ("#### 5.5", "5", False),
        ("there are 12,000 apples", "12000", True),
        ("#### 0.50", "0.5", True),
    ],
)  # fmt: skip
def test_the_gsm8k_answer_extractor_on_tricky_strings(response, answer, right):
    assert gsm8k_reward.is_right(response, answer) is right
    assert gsm8k_reward.score(["q"], [response], [answer]) == [float(right)]


def fake_math_verify(directory, body: str):
    """A stand-in `math_verify` package (the real one is optional and not installed here) on the child's path."""
    package = directory / "math_verify"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(body)
    return str(directory)


def test_math_verify_runs_in_a_subprocess_and_a_timeout_keeps_the_numeric_verdict(tmp_path, monkeypatch):
    # a verifier that accepts "\frac{3}{4}" for 0.75, in the child's main thread (where SIGALRM works)
    body = ("import signal, threading\n"
            "def parse(s):\n"
            "    assert threading.current_thread() is threading.main_thread()\n"
            "    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # fails off the main thread, as math-verify's does\n"
            "    return s.replace('$', '').replace('\\\\frac{3}{4}', '0.75').split()[-1]\n"
            "def verify(gold, pred):\n"
            "    return float(gold) == float(pred)\n")  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", fake_math_verify(tmp_path / "ok", body))
    monkeypatch.setattr(gsm8k_reward, "has_math_verify", lambda: True)
    responses = ["it is \\frac{3}{4}", "#### 0.75", "#### 2"]
    assert gsm8k_reward.score(["q"] * 3, responses, ["0.75"] * 3) == [1.0, 1.0, 0.0]
    # one that never returns: the subprocess is stopped at the timeout and the numeric verdicts stand
    monkeypatch.setenv("PYTHONPATH", fake_math_verify(tmp_path / "hangs", "import time\ntime.sleep(60)\n"))
    assert gsm8k_reward.math_verify_verdicts([("$1$", "1")], timeout=2.0) is None
    monkeypatch.setattr(gsm8k_reward, "MATH_VERIFY_TIMEOUT_S", 2.0)
    assert gsm8k_reward.score(["q"] * 3, responses, ["0.75"] * 3) == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------- the GSM8K recipe on stand-ins
QWEN_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)  # Qwen's ChatML, with the tokenizer's EOS ending each turn (as <|im_end|> does Qwen's)


def gsm8k_stand_ins(tmp_path):
    """A GSM8K-format directory (question, answer ending "#### N", some with commas) and a tiny random Qwen2 with
    a chat template."""
    from test_architectures import save_tiny
    from transformers import AutoTokenizer

    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b:,}"}
            for a, b in [(3, 4), (1000, 250), (12, 30), (7, 8), (5, 5), (900, 1100), (2, 9), (6, 1)]]  # fmt: skip
    (tmp_path / "gsm8k").mkdir()
    for split in ("train", "test"):
        write_jsonl(tmp_path / "gsm8k" / f"{split}.jsonl", rows)
    model = save_tiny("qwen2", tmp_path / "qwen2")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.save_pretrained(model)
    return {"MODEL": model, "DATASET": str(tmp_path / "gsm8k"), "DATA_DIR": str(tmp_path / "data"),
            "OUT": str(tmp_path / "run")}  # fmt: skip


def test_gsm8k_recipe_prints_its_runs_and_trains_on_stand_ins(tmp_path):
    variables = gsm8k_stand_ins(tmp_path)
    check_dry_runs("grpo_gsm8k.sh", [["grpo"], ["rloo"]], variables)
    shrink = ["--total-episodes", "20", "--rollout-batch-size", "10", "--mini-batch-size", "10", "--max-new-tokens",
              "8", "--max-prompt-length", "96", "--eval-size", "4", "--eval-every", "1", "--save-every", "0",
              "--dtype", "float32", "--micro-batch-size", "5"]  # fmt: skip
    run_recipe("grpo_gsm8k.sh", ["grpo", *shrink], variables)
    written = [json.loads(line) for line in open(tmp_path / "data" / "train.jsonl")]
    assert written[1]["answer"].endswith("#### 1,250") and written[1]["prompt"][0]["role"] == "user"
    assert 'output the final answer after "####"' in written[1]["prompt"][0]["content"]
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["iteration"] == 2
    # the reward is a checker: accuracy sampled and greedy, and the groups' accuracy and equal-reward fraction
    assert {"eval/accuracy", "eval/accuracy_greedy"} <= rows[0].keys()
    assert {"train/accuracy", "train/zero_std_groups"} <= rows[-1].keys()
    assert rows[-1]["train/accuracy"] == rows[-1]["train/reward"]  # 0/1 rewards, no missing-EOS penalty


def test_the_reward_function_imports_as_the_recipe_names_it():
    assert scorers.import_scoring_function("recipes.gsm8k_reward:score", "--reward-model") is gsm8k_reward.score
    assert "recipes" in sys.modules and (REPO / "recipes" / "gsm8k_reward.py").exists()


def test_accuracy_is_reported_for_a_checker_only_and_greedy_means_greedy():
    """eval/accuracy is the checker's mean over the samples and eval/accuracy_greedy its mean over greedy()'s texts;
    with a scorer that is not a checker neither is logged and greedy() is never called. common.greedy_texts decodes
    what transformers' generate() does with sampling off, whatever the seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import common
    from plumbing.data import load_rows, tokenize_prompts
    from plumbing.run import evaluation_metrics

    checker = scorers.load_scorer("toy.arith:score", "--eval-reward", torch.device("cpu"), torch.float32)
    gold = scorers.load_scorer("toy.gold:score", "--eval-reward", torch.device("cpu"), torch.float32)
    kl, mask, ended = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.tensor([True, True])
    columns = [{"answer": 7}, {"answer": 9}]
    sampled, greedy = [" #### 7", " #### 8"], [" #### 7", " #### 9"]
    metrics = evaluation_metrics(checker, checker, ["p", "q"], sampled, ended, kl, mask, columns=columns,
                                 greedy=lambda: greedy)  # fmt: skip
    assert metrics["eval/accuracy"] == 0.5 and metrics["eval/accuracy_greedy"] == 1.0
    never = lambda: pytest.fail("greedy() called for a scorer that is not a checker")  # noqa: E731
    prompts = ["\n\nHuman: chess?\n\nAssistant:"] * 2
    metrics = evaluation_metrics(gold, gold, prompts, [" watch the bishop.", " sure! watch the bishop."], ended, kl,
                                 mask, greedy=never)  # fmt: skip
    assert "eval/accuracy" not in metrics and "eval/accuracy_greedy" not in metrics

    path = str(REPO / "toy" / "arith" / "policy")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).float()
    prompts = tokenize_prompts(tokenizer, load_rows(str(REPO / "toy" / "arith" / "data"), "test")[0][:6], 128)
    config = GenerationConfig(max_new_tokens=24, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    texts = []
    for seed in (0, 123):  # sampling off: the seed changes nothing
        torch.manual_seed(seed)
        texts.append(common.greedy_texts(model, prompts, tokenizer, config, 4, torch.float32))
    assert texts[0] == texts[1]
    expected = [tokenizer.decode(model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24,
                                                pad_token_id=tokenizer.pad_token_id)[0, len(p):],
                                 skip_special_tokens=True) for p in prompts]  # fmt: skip
    assert texts[0] == expected
