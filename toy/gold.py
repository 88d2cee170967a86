"""Gold scorer of the toy assistant-dialogue task: the "true" quality of a response.

The reward model is trained on pairs labelled by this scorer, so it only approximates it;
logging both shows reward over-optimisation. It is also an example of a scoring-function
reward: pass `--reward-model toy.gold:score` (or `--eval-reward toy.gold:score`).

A good response is polite, names up to three things that belong to the prompt's topic,
mentions nothing from other topics, never repeats itself, stays short, ends with a full
stop or closing line, and is not rude.
"""

import re

TOPICS = {
    "cooking": ["salt", "oven", "garlic", "onion", "pan", "recipe"],
    "gardening": ["soil", "seeds", "compost", "roots", "sunlight", "weeds"],
    "running": ["shoes", "pace", "stretching", "miles", "hills", "breathing"],
    "music": ["scales", "rhythm", "guitar", "chords", "melody", "metronome"],
    "travel": ["passport", "luggage", "tickets", "hotel", "map", "train"],
    "money": ["savings", "budget", "receipts", "interest", "bills", "taxes"],
    "sleep": ["pillow", "bedtime", "alarm", "caffeine", "darkness", "naps"],
    "chess": ["pawns", "bishop", "castling", "openings", "endgame", "knight"],
}
WORD_TOPIC = {w: t for t, words in TOPICS.items() for w in words}
POLITE_OPENERS = ["sure!", "happy to help!", "great question!"]
RUDE_OPENERS = ["ugh, fine.", "that is a silly question.", "whatever."]
RUDE_WORDS = {"ugh", "silly", "whatever", "dumb"}
CLOSINGS = ["hope this helps!", "good luck!", "have fun!"]
MAX_WORDS = 24


def prompt_topic(prompt: str | list[dict]) -> str | None:
    """The topic named in the last human turn of the prompt (HH text or a list of chat messages), or None."""
    if isinstance(prompt, list):
        last_turn = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "").lower()
    else:
        last_turn = prompt.rsplit("Human:", 1)[-1].lower()
    for topic in TOPICS:
        if topic in last_turn:
            return topic
    return None


def _sentences(text: str) -> list[str]:
    return [s.strip() + p for s, p in re.findall(r"([^.!?]+)([.!?]|$)", text) if s.strip()]


def score_one(prompt: str | list[dict], response: str) -> float:
    topic = prompt_topic(prompt)
    text = response.strip().lower()
    words = re.findall(r"[a-z']+", text)
    sentences = _sentences(text)
    on_topic = {w for w in words if WORD_TOPIC.get(w) == topic}
    off_topic = {w for w in words if w in WORD_TOPIC and WORD_TOPIC[w] != topic}
    score = 1.0 * min(len(on_topic), 3) - 1.0 * len(off_topic)
    score -= 1.5 * sum(w in RUDE_WORDS for w in words)
    score += 0.5 * bool(sentences and sentences[0] in POLITE_OPENERS)
    score += 0.5 * bool(sentences and sentences[-1] in CLOSINGS)
    score -= 1.0 * (len(sentences) - len(set(sentences)))  # repeated sentences
    score -= 0.1 * max(0, len(words) - MAX_WORDS)  # rambling
    score -= 1.0 * (not text.endswith((".", "!", "?")))  # cut off mid-sentence
    return score


def score(prompts: list[str] | list[list[dict]], responses: list[str]) -> list[float]:
    """Scoring-function reward interface: (prompts, responses) -> one float each. A prompt is the dataset's: HH text
    or, for a conversational dataset, its list of {"role", "content"} messages."""
    return [score_one(p, r) for p, r in zip(prompts, responses, strict=True)]
