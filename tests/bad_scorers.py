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


def needs_answer(prompts, responses, answer):
    """Reads the dataset's `answer` column (the test data has none): refused before any model loads."""
    return [float(r.strip() == str(a)) for r, a in zip(responses, answer)]


def takes_nothing(prompts):
    return [0.0 for _ in prompts]


def every_column(prompts, responses, **columns):
    """Takes every column of the dataset: returns how many it got, per response."""
    return [float(len(columns)) for _ in prompts]


def answer_and_maybe_topic(prompts, responses, answer, topic=None):
    """`topic` is a column it reads when the dataset has one (a list, one value per response), else None."""
    topics = topic or ["none"] * len(answer)
    return [float(str(a) in r) + 0.5 * (t != "none") for r, a, t in zip(responses, answer, topics)]


def wrong_answers(prompts, responses, answer):
    """The toy checker reversed (1 for a wrong answer): the learning test's broken variant, measured (an advantage
    whose sign is flipped, for std-normalised groups)."""
    from toy.arith import score

    return [1.0 - s for s in score(prompts, responses, answer)]
