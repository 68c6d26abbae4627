"""SubLoRA: projector maths, allocation modes, rebuild, export, validation (tiny GPT-2, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_cfg
from peftlab.errors import ConfigError, PeftlabError
from peftlab.methods.sublora.projectors import DENSE_MAX_ENTRIES, PROJECTORS, make_projector


def _build(tmp_path, structure=None, **over):
    """(method, wrapped model, batch) for tiny-gpt2 with the given sublora overrides."""
    from peftlab.methods import METHODS, MethodContext
    from peftlab.models import load_model

    over.setdefault("sublora__intrinsic_dim", 64)
    cfg = make_cfg(tmp_path, method="sublora", **over)
    model, tok, info = load_model(cfg, "causal_lm")
    m = METHODS["sublora"](MethodContext(cfg=cfg, task="causal_lm", target_modules=info.target_modules))
    torch.manual_seed(0)
    wrapped = m.apply(model, structure=structure)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 16), generator=g)
    return m, wrapped, {"input_ids": ids, "labels": ids}


def _randomise(model, seed=3, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.w.copy_(torch.randn(model.w.shape, generator=g) * scale)
        if model.mode == "learned":
            model.phi.copy_(torch.randn(model.phi.shape, generator=g))


# ------------------------------------------------------------------ projectors
@pytest.mark.parametrize("kind", PROJECTORS)
@pytest.mark.parametrize("D,d", [(300, 40), (101, 9), (64, 60), (7, 1), (50, 50)])
def test_projector_columns_orthonormal(kind, D, d):
    P = make_projector(kind, D, d, 137).matrix()
    assert P.shape == (D, d)
    assert torch.allclose(P.T @ P, torch.eye(d), atol=1e-5)  # unit norm, orthogonal columns
    assert (P.abs().sum(1) > 0).all()  # every entry of θ is reachable


@pytest.mark.parametrize("kind", ["kron", "hashed"])
def test_structured_projector_memory_is_linear(kind):
    D, d = 300_000, 2000  # GPT-2-small-like D with the seed grid's larger d
    p = make_projector(kind, D, d, 137)
    assert p.nbytes() <= 12 * (D + d)  # a dense P would be D·d·4 = 2.4 GB
    assert sum(b.numel() for b in p.buffers()) <= 2 * (D + d)
    eye = torch.eye(d)
    for j in (0, 1, 999, 1936, 1999):  # inside the Kronecker block and the remainder
        assert math.isclose(p(eye[j]).norm().item(), 1.0, rel_tol=1e-4)
    # P·w against the column sum Σ_j w_j P[:, j] on a few coordinates (linearity)
    w = torch.zeros(d)
    w[5], w[1990] = 2.0, -3.0
    assert torch.allclose(p(w), 2 * p(eye[5]) - 3 * p(eye[1990]), atol=1e-6)


def test_projector_seeded_and_dense_guard():
    a, b, c = (make_projector("kron", 500, 30, s).matrix() for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(PeftlabError, match="dense projector"):
        make_projector("dense", DENSE_MAX_ENTRIES, 2, 0)
    with pytest.raises(PeftlabError, match="exceeds"):
        make_projector("hashed", 10, 11, 0)


# ------------------------------------------------------------------ modes
def test_uniform_is_theta0_plus_Pw_and_D_recorded(tmp_path):
    m, model, _ = _build(tmp_path)
    rec = m.structure(model)
    # tiny-gpt2: 2 layers, c_attn 64 -> 192, r=8; q,v rows only: A 8*64, B 128*8 per layer
    assert rec["D"] == 2 * (8 * 64 + 128 * 8) and rec["D_A"] == 2 * 8 * 64
    _randomise(model)
    t = model.lora_tensors()
    P = model.projectors[0].matrix()
    delta = P @ model.w.detach()
    off = 0
    for s in model.segs:
        got = t[s.name].detach()
        if s.rows is not None:  # the k third of c_attn's lora_B stays exactly zero
            assert torch.equal(got[64:128], torch.zeros_like(got[64:128]))
            got = torch.cat([got[:64], got[128:]])
        theta0 = torch.zeros_like(got) if s.kind == "B" else dict(model.model.named_parameters())[s.name].detach()
        assert torch.allclose(got.reshape(-1), theta0.reshape(-1) + delta[off:off + got.numel()], atol=1e-6)
        off += got.numel()
    assert off == rec["D"]


def test_fixed_mode_touches_A_only_through_PA_and_B_through_PB(tmp_path):
    m, model, _ = _build(tmp_path, sublora__allocation_mode="fixed", sublora__allocation_ratio=0.75)
    rec = m.structure(model)
    assert (rec["d_A"], rec["d_B"]) == (16, 48)
    base = {k: v.detach().clone() for k, v in model.lora_tensors().items()}
    kinds = {s.name: s.kind for s in model.segs}
    for lo, hi, side in ((0, 16, "A"), (16, 64, "B")):
        with torch.no_grad():
            model.w.zero_()
            model.w[lo:hi] = torch.randn(hi - lo)
        t = model.lora_tensors()
        for n, v in t.items():
            changed = not torch.equal(v.detach(), base[n])
            assert changed == (kinds[n] == side), (n, side)
        # and the change is exactly P_side · w[lo:hi]
        k = 0 if side == "A" else 1
        b = model.blocks[k]
        delta = model.projectors[k](model.w[lo:hi].detach())
        for i, off in zip(b.segments, b.offsets):
            s = model.segs[i]
            got = t[s.name].detach() - base[s.name]
            if s.rows is not None:
                got = got[model.__getattr__(f"rows_{i}")]
            assert torch.allclose(got.reshape(-1), delta[off:off + s.numel], atol=1e-6)


def test_fixed_ratio_rounding_matches_seed_table():
    from peftlab.methods.sublora.method import split_dims

    assert split_dims(1000, 0.8) == (200, 800)
    assert split_dims(2000, 0.2) == (1600, 400)
    assert split_dims(1000, 0.5) == (500, 500)


def test_learned_mask_formula_gates_get_gradients_and_move(tmp_path):
    m, model, batch = _build(tmp_path, sublora__allocation_mode="learned", sublora__gating_scale=5.0)
    assert model.groups == ["0", "1"]
    _randomise(model)
    # the soft mask by hand: m_i = sigmoid(s (γ d − i))
    g = torch.sigmoid(model.phi.detach())
    i = torch.arange(64, dtype=torch.float32)
    assert torch.allclose(model.masks().detach(), torch.sigmoid(5.0 * (g[:, None] * 64 - i[None])), atol=1e-6)
    # B of layer 0 receives P_B,0 (w ⊙ m_0), A receives P_A,0 (w ⊙ (1 − m_0))
    mk = model.masks().detach()
    for k, b in enumerate(model.blocks):
        want = model.projectors[k](model.w.detach() * (mk[b.gate] if b.side == "B" else 1 - mk[b.gate]))
        got_all = model.lora_tensors()
        s = model.segs[b.segments[0]]
        got = got_all[s.name].detach()
        if s.kind == "B":
            got = got[model.__getattr__(f"rows_{b.segments[0]}")]
        else:
            got = got - dict(model.model.named_parameters())[s.name].detach()
        assert torch.allclose(got.reshape(-1), want[:s.numel], atol=1e-6)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert model.phi.grad is not None and (model.phi.grad.abs() > 0).all()
    opt = torch.optim.SGD(m.param_groups(model), lr=1.0)
    before = model.gates().detach().clone()
    opt.step()
    assert (model.gates().detach() - before).abs().min() > 0


def test_distinct_layers_and_sides_get_distinct_projections(tmp_path):
    m, model, _ = _build(tmp_path, sublora__allocation_mode="learned")
    seeds = [b.seed for b in model.blocks]
    assert len(seeds) == 4 and len(set(seeds)) == 4
    a0, a1 = model.projectors[0].matrix(), model.projectors[2].matrix()  # A of layers 0 and 1, same shape
    assert a0.shape == a1.shape and not torch.allclose(a0, a1)


# ------------------------------------------------------------------ equivalence with LoRA
def test_dense_full_dimension_sgd_step_equals_lora_step(tmp_path):
    """d = D with an orthogonal P: w ← w − η Pᵀ∇θ gives θ ← θ − η ∇θ, i.e. plain LoRA SGD."""
    D = 2 * (1 * 64 + 192 * 1)  # r = 1, whole c_attn: A 1×64 and B 192×1 per layer
    m, model, batch = _build(tmp_path, sublora__intrinsic_dim=D, sublora__projector="dense", sublora__fused_attn="qkv",
                             lora__r=1, lora__dropout=0.0)
    assert m.structure(model)["D"] == D
    from peftlab.methods import METHODS, MethodContext
    from peftlab.models import load_model

    cfg = make_cfg(tmp_path, method="lora", lora__r=1, lora__dropout=0.0)
    base, _, info = load_model(cfg, "causal_lm")
    lora = METHODS["lora"](MethodContext(cfg=cfg, task="causal_lm", target_modules=info.target_modules)).apply(base)
    lp = dict(lora.named_parameters())
    with torch.no_grad():
        for n, t in model.lora_tensors().items():
            lp[n].copy_(t)
    eta = 0.5
    opt_s = torch.optim.SGD([model.w], lr=eta)
    opt_l = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=eta)
    model.eval(), lora.eval()  # the base model's own dropout would draw different masks
    for _ in range(2):  # two steps: the first moves only B (B₀ = 0), the second A too
        for mod, opt in ((model, opt_s), (lora, opt_l)):
            opt.zero_grad()
            mod(**batch).loss.backward()
            opt.step()
    t = model.lora_tensors()
    moved = 0.0
    for n, v in t.items():
        assert torch.allclose(v.detach(), lp[n].detach(), atol=1e-5), n
        moved += (v.detach() - dict(model.model.named_parameters())[n].detach()).abs().sum().item()
    assert moved > 1e-3


# ------------------------------------------------------------------ rebuild, export, eval
@pytest.mark.parametrize("mode", ["uniform", "fixed", "learned"])
def test_rebuild_from_structure_reproduces_logits(tmp_path, mode):
    m, model, batch = _build(tmp_path, sublora__allocation_mode=mode, sublora__projector="hashed" if mode == "fixed" else "kron")
    _randomise(model)
    model.eval()
    want = model(**batch).logits
    record = json.loads(json.dumps(m.structure(model)))  # through JSON, as method.json
    state = m.model_state(model)
    m2, model2, _ = _build(tmp_path, structure=record, sublora__intrinsic_dim=7, sublora__projector="dense")  # config ignored
    m2.load_model_state(model2, state)
    model2.eval()
    assert torch.equal(model2(**batch).logits, want)
    assert set(m2.compressible_state(model2)) == ({"w", "phi"} if mode == "learned" else {"w"})


def test_dropout_off_in_eval(tmp_path):
    m, model, batch = _build(tmp_path, lora__dropout=0.5)
    _randomise(model, scale=5.0)
    model.train()
    torch.manual_seed(0)
    a = model(**batch).logits
    b = model(**batch).logits
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(**batch).logits, model(**batch).logits)
    assert "w" in model.state_dict() and any(k.startswith("model.") for k in model.state_dict())


def test_train_export_loads_with_peft_and_same_seed_same_run(tmp_path, run_train):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    kw = dict(sublora__allocation_mode="learned", sublora__intrinsic_dim=64, training__max_steps=6,
              training__learning_rate=0.05, sublora__gating_lr=0.5, logging__progress_bar=False)
    res = run_train(make_cfg(tmp_path / "a", method="sublora", **kw))
    assert res["trainable_params"] == 64 + 2 and res["method_summary"]["D"] == 3072
    run = tmp_path / "a" / "run"
    trace = (run / "gating_trace.csv").read_text().splitlines()
    assert trace[0] == "step,gating_scale,gamma_0,gamma_1" and len(trace) == 7
    alloc = json.loads((run / "allocation.json").read_text())
    assert set(alloc["gamma"]) == {"0", "1"} and alloc["gamma"]["0"] != 0.5
    w = load_file(str(run / "subspace" / "subspace.safetensors"))
    assert w["w"].abs().sum() > 0
    # the exported adapter is a plain peft LoRA with θ₀ + P·w materialised
    m, model, batch = _build(tmp_path / "a", structure=json.loads((run / "subspace" / "structure.json").read_text()),
                             **{k: v for k, v in kw.items() if k.startswith("sublora")})
    m.load_model_state(model, {**{k: v for k, v in w.items() if k != "gating_scale"}, "gating_scale": w["gating_scale"][0]})
    model.eval()
    base = AutoModelForCausalLM.from_pretrained(str(run / "base_model"))
    peft = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    assert torch.allclose(peft(**batch).logits, model(**batch).logits, atol=1e-5)
    # load_run rebuilds the run from its directory alone (method.json + checkpoint)
    from peftlab.runs import load_run

    loaded = load_run(run, "final")
    assert torch.equal(loaded.model(**batch).logits, model(**batch).logits)
    assert json.loads((run / "method.json").read_text()) == json.loads((run / "subspace" / "structure.json").read_text())
    # same config and seed -> the same numbers
    run_train(make_cfg(tmp_path / "b", method="sublora", **kw))
    w2 = load_file(str(tmp_path / "b" / "run" / "subspace" / "subspace.safetensors"))
    assert torch.equal(w["w"], w2["w"]) and torch.equal(w["phi"], w2["phi"])


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("over,match", [
    ({"sublora.allocation_ratio": 1.5}, "allocation_ratio` must be in"),
    ({"sublora.intrinsic_dim": 0}, "intrinsic_dim` must be at least 1"),
    ({"sublora.allocation_mode": "fixed", "sublora.intrinsic_dim": 3, "sublora.allocation_ratio": 0.1}, "d_A=3, d_B=0"),
    ({"sublora.gating_scale_final": 20.0}, "gating_anneal_steps"),
])
def test_bad_settings_rejected_before_model(over, match):
    from peftlab.config import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, {"method": "sublora", **over})


def test_allocation_flags_with_another_method_rejected():
    from peftlab.config import load_config

    with pytest.raises(ConfigError, match="applies to SubLoRA only"):
        load_config(None, {"method": "lora", "sublora.allocation_mode": "fixed"})
    load_config(None, {"method": "lora", "sublora.intrinsic_dim": 2000})  # a shared study file may carry d


def test_d_larger_than_D_rejected_before_training(tmp_path):
    with pytest.raises(PeftlabError, match="hold only D=3,072"):
        _build(tmp_path, sublora__intrinsic_dim=5000)
    with pytest.raises(PeftlabError, match="exceeds D=3,072"):
        _build(tmp_path, sublora__intrinsic_dim=3073, sublora__allocation_mode="learned")


@pytest.mark.parametrize("kind", PROJECTORS)
def test_learned_blocks_smaller_than_d_get_wide_projections(tmp_path, kind):
    """Each tiny-gpt2 layer holds 512 A parameters; with d = 600 the A blocks are wide: P = Hᵀ with
    orthonormal rows, so every entry is reachable, and training still reaches the gates."""
    m, model, batch = _build(tmp_path, sublora__intrinsic_dim=600, sublora__allocation_mode="learned", sublora__projector=kind)
    b = model.blocks[0]
    assert (b.side, b.D, b.d) == ("A", 512, 600)
    P = model.projectors[0].matrix()
    assert P.shape == (512, 600) and torch.allclose(P @ P.T, torch.eye(512), atol=1e-5)
    _randomise(model)
    model(**batch).loss.backward()
    assert model.w.grad.abs().sum() > 0 and (model.phi.grad.abs() > 0).all()
    # the analytic gradient through the wide projection matches a finite difference
    w = torch.randn(600, dtype=torch.float64)
    g = torch.randn(512, dtype=torch.float64)
    proj = model.projectors[0].double()
    x = torch.zeros(600, dtype=torch.float64, requires_grad=True)
    (proj(x) * g).sum().backward()
    assert torch.allclose(x.grad, P.double().T @ g, atol=1e-5) and torch.allclose(proj(w), P.double() @ w, atol=1e-5)


def test_learned_resume_from_mid_run_checkpoint_matches(tmp_path, run_train):
    from safetensors.torch import load_file

    kw = dict(sublora__allocation_mode="learned", sublora__intrinsic_dim=64, training__max_steps=8, training__save_steps=4,
              training__learning_rate=0.05, sublora__gating_lr=0.5, sublora__gating_scale_final=10.0,
              sublora__gating_anneal_steps=6, logging__progress_bar=False)
    run_train(make_cfg(tmp_path, method="sublora", **kw))
    run = tmp_path / "run"
    trace = (run / "gating_trace.csv").read_text()
    w = load_file(str(run / "subspace" / "subspace.safetensors"))
    assert w["gating_scale"].item() == 10.0  # annealed 5 -> 10 over 6 steps
    (run / "results_final.json").unlink()
    run_train(make_cfg(tmp_path, method="sublora", training__resume_from=str(run / "checkpoints" / "step-4"), **kw))
    assert (run / "gating_trace.csv").read_text() == trace  # rows after step 4 replaced, not duplicated
    w2 = load_file(str(run / "subspace" / "subspace.safetensors"))
    assert all(torch.equal(w[k], w2[k]) for k in w)


@pytest.mark.slow
def test_example_config_learns_on_python_docs(tmp_path, run_train):
    """configs/examples/lm_sublora.yaml, shortened: 2,000 trained numbers pull the frozen random
    GPT-2 (full GPT-2 BPE vocabulary) well below the untrained model's ln(50257) = 10.83."""
    from conftest import ROOT
    from peftlab.config import load_config

    cfg = load_config(ROOT / "configs/examples/lm_sublora.yaml", {
        "output.dir": str(tmp_path / "run"), "training.max_steps": 30, "training.eval_max_batches": 2,
        "logging.progress_bar": False, "model.name": str(ROOT / "configs/examples/gpt2-mini")})
    try:
        res = run_train(cfg)
    except PeftlabError as e:  # the offline corpus or tokenizer package is not installed here
        pytest.skip(str(e).splitlines()[0])
    assert res["final"]["val_loss"] < math.log(50257) - 1.5  # measured: 8.49 after 30 steps


def test_rebuild_refuses_a_structure_whose_projections_differ(tmp_path):
    m, model, _ = _build(tmp_path, sublora__allocation_mode="fixed")
    record = json.loads(json.dumps(m.structure(model)))
    record["blocks"][1]["seed"] += 1
    with pytest.raises(PeftlabError, match="derives projector seeds differently"):
        _build(tmp_path, structure=record)
    record = json.loads(json.dumps(m.structure(model)))
    record["theta0_sum"] += 1.0
    with pytest.raises(PeftlabError, match="θ₀ regenerated"):
        _build(tmp_path, structure=record)
