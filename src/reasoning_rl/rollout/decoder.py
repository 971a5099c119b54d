"""The plain batched decoding loop of the native engine (steps 3-4 of :mod:`reasoning_rl.rollout.native`):
prefill a batch of left-padded prompts once, decode one token per step with the KV cache, stop rows at EOS, a stop
string or the length limit, and prune finished rows."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from reasoning_rl.rollout.kv_cache import new_cache
from reasoning_rl.rollout.next_token import draw_step
from reasoning_rl.rollout.sampler import Sample, SamplingParams, completion_text

# A batch is dropped to its unfinished rows once this fraction of them has finished: pruning copies the whole KV
# cache, so doing it for every single finished row would cost more than the compute it saves.
PRUNE_FRACTION = 0.25


class Decoder:
    """The decoding loop of one batch; holds what stays fixed across batches (model, params, generator)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        params: SamplingParams,
        eos_ids: frozenset[int],
        device: torch.device,
        seed: int,
    ) -> None:
        self.model, self.tokenizer, self.params, self.eos_ids, self.device = model, tokenizer, params, eos_ids, device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # A stop string of n characters is produced by at most n tokens; 2 more cover a tokenizer that drops the
        # leading space of the first decoded token.
        self.stop_window = max((len(s) for s in params.stop_strings), default=0) + 2
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
        self.pad_id = pad

    def prefill(self, prompts: list[list[int]]) -> tuple[Cache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the distinct prompts once, then repeat cache rows: returns cache, last logits, mask and positions."""
        distinct: list[list[int]] = []
        expand: list[int] = []  # row -> index into `distinct`; copies of a prompt are adjacent
        for ids in prompts:
            if not distinct or ids != distinct[-1]:
                distinct.append(ids)
            expand.append(len(distinct) - 1)
        width = max(len(ids) for ids in distinct)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in distinct], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in distinct], device=self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (U, T): 0 at each prompt's first real token
        cache = new_cache(self.model, width + self.params.max_new_tokens)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()  # (U, V)
        if len(distinct) < len(prompts):
            index = torch.tensor(expand, device=self.device)  # (B,)
            cache.reorder_cache(index)
            logits, mask, position_ids = logits[index], mask[index], position_ids[index]
        # The mask grows one column per step; allocate all of it now and slice.
        full_mask = torch.ones(len(prompts), width + self.params.max_new_tokens, dtype=mask.dtype, device=self.device)
        full_mask[:, :width] = mask  # (B, T + max_new_tokens)
        return cache, logits, full_mask, position_ids[:, -1] + 1

    def run(self, prompts: list[list[int]], bar: tqdm) -> list[Sample]:
        params = self.params
        cache, logits, full_mask, positions = self.prefill(prompts)  # logits (B, V), positions (B,)
        width = full_mask.shape[1] - params.max_new_tokens
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        live = list(range(len(prompts)))  # batch row -> sequence; shrinks as finished rows are pruned
        finished_live = 0  # rows of `live` that have finished but are still in the batch
        banned = torch.tensor(params.banned_token_ids, dtype=torch.long, device=self.device)
        for step in range(params.max_new_tokens):
            token, step_tokens, step_logprobs = draw_step(
                logits, banned, params.temperature, params.top_p, self.generator
            )  # (B,)
            newly_done = self._record(live, step_tokens, step_logprobs, tokens, logprobs, finish)
            if newly_done:  # an update of 0 still redraws the bar: one line per step in a log file
                bar.update(newly_done)
            finished_live += newly_done
            if finished_live == len(live) or step == params.max_new_tokens - 1:
                break
            if finished_live >= PRUNE_FRACTION * len(live):  # drop finished rows from the batch and its cache
                keep = [r for r, seq in enumerate(live) if finish[seq] is None]
                index = torch.tensor(keep, device=self.device)  # (B',)
                cache.reorder_cache(index)
                token, full_mask, positions = token[index], full_mask[index], positions[index]
                live, finished_live = [live[r] for r in keep], 0
            out = self.model(
                input_ids=token[:, None],  # (B, 1)
                attention_mask=full_mask[:, : width + step + 1],  # (B, T + step + 1)
                position_ids=positions[:, None],  # (B, 1)
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()  # (B, V)
            positions = positions + 1
        bar.update(sum(f is None for f in finish))  # the rest stopped at max_new_tokens
        return [self._sample(t, lp, f or "length") for t, lp, f in zip(tokens, logprobs, finish, strict=True)]

    def _record(
        self,
        live: list[int],
        step_tokens: list[float],
        step_logprobs: list[float],
        tokens: list[list[int]],
        logprobs: list[list[float]],
        finish: list[str | None],
    ) -> int:
        """Append this step's token to every unfinished sequence, mark those that stop; return how many did."""
        newly_done = 0
        check_rows: list[int] = []
        for r, seq in enumerate(live):
            if finish[seq] is not None:  # finished earlier, not yet pruned: its tokens are ignored
                continue
            tok = int(step_tokens[r])
            tokens[seq].append(tok)
            logprobs[seq].append(step_logprobs[r])
            if tok in self.eos_ids:
                finish[seq] = "eos"
                newly_done += 1
            elif self.params.stop_strings:
                check_rows.append(seq)
        if check_rows:
            tails = self.tokenizer.batch_decode(
                [tokens[seq][-self.stop_window :] for seq in check_rows], skip_special_tokens=True
            )
            for seq, tail in zip(check_rows, tails, strict=True):
                if any(s in tail for s in self.params.stop_strings):
                    finish[seq] = "stop"
                    newly_done += 1
        return newly_done

    def _sample(self, token_ids: list[int], logprobs: list[float], finish_reason: str) -> Sample:
        text = completion_text(self.tokenizer, token_ids, finish_reason, self.params.stop_strings)
        return Sample(token_ids=token_ids, text=text, logprobs=logprobs, finish_reason=finish_reason)
