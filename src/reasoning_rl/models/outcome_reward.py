"""The outcome-based reward model (ORM; Havrilla et al. 2024, section 3; Cobbe et al. 2021): the policy's
architecture with a scalar head that predicts, after any prefix of a solution, the probability that the solution
ends with a correct final answer. Trained by :mod:`reasoning_rl.algos.orm`; scores for rerank@K, ORM EI, ORM RCRL
and ORM PPO."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reasoning_rl.models.loading import load_checkpoint, save_checkpoint
from reasoning_rl.tasks import step_prefixes
from reasoning_rl.training.precision import Precision


class OutcomeRewardModel(torch.nn.Module):
    """A causal LM's trunk (``lm.base_model``) and a linear head: one logit per position (the LM head is unused).

    Scoring autocasts to ``compute_dtype``; a frozen ORM loaded for a run is held in it (:meth:`load`)."""

    def __init__(
        self,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 32,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.compute_dtype = compute_dtype
        self.head = torch.nn.Linear(lm.config.hidden_size, 1, device=lm.device, dtype=lm.dtype)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **packed: object
    ) -> torch.Tensor:
        """(B, T) logits of P(correct final answer); ``packed``: a packed row's position ids and span boundaries
        (:func:`reasoning_rl.training.packing.forward_kwargs`, inside
        :func:`~reasoning_rl.training.packing.packed_attention`)."""
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, **packed).last_hidden_state
        return self.head(hidden).squeeze(-1).float()  # (B, T)

    @torch.no_grad()
    def score_prefixes(self, prompts: Sequence[str], prefixes: Sequence[str]) -> list[float]:
        """P(correct final answer) after each (prompt, partial or whole solution) pair, tokenized as in training."""
        if len(prompts) != len(prefixes):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} prefixes")
        max_len = self.lm.config.max_position_embeddings
        sequences = [
            (self.tokenizer(p)["input_ids"] + self.tokenizer(c, add_special_tokens=False)["input_ids"])[-max_len:]
            for p, c in zip(prompts, prefixes, strict=True)
        ]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths share a batch
        scores = [0.0] * len(sequences)
        self.eval()
        precision = Precision.of(self, self.compute_dtype)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(sequences[i]) for i in rows)
            input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
            for r, i in enumerate(rows):  # right padding: position len-1 is the last real token
                input_ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
                attention_mask[r, : len(sequences[i])] = 1
            with precision.autocast():
                logits = self(input_ids.to(self.lm.device), attention_mask.to(self.lm.device))  # (B, T)
            last = torch.tensor([len(sequences[i]) - 1 for i in rows], device=logits.device)  # (B,)
            probs = torch.sigmoid(logits.gather(1, last[:, None]).squeeze(1)).tolist()  # (B,)
            for i, p in zip(rows, probs, strict=True):
                scores[i] = p
        return scores

    def score(self, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> list[list[float]]:
        """Whole-solution scores for K completions per prompt: the evaluation's :class:`Reranker`."""
        flat = [(p, c) for p, group in zip(prompts, completions, strict=True) for c in group]
        flat_scores = iter(self.score_prefixes([p for p, _ in flat], [c for _, c in flat]))
        return [[next(flat_scores) for _ in group] for group in completions]

    def min_step_scores(self, prompts: Sequence[str], solutions: Sequence[str]) -> list[float]:
        """The lowest score after any step of each solution ("Dense ORM"); the whole-solution score if it has none."""
        pairs = [(i, prefix) for i, s in enumerate(solutions) for prefix in step_prefixes(s) or [s]]
        flat = self.score_prefixes([prompts[i] for i, _ in pairs], [prefix for _, prefix in pairs])
        lowest = [1.0] * len(solutions)
        for (i, _), score in zip(pairs, flat, strict=True):
            lowest[i] = min(lowest[i], score)
        return lowest

    def save(self, directory: Path) -> None:
        save_checkpoint(self.lm, self.tokenizer, directory / "model")
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, directory / "head.safetensors")

    @classmethod
    def load(
        cls, directory: Path, device: torch.device, compute_dtype: torch.dtype, batch_size: int
    ) -> OutcomeRewardModel:
        """The trained ORM, frozen, with its weights in ``compute_dtype`` (it only scores)."""
        lm, tokenizer = load_checkpoint(directory / "model", device)
        orm = cls(lm, tokenizer, batch_size, compute_dtype)
        orm.head.load_state_dict(load_file(directory / "head.safetensors", device=str(device)))
        return orm.to(compute_dtype).eval().requires_grad_(False)
