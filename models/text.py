"""Task instructions -> one vector: a word-level tokenizer and a tiny BERT trained from scratch.

A world's tasks are a handful of short instruction sentences ("pick up the red cube"), so a
pretrained tokenizer and language model would be all overhead: the vocabulary is the
lower-cased words of those sentences (``build_vocab``), tokenization is a lookup with
``[PAD]`` = 0 and ``[UNK]`` = 1, and the encoder is a one-layer transformers ``BertModel``
built from a ``BertConfig`` (never downloaded) whose last hidden states are mean-pooled over
the real tokens. The design follows the language-conditioned policies that embed the
instruction with a (here much smaller) transformer text encoder and condition the visual
features on it (BC-Z, Jang et al. 2021; RT-1, Brohan et al. 2022, with FiLM, Perez et al. 2018).

Shared by ``models.policy`` and ``models.world_model``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

SPECIALS = ("[PAD]", "[UNK]")
PAD_ID, UNK_ID = 0, 1
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``, punctuation stripped ("Pick up the RED cube!" -> pick up the red cube)."""
    return _WORD.findall(str(text).lower())


def build_vocab(sentences: Iterable[str]) -> tuple[str, ...]:
    """The sorted distinct words of ``sentences``: the ``task_vocab`` of a model config."""
    return tuple(sorted({w for s in sentences for w in words(s)}))


def check_vocab(vocab: Sequence[str]) -> None:
    """A vocabulary is distinct lower-case words (what ``words`` produces); anything else is an error."""
    bad = [w for w in vocab if words(w) != [w]]
    if bad:
        raise ValueError(f"task_vocab entries must be lower-case words without punctuation, got {bad}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("task_vocab has duplicate words")


def tokenize(texts: Sequence[str], vocab: Sequence[str], max_len: int) -> torch.Tensor:
    """Token ids LongTensor[B, L] of ``texts`` (L = the longest, at most ``max_len``; longer texts are
    truncated, shorter ones padded with 0). Unknown words map to 1 (``[UNK]``)."""
    if isinstance(texts, str):
        raise ValueError("tokenize takes a list of texts, not one string")
    index = {w: i + len(SPECIALS) for i, w in enumerate(vocab)}
    rows = [[index.get(w, UNK_ID) for w in words(t)][:max_len] for t in texts]
    out = torch.full((len(rows), max(1, *map(len, rows)) if rows else 1), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class TaskEncoder(nn.Module):
    """Token ids [B, L] -> task embedding [B, hidden]: a one-layer BERT, mean-pooled over real tokens."""

    def __init__(self, vocab: Sequence[str], hidden: int, max_len: int) -> None:
        from transformers import BertConfig, BertModel  # here: a model without task text never pays its import

        super().__init__()
        check_vocab(vocab)
        self.vocab, self.max_len = tuple(vocab), max_len
        heads = 2 if hidden % 2 == 0 else 1
        self.bert = BertModel(BertConfig(
            vocab_size=len(vocab) + len(SPECIALS), hidden_size=hidden, num_hidden_layers=1,
            num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=max_len,
            type_vocab_size=1, pad_token_id=PAD_ID, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        ), add_pooling_layer=False)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids LongTensor[B, L] on the CPU (see ``tokenize``)."""
        return tokenize(texts, self.vocab, self.max_len)

    def forward(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        n = self.bert.config.vocab_size
        if tokens_BL.ndim != 2 or tokens_BL.shape[1] > self.max_len or tokens_BL.dtype != torch.long:
            raise ValueError(f"tokens must be a LongTensor [B, L <= {self.max_len}], got "
                             f"{tokens_BL.dtype}{list(tokens_BL.shape)}")
        if tokens_BL.numel() and (tokens_BL.min() < 0 or tokens_BL.max() >= n):
            raise ValueError(f"token ids must be in [0, {n}), got [{tokens_BL.min()}, {tokens_BL.max()}]")
        if tokens_BL.shape[0] == 0:
            return torch.zeros(0, self.bert.config.hidden_size, device=tokens_BL.device)
        # a batch repeats a handful of instructions: encode each distinct one once
        unique_UL, index_B = torch.unique(tokens_BL, dim=0, return_inverse=True)
        mask_UL = unique_UL != PAD_ID
        hidden_ULD = self.bert(input_ids=unique_UL, attention_mask=mask_UL.long()).last_hidden_state
        mask = mask_UL[..., None].to(hidden_ULD.dtype)
        pooled_UD = (hidden_ULD * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # an empty text pools to zeros
        return pooled_UD[index_B]

    def encode(self, texts: Sequence[str], batch: int, device: torch.device) -> torch.Tensor:
        """Embeddings [B, hidden] of ``batch`` texts (a missing or wrong-length list is an error)."""
        if texts is None:
            raise ValueError(f"this model reads a task instruction: pass tasks (one sentence per row; "
                             f"vocabulary: {' '.join(self.vocab)})")
        if isinstance(texts, str) or len(texts) != batch:
            raise ValueError(f"tasks must be a list of {batch} sentences, got {texts!r}")
        return self(self.tokenize(list(texts)).to(device))
