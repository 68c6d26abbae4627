"""Classification tasks: local layouts, carving, k-shot, cleaning, samples, bad data, `data prepare` CSVs."""

from __future__ import annotations

import shutil
from collections import Counter

import pandas as pd
import pytest

from peftlab.data import SAMPLES_DIR, load_raw
from peftlab.data.clean import clean_text
from peftlab.data.splits import k_shot, stratified_split
from peftlab.data.tasks import TASKS
from peftlab.errors import PeftlabError

from conftest import make_cfg

FULL = {"data__max_train_examples": None, "data__max_val_examples": None}


def _cfg(tmp_path, **kw):
    return make_cfg(tmp_path, "cls", **{**FULL, **kw})


def test_samples_regenerate_byte_identical(tmp_path):
    from peftlab.data.samples import generate_all

    written = generate_all(tmp_path)
    assert {p.parent.name for p in written} == {"lm-sample", "sst2_dataset", "imdb_dataset", "ag_news_dataset", "tweet_eval_dataset"}
    for p in written:
        shipped = SAMPLES_DIR / p.relative_to(tmp_path)
        assert shipped.read_bytes() == p.read_bytes(), f"{shipped} differs from a fresh generate_all()"
    # IMDB, AG News and TweetEval samples ship no validation file, so loading them carves one.
    for task in ("imdb", "ag_news", "tweet_eval"):
        assert sorted(f.name for f in (SAMPLES_DIR / f"{task}_dataset").iterdir()) == [f"{task}_test.csv", f"{task}_train.csv"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_loads_from_local_files(tmp_path, task):
    spec = TASKS[task]
    data_dir = tmp_path / "data"
    shutil.copytree(SAMPLES_DIR / f"{task}_dataset", data_dir / f"{task}_dataset")  # the seed-002 layout
    train_csv = pd.read_csv(data_dir / f"{task}_dataset" / f"{task}_train.csv")
    assert list(train_csv.columns) == [spec.text_column, "label"]
    raw = load_raw(_cfg(tmp_path, data__dataset=task, data__data_dir=str(data_dir)))
    assert raw.task == "classification" and raw.name == task
    assert raw.num_labels == spec.num_labels and raw.label_names == list(spec.label_names)
    assert raw.info["text_column"] == spec.text_column and raw.info["label_column"] == "label"
    # Every training row ends up in train or (carved) validation, with its own label.
    pairs = Counter(zip(raw.train["text"], raw.train["label"]))
    if spec.has_validation and task != "tweet_eval":
        val_csv = pd.read_csv(data_dir / f"{task}_dataset" / f"{task}_validation.csv")
        assert raw.val["text"] == val_csv[spec.text_column].tolist()
        assert "validation" not in raw.info
    else:
        pairs += Counter(zip(raw.val["text"], raw.val["label"]))
        assert "carved" in raw.info["validation"]
        assert raw.test is not None and len(raw.test["label"]) == len(pd.read_csv(data_dir / f"{task}_dataset" / f"{task}_test.csv"))
    assert pairs == Counter(zip(train_csv[spec.text_column], train_csv["label"]))
    assert set(raw.train["label"]) == set(range(spec.num_labels))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_sample_names_resolve(tmp_path, task):
    raw = load_raw(_cfg(tmp_path, data__dataset=f"{task}-sample"))
    assert raw.name == f"{task}-sample" and raw.num_labels == TASKS[task].num_labels
    assert "not the real dataset" in raw.info["source"]


def test_stratified_split_hand_worked():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    keep, held = stratified_split(labels, 0.1, seed=7)
    assert Counter(labels[i] for i in held) == {0: 5, 1: 3, 2: 2}  # 10% of each class
    assert set(keep).isdisjoint(held) and sorted(keep + held) == list(range(100))
    assert (keep, held) == stratified_split(labels, 0.1, seed=7)
    assert held != stratified_split(labels, 0.1, seed=8)[1]
    # a class of one example stays in train; a class of two gives one to validation
    keep, held = stratified_split([0, 1, 1, 2, 2, 2], 0.1, seed=0)
    assert Counter([0, 1, 1, 2, 2, 2][i] for i in held) == {1: 1, 2: 1}


def test_carved_validation_is_stratified_disjoint_and_seed_stable(tmp_path):
    a = load_raw(_cfg(tmp_path, data__dataset="ag_news-sample"))
    b = load_raw(_cfg(tmp_path, data__dataset="ag_news-sample"))
    c = load_raw(_cfg(tmp_path, data__dataset="ag_news-sample", data__split_seed=1))
    assert a.val == b.val and a.train == b.train
    assert a.val != c.val
    full = Counter(a.train["label"]) + Counter(a.val["label"])
    val = Counter(a.val["label"])
    for y, n in full.items():
        assert val[y] == max(1, round(n * 0.1)), (y, n, val[y])
    # disjoint and complete: every source row is in exactly one of the two splits
    src = pd.read_csv(SAMPLES_DIR / "ag_news_dataset" / "ag_news_train.csv")
    assert Counter(zip(a.train["text"], a.train["label"])) + Counter(zip(a.val["text"], a.val["label"])) == Counter(zip(src["text"], src["label"]))
    assert a.info["val_size"] == len(a.val["label"]) and a.info["train_size"] == len(a.train["label"])


@pytest.mark.parametrize("k", [16, 64])
def test_k_shot_has_exactly_k_per_class(tmp_path, k):
    raw = load_raw(_cfg(tmp_path, data__dataset="ag_news-sample", data__train_samples=k))
    assert Counter(raw.train["label"]) == {y: k for y in range(4)}
    again = load_raw(_cfg(tmp_path, data__dataset="ag_news-sample", data__train_samples=k))
    assert raw.train == again.train
    full = load_raw(_cfg(tmp_path, data__dataset="ag_news-sample"))
    assert raw.val == full.val  # k-shot does not change the carved validation set
    assert not (Counter(raw.train["text"]) - Counter(full.train["text"]))  # drawn from the training part only


def test_k_shot_too_large_is_an_error():
    with pytest.raises(PeftlabError, match="per class but some classes have fewer"):
        k_shot([0, 0, 0, 1], 2, seed=0)
    labels = [0, 1] * 10
    picked = k_shot(labels, 3, seed=5)
    assert Counter(labels[i] for i in picked) == {0: 3, 1: 3} and picked == k_shot(labels, 3, seed=5)


def test_clean_text_hand_worked():
    assert clean_text("@user I &lt;3 this&amp;that<br />so much http://t.co/abc   www.x.org/y !") == "[USER] I <3 this&that so much [URL] [URL] !"
    assert clean_text("<b>Bold</b>\n\n  move @Bob_99, see HTTPS://a.b/c?d=1") == "Bold move [USER], see [URL]"
    assert clean_text("  plain text  ") == "plain text"


def test_clean_text_option_applies_to_any_task(tmp_path):
    dirty = load_raw(_cfg(tmp_path, data__dataset="tweet_eval-sample"))
    assert any("&amp;" in t or "http" in t or "@user" in t for t in dirty.train["text"])
    assert "clean_text" in dirty.info["hint"]
    raw = load_raw(_cfg(tmp_path, data__dataset="tweet_eval-sample", data__clean_text=True))
    for split in (raw.train, raw.val, raw.test):
        assert not any("&amp;" in t or "http" in t or "www." in t or "@user" in t or "<br>" in t for t in split["text"])
    assert any("[USER]" in t for t in raw.train["text"]) and any("[URL]" in t for t in raw.train["text"])
    assert raw.val["label"] == dirty.val["label"]  # cleaning does not move examples between splits
    imdb = load_raw(_cfg(tmp_path, data__dataset="imdb-sample", data__clean_text=True))
    assert not any("<br" in t for t in imdb.train["text"])


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_missing_columns_name_the_columns_found(tmp_path):
    _write(tmp_path / "d" / "imdb_dataset" / "imdb_train.csv", "review,sentiment\ngood,1\nbad,0\n")
    with pytest.raises(PeftlabError, match=r"columns found: review, sentiment"):
        load_raw(_cfg(tmp_path, data__dataset="imdb", data__data_dir=str(tmp_path / "d")))
    f = _write(tmp_path / "t.csv", "body,label\nx,0\ny,1\n")
    with pytest.raises(PeftlabError, match=r"no text column .*columns found: body, label"):
        load_raw(_cfg(tmp_path, data__dataset=str(f)))


def test_labels_outside_range_are_rejected(tmp_path):
    _write(tmp_path / "d" / "sst2_dataset" / "sst2_train.csv", "sentence,label\ngood,1\nbad,0\nodd,2\n")
    with pytest.raises(PeftlabError, match=r"labels must lie in 0\.\.1 for 2 classes, found 0\.\.2"):
        load_raw(_cfg(tmp_path, data__dataset="sst2", data__data_dir=str(tmp_path / "d")))
    _write(tmp_path / "e" / "ag_news_dataset" / "ag_news_train.csv", "text,label\na,0\nb,1\nc,2\nd,3\n")
    _write(tmp_path / "e" / "ag_news_dataset" / "ag_news_validation.csv", "text,label\na,0\nb,7\n")
    with pytest.raises(PeftlabError, match=r"validation split .* labels outside 0\.\.3: \[7\]"):
        load_raw(_cfg(tmp_path, data__dataset="ag_news", data__data_dir=str(tmp_path / "e")))


def test_empty_files_are_rejected(tmp_path):
    _write(tmp_path / "d" / "sst2_dataset" / "sst2_train.csv", "")
    with pytest.raises(PeftlabError, match="is empty"):
        load_raw(_cfg(tmp_path, data__dataset="sst2", data__data_dir=str(tmp_path / "d")))
    f = _write(tmp_path / "h.csv", "text,label\n")
    with pytest.raises(PeftlabError, match="has column\\(s\\) text, label but no rows"):
        load_raw(_cfg(tmp_path, data__dataset=str(f)))
    with pytest.raises(PeftlabError, match="No training file for task 'imdb'"):
        load_raw(_cfg(tmp_path, data__dataset="imdb", data__data_dir=str(tmp_path / "nothing")))


def test_openwebtext_asks_for_prepare(tmp_path):
    with pytest.raises(PeftlabError, match="peftlab data prepare openwebtext --output-dir"):
        load_raw(make_cfg(tmp_path, "lm", data__dataset="openwebtext"))


def test_hub_name_detection():
    from peftlab.hub import looks_like_name as _looks_like_hub_name

    assert _looks_like_hub_name("tweet_eval:sentiment") and _looks_like_hub_name("stanfordnlp/imdb")
    assert not _looks_like_hub_name("/no/such/file.csv")
    assert not _looks_like_hub_name("data/x.jsonl")
    assert not _looks_like_hub_name("./rel")


def test_cli_prepare_writes_the_local_layout(tmp_path, capsys):
    from peftlab.cli import main

    out = tmp_path / "data"
    assert main(["data", "prepare", "imdb-sample", "--output-dir", str(out)]) == 0
    assert "no validation split" in capsys.readouterr().out
    folder = out / "imdb_dataset"
    assert sorted(p.name for p in folder.iterdir()) == ["imdb_test.csv", "imdb_train.csv"]
    assert (folder / "imdb_train.csv").read_bytes() == (SAMPLES_DIR / "imdb_dataset" / "imdb_train.csv").read_bytes()
    assert main(["data", "prepare", "imdb-sample", "--output-dir", str(out)]) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    # sst2 keeps its own column name and its validation split; the written layout loads back the same
    assert main(["data", "prepare", "sst2-sample", "--output-dir", str(out)]) == 0
    a = load_raw(_cfg(tmp_path, data__dataset="sst2", data__data_dir=str(out)))
    b = load_raw(_cfg(tmp_path, data__dataset="sst2-sample"))
    assert (a.train, a.val, a.num_labels) == (b.train, b.val, b.num_labels)
    # a local table with string labels: written with integer labels, loadable as a folder
    f = _write(tmp_path / "reviews.csv", "text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n")
    assert main(["data", "prepare", str(f), "--output-dir", str(out)]) == 0
    written = pd.read_csv(out / "reviews_dataset" / "reviews_train.csv")
    assert written["label"].tolist() == [1, 0, 1, 0]


def test_training_on_a_carved_four_class_sample(tmp_path, run_train):
    cfg = make_cfg(tmp_path, "cls", data__dataset="ag_news-sample", data__train_samples=16, training__max_steps=3,
                   data__max_val_examples=32)
    res = run_train(cfg)
    assert res["status"] == "completed"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "carved" in log and "k_shot: 16 examples per class (64 in all" in log
