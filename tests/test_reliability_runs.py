"""Reliability of the readers of a run (issue 26, classes 1, 3, 6, 9, 10): every reader verifies
the checkpoint it reads, a full disk during a save is one clear error, damaged run files and
read-only outputs are clear errors before the work, messages send the user the right way."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_cfg


# ------------------------------------------------------------ class 3: disk full during a save
def _save_args():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1000))])
    return dict(model_state={"w": torch.zeros(1000)}, optimizer=opt, scheduler=opt, method_state={},
                trainer_state={"global_step": 4})


def test_disk_full_in_safetensors_is_the_disk_full_error_and_removes_the_partial_save(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from peftlab import checkpoints as ckpt
    from peftlab.errors import PeftlabError

    def full(*a, **k):  # what safetensors 0.8 raises on a full tmpfs
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    final = tmp_path / "checkpoints" / "step-4"
    tmp = ckpt.begin(final)
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(PeftlabError, match=r"No space left on the device while writing .*checkpoints/step-4 \(Error while "
                                           r"serializing: I/O error: No space left on device \(os error 28\); .* free on .*"
                                           r"this save needs about 11.7 KiB\).*resume_from=latest"):
        ckpt.write_main(tmp, **_save_args())
    assert not tmp.exists()


def test_disk_full_in_torch_save_is_the_disk_full_error_other_runtime_errors_are_not(tmp_path, monkeypatch):
    from peftlab import checkpoints as ckpt
    from peftlab import io
    from peftlab.errors import PeftlabError

    def full(*a, **k):  # what torch 2.13's zip writer raises on a full tmpfs: no word of the cause
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 640 vs 598")

    usage = collections.namedtuple("usage", "total used free")
    final = tmp_path / "checkpoints" / "step-4"
    tmp = ckpt.begin(final)
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 0))
    with pytest.raises(PeftlabError, match=r"No space left on the device while writing .*checkpoints/step-4 \(\[enforce fail"):
        ckpt.write_main(tmp, **_save_args())
    assert not tmp.exists()
    tmp = ckpt.begin(final)
    with pytest.raises(PeftlabError, match=r"No space left on the device while writing .*checkpoints/step-4"):
        ckpt.write_rank_rng(tmp, 0)
    assert not tmp.exists()
    # the same error with space to spare is not a full disk: it stays what it is
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: usage(1 << 30, 0, 1 << 30))
    tmp = ckpt.begin(final)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        ckpt.write_main(tmp, **_save_args())
