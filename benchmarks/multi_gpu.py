"""Several processes vs one (issue 19): per-step parity of every method, kill + resume, both launchers.

For each precision and method: one process at batch ``N*B`` against ``N`` processes at batch
``B`` (the same global batches, see ``EpochBatches``), launched by ``torchrun`` and by
``accelerate launch``; the per-step training losses (``log_steps=1``) and the final validation
loss are compared. Then an ``N``-process LoRA run is killed with SIGKILL after its first
checkpoint and resumed on ``N`` processes; its final metrics are compared with an uninterrupted
run. On GPUs (``--device cuda``) this is NCCL; on CPUs (``--device cpu``) gloo, which is how it
was checked on the development machine. NVLink multicast stays off (NCCL_NVLS_ENABLE=0 etc.).

    python benchmarks/multi_gpu.py --out DIR [--nproc 2] [--device cuda] [--dtypes fp32,bf16]
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
}
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


def train_args(method: str, dtype: str, device: str, batch: int, out: Path, steps: int, extra=()) -> list[str]:
    return ["train", str(CONFIG), f"--method={method}", *METHOD_ARGS[method], f"--training.max_steps={steps}",
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
                rc = run(launch_cmd(launcher, a.nproc, a.device) + train_args(method, dtype, a.device, a.batch, d / launcher, a.steps),
                         d / f"{launcher}.log")
                row = {"dtype": dtype, "method": method, "launcher": launcher, "nproc": a.nproc, "rc_one": rc1, "rc_n": rc}
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
    ref = run(launch_cmd("torchrun", a.nproc, a.device) + train_args("lora", "fp32", a.device, a.batch, d / "ref", steps, extra),
              d / "ref.log")
    env = dict(os.environ, **SAFE_ENV, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    cmd = launch_cmd("torchrun", a.nproc, a.device) + train_args("lora", "fp32", a.device, a.batch, d / "killed", steps, extra)
    with open(d / "killed.log", "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.time() + 600
        while not (d / "killed/checkpoints/step-4").is_dir() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        killed_early = p.poll() is None
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and every rank: a process group this script started
        p.wait()
    resume_args = train_args("lora", "fp32", a.device, a.batch, d / "killed", steps, extra)
    resume_args.remove("--output.overwrite=true")
    rc = run(launch_cmd("torchrun", a.nproc, a.device) + resume_args + ["--training.resume_from=latest"], d / "resumed.log")
    row = {"check": "sigkill+resume", "nproc": a.nproc, "rc_ref": ref, "rc_resumed": rc, "killed_before_end": killed_early}
    if ref == 0 and rc == 0:
        r0 = json.loads((d / "ref/results_final.json").read_text())["final"]
        r1 = json.loads((d / "killed/results_final.json").read_text())["final"]
        row.update(ref=r0, resumed=r1, max_abs_diff=max(abs(r0[k] - r1[k]) for k in r0))
        row["ok"] = row["max_abs_diff"] <= TOL["fp32"]
    print(json.dumps(row), flush=True)
    return row


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
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = parity(a, out)
    if not a.skip_resume:
        rows.append(kill_resume(a, out))
    (out / "multi_gpu.json").write_text(json.dumps(rows, indent=1))
    print("| dtype | method | launcher | N | max per-step loss diff | tol | val loss diff | ok |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "method" in r:
            print(f"| {r['dtype']} | {r['method']} | {r['launcher']} | {r['nproc']} | {r.get('max_step_loss_diff', 'rc!=0')} | "
                  f"{TOL[r['dtype']]} | {r.get('val_loss_diff', '-')} | {r['ok']} |")
        else:
            print(f"| resume | lora | torchrun | {r['nproc']} | final diff {r.get('max_abs_diff', 'rc!=0')} | {TOL['fp32']} | | {r.get('ok')} |")
    sys.exit(0 if all(r.get("ok") for r in rows) else 1)


if __name__ == "__main__":
    main()
