"""The bounds pipeline on a tiny model trained on a small, highly repetitive corpus (no run directory needed)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import TrainableTensors
from peftlab.bounds.config import bounds_config
from peftlab.bounds.evaluate import compress, compute_bounds, resolve_data, write_metrics
from peftlab.data.bins import prepare_token_bins
from peftlab.errors import ConfigError, PeftlabError
from peftlab.models.tokenizers import byte_tokenizer

SEED_KEYS = ("kl_divergence", "empirical_bpd", "bound_value", "compressed_size_bits")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-layer GPT-2 (8.5k parameters, all trained and all compressed) on ~200k bytes of three repeated phrases."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bins")
    phrases = ["the cat sat on the mat. ", "a dog ran in the park. ", "we like green tea. "]
    docs = [phrases[i % 3] * (1 + i % 2) for i in range(6000)]
    prepare_token_bins(docs, byte_tokenizer(), d, 0.02, tokenizer_name="byte", progress=False)
    tokens = np.fromfile(d / "train.bin", dtype=np.uint16).astype(np.int64)
    cfg = GPT2Config(vocab_size=260, n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=256, eos_token_id=256)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = np.random.default_rng(0)
    model.train()
    for _ in range(300):
        s = g.integers(0, len(tokens) - 65, size=16)
        x = torch.from_numpy(np.stack([tokens[i:i + 64] for i in s]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    run_cfg = SimpleNamespace(data=SimpleNamespace(dataset=str(d), block_size=64, tokenizer="byte"), model=SimpleNamespace(name="x"))
    return model, run_cfg, d


def bcfg(**kw):
    base = {"bounds.num_docs": 400, "bounds.progress_bar": False, "bounds.full_precision_units": 50, "bounds.stride": 16}
    base.update({f"bounds.{k}": v for k, v in kw.items()})
    return bounds_config(base)


def test_token_level_bound_non_vacuous_and_complete(trained, tmp_path):
    model, run_cfg, d = trained
    c = bcfg(bound_type="token_level", num_docs=3000)
    m = compute_bounds(model, TrainableTensors(), run_cfg, c, d, torch.device("cpu"), log=lambda s: None)
    for k in SEED_KEYS + ("prefix_message_len", "best_alpha", "top1_error", "top1_error_bound", "top10_error_bound",
                          "top100_error_bound", "levels", "n", "m", "delta", "wall_time_s"):
        assert k in m and m[k] is not None, k
        if isinstance(m[k], float):
            assert math.isfinite(m[k]), k
    assert m["kl_divergence_units"] == "nats"
    assert m["m"] > 100_000 and m["n"] == 3000 and m["subsampled"]
    assert m["bound_value"] < math.log2(260) and m["non_vacuous"], m["bound_value"]
    assert m["bound_value"] > m["empirical_bpd"]
    # the KL is the prefix-free length plus the extra bits, in nats
    assert m["kl_divergence"] == pytest.approx((m["prefix_message_len"] + m["extra_bits"]) * math.log(2))
    assert m["extra_bits"] == 7 + 3
    qc = m["quantization_cost"]
    assert qc["units"] == 50 and qc["quantized_bpd"] > qc["full_precision_bpd"]  # 11 levels cost something here
    out = tmp_path / "bounds_metrics.json"
    write_metrics(m, out)
    back = json.loads(out.read_text())  # strict JSON (allow_nan=False on write)
    assert back["bound_value"] == m["bound_value"]


def test_document_level_fields_and_determinism(trained):
    model, run_cfg, d = trained
    c = bcfg(bound_type="document_level", alphas=[0.01, 0.1])
    a = compute_bounds(model, TrainableTensors(), run_cfg, c, d, torch.device("cpu"), log=lambda s: None)
    b = compute_bounds(model, TrainableTensors(), run_cfg, c, d, torch.device("cpu"), log=lambda s: None)
    for k in SEED_KEYS + ("top1_error", "top10_error", "top100_error"):
        assert a[k] == b[k], k
    assert a["m"] == 5880 and a["n"] == 400  # 2% of 3000 documents held out for validation
    assert 0.0 <= a["top1_error"] <= a["top1_error_bound"] <= 1.0
    assert a["top100_error"] <= a["top10_error"] <= a["top1_error"]
    # a different sampling seed draws other documents
    other = compute_bounds(model, TrainableTensors(), run_cfg, bcfg(bound_type="document_level", alphas=[0.01, 0.1], seed=5), d,
                           torch.device("cpu"), log=lambda s: None)
    assert other["empirical_bpd"] != a["empirical_bpd"]


def test_sequence_level_runs(trained):
    model, run_cfg, d = trained
    m = compute_bounds(model, TrainableTensors(), run_cfg, bcfg(bound_type="sequence_level", full_precision_units=0), d,
                       torch.device("cpu"), log=lambda s: None)
    assert m["context_length"] == 64 and m["tokens_scored"] == 64 * m["n_unique"]
    assert m["quantization_cost"]["units"] == 0


def test_scoring_uses_the_quantized_weights(trained):
    model, run_cfg, d = trained
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    c = bcfg(bound_type="token_level", levels=2, full_precision_units=0, num_docs=50)
    compute_bounds(model, TrainableTensors(), run_cfg, c, d, torch.device("cpu"), log=lambda s: None)
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    # two levels: every compressed tensor now holds at most two distinct values (the codebook)
    values = torch.cat([v.flatten() for v in after.values()]).unique()
    assert len(values) <= 2
    with torch.no_grad():  # restore for the other tests
        for n, p in model.named_parameters():
            if n in before:
                p.copy_(before[n])


def test_quantization_aware_training_lowers_the_quantized_loss(trained):
    model, run_cfg, d = trained
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c0 = bcfg(bound_type="token_level", num_docs=1000, full_precision_units=0, levels=5)
    c1 = bcfg(bound_type="token_level", num_docs=1000, full_precision_units=0, levels=5, quant_iters=40, quant_lr=0.05)
    plain = compute_bounds(model, TrainableTensors(), run_cfg, c0, d, torch.device("cpu"), log=lambda s: None)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    qat = compute_bounds(model, TrainableTensors(), run_cfg, c1, d, torch.device("cpu"), log=lambda s: None)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    assert qat["empirical_bpd"] < plain["empirical_bpd"] - 0.05, (qat["empirical_bpd"], plain["empirical_bpd"])


def test_compress_message_grows_with_levels():
    state = {"w": torch.randn(5000, generator=torch.Generator().manual_seed(0))}
    lens = [compress(state, bcfg(levels=L)).message_bits for L in (3, 11, 31)]
    errs = [compress(state, bcfg(levels=L)).mse for L in (3, 11, 31)]
    assert lens[0] < lens[1] < lens[2] and errs[0] > errs[1] > errs[2]


def test_document_level_without_eot_files_names_file_and_command(trained, tmp_path):
    _, run_cfg, d = trained
    import shutil

    copy = tmp_path / "bins"
    shutil.copytree(d, copy)
    (copy / "doc_lengths.npy").unlink()
    with pytest.raises(PeftlabError, match=r"doc_lengths\.npy.*peftlab data prepare"):
        resolve_data(bcfg(bound_type="document_level", data=str(copy)), run_cfg)
    resolve_data(bcfg(bound_type="token_level", data=str(copy)), run_cfg)  # other levels do not need it
    not_bins = SimpleNamespace(data=SimpleNamespace(dataset="python-docs", tokenizer="gpt2"), model=SimpleNamespace(name="x"))
    with pytest.raises(PeftlabError, match=r"peftlab data prepare python-docs --output-dir DIR --tokenizer gpt2"):
        resolve_data(bcfg(), not_bins)


def test_config_errors_are_collected():
    with pytest.raises(ConfigError) as e:
        bounds_config({"bounds.levls": 3, "bounds.delta": 2.0, "training.seed": 1})
    msg = str(e.value)
    assert "Did you mean `bounds.levels`" in msg and "only --bounds.*" in msg
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        bounds_config({"bounds.alphas": "0.1,1.5"})
