"""Several processes vs one (issue 19): per-step parity of every method, kill + resume, both launchers;
with ``--sharding fsdp`` (issue 25) the same for ``system.sharding=fsdp`` (FSDP2), plus a scaling
table: step time and peak memory per process at 1, 2, 4, 8 processes.

For each precision and method: one process at batch ``N*B`` against ``N`` processes at batch
``B`` (the same global batches, see ``EpochBatches``), launched by ``torchrun`` and by
``accelerate launch``; the per-step training losses (``log_steps=1``) and the final validation
loss are compared. Then an ``N``-process LoRA run is killed with SIGKILL after its first
checkpoint and resumed on ``N`` processes; its final metrics are compared with an uninterrupted
run. On GPUs (``--device cuda``) this is NCCL; on CPUs (``--device cpu``) gloo, which is how it
was checked on the development machine. NVLink multicast stays off (NCCL_NVLS_ENABLE=0 etc.).

    python benchmarks/multi_gpu.py --out DIR [--nproc 2] [--device cuda] [--dtypes fp32,bf16]
    python benchmarks/multi_gpu.py --out DIR --sharding fsdp --nproc 8 --scaling 1,2,4,8   # FSDP2 over NCCL

Under ``--sharding fsdp`` the N-process runs shard (the 1-process reference does not, so parity
is against the plain replica), rSVD-Adam is left out (refused under sharding), full fine-tuning
and SubLoRA are added, and the SIGKILL + resume check uses full fine-tuning, whose checkpoints
are sharded (torch.distributed.checkpoint).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/quickstart/lm_lora.yaml"
METHOD_ARGS = {
    "lora": [], "dora": [], "full": [],
    "sora": ["--sora.lambda=1.0", "--sora.gate_lr=0.05"],
    "sdora": ["--sora.lambda=1.0", "--sora.gate_lr=0.05"],
    "ba_lora": ["--ba_lora.gradient_samples=32", "--ba_lora.use_warmstart=true"],
    "rsvd": ["--rsvd.rank=4", "--rsvd.update_interval=3", "--training.learning_rate=1e-3"],
    "sublora": ["--sublora.intrinsic_dim=64", "--sublora.allocation_mode=learned", "--sublora.gating_lr=0.5",
                "--training.learning_rate=0.05"],
}
SHARDED_METHODS = "lora,dora,sora,sdora,ba_lora,sublora,full"
# Per-step |loss difference| allowed between N processes and one: reductions run in another order
# (all-reduce of gradients), so fp32 agrees to rounding and bf16 autocast to its own precision.
TOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(launcher: str, nproc: int, device: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "peftlab"]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                "-m", "peftlab"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    cmd += ["--cpu"] if device == "cpu" else ["--multi_gpu"]
    return cmd + ["-m", "peftlab"]


def train_args(method: str, dtype: str, device: str, batch: int, out: Path, steps: int, extra=(), sharding: str = "none") -> list[str]:
    return ["train", str(CONFIG), f"--method={method}", *METHOD_ARGS[method], f"--training.max_steps={steps}",
            f"--system.sharding={sharding}",
            "--training.log_steps=1", f"--training.batch_size={batch}", "--logging.progress_bar=false", "--model.dropout=0",
            "--data.max_train_examples=200", f"--system.device={device}", f"--system.dtype={dtype}",
            f"--output.dir={out}", "--output.overwrite=true", *extra]


def losses(run: Path) -> list[float]:
    with open(run / "loss_log.csv") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


def run(cmd: list[str], log: Path, timeout: int = 900) -> int:
    env = dict(os.environ, **SAFE_ENV, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout).returncode


def parity(a, out: Path) -> list[dict]:
    rows = []
    for dtype in a.dtypes.split(","):
        for method in a.methods.split(","):
            d = out / f"{dtype}_{method}"
            d.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            rc1 = run(launch_cmd("", 1, a.device) + train_args(method, dtype, a.device, a.batch * a.nproc, d / "one", a.steps), d / "one.log")
            for launcher in a.launchers.split(","):
                rc = run(launch_cmd(launcher, a.nproc, a.device) + train_args(method, dtype, a.device, a.batch, d / launcher, a.steps,
                                                                              sharding=a.sharding), d / f"{launcher}.log")
                row = {"dtype": dtype, "method": method, "launcher": launcher, "nproc": a.nproc, "rc_one": rc1, "rc_n": rc,
                       "sharding": a.sharding}
                if rc1 == 0 and rc == 0:
                    l1, ln = losses(d / "one"), losses(d / launcher)
                    r1 = json.loads((d / "one/results_final.json").read_text())
                    rn = json.loads((d / launcher / "results_final.json").read_text())
                    diff = max(abs(x - y) for x, y in zip(l1, ln)) if l1 and len(l1) == len(ln) else float("nan")
                    row.update(steps=len(l1), max_step_loss_diff=diff, tol=TOL[dtype],
                               val_loss_diff=abs(r1["final"]["val_loss"] - rn["final"]["val_loss"]),
                               world_size=rn.get("world_size"), ok=diff <= TOL[dtype] and rn.get("world_size") == a.nproc)
                    if rn.get("world_size") != a.nproc:
                        row["reason"] = f"the launcher started a run of world size {rn.get('world_size')}, not {a.nproc}"
                else:
                    row["ok"] = False
                row["seconds"] = round(time.time() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def kill_resume(a, out: Path) -> dict:
    """N processes killed with SIGKILL after the first checkpoint, resumed on N, vs uninterrupted."""
    d = out / "resume"
    d.mkdir(parents=True, exist_ok=True)
    extra = ["--training.save_steps=4"]
    steps = max(a.steps, 12)
    method = "full" if a.sharding != "none" else "lora"  # sharded: full fine-tuning writes sharded checkpoints
    args = lambda out: train_args(method, "fp32", a.device, a.batch, out, steps, extra, sharding=a.sharding)  # noqa: E731
    ref = run(launch_cmd("torchrun", a.nproc, a.device) + args(d / "ref"), d / "ref.log")
    env = dict(os.environ, **SAFE_ENV, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    cmd = launch_cmd("torchrun", a.nproc, a.device) + args(d / "killed")
    with open(d / "killed.log", "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.time() + 600
        while not (d / "killed/checkpoints/step-4").is_dir() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        killed_early = p.poll() is None
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and every rank: a process group this script started
        p.wait()
    resume_args = args(d / "killed")
    resume_args.remove("--output.overwrite=true")
    rc = run(launch_cmd("torchrun", a.nproc, a.device) + resume_args + ["--training.resume_from=latest"], d / "resumed.log")
    row = {"check": "sigkill+resume", "method": None, "resume_method": method, "sharding": a.sharding, "nproc": a.nproc,
           "rc_ref": ref, "rc_resumed": rc, "killed_before_end": killed_early}
    if ref == 0 and rc == 0:
        r0 = json.loads((d / "ref/results_final.json").read_text())["final"]
        r1 = json.loads((d / "killed/results_final.json").read_text())["final"]
        row.update(ref=r0, resumed=r1, max_abs_diff=max(abs(r0[k] - r1[k]) for k in r0))
        row["ok"] = row["max_abs_diff"] <= TOL["fp32"]
    print(json.dumps(row), flush=True)
    return row


def scaling(a, out: Path) -> list[dict]:
    """Step time and peak memory per process of a sharded run at each process count of ``--scaling``
    (the same per-process batch, so the global batch grows with N): what sharding buys and costs."""
    rows = []
    for n in [int(x) for x in a.scaling.split(",") if x.strip()]:
        d = out / f"scaling_{n}"
        d.mkdir(parents=True, exist_ok=True)
        for method in a.scaling_methods.split(","):
            t0 = time.time()
            args = train_args(method, a.scaling_dtype, a.device, a.batch, d / method, a.steps, a.scaling_extra.split(),
                              sharding=a.sharding)
            rc = run(launch_cmd("torchrun", n, a.device) + args, d / f"{method}.log")
            row = {"check": "scaling", "method": method, "nproc": n, "sharding": a.sharding, "rc": rc, "seconds": round(time.time() - t0, 1)}
            if rc == 0:
                r = json.loads((d / method / "results_final.json").read_text())
                row.update(wall_time_s=r["wall_time_s"], step_s=r["wall_time_s"] / max(r["global_step"], 1),
                           peak_memory_mb=r["peak_memory_mb"], world_size=r["world_size"])
            row["ok"] = rc == 0
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--methods", default="lora,dora,sora,sdora,ba_lora,rsvd")
    ap.add_argument("--launchers", default="torchrun,accelerate")
    ap.add_argument("--batch", type=int, default=4, help="per-process batch size")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip-resume", action="store_true")
    ap.add_argument("--sharding", choices=["none", "fsdp"], default="none", help="system.sharding of the N-process runs")
    ap.add_argument("--scaling", default="", help="with --sharding fsdp: process counts of the scaling table, e.g. 1,2,4,8")
    ap.add_argument("--scaling-methods", default="lora,full")
    ap.add_argument("--scaling-dtype", default="bf16")
    ap.add_argument("--scaling-extra", default="--model.name=gpt2 --model.from_scratch=true --data.block_size=256 --training.epochs=1000",
                    help="overrides of the scaling runs (a real model shape; space-separated)")
    a = ap.parse_args(argv)
    if a.sharding != "none" and a.methods == ap.get_default("methods"):
        a.methods = SHARDED_METHODS
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = parity(a, out)
    if not a.skip_resume:
        rows.append(kill_resume(a, out))
    if a.scaling:
        rows += scaling(a, out)
    (out / "multi_gpu.json").write_text(json.dumps(rows, indent=1))
    print("| dtype | method | launcher | N | max per-step loss diff | tol | val loss diff | ok |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("check") == "scaling":
            print(f"| scaling | {r['method']} | torchrun | {r['nproc']} | step {r.get('step_s', 'rc!=0')} s, "
                  f"peak {r.get('peak_memory_mb', '-')} MB/process | | | {r['ok']} |")
        elif r.get("method"):
            print(f"| {r['dtype']} | {r['method']} | {r['launcher']} | {r['nproc']} | {r.get('max_step_loss_diff', 'rc!=0')} | "
                  f"{TOL[r['dtype']]} | {r.get('val_loss_diff', '-')} | {r['ok']} |")
        else:
            print(f"| resume | {r.get('resume_method', 'lora')} ({r.get('sharding', 'none')}) | torchrun | {r['nproc']} | final diff {r.get('max_abs_diff', 'rc!=0')} | {TOL['fp32']} | | {r.get('ok')} |")
    sys.exit(0 if all(r.get("ok") for r in rows) else 1)


if __name__ == "__main__":
    main()
