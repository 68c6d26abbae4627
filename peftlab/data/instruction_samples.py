"""Offline instruction-tuning samples (``instruct-sample``, ``chat-sample``), generated deterministically.

Small synthetic tasks with a clear, learnable structure (numbers in words, sorting,
reversing, arithmetic, plurals, opposites, spelling, capitals, word counts), each asked
in several phrasings, so that a short LoRA run visibly lowers the response loss and a
person can read whether generations got better. They are NOT a real instruction corpus:
numbers measured on them say the plumbing works, nothing about the methods.

    python -m peftlab.data.instruction_samples   # rewrite the shipped files

``instruct-sample`` holds Alpaca-style records (``instruction``, ``input`` (may be empty),
``output``); ``chat-sample`` holds ``messages`` lists (``role``/``content``; some with a
system message, some with two user/assistant exchanges). A test checks that
regenerating them gives the shipped bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SAMPLES_DIR = Path(__file__).parent / "samples"

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORDS = ["apple", "river", "stone", "garden", "window", "candle", "forest", "pencil", "basket", "rocket", "mirror",
          "ladder", "island", "planet", "button", "bridge", "pocket", "shadow", "tiger", "violin"]
_PLURALS = {"box": "boxes", "city": "cities", "leaf": "leaves", "child": "children", "mouse": "mice", "bus": "buses",
            "berry": "berries", "knife": "knives", "foot": "feet", "tooth": "teeth", "dish": "dishes", "baby": "babies",
            "wolf": "wolves", "man": "men", "glass": "glasses", "story": "stories", "car": "cars", "book": "books",
            "fox": "foxes", "goose": "geese"}
_OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "early": "late", "happy": "sad", "light": "dark",
              "open": "closed", "full": "empty", "strong": "weak", "high": "low", "old": "new", "wet": "dry",
              "loud": "quiet", "hard": "soft", "rich": "poor", "near": "far"}
_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Egypt": "Cairo",
             "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens",
             "Portugal": "Lisbon", "Poland": "Warsaw", "Chile": "Santiago", "Ireland": "Dublin", "Austria": "Vienna"}
_SENTENCES = ["the cat sleeps on the warm mat", "we walked to the old bridge", "a small bird sings in the tree",
              "the train leaves at nine", "my sister paints a blue boat", "rain falls on the quiet river",
              "the baker makes fresh bread", "children play in the garden", "the lamp is bright tonight",
              "our neighbour builds a wooden box"]


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000 (``347`` -> ``three hundred forty-seven``)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def _task(rng: random.Random) -> tuple[str, str, str]:
    """One ``(instruction, input, output)`` triple of a randomly chosen task."""
    kind = rng.randrange(9)
    if kind == 0:
        n = rng.randrange(1, 1000)
        q = rng.choice(["Write the number {n} in words.", "Spell out {n} in English words.", "How do you write {n} in words?"])
        return q.format(n=n), "", number_words(n)
    if kind == 1:
        xs = rng.sample(range(1, 100), rng.randint(3, 6))
        q = rng.choice(["Sort these numbers from smallest to largest.", "Put the numbers in ascending order."])
        return q, " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))
    if kind == 2:
        ws = rng.sample(_WORDS, rng.randint(3, 5))
        q = rng.choice(["Reverse the order of these words.", "List the words in reverse order."])
        return q, ", ".join(ws), ", ".join(reversed(ws))
    if kind == 3:
        a, b = rng.randrange(10, 90), rng.randrange(10, 90)
        q = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."])
        return q.format(a=a, b=b), "", f"{a} + {b} = {a + b}."
    if kind == 4:
        w = rng.choice(sorted(_PLURALS))
        q = rng.choice(["Give the plural of the word '{w}'.", "What is the plural of '{w}'?"])
        return q.format(w=w), "", f"The plural of {w} is {_PLURALS[w]}."
    if kind == 5:
        w = rng.choice(sorted(_OPPOSITES))
        q = rng.choice(["What is the opposite of '{w}'?", "Name the antonym of '{w}'."])
        return q.format(w=w), "", f"The opposite of {w} is {_OPPOSITES[w]}."
    if kind == 6:
        w = rng.choice(_WORDS)
        q = rng.choice(["Spell the word '{w}' letter by letter.", "Spell '{w}' with dashes between the letters."])
        return q.format(w=w), "", "-".join(w)
    if kind == 7:
        c = rng.choice(sorted(_CAPITALS))
        q = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}."])
        return q.format(c=c), "", f"The capital of {c} is {_CAPITALS[c]}."
    s = rng.choice(_SENTENCES)
    if rng.random() < 0.5:
        return "How many words are in this sentence?", s, f"There are {len(s.split())} words."
    return "Rewrite this sentence in capital letters.", s, s.upper()


def instruction_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [dict(zip(("instruction", "input", "output"), _task(rng))) for _ in range(n)]


def _user_text(instruction: str, inp: str) -> str:
    return f"{instruction}\n\n{inp}" if inp else instruction


def chat_records(n: int, seed: int) -> list[dict]:
    """Conversations: one or two user/assistant exchanges, a third with a system message."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(["You answer briefly and exactly.", "You are a careful assistant."])})
        for _ in range(1 if rng.random() < 0.7 else 2):
            ins, inp, resp = _task(rng)
            msgs += [{"role": "user", "content": _user_text(ins, inp)}, {"role": "assistant", "content": resp}]
        out.append({"messages": msgs})
    return out


def generate(out_dir: Path = SAMPLES_DIR) -> list[Path]:
    """Write ``instruct-sample/`` and ``chat-sample/`` (train.jsonl, validation.jsonl); returns the files."""
    written = []
    for name, make, sizes in (("instruct-sample", instruction_records, (400, 40)), ("chat-sample", chat_records, (300, 30))):
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, n, seed in (("train", sizes[0], 101), ("validation", sizes[1], 102)):
            p = folder / f"{split}.jsonl"
            p.write_text("".join(json.dumps(r) + "\n" for r in make(n, seed)))
            written.append(p)
    return written


if __name__ == "__main__":
    for p in generate():
        print(p)
