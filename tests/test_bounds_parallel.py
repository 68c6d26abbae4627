"""`peftlab bounds` on 2 CPU processes (torchrun, gloo): each scores half of the batches, and
bounds_metrics.json holds the numbers of one process, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import free_port
from test_bounds_cli import bins, train_run  # noqa: F401  (bins is a fixture)

VOLATILE = {"wall_time_s", "scoring_time_s", "documents_per_second", "sequences_per_second", "tokens_per_second", "run_dir",
            "scoring_processes"}


def _stable(path):
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}


def test_two_processes_give_the_one_process_bound(tmp_path, bins):  # noqa: F811
    from peftlab.cli import main

    run = train_run(tmp_path, bins, method="sublora", sublora__intrinsic_dim=200, training__learning_rate=0.05)
    flags = ["--bounds.num_docs=80", "--bounds.stride=32", "--bounds.full_precision_units=30", "--bounds.batch_tokens=512",
             "--bounds.progress_bar=false"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["bounds", str(run), *flags, f"--bounds.output={one}"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        "-m", "peftlab", "bounds", str(run), *flags, f"--bounds.output={two}"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Wrote") == 1  # rank 0 reports
    m1, m2 = _stable(one), _stable(two)
    assert json.loads(two.read_text())["scoring_processes"] == 2
    assert m1 == m2
