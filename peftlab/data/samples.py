"""Small offline samples in each task's format, generated deterministically.

These are NOT the real datasets: they are synthetic text written by a tiny template
grammar so that the quickstart, the tests and every task's code path run with no
network. Numbers measured on them say the plumbing works, nothing about the methods.
The files under ``peftlab/data/samples/`` are the output of :func:`generate_all`
(a test checks that regenerating them gives the same bytes).

    python -m peftlab.data.samples   # rewrite the shipped files
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

SAMPLES_DIR = Path(__file__).parent / "samples"

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird", "the farmer", "our neighbour",
             "the children", "a young girl", "the captain", "the baker"]
_VERBS = ["sees", "finds", "likes", "carries", "paints", "follows", "builds", "watches", "cleans", "remembers"]
_OBJECTS = ["the red ball", "a wooden box", "the long road", "a green apple", "the quiet river", "an old map",
            "the bright lamp", "a warm coat", "the tall tree", "a blue boat"]
_PLACES = ["in the morning", "near the house", "at the market", "by the sea", "after dinner", "in the garden",
           "before the rain", "on the hill"]
_TOPICS = {
    "weather": ["the rain falls on the roof", "the wind is cold today", "the sun comes out at noon", "clouds cover the hill"],
    "food": ["bread is baked every day", "the soup is hot", "we eat apples in autumn", "fresh milk comes from the farm"],
    "travel": ["the train leaves at nine", "the ship sails to the north", "we walk along the road", "the map shows the way"],
}

_POS = ["wonderful", "delightful", "moving", "brilliant", "charming", "funny", "beautiful", "smart", "gripping", "warm"]
_NEG = ["boring", "dull", "clumsy", "tedious", "awful", "flat", "messy", "lifeless", "predictable", "weak"]
_NOUNS = ["film", "movie", "story", "performance", "script", "cast", "ending", "direction", "soundtrack", "plot"]
_FRAMES = ["the {n} is {a}", "a {a} {n}", "what a {a} {n}", "the {n} feels {a} and {a2}", "i found the {n} {a}",
           "this {n} was {a} from start to finish", "{a} , {a2} and often {a3}", "an {a} little {n}"]


def lm_documents(n_docs: int = 240, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        topic = rng.choice(sorted(_TOPICS))
        for _ in range(rng.randint(3, 9)):
            if rng.random() < 0.3:
                s = rng.choice(_TOPICS[topic])
            else:
                s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}"
            sents.append(s[0].upper() + s[1:] + ".")
        docs.append(" ".join(sents))
    return docs


def sentiment_rows(n: int, seed: int, noise: float = 0.05) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = _POS if label == 1 else _NEG
        a, a2, a3 = rng.sample(words, 3)
        text = rng.choice(_FRAMES).format(n=rng.choice(_NOUNS), a=a, a2=a2, a3=a3)
        if rng.random() < noise:
            label = 1 - label
        rows.append((text, label))
    return rows


def generate_all(out_dir: Path = SAMPLES_DIR) -> list[Path]:
    """Write every sample; returns the files written."""
    written = []
    lm = out_dir / "lm-sample"
    lm.mkdir(parents=True, exist_ok=True)
    docs = lm_documents()
    for split, part in (("train", docs[:216]), ("validation", docs[216:])):
        p = lm / f"{split}.jsonl"
        p.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        written.append(p)
    sst = out_dir / "sst2_dataset"
    sst.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 800, 1), ("validation", 200, 2)):
        p = sst / f"sst2_{split}.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["sentence", "label"])
            w.writerows(sentiment_rows(n, seed))
        written.append(p)
    return written


if __name__ == "__main__":
    for p in generate_all():
        print(p)
