"""``peftlab profile``: the seed-004 AdamW anchor on DistilBERT-base, rSVD state beside it, FLOPs
against a hand count, and the files with their documented columns."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import QUICK
from peftlab.profiling import BREAKDOWN_COLUMNS, FLOPS_COLUMNS, OPTIMIZER_COLUMNS

DISTILBERT_PARAMS = 66_955_010


def _rows(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def test_distilbert_adamw_anchor_and_rsvd_ranks(tmp_path, capsys):
    from peftlab.cli import main

    out = tmp_path / "prof"
    rc = main(["profile", str(QUICK["cls"]), "--method=rsvd", "--model.name=distilbert-base-uncased", "--model.from_scratch=true",
               f"--output.dir={tmp_path / 'run'}", "--output-dir", str(out), "--batch-size", "1", "--seq-len", "8",
               "--rsvd.power_iters=0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "510.83" in printed
    cols, rows = _rows(out / "optimizer_memory_comparison.csv")
    assert cols == OPTIMIZER_COLUMNS
    total = {(r["method"], r["rank"]): r for r in rows if r["group"] == "total"}
    adam = total[("adamw", "")]
    assert int(adam["params"]) == DISTILBERT_PARAMS
    assert int(adam["moment_bytes"]) == DISTILBERT_PARAMS * 2 * 4
    assert float(adam["state_mb"]) == 510.83 == round(DISTILBERT_PARAMS * 8 / 2**20, 2)
    # rSVD at the seed's ranks: the projected matrices are the 36 attention/FFN weights of the 6 blocks
    # (4 of 768x768, 3072x768, 768x3072 per block); their state is 2 * max(m,n) * r + min(m,n) * r floats.
    per_rank_floats = 6 * (4 * (2 * 768 + 768) + 2 * (2 * 3072 + 768))
    proj = {r["rank"]: r for r in rows if r["method"] == "rsvd" and r["group"] == "projected"}
    assert sorted(int(k) for k in proj) == [4, 8, 16, 64, 128]
    for r, row in proj.items():
        assert int(row["moment_bytes"]) + int(row["projector_bytes"]) == per_rank_floats * int(r) * 4
        assert int(row["params"]) == 6 * (4 * 768 * 768 + 2 * 3072 * 768)
    for r in ("4", "8", "16", "64", "128"):
        assert 0 < float(total[("rsvd", r)]["state_mb"]) < 510.83
        assert float(total[("rsvd", r)]["savings_pct"]) > 0
    # FLOPs of the forward on 1 x 8 tokens, counted by hand: linear layers of the blocks, QK^T and AV,
    # pre_classifier and classifier on the [CLS] vector (2 FLOPs per multiply-add).
    _, flops = _rows(out / "flops_profiler_stats.csv")
    f = {(r["method"], r["rank"], r["phase"]): int(r["flops"]) for r in flops}
    tokens, L = 8, 8
    blocks = 2 * tokens * 6 * (4 * 768 * 768 + 2 * 768 * 3072)
    attention = 6 * 2 * (2 * L * L * 768)
    head = 2 * 768 * 768 + 2 * 768 * 2
    assert f[("adamw", "", "forward")] == blocks + attention + head
    assert f[("adamw", "", "backward")] == 2 * f[("adamw", "", "forward")]
    assert f[("rsvd", "16", "forward")] == f[("adamw", "", "forward")]
    # steady-state projection: G P^T and N P for each matrix, 2 * 2 * m * n * r FLOPs
    assert f[("rsvd", "16", "optimizer_step")] == 2 * 2 * 16 * 6 * (4 * 768 * 768 + 2 * 3072 * 768)
    assert f[("adamw", "", "optimizer_step")] == 0


def test_profile_files_and_columns_tiny(tmp_path, monkeypatch, capsys):
    from peftlab.config import load_config
    from peftlab.profiling import run_profile

    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICK["cls"], {"method": "rsvd", "rsvd.rank": 4, "rsvd.weight_reduction_rank": 8,
                                     "output.dir": str(tmp_path / "run"), "training.batch_size": 2})
    res = run_profile(cfg, ranks=[2], echo=True)
    out = Path("profiles") / "run-rsvd"  # by default outside the run directory that output.dir names
    assert res["output_dir"] == out and not (tmp_path / "run").exists()
    printed = capsys.readouterr().out
    assert "memory breakdown" in printed and "FLOPs of one training step" in printed and "optimizer_state" in printed
    for name, want in (("optimizer_memory_comparison.csv", OPTIMIZER_COLUMNS), ("memory_breakdown_r4.csv", BREAKDOWN_COLUMNS),
                       ("flops_profiler_stats.csv", FLOPS_COLUMNS)):
        cols, rows = _rows(out / name)
        assert cols == want and rows, name
    _, rows = _rows(out / "memory_breakdown_r4.csv")
    b = {(r["method"], r["component"]): int(r["bytes"]) for r in rows}
    # weight reduction: 4 FFN weights of 64x128 -> rank-8 factors; they need no gradient or state
    saved_params = 4 * (64 * 128 - 8 * (64 + 128))
    assert b[("adamw", "parameters")] - b[("rsvd", "parameters")] == saved_params * 4
    assert b[("rsvd", "gradients")] < b[("adamw", "gradients")]
    assert b[("rsvd", "optimizer_state")] < b[("adamw", "optimizer_state")]
    assert b[("rsvd", "activations")] > 0
    for m in ("rsvd", "adamw"):
        assert b[(m, "total")] == sum(b[(m, c)] for c in ("parameters", "gradients", "optimizer_state", "activations"))
    _, rows = _rows(out / "optimizer_memory_comparison.csv")
    assert {r["method"] for r in rows} == {"adamw", "rsvd"} and {r["rank"] for r in rows} == {"", "4", "2"}


def test_profile_rejects_bad_ranks(tmp_path):
    from peftlab.cli import main

    assert main(["profile", str(QUICK["cls"]), "--ranks", "4,x"]) == 2
    assert main(["profile", str(QUICK["cls"]), "--ranks", "0", f"--output.dir={tmp_path}"]) == 2


def test_attention_flops_of_grouped_query_attention():
    """torch 2.11's attention FLOP formulas assert equal query and key/value heads, so profiling a Qwen2.5 or Llama-3
    shape on a GPU failed; peftlab counts grouped-query attention as the kernel computes it, with the query's heads.
    Checked on a stand-in formula that refuses unequal heads as torch 2.11's does (this machine's torch may not)."""
    import torch

    from peftlab.profiling import _heads_expanded, flop_counter

    def strict(q, k, v, *rest, out_shape=None, **kw):  # torch 2.11's sdpa_flop_count, with its assertion
        assert q[0] == k[0] == v[0] and q[1] == k[1] == v[1], "sdpa_flop_count: query/key/value shapes are incompatible"
        return 4 * q[0] * q[1] * q[2] * k[2] * q[3]

    def registered(*args, out_val=None, **kw):  # what the registry holds: the formula behind torch's shape wrapper
        return strict(*args, out_shape=out_val, **kw)

    b, hq, hkv, s, d = 2, 8, 2, 128, 64
    q, kv = torch.Size((b, hq, s, d)), torch.Size((b, hkv, s, d))
    with pytest.raises(AssertionError):
        registered(q, kv, kv)
    f = _heads_expanded(registered)
    assert f(q, kv, kv, 0.0, True, out_shape=None) == 4 * b * hq * s * s * d  # QK^T and PV over all query heads
    assert f(q, q, q) == registered(q, q, q)  # equal heads: unchanged
    assert f(q, kv, kv, None, torch.Size((b, hq, s))) == 4 * b * hq * s * s * d  # a 3-d argument is left alone
    # only the (batch, heads, seq, dim) scaled-dot-product entries are replaced; the raw-tensor ones stay torch's
    aten = torch.ops.aten
    reg = flop_counter().flop_registry
    from torch.utils.flop_counter import flop_registry

    assert reg[aten._scaled_dot_product_flash_attention](q, kv, kv) == 4 * b * hq * s * s * d
    assert reg[aten._flash_attention_forward] is flop_registry[aten._flash_attention_forward]


def test_profile_per_rank_for_several_world_sizes_and_a_baseline_that_does_not_fit(tmp_path, monkeypatch, capsys):
    """`--world-size 1,2,8` writes one per-process file per world size and prints them side by side; an AdamW
    baseline that runs out of GPU memory (8B on one H200) is left out with a note and the method's rows stay."""
    import torch

    import peftlab.profiling as prof
    from peftlab.cli import main

    real_groups, real_build = prof.state_bytes_by_group, prof.build_bare_base
    built = []

    def adamw_does_not_fit(optimizer, *a, **k):  # after AdamW's forward, backward and step: gradients exist
        if sum(p.numel() for g in optimizer.param_groups for p in g["params"]) > 50_000:  # every weight: AdamW's
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_groups(optimizer, *a, **k)

    monkeypatch.setattr(prof, "state_bytes_by_group", adamw_does_not_fit)
    monkeypatch.setattr(prof, "build_bare_base", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    out = tmp_path / "p"
    assert main(["profile", str(QUICK["lm"]), "--ranks=none", "--system.sharding=fsdp", "--world-size", "1,2,8",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: the adamw baseline does not fit in the GPU's memory" in printed
    assert "over 1 / 2 / 8 process(es)" in printed and "world 8" in printed
    per = {}
    for w in (1, 2, 8):
        _, rows = _rows(out / f"memory_per_rank_fsdp_w{w}.csv")
        per[w] = {r["component"]: int(r["bytes"]) for r in rows}
        assert {r["source"] for r in rows if r["component"] == "activations"} == {"saved tensors"}  # CPU: not measured
    assert per[1]["parameters"] > per[2]["parameters"] > per[8]["parameters"]
    assert per[1]["activations"] == per[8]["activations"]
    _, rows = _rows(out / "optimizer_memory_comparison.csv")
    assert {r["method"] for r in rows} == {"lora"} and all(r["savings_pct"] == "" for r in rows)
    assert all(p.grad is None for p in built[0].parameters())  # AdamW ran in place on the base: its gradients are gone
    assert main(["profile", str(QUICK["lm"]), "--ranks=none", "--system.sharding=fsdp", "--world-size", "2,0"]) == 2


def test_profile_builds_the_base_as_the_run_does(tmp_path):
    """The profiled base has the run's gradient checkpointing: autograd then saves only the blocks' inputs."""
    from peftlab.config import load_config
    from peftlab.profiling import run_profile

    act = {}
    for gc in (False, True):
        cfg = load_config(QUICK["lm"], {"model.gradient_checkpointing": gc, "output.dir": str(tmp_path / "run")})
        res = run_profile(cfg, tmp_path / f"p{gc}", ranks=[], echo=False)
        act[gc] = next(r["bytes"] for r in res["breakdown"] if r["method"] == "lora" and r["component"] == "activations")
    assert act[True] < act[False] / 4
