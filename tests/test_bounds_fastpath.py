"""The scoring view (merged adapters, fused GELU, LM head on counted positions only) gives the
numbers of the model's own forward pass, restores the model exactly, and is refused when it
would not be the same function; data-parallel shares of the batches add up to one process's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftlab.bounds import fastpath
from peftlab.bounds.scoring import document_rows, document_spans, reduce_scores, score_batches, score_rows
from test_bounds_scoring import EOT, make_stream

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def adapted(method: str, **over):
    """The built-in tiny GPT-2 adapted by ``method``, its learnable tensors moved off their init."""
    from peftlab.build import build
    from peftlab.config import load_config

    cfg = load_config(None, {"method": method, "model.name": "tiny-gpt2", "data.block_size": 32, **over})
    built = build(cfg, task="causal_lm", data=False, optimizer=False, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in built.method.trainable_parameters(built.model):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return built.model, built.method


def stream():
    lengths = [3, 20, 31, 45, 70, 2, 9, 64]
    tokens, eot, lens = make_stream(lengths, vocab=250)
    rows = document_rows(document_spans(eot, lens, len(tokens)), lens, np.arange(len(lengths)), context=16, stride=6)
    return tokens, rows, len(lengths)


@pytest.mark.parametrize("method", ["lora", "dora", "sublora", "sora", "full"])
def test_view_gives_the_models_numbers_and_restores_it(method):
    model, m = adapted(method)
    tokens, rows, n = stream()
    alphas = (0.001, 0.1)
    scored = m.scoring_module(model)  # SubLoRA: θ₀ + P·w written into the inner LoRA tensors
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = score_rows(model, tokens, rows, n, EOT, alphas, batch_tokens=64, progress=False, head="model")
    fast = score_rows(scored, tokens, rows, n, EOT, alphas, batch_tokens=64, progress=False)
    assert fast.path == "view" and ref.path == "model"
    np.testing.assert_allclose(fast.loss_bits, ref.loss_bits, rtol=1e-6)
    np.testing.assert_array_equal(fast.topk_correct, ref.topk_correct)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model was not restored exactly"
    # and the model still computes what it did (no adapter left merged, no activation left swapped)
    again = score_rows(model, tokens, rows, n, EOT, alphas, batch_tokens=64, progress=False, head="model")
    np.testing.assert_array_equal(again.loss_bits, ref.loss_bits)


@pytest.mark.parametrize("method", ["lora", "sublora"])
def test_view_scores_an_adapted_tied_lm_head(method):
    """SubLoRA's recipe adapts ``lm_head`` too (the seed-000/001 studies): GPT-2's head is tied to the input
    embedding, so its adapter is not merged but added to the logits of the counted positions; the view is
    used (it was refused before, and such runs were scored through the model's slower full logits)."""
    model, m = adapted(method, **{"model.target_modules": ["c_attn", "lm_head"]})
    tokens, rows, n = stream()
    scored = m.scoring_module(model)
    hf = fastpath.hf_model(scored)
    head = hf.get_output_embeddings()
    assert type(head) is not torch.nn.Linear and head.get_base_layer().weight is hf.get_input_embeddings().weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = score_rows(scored, tokens, rows, n, EOT, (0.01,), batch_tokens=64, progress=False, head="model")
    fast = score_rows(scored, tokens, rows, n, EOT, (0.01,), batch_tokens=64, progress=False)
    assert fast.path == "view"
    np.testing.assert_allclose(fast.loss_bits, ref.loss_bits, rtol=1e-6)
    np.testing.assert_array_equal(fast.topk_correct, ref.topk_correct)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["lora", "sublora"])
def test_view_is_used_for_a_base_stored_in_bf16(method):
    """On a GPU a bf16 run stores its frozen base in bf16 (model.base_dtype=auto). The check compares float32 logits
    to 1e-4, which the bf16 reference alone missed, so such runs (the subspace_allocation study's bounds on the GPU)
    were always scored through the model's slower full logits. The check now upcasts the base for its two rows; the
    view is used, its numbers are as close to the model's under bf16 autocast as those of a float32 base are, and the
    model (values and dtypes) is restored exactly."""
    model, m = adapted(method, **{"model.target_modules": ["c_attn", "lm_head"], "model.base_dtype": "bfloat16",
                                  "system.dtype": "bf16"})
    assert any(p.dtype == torch.bfloat16 for p in model.parameters())
    scored = m.scoring_module(model)
    tokens, rows, n = stream()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = score_rows(scored, tokens, rows, n, EOT, (0.01,), batch_tokens=64, progress=False, head="model",
                     autocast_dtype=torch.bfloat16)
    fast = score_rows(scored, tokens, rows, n, EOT, (0.01,), batch_tokens=64, progress=False, autocast_dtype=torch.bfloat16)
    assert fast.path == "view"
    assert np.abs(fast.loss_bits - ref.loss_bits).max() <= 1e-2 * np.abs(ref.loss_bits).max()
    after = model.state_dict()
    assert all(before[k].dtype == v.dtype and torch.equal(before[k], v) for k, v in after.items())


def test_a_check_that_runs_out_of_memory_falls_back_to_the_models_logits(monkeypatch):
    """The check upcasts a bf16 base to float32 (an 8B base: 32 GB). Where that does not fit, scoring goes on through
    the model's own logits, with the model restored (values and dtypes)."""
    model, m = adapted("lora", **{"model.base_dtype": "bfloat16", "system.dtype": "bf16"})
    tokens, rows, n = stream()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(fastpath, "_agrees", no_memory)
    got = score_rows(model, tokens, rows, n, EOT, (0.01,), batch_tokens=64, progress=False, autocast_dtype=torch.bfloat16)
    ref = score_rows(model, tokens, rows, n, EOT, (0.01,), batch_tokens=64, progress=False, head="model",
                     autocast_dtype=torch.bfloat16)
    assert got.path == "model"
    np.testing.assert_array_equal(got.loss_bits, ref.loss_bits)
    assert all(before[k].dtype == v.dtype and torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_view_is_refused_when_the_merge_is_wrong(monkeypatch):
    """A merge that does not give the adapted function (here: peft's merge doing nothing) fails
    the check, and scoring falls back to the model's own logits with the right numbers."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    model, m = adapted("lora")
    tokens, rows, n = stream()
    ref = score_rows(model, tokens, rows, n, EOT, (0.01,), batch_tokens=64, progress=False, head="model")
    monkeypatch.setattr(LoraLinear, "merge", lambda self, *a, **k: self.merged_adapters.append("default"))
    sc = score_rows(model, tokens, rows, n, EOT, (0.01,), batch_tokens=64, progress=False)
    assert sc.path == "model"
    np.testing.assert_array_equal(sc.loss_bits, ref.loss_bits)


def test_view_is_refused_for_post_processed_logits():
    """A model whose logits are not its head's output (soft-capping) is scored with its own logits."""
    model, _ = adapted("lora")

    class Capped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kw):
            out = self.inner(input_ids=input_ids, **kw)
            out.logits = 3.0 * torch.tanh(out.logits / 3.0)
            return out

    capped = Capped(model)
    tokens, rows, n = stream()
    sc = score_rows(capped, tokens, rows, n, EOT, (0.01,), batch_tokens=64, progress=False)
    ref = score_rows(capped, tokens, rows, n, EOT, (0.01,), batch_tokens=64, progress=False, head="model")
    assert sc.path == "model"
    np.testing.assert_array_equal(sc.loss_bits, ref.loss_bits)


def test_fused_gelu_is_the_tanh_gelu():
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    torch.testing.assert_close(fastpath.TanhGELU()(x), NewGELUActivation()(x), rtol=1e-12, atol=1e-12)


def test_padded_head_matches_the_linear_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 37, bias=True)
    view = fastpath.ScoringView(torch.nn.Identity(), head, 37)
    h = torch.randn(5, 8)
    torch.testing.assert_close(view.logits(h, None), head(h), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_shares_of_the_batches_add_up_to_one_process_exactly(world):
    model, m = adapted("sublora")
    tokens, rows, n = stream()
    kw = dict(batch_tokens=48, progress=False)
    one = score_rows(m.scoring_module(model), tokens, rows, n, EOT, (0.001, 0.1), **kw)
    parts = [score_batches(m.scoring_module(model), tokens, rows, EOT, (0.001, 0.1), batch_filter=lambda i, r=r: i % world == r, **kw)
             for r in range(world)]
    assert sum(len(p.index) for p in parts) > world  # every share holds batches
    many = reduce_scores(rows, n, (0.001, 0.1), parts[::-1])  # in any order
    np.testing.assert_array_equal(many.loss_bits, one.loss_bits)
    np.testing.assert_array_equal(many.topk_correct, one.topk_correct)
    np.testing.assert_array_equal(many.tokens, one.tokens)
    with pytest.raises(ValueError, match="scored twice"):
        reduce_scores(rows, n, (0.001, 0.1), parts + parts[:1])


def test_compiled_body_gives_the_eager_numbers_or_is_not_used(monkeypatch):
    """bounds.compile_body: the view's body through torch.compile (dynamic batch and length) scores to the eager
    numbers (1e-6); a compiled body that computes something else fails the first batch's check and is not used."""
    model, m = adapted("lora")
    tokens, rows, n = stream()
    said = []
    kw = dict(batch_tokens=64, progress=False)
    eager = score_rows(model, tokens, rows, n, EOT, (0.001, 0.1), **kw)
    torch._dynamo.reset()
    comp = score_rows(model, tokens, rows, n, EOT, (0.001, 0.1), compile_body=True, log=said.append, **kw)
    import shutil

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):  # inductor cannot build CPU kernels here
        assert said == ["bounds.compile_body: the scoring body did not compile to the eager body's numbers; scored eagerly"]
    else:
        assert said == ["bounds.compile_body: the scoring body compiled"]
    assert comp.path == "view"
    np.testing.assert_allclose(comp.loss_bits, eager.loss_bits, rtol=1e-6)
    np.testing.assert_array_equal(comp.topk_correct, eager.topk_correct)
    blocks = [b for b in model.modules() if type(b).__name__ == "GPT2Block"]
    assert blocks and all(getattr(b, "_compiled_call_impl", None) is None for b in blocks)  # put back when the view closed

    def wrong(fn, **_):  # a "compiled" block that is off by a little
        def off(*a, **k):
            out = fn(*a, **k)
            return out * 1.01 if torch.is_tensor(out) else (out[0] * 1.01, *out[1:])
        return off

    monkeypatch.setattr(torch, "compile", wrong)
    said.clear()
    fell_back = score_rows(model, tokens, rows, n, EOT, (0.001, 0.1), compile_body=True, log=said.append, **kw)
    assert said == ["bounds.compile_body: the scoring body did not compile to the eager body's numbers; scored eagerly"]
    np.testing.assert_array_equal(fell_back.loss_bits, eager.loss_bits)
