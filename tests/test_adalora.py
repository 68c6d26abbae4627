"""AdaLoRA: the loop drives peft's budget schedule (update_and_allocate after every optimizer step)."""

from __future__ import annotations

import json

import pytest

from conftest import make_cfg


def test_the_loop_prunes_to_the_budget_and_records_the_mask(tmp_path, run_train):
    cfg = make_cfg(tmp_path, method="adalora", adalora__init_r=6, adalora__target_r=3, training__max_steps=6,
                   training__batch_size=4, data__max_train_examples=48, training__learning_rate=3e-3)
    res = run_train(cfg)
    structure = json.loads((tmp_path / "run" / "method.json").read_text())
    assert structure["total_step"] == 6 and structure["rank_pattern"]
    kept = [sum(mask) for mask in structure["rank_pattern"].values()]
    assert sum(kept) == 3 * len(kept)  # the final budget: target_r per adapted weight on average
    assert sum(res["method_summary"]["adalora_ranks"].values()) == sum(kept)
    history = json.loads((tmp_path / "run" / "training_history.json").read_text())
    assert history["effective_params"][-1] < history["trainable_params"][-1]


def test_allocator_state_round_trips(tmp_path):
    import torch

    from peftlab.build import build

    cfg = make_cfg(tmp_path, method="adalora", training__max_steps=4, training__batch_size=4, data__max_train_examples=48)
    b = build(cfg)
    batch = next(iter(b.method.ctx.train_batches()))
    b.model(**batch).loss.backward()
    b.optimizer.step()
    b.method.after_optimizer_step(b.model, 1e-3)
    state = b.method.state_dict()
    assert state["steps"] == 1 and state["exp_avg_ipt"]
    other = build(cfg)
    other.method.load_state_dict(state)
    alloc = other.model.base_model.rankallocator
    assert other.method.steps == 1
    assert all(torch.equal(alloc.exp_avg_unc[k], v) for k, v in state["exp_avg_unc"].items())


def test_bad_schedules_are_refused(tmp_path):
    from peftlab.build import build
    from peftlab.errors import ConfigError, PeftlabError

    with pytest.raises(ConfigError, match=r"adalora.target_r=8` is above `adalora.init_r=4`.*--adalora.init_r"):
        make_cfg(tmp_path, method="adalora", adalora__init_r=4)
    with pytest.raises(PeftlabError, match=r"adalora.tinit \(10\).*below the run's 4 optimizer steps"):
        build(make_cfg(tmp_path, method="adalora", adalora__tinit=10, training__max_steps=4, training__batch_size=4,
                       data__max_train_examples=48), optimizer=False)


def test_validation_loss_is_the_task_loss_without_the_orthogonality_penalty(tmp_path):
    """peft's AdaLoraModel adds 0.5 x its orthogonality penalty to the model's ``loss`` whenever labels are given, in
    evaluation too: peftlab's classification val_loss was that sum (2.19 on the quickstart classifier, where a
    two-class cross-entropy is about 0.69). It is now the cross-entropy of the logits, as for every other method."""
    import torch

    from peftlab.build import build
    from peftlab.evaluation import evaluate

    cfg = make_cfg(tmp_path, "cls", method="adalora", training__max_steps=4, data__max_val_examples=24)
    b = build(cfg)
    got = evaluate(b.model, b.val_ds, b.collate, cfg, b.task, b.num_labels, "cpu")["val_loss"]
    b.model.eval()
    batch = b.collate([b.val_ds[i] for i in range(len(b.val_ds))])
    with torch.no_grad():
        out = b.model(**batch)
    ce = torch.nn.functional.cross_entropy(out.logits.double(), batch["labels"]).item()
    assert out.loss.item() > ce + 0.1  # the model's loss carries the penalty (A and B start far from orthonormal)
    assert got == pytest.approx(ce, rel=1e-6)
