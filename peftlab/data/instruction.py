"""Instruction tuning data for causal LMs: prompt/response and chat records, response-only
loss, packing, and readable generations per epoch. User guide: docs/instruction.md.

    raw = load_raw(cfg)            # RawTask(task="causal_lm", info["format"] = "instruction" | "chat")
    train, val, collate = build_datasets(raw, tokenizer, cfg, model=model)

Records are normalised to conversations (``[{"role", "content"}, ...]``) when loaded, and
bad records (missing fields, empty responses) are counted and dropped there, before the
model is built. Rendering happens once the tokenizer is known:

* the tokenizer's chat template (``data.chat_template=auto`` when it has one, or
  ``tokenizer``): the text is exactly ``tokenizer.apply_chat_template(messages)``, and
  assistant turns are located by rendering each prefix of the conversation (with the
  generation prompt) and checking that it is a prefix of the whole;
* otherwise peftlab's default: the Alpaca prompt for instruction records
  (:data:`ALPACA_PROMPT`), a role-tagged template for chat records
  (:data:`DEFAULT_CHAT_TEMPLATE`); responses end with the tokenizer's end-of-text token.

The text is tokenized once; with a fast tokenizer the characters of every assistant
turn are mapped to tokens through the offsets, so a token is supervised when it holds
any response character. Unless ``data.train_on_prompt``, every other token has label
-100. Validation always scores responses only.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .. import hub
from ..errors import PeftlabError
from ..io import read_text
from .packing import accepts_position_ids, pack_examples, padding_per_epoch, prepare_model_for_packing
from .raw import SAMPLES_DIR, RawTask, _split_files, register_dataset
from .splits import _subsample, stratified_split

FORMATS = ("instruction", "chat")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
SHOW_BAD = 3  # bad records shown in the report

log = logging.getLogger("peftlab")

# The Stanford Alpaca prompt (the convention Alpaca-style data is written for). The first
# line is replaced by ``data.system_prompt`` when one is set.
ALPACA_PREAMBLE = "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the request."
ALPACA_PROMPT = "{preamble}\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"

# Default chat template (Jinja, rendered by transformers): every message is
# ``<|role|>\ncontent\n``; assistant content is followed by the end-of-text token, which
# is supervised so that the model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- bad records
@dataclass
class BadRecords:
    """Counts of skipped records by reason, with the first few kept for the report."""

    split: str
    total: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    shown: list[str] = field(default_factory=list)

    def add(self, index: int, reason: str, record: Any) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.shown) < SHOW_BAD:
            text = json.dumps(record, ensure_ascii=False, default=str) if not isinstance(record, str) else record
            self.shown.append(f"#{index} {reason}: {text[:160] + ('...' if len(text) > 160 else '')}")

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        return f"{self.count} of {self.total} {self.split} records skipped ({why}); first: " + " | ".join(self.shown)

    def check(self, name: str, hint: str = "", warn: bool = True) -> None:
        """Raise if every record was bad; else log the summary as a warning (if any was bad and ``warn``)."""
        if self.count and self.count == self.total:
            raise PeftlabError(f"Every {self.split} record of {name!r} is unusable: {self.summary()}.{hint}")
        if self.count and warn:
            log.warning(f"data bad records: {self.summary()}")


# ------------------------------------------------------------------------------ reading
def read_records(path: Path) -> list:
    """Rows of a .jsonl (one object per line), .json (a list of objects, or an object
    holding one list) or .parquet file, as Python objects."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with io.StringIO(read_text(path, "instruction data file"), newline=None) as f:  # newlines as open() reads them
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise PeftlabError(f"{path}:{i} is not valid JSON; each line of a .jsonl file must be one JSON object.") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(read_text(path, "instruction data file"))
        except json.JSONDecodeError as e:
            raise PeftlabError(f"{path} is not valid JSON ({e}); give a list of records or use JSON Lines (.jsonl).") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1:
                data = lists[0]
        if not isinstance(data, list):
            raise PeftlabError(f"{path} holds a JSON {type(data).__name__}; expected a list of records (or an object with one list of records).")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise PeftlabError(f"{path}: instruction data must be .jsonl, .json or .parquet, got {suffix or 'no extension'}.")


def sniff_format(path: Path, cfg) -> Optional[str]:
    """``chat`` / ``instruction`` when the first record of a local file has the configured
    messages / instruction+output fields, else None (the file is something else)."""

    path = Path(path)
    if path.is_dir():
        path = _split_files(path).get("train")
        if path is None:
            return None
    if path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        return None
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        keys = set(pq.read_schema(path).names)
    elif path.suffix.lower() == ".jsonl":
        with io.StringIO(read_text(path, "data file"), newline=None) as f:  # any local .jsonl: not yet known as instruction data
            first = next((ln for ln in f if ln.strip()), "")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            return None
        keys = set(row) if isinstance(row, dict) else set()
    else:
        try:
            rows = read_records(path)
        except PeftlabError:
            return None
        keys = set(rows[0]) if rows and isinstance(rows[0], dict) else set()
    d = cfg.data
    if d.messages_column in keys:
        return "chat"
    if d.instruction_column in keys and d.output_column in keys:
        return "instruction"
    return None


# ---------------------------------------------------------------------- normalisation
def _message(m: Any) -> Optional[dict]:
    """``{"role", "content"}`` from a role/content or ShareGPT from/value message, else None."""
    if not isinstance(m, dict):
        return None
    if "role" in m and "content" in m:
        role, content = m["role"], m["content"]
    elif "from" in m and "value" in m:
        role, content = _SHAREGPT_ROLES.get(m["from"], m["from"]), m["value"]
    else:
        return None
    return {"role": role, "content": content}


def normalize(rows: list, fmt: str, cfg, split: str) -> tuple[list[dict], BadRecords]:
    """Turn raw records into ``{"messages": [...], "alpaca": (instruction, input) | None}``,
    dropping bad ones (returned in :class:`BadRecords`)."""
    d = cfg.data
    bad = BadRecords(split, total=len(rows))
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            bad.add(i, "not a JSON object", row)
            continue
        system = [{"role": "system", "content": d.system_prompt}] if d.system_prompt else []
        if fmt == "instruction":
            ins, inp, resp = row.get(d.instruction_column), row.get(d.input_column), row.get(d.output_column)
            if not isinstance(ins, str) or not ins.strip():
                bad.add(i, f"missing field `{d.instruction_column}`" if ins is None else f"empty or non-text `{d.instruction_column}`", row)
                continue
            if resp is None:
                bad.add(i, f"missing field `{d.output_column}`", row)
                continue
            if not isinstance(resp, str) or not resp.strip():
                bad.add(i, "empty response", row)
                continue
            if inp is not None and not isinstance(inp, str):
                bad.add(i, f"non-text `{d.input_column}`", row)
                continue
            inp = inp or ""
            user = f"{ins}\n\n{inp}" if inp.strip() else ins
            out.append({"messages": system + [{"role": "user", "content": user}, {"role": "assistant", "content": resp}],
                        "alpaca": (ins, inp)})
            continue
        msgs = row.get(d.messages_column)
        if msgs is None:
            bad.add(i, f"missing field `{d.messages_column}`", row)
            continue
        conv = [_message(m) for m in msgs] if isinstance(msgs, list) else [None]
        if not conv or any(m is None for m in conv):
            bad.add(i, f"`{d.messages_column}` is not a list of {{role, content}} messages", row)
            continue
        roles = {m["role"] for m in conv}
        if roles - set(ROLES):
            bad.add(i, f"unknown role {sorted(roles - set(ROLES))[0]!r}", row)
            continue
        if any(not isinstance(m["content"], str) for m in conv):
            bad.add(i, "non-text message content", row)
            continue
        if "assistant" not in roles:
            bad.add(i, "no assistant message", row)
            continue
        if any(m["role"] == "assistant" and not m["content"].strip() for m in conv):
            bad.add(i, "empty response", row)
            continue
        if conv[0]["role"] != "system":
            conv = system + conv
        if conv[0]["role"] == "assistant":  # nothing before the first response to condition it on (or to render)
            bad.add(i, "starts with an assistant message (no user or system message before it)", row)
            continue
        out.append({"messages": conv, "alpaca": None})
    return out, bad


# ---------------------------------------------------------------------------- loading
def _raw(name: str, fmt: str, train_rows: list, val_rows: Optional[list], cfg, source: str) -> RawTask:
    train, bad_t = normalize(train_rows, fmt, cfg, "train")
    hint = (f" Check the field names (data.instruction_column={cfg.data.instruction_column!r}, data.input_column={cfg.data.input_column!r}, "
            f"data.output_column={cfg.data.output_column!r}, data.messages_column={cfg.data.messages_column!r}) and data.format={fmt}.")
    bad_t.check(name, hint, warn=False)  # reported through RawTask.info, which the run logs
    info = {"source": source, "format": fmt}
    val = None
    if val_rows is not None:
        val, bad_v = normalize(val_rows, fmt, cfg, "validation")
        bad_v.check(name, hint, warn=False)
        if bad_v.count:
            info["bad_validation_records"] = bad_v.summary()
    if bad_t.count:
        info["bad_train_records"] = bad_t.summary()
    return RawTask("causal_lm", name, train, val, info=info)


def load_local(path: Path, fmt: str, cfg) -> RawTask:
    if path.is_dir():
        files = _split_files(path)
        if "train" not in files:
            raise PeftlabError(f"Folder {path} has no training file: expected train.jsonl / train.json / train.parquet (or <name>_train.*).")
        train_f, val_f = files["train"], files.get("validation")
    else:
        train_f, val_f = path, None
    return _raw(path.stem, fmt, read_records(train_f), read_records(val_f) if val_f else None, cfg, source=str(path))


def load_hub(name: str, fmt: str, cfg) -> RawTask:
    """A hub dataset (``name`` or ``name:config``): its train split, and validation (or test) when present."""

    if not hub.reachable():
        raise PeftlabError(f"data.dataset={name!r} is not a local path and the Hugging Face hub cannot be reached; "
                           "give a local .jsonl/.json/.parquet file or use a shipped sample (instruct-sample, chat-sample).")
    import datasets

    repo, _, config = name.partition(":")
    try:
        dd = datasets.load_dataset(repo, config or None)
    except Exception as e:  # datasets raises many types for a missing/private dataset
        raise PeftlabError(f"Could not load hub dataset {name!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if "train" not in dd:
        raise PeftlabError(f"Hub dataset {name!r} has no train split (splits: {', '.join(dd)}).")
    val_split = next((s for s in ("validation", "valid", "val", "test") if s in dd), None)
    return _raw(name, fmt, dd["train"].to_list(), dd[val_split].to_list() if val_split else None, cfg,
                source=f"hub {name} (train{', ' + val_split if val_split else ''})")


def maybe_load(name: str, cfg) -> Optional[RawTask]:
    """The instruction/chat RawTask for ``data.dataset`` when it is one (explicit
    ``data.format``, or a local file whose records look like it), else None."""

    fmt = cfg.data.format
    path = Path(name).expanduser()
    if path.exists():
        found = sniff_format(path, cfg)
        if fmt == "auto":
            fmt = found
        if fmt is None:
            return None
        return load_local(path, fmt, cfg)
    if fmt != "auto" and hub.looks_like_name(name):
        return load_hub(name, fmt, cfg)
    return None


def _sample(name: str, fmt: str):
    def load(cfg) -> RawTask:
        d = SAMPLES_DIR / name
        return _raw(name, fmt, read_records(d / "train.jsonl"), read_records(d / "validation.jsonl"), cfg,
                    source=f"shipped synthetic sample {d} (peftlab/data/instruction_samples.py)")

    register_dataset(name)(load)


_sample("instruct-sample", "instruction")
_sample("chat-sample", "chat")


def is_instruction(raw: RawTask) -> bool:
    return raw.info.get("format") in FORMATS


def finalize(raw: RawTask, cfg) -> RawTask:
    """Validation carving and subsampling (seeded by ``data.split_seed``) for instruction data."""

    d = cfg.data
    fmt = raw.info["format"]
    if d.format != "auto" and d.format != fmt:
        raise PeftlabError(f"data.format={d.format} but {raw.name!r} holds {fmt} records; set --data.format={fmt} (or auto).")
    if d.clean_text:
        raise PeftlabError("data.clean_text (TweetEval-style cleaning) does not apply to instruction or chat data; set --data.clean_text=false.")
    if d.train_samples:
        raise PeftlabError("data.train_samples (k-shot per class) applies to classification; for instruction data use data.max_train_examples.")
    if raw.val is None:
        if len(raw.train) < 2:
            raise PeftlabError(f"{raw.name} has a single usable record and no validation split; add records or a validation file.")
        keep, held = stratified_split([0] * len(raw.train), d.val_fraction, d.split_seed)
        raw.val = [raw.train[i] for i in held]
        raw.train = [raw.train[i] for i in keep]
        raw.info["validation"] = f"carved {len(held)} records ({d.val_fraction * 100:g}%, data.split_seed={d.split_seed}) from train"
    if d.max_train_examples and len(raw.train) > d.max_train_examples:
        raw.train = [raw.train[i] for i in _subsample(len(raw.train), d.max_train_examples, d.split_seed)]
    if d.max_val_examples and len(raw.val) > d.max_val_examples:
        raw.val = [raw.val[i] for i in _subsample(len(raw.val), d.max_val_examples, d.split_seed)]
    raw.info["train_examples"], raw.info["val_examples"] = len(raw.train), len(raw.val)
    return raw


def check_options(raw: RawTask, cfg) -> None:
    """Instruction-only options asked of other data: an error before the model is built."""
    d = cfg.data
    if is_instruction(raw):
        return
    asked = [k for k, on in (("format", d.format != "auto"), ("packing", d.packing), ("eval_generate", d.eval_generate > 0),
                             ("train_on_prompt", d.train_on_prompt)) if on]
    if asked:
        raise PeftlabError(
            f"data.{asked[0]} applies to instruction or chat data, but {raw.name!r} is a {raw.task} dataset of "
            f"{'documents' if raw.task == 'causal_lm' else 'labelled texts'}. Use instruction records (instruction/input/output, "
            "e.g. instruct-sample) or chat records (messages, e.g. chat-sample), or remove the option."
        )


# ---------------------------------------------------------------------------- rendering
def use_tokenizer_template(tokenizer, cfg) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    mode = cfg.data.chat_template
    if mode == "tokenizer" and not has:
        raise PeftlabError("data.chat_template=tokenizer but the tokenizer has no chat template; use --data.chat_template=default "
                           "(peftlab's documented template) or auto.")
    return has and mode != "default"


def _apply(tokenizer, messages, template: Optional[str], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt)


def render(example: dict, tokenizer, tokenizer_template: bool) -> tuple[str, list[tuple[int, int]]]:
    """``(text, assistant spans)``: the full text and the character ranges of every
    assistant turn (content and its end-of-turn marker), which are the supervised part."""
    msgs = example["messages"]
    if example["alpaca"] is not None and not tokenizer_template:
        ins, inp = example["alpaca"]
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        preamble = system if system is not None else ALPACA_PREAMBLE.format(ctx=", paired with an input that provides further context" if inp.strip() else "")
        prompt = ALPACA_PROMPT.format(preamble=preamble, instruction=ins, input_block=f"### Input:\n{inp}\n\n" if inp.strip() else "")
        text = prompt + msgs[-1]["content"] + (tokenizer.eos_token or "")
        return text, [(len(prompt), len(text))]
    template = None if tokenizer_template else DEFAULT_CHAT_TEMPLATE
    text = _apply(tokenizer, msgs, template, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = _apply(tokenizer, msgs[:i], template, True)
        end = _apply(tokenizer, msgs[:i + 1], template, False)
        if not (text.startswith(start) and text.startswith(end) and len(end) > len(start)):
            raise PeftlabError(
                "The chat template does not render conversations prefix by prefix (the text up to an assistant turn is not a "
                "prefix of the whole conversation; some templates drop earlier reasoning or change the system message), so the "
                "response tokens cannot be located. Use --data.chat_template=default (peftlab's documented template), or "
                "data.train_on_prompt does not help here."
            )
        spans.append((len(start), len(end)))
    return text, spans


def encode(text: str, spans: list[tuple[int, int]], tokenizer, add_special_tokens: bool) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it holds a character of a span."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        sup = [e > s and any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
        return list(enc["input_ids"]), sup
    # slow tokenizers have no offsets: tokenize the pieces between span edges one by one
    cuts = sorted({0, len(text), *[c for sp in spans for c in sp]})
    ids: list[int] = []
    sup: list[bool] = []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= a and b <= e for s, e in spans)
        ids += piece
        sup += [inside] * len(piece)
    if add_special_tokens and getattr(tokenizer, "bos_token_id", None) is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        ids, sup = [tokenizer.bos_token_id] + ids, [False] + sup
    return ids, sup


# ----------------------------------------------------------------------------- datasets
@dataclass
class Encoded:
    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt_ids: torch.Tensor  # the text before the last response (for generation)
    reference: str  # the last response


class InstructionDataset(torch.utils.data.Dataset):
    """Rows of ``input_ids`` and ``labels`` (-100 where not learned); packed rows also
    carry ``position_ids``. ``stats`` holds the counts that are logged."""

    def __init__(self, rows: list[dict], stats: dict, examples: Optional[list[Encoded]] = None):
        self.rows, self.stats, self.examples = rows, stats, examples or []

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> list[int]:
        return [len(r["input_ids"]) for r in self.rows]

    def __getitem__(self, i: int) -> dict:
        return {k: v for k, v in self.rows[i].items() if isinstance(v, torch.Tensor)}


def encode_split(records: list[dict], tokenizer, cfg, split: str, train_on_prompt: bool) -> tuple[list[Encoded], BadRecords, dict]:
    d = cfg.data
    tmpl = use_tokenizer_template(tokenizer, cfg)
    bad = BadRecords(split, total=len(records))
    out: list[Encoded] = []
    truncated = 0
    for i, ex in enumerate(records):
        text, spans = render(ex, tokenizer, tmpl)
        ids, sup = encode(text, spans, tokenizer, add_special_tokens=not tmpl)
        first = next((j for j, s in enumerate(sup) if s), None)
        if first is None:
            bad.add(i, "response renders to no tokens", ex["messages"])
            continue
        if first >= d.max_length:
            bad.add(i, f"prompt longer than max_length={d.max_length} ({first} tokens)", ex["messages"])
            continue
        if len(ids) > d.max_length:
            truncated += 1
            ids, sup = ids[:d.max_length], sup[:d.max_length]
        x = torch.tensor(ids, dtype=torch.long)
        labels = x.clone() if train_on_prompt else torch.where(torch.tensor(sup), x, torch.full_like(x, -100))
        labels[0] = -100  # never predicted (and in a packed row it would be predicted from the previous example)
        last = spans[-1][0]
        prompt = tokenizer(text[:last], add_special_tokens=not tmpl)["input_ids"]
        reference = next(m["content"] for m in reversed(ex["messages"]) if m["role"] == "assistant")
        out.append(Encoded(x, labels, torch.tensor(prompt, dtype=torch.long), reference))
    stats = {"examples": len(out), "tokens": sum(len(e.input_ids) for e in out),
             "supervised_tokens": sum(int((e.labels != -100).sum()) for e in out), "truncated": truncated,
             "bad_records": bad.count, "template": "tokenizer chat template" if tmpl else "peftlab default"}
    return out, bad, stats


def build(raw: RawTask, tokenizer, cfg, model: Optional[torch.nn.Module] = None):
    """``(train_dataset, val_dataset, collate)`` for instruction/chat data (see module doc)."""

    d, t = cfg.data, cfg.training
    if tokenizer.pad_token_id is None:
        raise PeftlabError("The tokenizer has no padding token; set one (peftlab's load_model uses the end-of-text token).")
    hint = f" Raise --data.max_length (now {d.max_length}) or shorten the prompts."
    train, bad_t, st_t = encode_split(raw.train, tokenizer, cfg, "train", d.train_on_prompt)
    bad_t.check(raw.name, hint)
    val, bad_v, st_v = encode_split(raw.val, tokenizer, cfg, "validation", False)  # validation: responses only, always
    bad_v.check(raw.name, hint)
    for split, st in (("train", st_t), ("validation", st_v)):
        log.info(f"data {split}: {st['examples']:,} {raw.info['format']} examples ({st['template']}), {st['tokens']:,} tokens, "
                 f"{st['supervised_tokens']:,} supervised ({100 * st['supervised_tokens'] / max(st['tokens'], 1):.1f}%"
                 f"{', prompt tokens too' if split == 'train' and d.train_on_prompt else ', responses only'})"
                 + (f"; {st['truncated']} cut at max_length={d.max_length}" if st["truncated"] else ""))
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in train]
    mode = "padded"
    if d.packing:
        lengths = [len(r["input_ids"]) for r in rows]
        packed = pack_examples(rows, d.max_length)
        isolated = True if model is None else prepare_model_for_packing(model)
        mode = "packed" if isolated else "packed-shared"
        pad_u, tot_u = padding_per_epoch(lengths, t.batch_size, t.seed)
        pad_p, tot_p = padding_per_epoch([len(r["input_ids"]) for r in packed], t.batch_size, t.seed)
        st_t.update(packed_rows=len(packed), packing_mode=mode, padding_unpacked=pad_u, positions_unpacked=tot_u,
                    padding_packed=pad_p, positions_packed=tot_p)
        log.info(f"data packing: {len(rows):,} examples into {len(packed):,} rows of at most {d.max_length} tokens; per epoch at "
                 f"batch_size {t.batch_size}: {pad_p:,} padding of {tot_p:,} positions ({100 * pad_p / max(tot_p, 1):.1f}%) instead of "
                 f"{pad_u:,} of {tot_u:,} ({100 * pad_u / max(tot_u, 1):.1f}%) unpacked")
        if model is None:
            log.debug("data packing: no model given to build_datasets (counting rows only), so keeping packed examples apart was "
                      "not checked; training builds the datasets with the model, which is checked and gets use_cache=False")
        elif not isolated:
            log.warning("data packing: this model does not keep packed examples apart (its attention ignores restarting position_ids), "
                        "so examples in one row attend to earlier examples of the row (the fallback documented in docs/instruction.md). "
                        "Set --data.packing=false for exact per-example training.")
        rows = packed
    n_gen = min(d.eval_generate, len(val))
    return (InstructionDataset(rows, st_t), InstructionDataset([{"input_ids": e.input_ids, "labels": e.labels} for e in val], st_v, val[:n_gen]),
            InstructionCollate(tokenizer.pad_token_id, shared=mode == "packed-shared", position_ids=model is None or _accepts_pos(model)))


def _accepts_pos(model) -> bool:
    return accepts_position_ids(model)


class InstructionCollate:
    """Pad a list of rows on the right: labels -100 on padding. Unpacked rows get a 2-D
    attention mask. Packed rows (with ``position_ids``) get no mask, so transformers builds
    the block-diagonal causal mask from the positions; padding is a segment of its own.
    In the shared fallback, packed rows get a 2-D padding mask (examples attend to each other)."""

    def __init__(self, pad_id: int, shared: bool = False, position_ids: bool = True):
        self.pad_id, self.shared, self.position_ids = pad_id, shared, position_ids

    def __call__(self, items: list[dict]) -> dict:
        L = max(len(it["input_ids"]) for it in items)
        B = len(items)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n], labels[i, :n] = it["input_ids"], it["labels"]
        batch = {"input_ids": ids, "labels": labels}
        if "position_ids" not in items[0]:
            mask = torch.zeros((B, L), dtype=torch.long)
            for i, it in enumerate(items):
                mask[i, :len(it["input_ids"])] = 1
            batch["attention_mask"] = mask
            return batch
        if self.position_ids:
            pos = torch.zeros((B, L), dtype=torch.long)
            for i, it in enumerate(items):
                n = len(it["input_ids"])
                pos[i, :n] = it["position_ids"]
                pos[i, n:] = torch.arange(L - n)  # padding: a segment of its own
            batch["position_ids"] = pos
        if self.shared or not self.position_ids:
            mask = torch.zeros((B, L), dtype=torch.long)
            for i, it in enumerate(items):
                mask[i, :len(it["input_ids"])] = 1
            batch["attention_mask"] = mask
        return batch


# --------------------------------------------------------------------------- generation
@torch.no_grad()
def write_generations(model, tokenizer, val_ds, cfg, run_dir: Path, epoch: int) -> Optional[Path]:
    """Greedy generations for the first ``data.eval_generate`` validation prompts, written to
    ``RUN_DIR/generations/epoch-N.jsonl`` (prompt, reference, generation). Deterministic."""
    examples = getattr(val_ds, "examples", None)
    if not examples:
        return None
    if not hasattr(model, "generate"):
        log.warning(f"data.eval_generate: the {type(model).__name__} model has no generate(); no generations written")
        return None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = Path(run_dir) / "generations" / f"epoch-{epoch}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    try:
        for i, ex in enumerate(examples):
            ids = ex.prompt_ids.unsqueeze(0).to(device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.data.eval_generate_max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = gen[0, ids.shape[1]:]
            lines.append(json.dumps({"epoch": epoch, "index": i, "prompt": tokenizer.decode(ex.prompt_ids),
                                     "reference": ex.reference, "generation": tokenizer.decode(new, skip_special_tokens=True)},
                                    ensure_ascii=False))
    finally:
        model.train(was_training)
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out)
    log.info(f"wrote {len(lines)} generations to {out}")
    return out


__all__ = ["ALPACA_PROMPT", "DEFAULT_CHAT_TEMPLATE", "BadRecords", "read_records", "sniff_format", "normalize", "maybe_load",
           "finalize", "check_options", "render", "encode", "encode_split", "build", "InstructionDataset", "InstructionCollate",
           "write_generations", "is_instruction"]
