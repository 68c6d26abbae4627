"""training.group_by_length: which examples share a batch, and the evaluation order by length."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_cfg
from peftlab.data.batches import GROUP_BATCHES, EpochBatches, epoch_padding

N, B = 1000, 8
_rng = random.Random(3)
LENGTHS = [_rng.randint(5, 120) for _ in range(N)]


def _flat(batches, e=0, start=0):
    return [i for idx in batches.epoch(e, start) for i in idx]


def test_grouped_batches_cover_the_epoch_and_pad_less():
    grouped, plain = EpochBatches(N, B, 42, lengths=LENGTHS), EpochBatches(N, B, 42)
    g = _flat(grouped)
    assert len(g) == len(set(g)) == len(grouped) * B  # every example at most once, as many batches as before
    assert set(g) <= set(range(N))
    pad_g, _ = epoch_padding(N, B, 42, 1, LENGTHS, grouped=True)
    pad_p, _ = epoch_padding(N, B, 42, 1, LENGTHS, grouped=False)
    assert pad_g < pad_p / 10, (pad_g, pad_p)
    # inside a batch the lengths are close: each batch is a slice of a sorted run of GROUP_BATCHES * B examples
    spread = [max(LENGTHS[i] for i in idx) - min(LENGTHS[i] for i in idx) for idx in grouped.epoch(0)]
    assert sorted(spread)[len(spread) // 2] <= 3
    # without lengths the order is the plain seeded permutation, as before the option existed
    g0 = torch.Generator().manual_seed(42 * 100_003)
    assert _flat(plain) == torch.randperm(N, generator=g0).tolist()[:len(plain) * B]


def test_grouped_batches_are_shuffled_not_a_length_curriculum():
    """Batch order is shuffled: the batch's length does not follow the step (and with it the learning rate)."""
    mean_len = [sum(LENGTHS[i] for i in idx) / B for idx in EpochBatches(N, B, 42, lengths=LENGTHS).epoch(0)]
    first, second = mean_len[:len(mean_len) // 2], mean_len[len(mean_len) // 2:]
    assert abs(sum(first) / len(first) - sum(second) / len(second)) < 10
    steps = torch.arange(len(mean_len), dtype=torch.float64)
    assert abs(torch.corrcoef(torch.stack([steps, torch.tensor(mean_len, dtype=torch.float64)]))[0, 1]) < 0.3


def test_grouped_batches_are_seeded_resumable_and_independent_of_the_process_count():
    a = EpochBatches(N, B, 42, lengths=LENGTHS)
    assert _flat(a) == _flat(EpochBatches(N, B, 42, lengths=LENGTHS))
    assert _flat(a, e=1) != _flat(a, e=0) and _flat(EpochBatches(N, B, 7, lengths=LENGTHS)) != _flat(a)
    assert _flat(a, start=5) == _flat(a)[5 * B:]  # resume mid-epoch: the remaining batches of the same order
    # two processes with batch B/2 see exactly the global batches of one process with batch B
    two = [list(EpochBatches(N, B // 2, 42, r, 2, lengths=LENGTHS).epoch(0)) for r in range(2)]
    assert [x + y for x, y in zip(*two)] == list(a.epoch(0))
    with pytest.raises(ValueError, match="lengths"):
        EpochBatches(N, B, 42, lengths=LENGTHS[:-1])
    assert GROUP_BATCHES * B < N  # the test above spans several sorted runs


def test_group_by_length_trains_and_is_deterministic(tmp_path, run_train):
    kw = dict(training__group_by_length=True, training__max_steps=6)
    a = run_train(make_cfg(tmp_path / "a", "cls", **kw))
    b = run_train(make_cfg(tmp_path / "b", "cls", **kw))
    c = run_train(make_cfg(tmp_path / "c", "cls", training__max_steps=6))
    assert a["final"] == b["final"] and a["final"]["train_loss"] != c["final"]["train_loss"]
    log = (tmp_path / "a/run/train.log").read_text()
    assert "training.group_by_length: epoch 1 pads" in log


def test_evaluation_by_length_gives_the_metrics_of_one_example_at_a_time(tmp_path):
    """evaluate() batches validation examples longest first; its metrics equal those of batches of one (no padding)."""
    from peftlab.build import build
    from peftlab.evaluation import evaluate

    cfg = make_cfg(tmp_path, "cls")
    b = build(cfg, optimizer=False)
    lengths = b.val_ds.lengths()
    assert len(set(lengths)) > 1, "the sample needs examples of different lengths"
    got = evaluate(b.model, b.val_ds, b.collate, cfg, "classification", b.num_labels, torch.device("cpu"))
    losses, right = [], 0
    b.model.eval()
    with torch.no_grad():  # one example at a time: no padding, the reference
        for i in range(len(b.val_ds)):
            out = b.model(**b.collate([b.val_ds[i]]))
            losses.append(out.loss.double().item())
            right += int(out.logits.argmax(-1).item() == b.val_ds[i]["labels"])
    assert got["val_accuracy"] == pytest.approx(right / len(b.val_ds), abs=1e-12)
    assert got["val_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
