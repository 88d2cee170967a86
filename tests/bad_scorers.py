"""Scoring functions that misbehave, for the one-line error tests (and one that does not)."""


def raises(prompts, responses):
    return [1 / 0 for _ in prompts]


def one_too_few(prompts, responses):
    return [0.0] * (len(prompts) - 1)


def words(prompts, responses):
    return ["good" for _ in prompts]


def response_length(prompts, responses):
    """A well-behaved one: a float per response."""
    return [float(len(r)) for r in responses]
