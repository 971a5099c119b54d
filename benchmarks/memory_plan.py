"""GPU memory plan for model=7b and model=13b on 80 GB GPUs: the numbers of docs/memory.md, from its formulas.

Pure arithmetic (no torch, under a second): every table of docs/memory.md is this script's output, so a changed
config or formula is one rerun, not a hand edit. The formulas, their sources and the code they describe are in
docs/memory.md; each term below names the line of the code that holds it.

``--check-activations`` (needs the project's venv: torch, transformers) counts the bytes autograd saves in one
forward pass of our fine-tuning loss (``sft.summed_token_loss`` on a packed row, bf16 autocast over float32
weights, as on a GPU) for a 1- and a 2-layer Llama, and prints them beside the per-layer formula used here.

    .venv/bin/python benchmarks/memory_plan.py                      # the tables of docs/memory.md
    .venv/bin/python benchmarks/memory_plan.py --lora-rank 64
    .venv/bin/python benchmarks/memory_plan.py --check-activations  # ~10 s on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

GB = 1e9  # every size here is in GB = 1e9 bytes
CARD_TOTAL = 85.0 * GB  # what CUDA reports for an "80 GB" A100/H100 (79.15 GiB); vLLM's share is a fraction of it
BUDGET = 80.0 * GB  # what our tensors may use; the rest: CUDA context, cuBLAS/NCCL workspaces, fragmentation
COMFORT = 0.9  # a peak under 90% of BUDGET fits; up to BUDGET it is tight (the allocator's fragmentation decides)
VLLM_OVERHEAD = 2.0 * GB  # inside vLLM's share, besides weights and KV cache: its activation peak and CUDA graphs
#   (an assumption; vLLM logs the real split at start-up: "Available KV cache memory")
MAX_NEW_TOKENS = 256  # algo.max_new_tokens / eval.max_new_tokens / orm.max_new_tokens defaults (config.py)
PROMPT_TAIL_TOKENS = 200  # a GSM8K prompt past its few-shot exemplars ("Question: ...\nAnswer:\n"): the longest of 500
#   train questions is 183 tokens (SmolLM2's tokenizer; Llama-2's, not measured here, splits digits alike)
EXEMPLAR_TOKENS = 900  # init=pretrained's 4 exemplars, shared by every prompt of a call (~800-900 tokens, SmolLM2's)
VLLM_CONTEXT = 4096  # vLLM's max_model_len = Llama-2's max_position_embeddings (vllm_engine.py): one sequence of it
#   must fit in the KV cache or the engine does not start


@dataclass(frozen=True)
class Llama:
    """A Llama-2 model (its config.json) and the repo's model=<name> option for it (config.py)."""

    name: str
    hidden: int  # h
    layers: int  # L
    heads: int  # a (no grouped-query attention in Llama-2 7B/13B: as many KV heads)
    intermediate: int  # I, the SwiGLU MLP's width
    micro_batch_size: int  # model.micro_batch_size
    max_seq_len: int  # model.max_seq_len
    sample_batch_size: int  # model.sample_batch_size: the native sampler's decoding slots
    gpu_memory_utilization: float  # the plan's rollout.gpu_memory_utilization (default 0.3; 13b needs more)
    vocab: int = 32000  # V

    @property
    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden  # + embed, lm_head, norm

    def lora_params(self, rank: int) -> int:
        """r x (in + out) per adapted projection (lora.TARGET_MODULES): q, k, v, o are h -> h, gate/up h -> I, down
        I -> h, so r (8h + 3(h + I)) = r (11h + 3I) per layer."""
        return self.layers * rank * (11 * self.hidden + 3 * self.intermediate)

    @property
    def act_bytes_per_token_layer(self) -> int:
        """Saved for the backward pass per token per decoder layer, no recompute (docs/memory.md derives it):
        36h + 8I + 4a bytes under bf16 autocast with float32 weights and fused (flash) attention."""
        return 36 * self.hidden + 8 * self.intermediate + 4 * self.heads

    @property
    def ckpt_bytes_per_token_layer(self) -> int:
        """Full recompute keeps each layer's input only: the float32 residual stream, 4h bytes."""
        return 4 * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.hidden * 2  # K and V, every layer, bf16

    @property
    def fused_sampler_bytes(self) -> int:
        """The native fast sampler concatenates q/k/v and gate/up of its bf16 copy once per call (continuous.py)."""
        h, i = self.hidden, self.intermediate
        return self.layers * 2 * (3 * h * h + 2 * h * i)


LLAMA2_7B = Llama("7b", hidden=4096, layers=32, heads=32, intermediate=11008, micro_batch_size=4, max_seq_len=1024,
                  sample_batch_size=64, gpu_memory_utilization=0.3)  # fmt: skip
LLAMA2_13B = Llama("13b", hidden=5120, layers=40, heads=40, intermediate=13824, micro_batch_size=2, max_seq_len=1024,
                   sample_batch_size=32, gpu_memory_utilization=0.45)  # fmt: skip
MODELS = (LLAMA2_7B, LLAMA2_13B)


@dataclass(frozen=True)
class Row:
    """One algorithm's peak on one GPU, term by term (bytes)."""

    name: str
    trained: float  # float32 weights of the trained model + float32 gradients + AdamW's two moments
    held: float  # frozen models and extra copies the code keeps on the GPU while this trains
    casts: float  # bf16 copies of weights made by autocast during a forward/backward
    activations: float  # saved activations + the loss's logits, one micro-batch
    sampling_resident: float  # what stays on the GPU while the sampler decodes (no gradients, no activations)
    plain_model: bool  # the sampled model is plain nn.Linear layers (the fast sampler fuses them); False with LoRA
    sampled_before: bool = True  # the native sampler ran before this trains, so its bf16 copy is still held (all but
    #   the SFT stage, which trains before anything is sampled)

    @property
    def training(self) -> float:
        return self.trained + self.held + self.casts + self.activations

    def peak_vllm(self, m: Llama) -> float:
        return max(self.training, self.sampling_resident) + vllm_share(m)

    def peak_native(self, m: Llama) -> float:
        p = m.params
        training = self.training + (2 * p if self.sampled_before else 0)  # + the copy kept from the last call
        fused = m.fused_sampler_bytes if self.plain_model else 0
        # CastSampler: the old copy is dropped, deepcopy(model) in float32 (4P), then cast to bf16 (2P); decoding adds
        # the fused weights and the KV cache
        sampling = self.sampling_resident + max(4 * p, 2 * p + fused + native_kv(m))
        return max(training, sampling)


def vllm_share(m: Llama) -> float:
    return m.gpu_memory_utilization * CARD_TOTAL


def vllm_kv(m: Llama) -> float:
    return vllm_share(m) - 2 * m.params - VLLM_OVERHEAD


def min_vllm_utilization(m: Llama) -> float:
    return (2 * m.params + VLLM_OVERHEAD + VLLM_CONTEXT * m.kv_bytes_per_token) / CARD_TOTAL


def native_kv(m: Llama) -> float:
    """continuous.py: each of the sample_batch_size slots has its own cache of max_new_tokens, each live prompt one of
    its tail (at most one prompt per slot: K = 1, the greedy maj@1 pass), and the exemplars are cached once."""
    tokens = m.sample_batch_size * (MAX_NEW_TOKENS + PROMPT_TAIL_TOKENS) + EXEMPLAR_TOKENS
    return tokens * m.kv_bytes_per_token


def activations(m: Llama, *, checkpointing: bool, logits_rows: int, logit_bytes: int) -> float:
    """One micro-batch of micro_batch_size sequences of max_seq_len tokens (the worst case), plus its logits."""
    tokens = m.micro_batch_size * m.max_seq_len
    per_layer = m.act_bytes_per_token_layer
    if checkpointing:  # layer inputs, and one layer's activations while its backward recomputes it
        saved = tokens * (m.layers * m.ckpt_bytes_per_token_layer + per_layer)
    else:
        saved = tokens * m.layers * per_layer
    return saved + logits_rows * m.vocab * logit_bytes


def rows(m: Llama, lora_rank: int) -> list[Row]:
    p, pl, layer = m.params, m.lora_params(lora_rank), m.layer_params
    tokens = m.micro_batch_size * m.max_seq_len
    full = 16 * p  # 4 weights + 4 gradients + 8 AdamW (exp_avg, exp_avg_sq), all float32
    lora = 4 * p + 16 * pl  # the frozen base stays float32 (models.MASTER_DTYPE); the adapters train as above
    r = f"LoRA r{lora_rank}"
    # SFT/EI/RCRL: the LM head at target positions only (sft.summed_token_loss): <= tokens rows, ~12 B per logit at the
    # loss's peak (bf16 output 2, float32 copy 4, log-softmax kept for backward 4, its gradient); the ORM has no LM head
    sft_acts = activations(m, checkpointing=True, logits_rows=tokens, logit_bytes=12)
    orm_acts = activations(m, checkpointing=True, logits_rows=0, logit_bytes=0)

    def ppo_acts(micro_batch_size: int) -> float:
        # PPO never checkpoints (ppo.py ignores model.gradient_checkpointing); logits at the response positions,
        # float32 and kept with their log-softmax and gradients: ~16 B per logit
        mb = dataclasses.replace(m, micro_batch_size=micro_batch_size)
        return activations(mb, checkpointing=False, logits_rows=micro_batch_size * MAX_NEW_TOKENS, logit_bytes=16)

    return [
        # the SFT stage samples only to evaluate, after training: the policy alone is resident then
        Row("SFT, full", full, 0, 2 * p, sft_acts, 4 * p, True, sampled_before=False),
        Row(f"SFT, {r}", lora, 0, 2 * layer, sft_acts, 4 * p, True, sampled_before=False),
        # RCRL labels with the EI row's policy, loaded in float32 beside its own (rcrl.labelled_examples; the EI stage
        # cached already), then fine-tunes as SFT does
        Row("RCRL, full", full, 0, 2 * p, sft_acts, 8 * p, True),
        Row(f"RCRL, {r}", lora, 0, 2 * layer, sft_acts, 8 * p, True),
        # EI (algo.reinit_each_round=true, the default) keeps deepcopy(model.state_dict()): float32, on the GPU
        Row("EI, full", full, 4 * p, 2 * p, sft_acts, 8 * p, True),
        Row(f"EI, {r}", lora, 4 * p, 2 * layer, sft_acts, 8 * p, True),
        Row(f"EI, {r}, algo.reinit_each_round=false", lora, 0, 2 * layer, sft_acts, 4 * p, True),
        # PPO: reference = deepcopy(policy) cast to bf16; AdamW's moments stay between steps (gradients set to None)
        Row("PPO, full", full, 2 * p, 2 * p, ppo_acts(m.micro_batch_size), 12 * p + 2 * p, True),
        Row("PPO, full, algo.micro_batch_size=1", full, 2 * p, 2 * p, ppo_acts(1), 12 * p + 2 * p, True),
        # LoRA: the reference is the policy with its adapters off; the frozen base's bf16 casts are saved for the
        # backward pass (no checkpointing in PPO); the sampled copy keeps the adapters (not fused)
        Row(f"PPO, {r}", lora, 0, 2 * p, ppo_acts(m.micro_batch_size), 4 * p + 12 * pl, False),
        Row(f"PPO, {r}, algo.micro_batch_size=1", lora, 0, 2 * p, ppo_acts(1), 4 * p + 12 * pl, False),
        # ORM training: OutcomeRewardModel(deepcopy(ctx.model)) while ctx.model (float32) stays; the ORM's samples are
        # drawn before, from ctx.model alone
        Row("ORM training, full", full, 4 * p, 2 * p, orm_acts, 4 * p, True),
        Row(f"ORM training, {r}", lora, 4 * p, 2 * layer, orm_acts, 4 * p, True),
    ]


def fsdp2_planned_per_gpu(m: Llama, row: Row, n: int) -> float:
    """Per GPU with FSDP2 over n GPUs as planned (beyond what is built): the float32 state, frozen models and copies
    sharded 1/n, the sampled model too; bf16 all-gathered weights of ~2 layers and one layer's float32 unsharded
    gradients instead of autocast's whole-model casts; activations per GPU as on one; vLLM's share per GPU."""
    working = (2 * 2 + 4) * m.layer_params
    training = (row.trained + row.held) / n + working + row.activations
    return max(training, row.sampling_resident / n) + vllm_share(m)


SHARDED_LOOPS = ("SFT", "EI", "PPO")  # the rows model.fsdp shards (training/sharding.py); the others: not built


def fsdp2_per_gpu(m: Llama, row: Row, n: int) -> float:
    """Per GPU with ``model.fsdp`` over n GPUs, with vLLM, as training/sharding.py does it: the trained state
    (weights, gradients, AdamW; with LoRA the frozen base too) sharded 1/n; units gathered in bf16 (~2 layers) and
    one layer's unsharded gradients in place of autocast's whole-model casts; the whole float32 model in host memory
    while it trains; what the row holds besides (EI's initial weights) and vLLM's share whole on every rank (each
    rank's engine holds the whole model); sampling as without sharding (the whole model is back on the GPU). PPO
    (and the GRPO family) keep the whole float32 policy on the GPU beside its shards, which it samples and scores
    with every step (ppo.py: training/sharding.shard, not sharded_copy), and the shards stay while it samples (their
    gradients counted too: a small overestimate, 4 B per trained parameter / n)."""
    working = (2 * 2 + 4) * m.layer_params
    if row.name.startswith("PPO"):
        whole_policy = 4 * m.params
        training = row.trained / n + row.held + whole_policy + working + row.activations
        return max(training, whole_policy + row.held + row.trained / n) + vllm_share(m)
    training = row.trained / n + row.held + working + row.activations
    return max(training, row.sampling_resident) + vllm_share(m)


def verdict(peak: float) -> str:
    return "yes" if peak <= COMFORT * BUDGET else "tight" if peak <= BUDGET else "no"


def gb(x: float) -> str:
    return f"{x / GB:.1f}"


def print_tables(models: tuple[Llama, ...], lora_rank: int) -> None:
    print(f"GB = 1e9 B; budget {gb(BUDGET)} GB per 80 GB GPU (CUDA reports {gb(CARD_TOTAL)}); 'yes' <= "
          f"{gb(COMFORT * BUDGET)}, 'tight' <= {gb(BUDGET)}; activations at micro_batch_size x max_seq_len "
          "tokens\n")  # fmt: skip
    for m in models:
        p = m.params
        tokens = m.micro_batch_size * m.max_seq_len
        pl = m.lora_params(lora_rank)
        print(f"## model={m.name}: P = {p / 1e9:.3f}e9 parameters, LoRA r{lora_rank}: {pl / 1e6:.1f}M "
              f"({100 * pl / p:.2f}%)")  # fmt: skip
        print(f"- per parameter: 4P = {gb(4 * p)} GB, 2P = {gb(2 * p)} GB, 16P = {gb(16 * p)} GB")
        act_off = tokens * m.layers * m.act_bytes_per_token_layer
        act_on = tokens * (m.layers * m.ckpt_bytes_per_token_layer + m.act_bytes_per_token_layer)
        print(f"- activations per token per layer {m.act_bytes_per_token_layer:,} B (36h+8I+4a), x {m.layers} layers = "
              f"{m.layers * m.act_bytes_per_token_layer / 1e6:.2f} MB/token; micro-batch {m.micro_batch_size} x "
              f"{m.max_seq_len} = {tokens} tokens: {gb(act_off)} GB, with checkpointing {gb(act_on)} GB "
              f"({m.ckpt_bytes_per_token_layer:,} B/token/layer + one layer)")  # fmt: skip
        korth = tokens * m.layers * (34 * m.hidden + 5 * m.heads * m.max_seq_len)
        print(f"- Korthikanti et al. (34h + 5as per token per layer, GPT, 16-bit): {gb(korth)} GB; without the 5as "
              f"term (fused attention): {gb(tokens * m.layers * 34 * m.hidden)} GB")  # fmt: skip
        print(f"- logits: SFT {tokens} target rows x V x 12 B = {gb(tokens * m.vocab * 12)} GB; PPO "
              f"{m.micro_batch_size * MAX_NEW_TOKENS} response rows x V x 16 B = "
              f"{gb(m.micro_batch_size * MAX_NEW_TOKENS * m.vocab * 16)} GB; a full (B, T, V) float32 copy "
              f"{gb(tokens * m.vocab * 4)} GB")  # fmt: skip
        print(f"- KV cache {m.kv_bytes_per_token / 1e6:.3f} MB/token; native sampler {gb(native_kv(m))} GB KV + "
              f"{gb(m.fused_sampler_bytes)} GB fused weights; vLLM at {m.gpu_memory_utilization}: share "
              f"{gb(vllm_share(m))} GB = weights {gb(2 * p)} + overhead {gb(VLLM_OVERHEAD)} + KV {gb(vllm_kv(m))} GB "
              f"({vllm_kv(m) / m.kv_bytes_per_token:,.0f} tokens); starts from "
              f"gpu_memory_utilization >= {min_vllm_utilization(m):.3f}")  # fmt: skip
        print()
        print("| row | weights + grads + AdamW | frozen / extra copies | bf16 casts | activations + logits | "
              "resident while sampling | peak, native sampler | peak, vLLM | FSDP2 planned: GPUs (GB each) | "
              "model.fsdp as built, vLLM: GPUs (GB each) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in rows(m, lora_rank):
            native, vllm = row.peak_native(m), row.peak_vllm(m)
            n = next((n for n in (1, 2, 4, 8, 16) if fsdp2_planned_per_gpu(m, row, n) <= COMFORT * BUDGET), None)
            planned = f"{n} ({gb(fsdp2_planned_per_gpu(m, row, n))})" if n else "> 16"
            n = next((n for n in (2, 4, 8, 16) if fsdp2_per_gpu(m, row, n) <= COMFORT * BUDGET), None)
            fsdp = f"{n} ({gb(fsdp2_per_gpu(m, row, n))})" if n else f"> 16 ({gb(fsdp2_per_gpu(m, row, 16))} at 16)"
            if not row.name.startswith(SHARDED_LOOPS):
                fsdp = "not built"
            print(f"| {row.name} | {gb(row.trained)} | {gb(row.held)} | {gb(row.casts)} | {gb(row.activations)} | "
                  f"{gb(row.sampling_resident)} | {gb(native)} {verdict(native)} | {gb(vllm)} {verdict(vllm)} | "
                  f"{planned} | {fsdp} |")  # fmt: skip
        no_ckpt = activations(m, checkpointing=False, logits_rows=tokens, logit_bytes=12)
        print(f"\nAdd {gb(2 * p)} GB for a frozen ORM (reward=orm|orm_dense, orm.rerank=true) and {gb(4 * p)} GB in a "
              "job that reuses a cached SFT checkpoint (init=sft); activations without checkpointing: "
              f"{gb(no_ckpt)} GB (SFT/EI/RCRL).\n")  # fmt: skip


def check_activations() -> None:
    """Bytes autograd saves per token per layer in our loss's forward pass, against 36h + 8I + 4a."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reasoning_rl.training.finetune import TokenizedExample, summed_token_loss
    from reasoning_rl.training.packing import collate_packed, packed_attention

    h, i, a, v, t = 256, 688, 4, 1000, 200  # t differs from every weight dimension, so weights and activations part
    weight_shapes = {(h, h), (h, i), (i, h), (v, h), (h, v)}

    def saved_bytes(num_layers: int) -> tuple[int, int]:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=num_layers,
                             num_attention_heads=a, num_key_value_heads=a, tie_word_embeddings=False)  # fmt: skip
        model = LlamaForCausalLM(config).float()
        acts: dict[int, int] = {}
        casts: dict[int, int] = {}

        def pack(x: torch.Tensor) -> torch.Tensor:
            if not (x.requires_grad and x.is_leaf):  # parameters themselves are not copies
                target = casts if tuple(x.shape) in weight_shapes else acts
                target[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        batch = collate_packed([TokenizedExample(list(range(5, 5 + t)), 1)], -100)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), packed_attention(model):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                summed_token_loss(model, batch)
        return sum(acts.values()), sum(casts.values())

    (acts2, casts2), (acts1, casts1) = saved_bytes(2), saved_bytes(1)
    print(f"h={h} I={i} a={a}: saved activations per token per layer {(acts2 - acts1) / t:.0f} B, formula 36h + 8I + "
          f"4a = {36 * h + 8 * i + 4 * a} B; bf16 weight casts saved per layer {casts2 - casts1:,} B, 2 x the layer's "
          f"weights = {2 * (4 * h * h + 3 * h * i):,} B")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora-rank", type=int, default=16, help="model.lora_rank of the LoRA rows")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="override model.micro_batch_size")
    parser.add_argument("--max-seq-len", type=int, default=None, help="override model.max_seq_len")
    parser.add_argument("--check-activations", action="store_true", help="count saved bytes with torch (needs venv)")
    args = parser.parse_args()
    if args.check_activations:
        check_activations()
        return
    overrides = {k: v for k, v in (("micro_batch_size", args.micro_batch_size), ("max_seq_len", args.max_seq_len)) if v}
    print_tables(tuple(dataclasses.replace(m, **overrides) for m in MODELS), args.lora_rank)


if __name__ == "__main__":
    main()
