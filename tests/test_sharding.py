"""``system.sharding=fsdp`` (FSDP2 ``fully_shard``) on CPU processes over gloo: per-step parity
with one unsharded process for every method that shards, in ONE torchrun launch (a launch costs
far more than the few steps of a case; see tests/test_distributed.py for the same pattern), and
the refusal of rSVD-Adam.

Tolerance (fp32): the per-step losses of 2 (and 4) sharded processes at batch 4 (2) equal those
of one unsharded process at batch 8 to 1e-5 absolute; only the order of the sums differs
(gradients all-reduced or reduce-scattered across the processes, batch means of 4 + 4 examples).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICKSTART, free_port, multiprocess_args, step_losses

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = QUICKSTART
COMMON = multiprocess_args(max_steps=6, save_steps=3)
# name: (quickstart config, method, its settings)
CASES = {
    "lora": ("lm", "lora", []),
    "dora": ("lm", "dora", []),
    "sora": ("lm", "sora", ["--sora.lambda=1.0", "--sora.gate_lr=0.05"]),
    "sdora": ("cls", "sdora", ["--sora.lambda=1.0", "--sora.gate_lr=0.05", "--data.max_length=32"]),
    "ba_lora": ("lm", "ba_lora", ["--ba_lora.gradient_samples=32", "--ba_lora.use_warmstart=true"]),
    "sublora-learned": ("lm", "sublora", ["--sublora.intrinsic_dim=64", "--sublora.allocation_mode=learned",
                                          "--sublora.gating_lr=0.5", "--training.learning_rate=0.05"]),
    "full": ("lm", "full", ["--training.learning_rate=1e-3"]),
    # the frozen base in bf16 (the CUDA default, model.base_dtype=auto) beside float32 adapters, sharded
    "lora-bf16-base": ("lm", "lora", ["--system.dtype=bf16", "--model.base_dtype=bfloat16"]),
}
TOL = 1e-5
# Runs on every rank: each case in turn, each rank's exit status in status/<case>.rank<r>.
DRIVER = """
import json, os, sys, traceback
from pathlib import Path

from peftlab.cli import main

runs = json.loads(Path(sys.argv[1]).read_text())
status = Path(sys.argv[2])
for name, run in runs.items():
    os.environ.update(run.get("env", {}))  # e.g. the SIGKILL in the middle of a save (checkpoints._fault_point)
    try:
        rc = main(run["argv"])
    except BaseException:
        traceback.print_exc()
        rc = "exception"
    (status / f"{name}.rank{os.environ['RANK']}").write_text(str(rc))
"""


def _argv(name: str, out: Path, batch_size: int, sharding: str) -> list[str]:
    kind, method, extra = CASES[name]
    return ["train", str(CONFIGS[kind]), *COMMON, f"--method={method}", *extra, f"--output.dir={out}",
            f"--training.batch_size={batch_size}", f"--system.sharding={sharding}"]


def launch(root: Path, nproc: int, runs: dict) -> subprocess.CompletedProcess:
    """Every run of ``runs`` (name -> argv, or {"argv": ..., "env": {...}}) in turn on ``nproc`` gloo
    processes, in one torchrun launch."""
    (root / "status").mkdir(parents=True, exist_ok=True)
    (root / "driver.py").write_text(DRIVER)
    (root / "runs.json").write_text(json.dumps({n: r if isinstance(r, dict) else {"argv": r} for n, r in runs.items()}))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))  # this checkout's peftlab
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                           str(root / "driver.py"), str(root / "runs.json"), str(root / "status")],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Every case sharded over N gloo processes at batch 8/N each, one torchrun launch per N (made when first asked)."""
    made: dict[int, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(nproc: int):
        if nproc not in made:
            root = tmp_path_factory.mktemp(f"fsdp{nproc}")
            runs: dict = {name: _argv(name, root / name, 8 // nproc, "fsdp") for name in CASES}
            if nproc == 2:  # last, since it ends the launch: full fine-tuning SIGKILLed in the middle of its final save
                runs["killed"] = {"argv": _argv("full", root / "killed", 4, "fsdp"), "env": {"PEFTLAB_TEST_KILL_DURING_SAVE": "epoch-1"}}
            made[nproc] = root, launch(root, nproc, runs)
        return made[nproc]

    return get


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The unsharded 1-process reference of a case at batch 8 (trained once, in this process)."""
    from peftlab.cli import main

    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp("one") / name
            assert main(_argv(name, out, 8, "none")) == 0
            made[name] = out
        return made[name]

    return get


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: a second launch, ~20 s on 2 cores
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_processes_match_one_unsharded_process(name, nproc, sharded_runs, one_process):
    """N sharded gloo processes with batch 8/N = 1 unsharded process with batch 8, loss by loss (fp32: 1e-5; the
    bf16 base under bf16 autocast: 1e-4)."""
    root, run = sharded_runs(nproc)
    for rank in range(nproc):
        status = root / "status" / f"{name}.rank{rank}"
        assert status.is_file() and status.read_text() == "0", run.stderr[-4000:]
    rn = json.loads((root / name / "results_final.json").read_text())
    assert rn["world_size"] == nproc
    assert f"sharded over {nproc} process(es)" in (root / name / "train.log").read_text()
    one = one_process(name)
    l1, ln = step_losses(one), step_losses(root / name)
    assert len(l1) == len(ln) == 6
    # bf16 autocast: half batches round their products differently from the whole batch (measured 2.4e-5)
    tol = 1e-4 if "bf16" in name else TOL
    assert l1 == pytest.approx(ln, rel=0, abs=tol)
    r1 = json.loads((one / "results_final.json").read_text())
    assert r1["final"]["val_loss"] == pytest.approx(rn["final"]["val_loss"], rel=0, abs=tol)


def test_sharded_checkpoint_sigkill_resume_load_run_and_export(sharded_runs, one_process, tmp_path):
    """Full fine-tuning sharded over 2 processes writes sharded checkpoints (torch.distributed.checkpoint);
    SIGKILLed in the middle of its last save, it resumes from step-3 on 2 processes to the very numbers
    of the uninterrupted run; load_run and `peftlab export` read the sharded checkpoints whole."""
    from safetensors.torch import load_file

    from peftlab.checkpoints import is_sharded
    from peftlab.cli import main
    from peftlab.runs import load_run

    root, launched = sharded_runs(2)
    ref, run = root / "full", root / "killed"
    assert launched.returncode != 0 and not (root / "status/killed.rank0").exists() and not (run / "results_final.json").exists()
    assert is_sharded(run / "checkpoints/step-3") and not (run / "checkpoints/epoch-1").exists()
    resumed = launch(tmp_path / "r", 2, {"resumed": _argv("full", run, 4, "fsdp") + ["--training.resume_from=latest"]})
    assert (tmp_path / "r/status/resumed.rank0").read_text() == "0", resumed.stderr[-4000:]
    assert "resumed from" in (run / "train.log").read_text()
    assert step_losses(run) == step_losses(ref)  # bit for bit: same shards, same optimizer state, same RNG
    res, res_ref = (json.loads((d / "results_final.json").read_text()) for d in (run, ref))
    assert res["final"] == res_ref["final"]

    # the model written at the end of training is the whole final state, as the unsharded run's (summation order aside)
    whole, one = load_file(str(run / "model/model.safetensors")), load_file(str(one_process("full") / "model/model.safetensors"))
    assert whole.keys() == one.keys()
    assert max((whole[k] - one[k]).abs().max().item() for k in whole) < 1e-4
    loaded = load_run(run, which="step-3")  # a sharded checkpoint, read whole in this one process
    w3 = dict(loaded.model.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    assert main(["export", str(run), "--which", "step-3", "--output-dir", str(tmp_path / "exp")]) == 0
    exported = load_file(str(tmp_path / "exp/model.safetensors"))
    assert exported["transformer.h.0.attn.c_attn.weight"].equal(w3.detach())
    assert not exported["transformer.h.0.attn.c_attn.weight"].equal(whole["transformer.h.0.attn.c_attn.weight"])


def test_rsvd_is_refused_under_sharding(tmp_path):
    """rSVD-Adam projects whole gradient matrices: refused before any model is built, naming the fix."""
    from peftlab.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"system.sharding=fsdp` does not support method=rsvd: rSVD-Adam .*system.sharding=none"):
        load_config(CONFIGS["lm"], ["--method=rsvd", "--system.sharding=fsdp"])
    with pytest.raises(ConfigError, match=r"system.dtype=fp16 is not supported.*bf16"):
        load_config(CONFIGS["lm"], ["--system.sharding=fsdp", "--system.dtype=fp16"])


def test_profile_prints_the_memory_per_process_of_a_sharded_run(tmp_path, capsys):
    """`peftlab profile --system.sharding=fsdp --world-size N`: parameters, gradients and optimizer state of
    a sharded method split N ways (padded row shards), an adapter's replicated, activations as measured."""
    import csv as _csv

    from peftlab.cli import main

    rows = {}
    for method, world in (("full", 1), ("full", 4), ("lora", 4)):
        out = tmp_path / f"{method}{world}"
        assert main(["profile", str(CONFIGS["lm"]), f"--method={method}", "--ranks=none", "--system.sharding=fsdp",
                     "--world-size", str(world), "--output-dir", str(out)]) == 0
        with open(out / f"memory_per_rank_fsdp_w{world}.csv") as f:
            rows[method, world] = {r["component"]: int(r["bytes"]) for r in _csv.DictReader(f)}
        with open(out / f"memory_breakdown_{'full' if method == 'full' else 'r8'}.csv") as f:
            rows[method, "replica"] = {r["component"]: int(r["bytes"]) for r in _csv.DictReader(f) if r["method"] == method}
    printed = capsys.readouterr().out
    assert "memory per process, system.sharding=fsdp over 4 process(es) (lora r=8" in printed
    full1, full4, replica = rows["full", 1], rows["full", 4], rows["full", "replica"]
    for c in ("parameters", "gradients", "optimizer_state"):
        assert full1[c] == replica[c]  # one process holds every shard
        assert replica[c] / 4 <= full4[c] <= replica[c] / 4 + 2048  # a quarter, plus the padding of uneven rows
    assert full4["activations"] == replica["activations"]
    lora4, lora_replica = rows["lora", 4], rows["lora", "replica"]
    assert lora4["optimizer_state"] == lora_replica["optimizer_state"]  # the adapter's state stays whole
    assert lora4["gradients"] == lora_replica["gradients"]
    assert lora4["parameters"] < lora_replica["parameters"] / 2  # the frozen base is split
    assert main(["profile", str(CONFIGS["lm"]), "--ranks=none", "--world-size", "2", "--output-dir", str(tmp_path / "x")]) == 2
    assert "add --system.sharding=fsdp" in capsys.readouterr().err


def test_shard_memory_benchmark_plumbing(tmp_path):
    """benchmarks/bench_shard_memory.py (the 3B/8B check of `peftlab profile`'s memory per process against a
    measured sharded run) at toy size on the CPU: both halves run and the row holds every world size."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_shard_memory

    row = bench_shard_memory.one("qwen3b", "lora", tmp_path, tiny=True)
    assert set(row["computed"]) == {"1", "2", "4", "8"} and row["activation_source"] == "saved tensors"
    assert row["computed"]["8"]["parameters"] < row["computed"]["1"]["parameters"]
    assert row["measured_peak_bytes"] > 0 and row["ratio_measured_over_computed_w1"] > 0


# ----------------------------------------------------------------- on a GPU (skipped without one)
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")


def _record(row: dict) -> None:
    """One JSON line per GPU check under $OUT (when set), for the lead's device run."""
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "sharding_gpu.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


@cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["lora", "dora", "sora", "full"])
def test_cuda_sharded_world_of_one_matches_unsharded(name, dtype, tmp_path):
    """On one GPU, a sharded world of 1 (FSDP2 over a process group of one, NCCL) gives the unsharded losses."""
    from peftlab.cli import main

    runs = {}
    for sharding in ("none", "fsdp"):
        out = tmp_path / sharding
        argv = [a.replace("--system.device=cpu", "--system.device=cuda") for a in _argv(name, out, 8, sharding)]
        assert main([*argv, f"--system.dtype={dtype}"]) == 0
        runs[sharding] = step_losses(out)
    diff = max(abs(a - b) for a, b in zip(runs["none"], runs["fsdp"]))
    tol = 1e-4 if dtype == "fp32" else 2e-2  # GPU kernels reduce in their own order; bf16 autocast to its precision
    _record({"check": "world1_parity", "method": name, "dtype": dtype, "max_step_loss_diff": diff, "tol": tol,
             "losses_none": runs["none"], "losses_fsdp": runs["fsdp"]})
    assert len(runs["none"]) == len(runs["fsdp"]) == 6 and diff <= tol


@cuda
@pytest.mark.parametrize("name", ["lora", "full"])
def test_cuda_profile_per_rank_memory_against_a_measured_world_of_one(name, tmp_path):
    """The memory `peftlab profile --system.sharding=fsdp --world-size 1` computes for GPT-2 (124M, batch 4 x 256)
    against the peak a sharded world-of-1 training run measures (torch.cuda.max_memory_allocated)."""
    import csv as _csv

    from peftlab.cli import main

    shape = ["--model.name=gpt2", "--model.from_scratch=true", "--data.block_size=256", "--training.batch_size=4",
             "--training.max_steps=3", "--training.eval_max_batches=1", f"--method={name}", "--system.sharding=fsdp",
             "--system.device=cuda", "--logging.progress_bar=false", "--data.max_train_examples=100"]
    assert main(["profile", str(CONFIGS["lm"]), *shape, "--ranks=none", "--world-size", "1", "--output-dir", str(tmp_path / "p")]) == 0
    with open(tmp_path / "p/memory_per_rank_fsdp_w1.csv") as f:
        computed = {r["component"]: int(r["bytes"]) for r in _csv.DictReader(f)}
    assert main(["train", str(CONFIGS["lm"]), *shape, f"--output.dir={tmp_path / 'run'}"]) == 0
    measured = json.loads((tmp_path / "run/results_final.json").read_text())["peak_memory_mb"] * 2**20
    ratio = measured / computed["total"]
    _record({"check": "profile_vs_measured_world1", "method": name, "computed_bytes": computed, "measured_peak_bytes": measured,
             "ratio": ratio})
    assert 0.5 < ratio < 2.0
