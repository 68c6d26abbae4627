"""lora.init and lora.use_rslora through peft: what is refused before any work, and what is passed on.
The training/resume/load_run/export checks of each init are conformance cases (tests/test_conformance.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_cfg


def test_loftq_is_refused_without_cuda_and_bitsandbytes(tmp_path):
    from peftlab.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    with pytest.raises(ConfigError, match=r"lora.init=loftq.*bitsandbytes on a CUDA device.*--lora.init=pissa"):
        make_cfg(tmp_path, lora__init="loftq")


@pytest.mark.parametrize("method", ["dora", "sora", "ba_lora", "sublora"])
def test_peft_inits_come_with_method_lora_only(tmp_path, method):
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"lora.init=pissa` is not available for method {method}.*--method=lora"):
        make_cfg(tmp_path, method=method, lora__init="pissa")


def test_olora_refuses_conv1d_targets(tmp_path):
    from peftlab.build import build
    from peftlab.errors import PeftlabError

    with pytest.raises(PeftlabError, match="olora needs nn.Linear targets.*Conv1D.*--lora.init=pissa"):
        build(make_cfg(tmp_path, lora__init="olora"), optimizer=False)


def test_rslora_and_init_reach_peft(tmp_path):
    from peftlab.build import build
    from peftlab.methods.lora import lora_layers

    b = build(make_cfg(tmp_path, lora__use_rslora=True, lora__r=4, lora__alpha=8.0, lora__init="pissa"), data=False,
              task="causal_lm", optimizer=False)
    pc = b.model.peft_config["default"]
    assert pc.use_rslora and pc.init_lora_weights == "pissa"
    layer = next(layer for _, layer in lora_layers(b.model))
    assert layer.scaling["default"] == pytest.approx(8.0 / 2.0)  # alpha / sqrt(r)
    assert b.method.structure(b.model)["init"] == {"name": "pissa"}
