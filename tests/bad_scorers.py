"""Scoring functions that misbehave, for the one-line error tests."""


def raises(prompts, responses):
    return [1 / 0 for _ in prompts]


def one_too_few(prompts, responses):
    return [0.0] * (len(prompts) - 1)


def words(prompts, responses):
    return ["good" for _ in prompts]
