"""Token-level rewards (Havrilla et al. 2024, section 3): a tensor r with one entry per generated token.

- ``sparse``: ``correct_reward`` at the last generated token when the final answer is correct, else nothing.
- ``dense``: sparse, plus ``step_reward`` at the end of each step whose intermediate result is one of the
  reference solution's calculator results (:func:`reasoning_rl.tasks.intermediate_results`).
- ``orm``: the ORM's probability that the whole solution is correct, at the last generated token ("Sparse ORM").
- ``orm_dense``: at each step's end, the change the step makes to the ORM's probability ("Dense ORM").

Choices where the paper is not explicit:
- A step is a non-blank line before the first "####" (as in ``split_steps``); its intermediate results are its
  calculator annotations' results. Each reference result can be matched once (a multiset), so writing a correct
  step twice earns its reward once; a step with several annotations earns at most one ``step_reward``. Lines after
  the answer line earn nothing (grading reads the first "####").
- Dense ORM rewards step i with s_i - s_{i-1}, the change in the ORM's score of the prefix that ends with step i
  (s_0 = 0), so a solution's undiscounted return is its final score, as in Sparse ORM; the density only moves the
  credit to the steps that earned it. Paying the raw score s_i at every step end (one reading of the paper's
  "the ORM's score after each step") would make the return a sum over steps, which pays a solution for being long:
  padding a correct solution with lines the ORM still likes raises its return with every line. With s_0 = 0 this is
  potential-based shaping (Ng et al. 1999) of the sparse ORM reward, which leaves the optimal policy unchanged.

Where a step ends in tokens: ``token_char_ends(tokenizer, token_ids)[t]`` is the length of the text decoded from the
tokens 0..t, so the step whose text ends at character c ends at the first token whose decoded prefix reaches c.
Decoding cumulative prefixes, rather than re-tokenizing the text, keeps the generated tokens themselves (a text
can tokenize differently from how it was sampled) and handles tokenizers whose pieces do not map one-to-one to
characters (SentencePiece's leading space, byte-level BPE). The reward functions are pure: they take these ends.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from reasoning_rl.tasks import intermediate_results, step_prefixes
from reasoning_rl.tasks.answers import ANSWER_MARKER

# ----------------------------------------------------------------------------------------- token positions


def token_char_ends(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int]) -> list[int]:
    """For each generated token t, the length of ``decode(token_ids[: t + 1])`` (special tokens skipped).

    Made non-decreasing: a byte-level tokenizer decodes half a multi-byte character as a replacement character
    that may vanish once the rest arrives.
    """
    prefixes = [list(token_ids[: t + 1]) for t in range(len(token_ids))]
    lengths = [len(text) for text in tokenizer.batch_decode(prefixes, skip_special_tokens=True)]
    ends, longest = [], 0
    for length in lengths:
        longest = max(longest, length)
        ends.append(longest)
    return ends


def token_at(token_ends: Sequence[int], char_offset: int) -> int:
    """The index of the token that completes the first ``char_offset`` characters (the last token if none does)."""
    if not token_ends:
        raise ValueError("a completion has at least one generated token")
    return min(bisect.bisect_left(token_ends, char_offset), len(token_ends) - 1)


def step_ends(completion: str) -> list[tuple[str, int]]:
    """Each step line of a completion up to and including its first "####" line, with the character offset at which
    the step ends (its newline included): "a\\nb\\n#### 3\\nc" -> [("a", 2), ("b", 4), ("#### 3", 11)]."""
    steps, start = [], 0
    for prefix in step_prefixes(completion):
        line = completion[start : len(prefix)].strip()
        steps.append((line, len(prefix)))
        start = len(prefix)
        if ANSWER_MARKER in line:
            break
    return steps


# ------------------------------------------------------------------------------------------------- rewards


def sparse_rewards(num_tokens: int, correct: bool, correct_reward: float) -> torch.Tensor:
    """``correct_reward`` at the last token when the final answer is correct; zeros otherwise. (T,)"""
    rewards = torch.zeros(num_tokens)  # (T,)
    if correct:
        rewards[-1] = correct_reward
    return rewards


def matched_steps(reference: str, completion: str) -> list[bool]:
    """For each step of :func:`step_ends`, whether it produces a reference intermediate result not yet matched."""
    unmatched = Counter(intermediate_results(reference))
    matched = []
    for line, _ in step_ends(completion):
        hit = next((value for value in intermediate_results(line) if unmatched[value] > 0), None)
        if hit is not None:
            unmatched[hit] -= 1
        matched.append(hit is not None)
    return matched


def dense_rewards(
    reference: str,
    completion: str,
    token_ends: Sequence[int],
    correct: bool,
    correct_reward: float,
    step_reward: float,
) -> torch.Tensor:
    """Sparse, plus ``step_reward`` at the last token of each step that matches a reference result. (T,)"""
    rewards = sparse_rewards(len(token_ends), correct, correct_reward)  # (T,)
    for (_, end), hit in zip(step_ends(completion), matched_steps(reference, completion), strict=True):
        if hit:
            rewards[token_at(token_ends, end)] += step_reward
    return rewards


def orm_rewards(num_tokens: int, score: float) -> torch.Tensor:
    """The ORM's score of the whole solution at the last token. (T,)"""
    rewards = torch.zeros(num_tokens)  # (T,)
    rewards[-1] = score
    return rewards


def orm_step_prefixes(completion: str) -> list[str]:
    """The prefixes the ORM scores for ``orm_dense``: the completion cut after each step (the whole completion when
    it has no step), as in ``OutcomeRewardModel.min_step_scores``; one per :func:`step_ends` entry."""
    return [completion[:end] for _, end in step_ends(completion)] or [completion]


def orm_dense_rewards(completion: str, token_ends: Sequence[int], step_scores: Sequence[float]) -> torch.Tensor:
    """At each step's last token, the change in the ORM's score that the step makes: s_i - s_{i-1}, with s_i the
    score of the i-th step prefix (:func:`orm_step_prefixes`) and s_0 = 0. The rewards sum to the last score. (T,)"""
    ends = [end for _, end in step_ends(completion)] or [len(completion)]
    if len(ends) != len(step_scores):
        raise ValueError(f"{len(ends)} steps but {len(step_scores)} scores")
    rewards = torch.zeros(len(token_ends))  # (T,)
    previous = 0.0
    for end, score in zip(ends, step_scores, strict=True):
        rewards[token_at(token_ends, end)] += score - previous
        previous = score
    return rewards
