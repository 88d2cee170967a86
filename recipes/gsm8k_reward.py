"""GSM8K's verifiable reward: 1.0 when a response's final answer equals the row's, else 0.0.

    --reward-model recipes.gsm8k_reward:score     (a scoring function reading the dataset's `answer` column)

The final answer of a response: the number after its last "####" (GSM8K's own format, which the recipe's
instruction asks for), else in its last \\boxed{...}, else its last number. Numbers are compared as exact decimals
after dropping thousands separators, a leading "$" and trailing zeros of a fraction ("1,234" = "1234.00" = "$1234";
"-3" and "−3" are negative). The row's answer is GSM8K's solution, whose final line is "#### N" (or a bare number).

When the `math-verify` package is installed, a response the numeric comparison marks wrong is also checked with it
(LaTeX fractions and expressions: "\\frac{3}{4}" against "0.75"), in a subprocess with a timeout: math-verify times
its parsing with SIGALRM, which works only on a process's main thread (Math-Verify issue #55), and one pathological
response must not stall a run. Without the package, or when the subprocess fails or times out, the numeric verdict
stands.
"""

import json
import re
import subprocess
import sys
from decimal import Decimal, InvalidOperation

# a number: thousands grouped by commas ("1,234.5") or plain digits, an optional fraction, not inside a word or
# after a digit ("10-15" is 15, "3,4" is 3 and 4)
NUMBER = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+"
FINAL = re.compile(r"####\s*(-?)\s*\$?\s*(-?)\s*(" + NUMBER + ")")  # "#### 72", "#### $1,000", "#### -$5"
BOXED = re.compile(r"\\boxed\{\s*\$?\s*(" + NUMBER + r")\s*\}")
ANY_NUMBER = re.compile(NUMBER)
MATH_VERIFY_TIMEOUT_S = 30.0  # for one call, plus MATH_VERIFY_PER_RESPONSE_S per response it checks
MATH_VERIFY_PER_RESPONSE_S = 1.0  # (math-verify bounds each parse itself, at 5 s; this is the backstop)


def normalize(text: str) -> str:
    """Unicode minus to "-", thousands separators and "$" out."""
    return text.replace("\u2212", "-").replace(",", "").replace("$", "")


def extract_answer(response: str) -> str | None:
    """The response's final answer as written (a number string), or None if it has no number."""
    text = response.replace("\u2212", "-")
    final = FINAL.findall(text)
    if final:
        minus, minus_after_dollar, number = final[-1]
        return ("-" if (minus or minus_after_dollar) and not number.startswith("-") else "") + number
    for pattern in (BOXED, ANY_NUMBER):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    return None


def to_decimal(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        return Decimal(normalize(text).rstrip("."))
    except InvalidOperation:
        return None


def reference_answer(answer) -> str:
    """The number of a GSM8K solution ("... #### 72"), or the answer itself if it has no "####"."""
    answer = str(answer)
    return answer.rsplit("####", 1)[-1].strip() if "####" in answer else answer.strip()


def is_right(response: str, answer) -> bool:
    got, want = to_decimal(extract_answer(response)), to_decimal(reference_answer(answer))
    return got is not None and want is not None and got == want


def math_verify_verdicts(pairs: list[tuple[str, str]], timeout: float) -> list[bool] | None:
    """math-verify's verdict on each (reference, response) in one subprocess (its main thread: SIGALRM works), or
    None when math-verify is not installed, or the subprocess fails or runs past `timeout` seconds."""
    child = (
        "import json, sys\n"
        "from math_verify import parse, verify\n"
        "pairs = json.load(sys.stdin)\n"
        "out = []\n"
        "for gold, response in pairs:\n"
        "    try:\n"
        "        out.append(bool(verify(parse(gold), parse(response))))\n"
        "    except Exception:\n"
        "        out.append(False)\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", child], input=json.dumps(pairs), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        verdicts = json.loads(done.stdout) if done.returncode == 0 else None
    except (subprocess.TimeoutExpired, json.JSONDecodeError, OSError):
        return None
    return verdicts if isinstance(verdicts, list) and len(verdicts) == len(pairs) else None


def has_math_verify() -> bool:
    import importlib.util

    return importlib.util.find_spec("math_verify") is not None


def score(prompts: list, responses: list[str], answer: list, **columns) -> list[float]:
    """1.0 for each response whose final answer equals its row's `answer`, else 0.0."""
    right = [is_right(r, a) for r, a in zip(responses, answer)]
    wrong = [i for i, ok in enumerate(right) if not ok]
    if wrong and has_math_verify():
        pairs = [("$" + reference_answer(answer[i]) + "$", responses[i]) for i in wrong]
        verdicts = math_verify_verdicts(pairs, MATH_VERIFY_TIMEOUT_S + MATH_VERIFY_PER_RESPONSE_S * len(pairs))
        for i, ok in zip(wrong, verdicts or []):
            right[i] = ok
    return [float(ok) for ok in right]
