"""The fused LoRA / DoRA linear (peftlab/kernels/lora.py, methods/fused_lora.py) against peft's unfused path.

float64 on CPU: forward and the gradients of x, A, B (the SoRA gate, the DoRA magnitude), with and
without dropout (the same seed on both sides: the dropout module draws the same mask), for nn.Linear
and GPT-2's Conv1D (fan_in_fan_out). Tolerance 1e-12 (float64; the two paths sum the same products
in different orders). GPU tests (bf16 autocast, torch.compile) skip without CUDA.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo  # imported here: inside a test it would make `torch` a local name there
from torch import nn

from peftlab.errors import PeftlabError
from peftlab.kernels.lora import lora_linear, lora_linear_reference
from peftlab.methods.fused_lora import install_fused_lora, uninstall_fused_lora, use_fused

TOL = 1e-12
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _max_err(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------- the kernel alone
@pytest.mark.parametrize("fif", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("gate", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("kind", ["lora", "lora_dropout", "dora", "dora_dropout"])
def test_kernel_matches_separate_ops_float64(fif, gate, kind):
    g0 = torch.Generator().manual_seed(0)
    dt = torch.float64
    d_in, d_out, r = 7, 6, 3

    def rnd(*s, grad=False):
        return torch.randn(*s, generator=g0, dtype=dt).requires_grad_(grad)

    x = rnd(2, 5, d_in, grad=True)
    W = rnd(*((d_in, d_out) if fif else (d_out, d_in)))
    b, A, B = rnd(d_out), rnd(r, d_in, grad=True), rnd(d_out, r, grad=True)
    g = rnd(r, grad=True) if gate else None
    m = rnd(d_out, grad=True)
    drop = nn.Dropout(0.3) if kind.endswith("_dropout") else None
    probe = rnd(2, 5, d_out)
    leaves = [t for t in (x, A, B, g, m) if t is not None]
    res = []
    for fn in (lora_linear, lora_linear_reference):
        torch.manual_seed(1)
        c = m / 3.0 if kind.startswith("dora") else None
        y = fn(x, W, b, A, B, 0.7, dropout=drop, gate=g, fan_in_fan_out=fif, magnitude_scale=c)
        grads = torch.autograd.grad((y * probe).sum(), leaves, allow_unused=True)
        res.append((y, [gr if gr is not None else torch.zeros(()) for gr in grads]))
    (y1, g1), (y2, g2) = res
    assert torch.allclose(y1, y2, atol=TOL, rtol=0)
    assert _max_err(g1, g2) < TOL
    if kind == "lora":  # m does not enter plain LoRA
        assert float(g1[-1].abs().sum()) == 0.0


def test_kernel_saves_no_weight_gradient_and_skips_input_gradient_when_not_needed():
    x = torch.randn(4, 8, dtype=torch.float64)  # no grad: the first layer's input
    W = torch.randn(5, 8, dtype=torch.float64)
    A = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    y = lora_linear(x, W, None, A, B, 2.0)
    assert type(y.grad_fn).__name__ == "LoraLinearFunctionBackward"
    y.sum().backward()
    assert A.grad is not None and B.grad is not None and W.grad is None


# ------------------------------------------------------------- against peft's layers
class Net(nn.Module):
    def __init__(self, conv1d: bool, d=12, out=10):
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.proj = Conv1D(out, d)  # weight d x out (fan_in_fan_out)
        else:
            self.proj = nn.Linear(d, out)
        self.head = nn.Linear(out, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def _peft_pair(conv1d: bool, dora: bool, dropout: float, gated: bool = False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = Net(conv1d).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"],
                                               use_dora=dora, fan_in_fan_out=conv1d))
    with torch.no_grad():  # B = 0 at init would hide B's role in the gradients of A and x
        for n, p in model.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(torch.randn_like(p) * 0.5)
    if gated:
        from peftlab.methods.sora.layers import GatedLoraA

        layer = model.base_model.model.proj
        layer.lora_A["default"] = GatedLoraA(layer.lora_A["default"], torch.randn(4, dtype=torch.float64))
    fused = copy.deepcopy(model)
    assert install_fused_lora(fused) == 1
    return model, fused


def _run(model, x, seed=3):
    torch.manual_seed(seed)
    model.train()
    x = x.clone().requires_grad_(True)
    y = model(x)
    probe = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    (y * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


CASES = [  # (conv1d, dora, dropout, gated)
    (False, False, 0.0, False), (True, False, 0.0, False),
    (False, False, 0.25, False), (True, False, 0.25, False),
    (False, True, 0.0, False), (True, True, 0.0, False),
    (False, False, 0.25, True), (True, True, 0.0, True),
    (False, True, 0.25, False), (True, True, 0.25, False), (True, True, 0.25, True),  # DoRA / SDoRA with dropout
]


@pytest.mark.parametrize("conv1d,dora,dropout,gated", CASES)
def test_fused_layer_equals_peft_float64(conv1d, dora, dropout, gated):
    if dora and gated:  # SDoRA's magnitude layer
        from peftlab.methods.sora.layers import GatedDoraLayer

    ref, fused = _peft_pair(conv1d, dora, dropout, gated)
    if dora and gated:
        for m in (ref, fused):
            layer = m.base_model.model.proj
            layer.lora_magnitude_vector["default"] = GatedDoraLayer.from_dora(layer.lora_magnitude_vector["default"], None)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    y1, dx1, g1 = _run(ref, x)
    y2, dx2, g2 = _run(fused, x)
    assert torch.allclose(y1, y2, atol=TOL, rtol=0)
    assert torch.allclose(dx1, dx2, atol=TOL, rtol=0)
    assert g1.keys() == g2.keys() and any("lora_A" in n for n in g1) and any("lora_B" in n for n in g1)
    assert (not dora) or any("magnitude" in n for n in g1)
    assert (not gated) or any(n.endswith("gate") for n in g1)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=TOL, rtol=0), n
    # the fused node really ran (not peft's fallback)
    torch.manual_seed(3)
    out = fused.base_model.model.proj(x)
    assert type(out.grad_fn).__name__ in ("LoraLinearFunctionBackward", "DoraLinearFunctionBackward", "DoraDropoutLinearFunctionBackward")
    fused.eval(), ref.eval()  # eval: no dropout, DoRA reuses the base output
    assert torch.allclose(ref(x), fused(x), atol=TOL, rtol=0)


def test_fallbacks_compute_peft_numbers():
    """Merged and disabled adapters fall back to peft's forward, bit for bit."""
    ref, fused = _peft_pair(False, False, 0.0)
    x = torch.randn(2, 12, dtype=torch.float64)
    with ref.disable_adapter(), fused.disable_adapter():
        assert torch.equal(ref(x), fused(x))
    ref.merge_adapter(), fused.merge_adapter()
    assert torch.equal(ref(x), fused(x))
    assert fused.base_model.model.proj.base_layer.weight.requires_grad is False
    ref.unmerge_adapter(), fused.unmerge_adapter()
    assert uninstall_fused_lora(fused) == 1 and "forward" not in fused.base_model.model.proj.__dict__


def test_switch_values():
    assert use_fused("auto", "cpu") is False and use_fused("auto", "cuda") is True
    assert use_fused("on", "cpu") is True and use_fused("off", "cuda") is False
    with pytest.raises(PeftlabError, match="lora.fused must be"):
        use_fused("yes", "cpu")


def test_built_model_auto_is_peft_on_cpu_and_on_installs():
    from peftlab.build import build
    from peftlab.config import config_from_dict

    def built(fused, method="lora"):
        cfg = config_from_dict({"method": method, "model": {"name": "tiny-gpt2"}, "lora": {"fused": fused, "dropout": 0.1},
                                "output": {"dir": "/tmp/peftlab_test_fused"}})
        return build(cfg, data=False, task="causal_lm", optimizer=False).model

    def n_fused(m):
        return sum(1 for mod in m.modules() if "forward" in mod.__dict__)

    assert n_fused(built("auto")) == 0
    on, off = built("on"), built("off")
    assert n_fused(on) == 2 and n_fused(off) == 0
    with torch.no_grad():
        for (n, p), (_, q) in zip(on.named_parameters(), off.named_parameters()):
            if "lora_B" in n:
                p.normal_(generator=torch.Generator().manual_seed(1))
                q.copy_(p)
    x = torch.randint(0, 256, (2, 24))
    losses = []
    for m in (on, off):
        torch.manual_seed(5)
        m.train()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        losses.append((loss.item(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert abs(losses[0][0] - losses[1][0]) < 1e-5
    for n, gr in losses[0][1].items():
        assert torch.allclose(gr, losses[1][1][n], atol=1e-5, rtol=1e-4), n


# ------------------------------------------------------------------------ GPU only
@cuda
@pytest.mark.parametrize("conv1d,dora", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_equals_peft_bf16_autocast_cuda(conv1d, dora):
    """bf16 autocast on the GPU: fused vs peft within bf16 rounding (relative 2e-2 of the largest value)."""
    ref, fused = _peft_pair(conv1d, dora, 0.0)
    ref, fused = ref.float().cuda(), fused.float().cuda()
    x = torch.randn(4, 64, 12, device="cuda")
    outs = []
    for m in (ref, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(_run(m, x.clone()))
    (y1, dx1, g1), (y2, dx2, g2) = outs
    for a, b in [(y1, y2), (dx1, dx2)] + [(g1[n], g2[n]) for n in g1]:
        scale = a.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - b.float()).abs().max() / scale) < 2e-2


@cuda
def test_fused_compiles_without_graph_breaks_cuda():
    ref, fused = _peft_pair(False, False, 0.1)
    fused = fused.float().cuda()
    x = torch.randn(4, 64, 12, device="cuda")

    torch._dynamo.reset()
    explain = torch._dynamo.explain(fused)(x)
    assert explain.graph_break_count == 0
