"""The toy's verifiable task: arithmetic word problems whose answers are right or wrong (built by toy/arith/build.py).

`score` is its checker, a scoring function that reads the dataset's `answer` column:

    python grpo.py --model toy/arith/policy --dataset toy/arith/data --reward-model toy.arith:score \
        --eval-reward toy.arith:score

A response earns 1.0 when the number after its last "####" equals the row's answer, else 0.0 (a response without
"####" included: the format is part of being right). No partial credit, so every group of samples that is all right
or all wrong gives GRPO and RLOO no signal.
"""

import re

FINAL = re.compile(r"####\s*(-?\d+)(?![\d.,]*\d)")  # a whole integer: "#### 12.5" and "#### 1,2" are no answer


def final_answer(response: str) -> int | None:
    """The integer after the response's last "####", or None."""
    found = FINAL.findall(response)
    return int(found[-1]) if found else None


def score(prompts: list, responses: list[str], answer: list, **columns) -> list[float]:
    """1.0 for each response whose final answer equals the row's `answer`, else 0.0."""
    return [float(final_answer(r) == int(a)) for r, a in zip(responses, answer)]
