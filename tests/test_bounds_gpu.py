"""GPU-only checks of the bound's fast scoring path (skipped without CUDA): the compiled
logits reduction against the eager one, and bf16 scoring through the view against the
model's own logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftlab.bounds.scoring import compiled_target_scores, score_rows, target_scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compiled_reduction_matches_eager_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    f = compiled_target_scores()
    for k in (1, 333, 5000):
        lg = (3 * torch.randn(k, 50257, device="cuda", generator=g)).bfloat16()
        t = torch.randint(0, 50257, (k,), device="cuda", generator=g)
        (lp, rank), (lp0, rank0) = f(lg, t), target_scores(lg, t)
        torch.testing.assert_close(lp, lp0, rtol=0, atol=2e-5)
        assert torch.equal(rank, rank0)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_view_scoring_on_gpu_matches_the_models_logits(dtype):
    from test_bounds_fastpath import adapted, stream
    from test_bounds_scoring import EOT

    model, m = adapted("sublora")
    model.cuda()
    tokens, rows, n = stream()
    kw = dict(batch_tokens=64, progress=False, device="cuda", autocast_dtype=dtype)
    ref = score_rows(model, tokens, rows, n, EOT, (0.001, 0.1), head="model", **kw)
    fast = score_rows(m.scoring_module(model), tokens, rows, n, EOT, (0.001, 0.1), compile=True, **kw)
    assert fast.path == "view"
    np.testing.assert_allclose(fast.loss_bits, ref.loss_bits, rtol=1e-5 if dtype is None else 2e-2)
