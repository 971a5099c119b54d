"""Token-level rewards: where each reward lands, worked by hand on the character tokenizer, and step ends mapped to
tokens on tokenizers whose tokens are not characters (byte-level BPE, SentencePiece-style), built in code."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from reasoning_rl.models.loading import build_tiny_tokenizer
from reasoning_rl.scoring.rewards import (
    dense_rewards,
    matched_steps,
    orm_dense_rewards,
    orm_rewards,
    orm_step_prefixes,
    sparse_rewards,
    step_ends,
    token_at,
    token_char_ends,
)

REFERENCE = "5+3=<<5+3=8>>8\n8-2=<<8-2=6>>6\n#### 6"  # intermediate results 8 and 6
CORPUS = [REFERENCE, "Tom has 5 apples. He gets 3 more.", "12*4=<<12*4=48>>48 apples\n#### 48", "caf\u00e9 na\u00efve"]


def byte_level_bpe() -> PreTrainedTokenizerBase:
    """A GPT-2 / SmolLM2-style tokenizer: byte-level BPE, multi-character tokens, "é" split across two tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")


def sentencepiece_style() -> PreTrainedTokenizerBase:
    """A Llama-style tokenizer: "▁" marks a space, and decoding drops the first token's leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"])
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="<unk>")


# ------------------------------------------------------------------------------------------ token positions


def test_token_char_ends_on_the_character_tokenizer():
    tok = build_tiny_tokenizer()
    ids = tok("ab\nc", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert token_char_ends(tok, ids) == [1, 2, 3, 4, 4]  # one character per token; EOS adds no text


@pytest.mark.parametrize("make_tokenizer", [byte_level_bpe, sentencepiece_style])
def test_token_char_ends_follow_the_decoded_text(make_tokenizer):
    tok = make_tokenizer()
    text = "5+3=<<5+3=8>>8 apples\n8-2=<<8-2=6>>6\n#### 6 caf\u00e9"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text)  # tokens are not characters here
    ends = token_char_ends(tok, [*ids, tok.eos_token_id])
    assert ends[-1] == ends[-2] == len(text)
    assert ends == sorted(ends)
    for t in range(len(ids)):
        decoded = tok.decode(ids[: t + 1])
        if "\ufffd" not in decoded:  # half of "é" decodes to a replacement character; the whole one does not
            assert text[: ends[t]] == decoded
    # the token that ends a step is the first whose decoded prefix holds the whole step, its newline included (a
    # token may also carry the next line's first characters: "\n8" is one token of the byte-level BPE)
    for _, end in step_ends(text):
        t = token_at(ends, end)
        assert tok.decode(ids[: t + 1]).startswith(text[:end])
        assert len(tok.decode(ids[:t])) < end


def test_token_at_by_hand():
    ends = [1, 3, 3, 6]  # token 0 covers "a", token 1 "bc", token 2 nothing (EOS-like), token 3 "def"
    assert [token_at(ends, c) for c in (1, 2, 3, 4, 6)] == [0, 1, 1, 3, 3]
    assert token_at(ends, 0) == 0
    assert token_at(ends, 99) == 3  # past the end: the last token


def test_step_ends_stop_at_the_answer_line():
    # "a\n" ends at 2, "b\n" (after a blank line) at 5, "#### 3" at 12; the line after the answer is not a step
    assert step_ends("a\n\nb\n#### 3\nc\n") == [("a", 2), ("b", 5), ("#### 3", 12)]
    assert step_ends("") == []
    assert step_ends("#### 7") == [("#### 7", 6)]


# -------------------------------------------------------------------------------------------------- rewards


def test_sparse_reward_at_the_last_token():
    assert sparse_rewards(3, True, 1.0).tolist() == [0.0, 0.0, 1.0]
    assert sparse_rewards(3, False, 1.0).tolist() == [0.0, 0.0, 0.0]
    assert sparse_rewards(1, True, 2.5).tolist() == [2.5]  # one token: it is the last


def test_matched_steps_by_hand():
    # the reference's results are 8 and 6 (each can be matched once)
    assert matched_steps(REFERENCE, REFERENCE) == [True, True, False]  # the "####" line is not a step result
    assert matched_steps(REFERENCE, "5+3=<<5+3=8>>8\n8-3=<<8-3=5>>5\n#### 5") == [True, False, False]
    # the same correct step twice earns once: the reference has one 8
    assert matched_steps(REFERENCE, "5+3=<<5+3=8>>8\n5+3=<<5+3=8>>8\n#### 8") == [True, False, False]
    # a result in another place still counts (6 is a reference result); steps after the answer line never do
    assert matched_steps(REFERENCE, "2+4=<<2+4=6>>6\n#### 6\n5+3=<<5+3=8>>8") == [True, False]
    assert matched_steps(REFERENCE, "no calculation here\n#### 9") == [False, False]
    assert matched_steps(REFERENCE, "") == []


def test_dense_rewards_by_hand_on_the_character_tokenizer():
    tok = build_tiny_tokenizer()
    completion = "5+3=<<5+3=8>>8\n8-2=<<8-2=6>>6\n#### 6"
    ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # 36 characters + EOS
    ends = token_char_ends(tok, ids)
    rewards = dense_rewards(REFERENCE, completion, ends, correct=True, correct_reward=1.0, step_reward=0.2)
    # step 1 "5+3=<<5+3=8>>8\n" ends with its newline, character 15 = token 14; step 2 with character 30 = token 29;
    # the correct answer's 1.0 goes to the last token, EOS (36)
    expected = torch.zeros(37)
    expected[14], expected[29], expected[36] = 0.2, 0.2, 1.0
    torch.testing.assert_close(rewards, expected)
    wrong = "5+3=<<5+3=8>>8\n8-3=<<8-3=5>>5\n#### 5"
    rewards = dense_rewards(REFERENCE, wrong, ends, correct=False, correct_reward=1.0, step_reward=0.2)
    assert rewards.nonzero().flatten().tolist() == [14] and rewards.sum().item() == pytest.approx(0.2)
    # step_reward 0 is the sparse reward
    assert dense_rewards(REFERENCE, completion, ends, True, 1.0, 0.0).tolist() == sparse_rewards(37, True, 1.0).tolist()


def test_orm_rewards_by_hand():
    assert orm_rewards(3, 0.7).tolist() == pytest.approx([0.0, 0.0, 0.7])
    tok = build_tiny_tokenizer()
    completion = "a\nb\n#### 3"  # steps end at characters 2, 4, 10 -> tokens 1, 3, 9; EOS is token 10
    ends = token_char_ends(tok, tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    assert orm_step_prefixes(completion) == ["a\n", "a\nb\n", "a\nb\n#### 3"]
    # scores 0.2, 0.5, 0.9 after steps 1-3: rewards 0.2 - 0, 0.5 - 0.2 = 0.3, 0.9 - 0.5 = 0.4; sum 0.9, the last score
    rewards = orm_dense_rewards(completion, ends, [0.2, 0.5, 0.9])
    assert rewards.tolist() == pytest.approx([0, 0.2, 0, 0.3, 0, 0, 0, 0, 0, 0.4, 0])
    assert float(rewards.sum()) == pytest.approx(0.9)
    # a step that lowers the ORM's belief is penalised: 0.8 then 0.3 -> +0.8, then 0.3 - 0.8 = -0.5
    assert orm_dense_rewards("a\n#### 3", [1, 2, 3, 4, 5, 6, 7, 8], [0.8, 0.3]).tolist() == pytest.approx(
        [0, 0.8, 0, 0, 0, 0, 0, -0.5]
    )
    # no step at all (an empty completion, just EOS): the whole completion's score at its only token
    assert orm_step_prefixes("") == [""]
    assert orm_dense_rewards("", [0], [0.4]).tolist() == pytest.approx([0.4])
    with pytest.raises(ValueError, match="3 steps but 2 scores"):
        orm_dense_rewards(completion, ends, [0.2, 0.5])
