"""A broken scoring-function reward for the bad-input tests: every score is NaN."""


def score(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan")] * len(prompts)
