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


_FILLER = ["i watched it on a rainy sunday with my brother", "the trailer had promised something else",
           "it runs a little over two hours", "i had read the book years ago", "the theatre was half empty",
           "a friend recommended it to me", "it is based on a true story", "the director made two films before this one"]


def review_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """IMDB-format rows: several sentences per review, ``<br /><br />`` between paragraphs
    as in the real files, label 0 (negative) / 1 (positive)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2 if rng.random() < 0.5 else 1 - i % 2
        words, other = (_POS, _NEG) if label == 1 else (_NEG, _POS)
        sents = []
        for _ in range(rng.randint(4, 8)):
            r = rng.random()
            if r < 0.35:
                sents.append(rng.choice(_FILLER))
            else:
                a, a2, a3 = rng.sample(words if r < 0.9 else other, 3)  # some sentences disagree, as reviews do
                sents.append(rng.choice(_FRAMES).format(n=rng.choice(_NOUNS), a=a, a2=a2, a3=a3))
        paras = [" ".join(s[0].upper() + s[1:] + "." for s in sents[j:j + 3]) for j in range(0, len(sents), 3)]
        rows.append(("<br /><br />".join(paras), label))
    return rows


_NEWS = {  # AG News classes in label order: 0 World, 1 Sports, 2 Business, 3 Sci/Tech
    0: (["Leaders", "Rebels", "Ministers", "Envoys", "Voters"], ["meet in", "clash near", "sign a treaty in", "hold talks in", "protest in"],
        ["Geneva", "the capital", "the border region", "Nairobi", "Brussels"], ["the ceasefire holds", "elections are due next month",
        "the united nations urged calm", "the talks ended without a deal"]),
    1: (["Striker", "Coach", "Champions", "Veteran pitcher", "Olympic team"], ["wins in", "loses in", "signs with", "returns to", "stuns rivals in"],
        ["the final", "overtime", "the league opener", "the semifinal", "extra innings"], ["the crowd cheered for ten minutes",
        "the title race is wide open", "he scored twice in the second half", "the season starts on saturday"]),
    2: (["Shares", "Oil prices", "Retailer", "Bank", "Carmaker"], ["rise after", "fall after", "cuts jobs after", "beats forecasts after", "slips after"],
        ["quarterly results", "the rate decision", "a merger bid", "weak sales", "the holiday season"], ["investors sold the stock",
        "profit rose eight percent", "analysts expect slower growth", "the dollar weakened"]),
    3: (["Software maker", "Scientists", "Chipmaker", "Space agency", "Researchers"], ["unveils", "tests", "patches", "launches", "delays"],
        ["a new processor", "the probe", "a security flaw", "an open source browser", "a faster network"], ["the update ships next week",
        "the study appears in a journal", "the satellite reached orbit", "the code is free to download"]),
}
_SOURCES = ["Reuters", "AP", "AFP", "Ziff Davis", "Sports Network"]


def news_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """AG-News-format rows: ``Title (Source) Source - description``, labels 0..3."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randrange(4) if rng.random() < 0.2 else i % 4
        subj, verb, obj, desc = _NEWS[label]
        src = rng.choice(_SOURCES)
        title = f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}"
        body = " ".join(s[0].upper() + s[1:] + "." for s in rng.sample(desc, 2))
        rows.append((f"{title} ({src}) {src} - {body}", label))
    return rows


_EMOTIONS = {  # TweetEval emotion classes in label order: 0 anger, 1 joy, 2 optimism, 3 sadness
    0: ["so angry about", "furious at", "sick of", "cannot stand", "outraged by"],
    1: ["so happy about", "loving", "laughing at", "having a blast with", "delighted by"],
    2: ["hopeful about", "things will get better with", "believe in", "looking forward to", "never give up on"],
    3: ["heartbroken about", "missing", "so sad about", "crying over", "lonely without"],
}
_TWEET_OBJECTS = ["the new season", "my team", "this weather", "the traffic", "monday", "my exams", "the concert", "grandma",
                  "the news today", "our trip"]
_TWEET_EXTRAS = ["", " #blessed", " #mood", " &amp; more", " http://t.co/{c}", " &lt;3", " <br>", " @user", "  !!", " www.example.com/{c}"]


def tweet_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """TweetEval-format rows (emotion subset): anonymised ``@user`` mentions, links, HTML
    entities and stray tags, which ``data.clean_text`` removes; labels 0..3."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randrange(4) if rng.random() < 0.2 else i % 4
        text = f"{rng.choice(_EMOTIONS[label])} {rng.choice(_TWEET_OBJECTS)}"
        if rng.random() < 0.5:
            text = "@user " + text
        for _ in range(rng.randint(0, 2)):
            text += rng.choice(_TWEET_EXTRAS).format(c="".join(rng.choice("abcdefXYZ0123") for _ in range(6)))
        rows.append((text, label))
    return rows


def _write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


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
    # IMDB, AG News and TweetEval samples have train and test files but no validation
    # file, as IMDB and AG News on the hub: loading them exercises validation carving.
    for task, make, sizes in (("imdb", review_rows, (300, 100)), ("ag_news", news_rows, (320, 80)),
                              ("tweet_eval", tweet_rows, (320, 80))):
        folder = out_dir / f"{task}_dataset"
        folder.mkdir(parents=True, exist_ok=True)
        for split, n, seed in (("train", sizes[0], 11), ("test", sizes[1], 12)):
            written.append(_write_csv(folder / f"{task}_{split}.csv", ["text", "label"], make(n, seed)))
    return written


if __name__ == "__main__":
    for p in generate_all():
        print(p)
