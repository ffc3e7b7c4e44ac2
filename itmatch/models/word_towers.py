"""Word-level text towers trained from scratch on the training split's vocabulary:

    textcnn   004's text CNN: words (fixed length model.text_max_length) -> a 1×1 convolution as
              the word lookup (initialised from word vectors when model.word_vectors names a local
              file), residual blocks of 1×2 convolutions, average pooling over positions;
              training sentences get 004's *position shift* (a random number of padding positions
              before the words, not only after them)
    gru       001 §5.3: word embedding (256) -> bidirectional GRU (hidden 512) -> mean over the words

The vocabulary is built from the training split only (`fit_vocabulary`, called by the trainer
before the first step) and travels in the checkpoint as the tower's extra state, so evaluation
and the MLflow model tokenise exactly as training did. Index 0 pads, 1 is the unknown word.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itmatch.config import ModelConfig

log = logging.getLogger("itmatch.models")
_WORD = re.compile(r"[0-9a-z]+")
PAD, UNK = 0, 1


def words(text: str) -> list[str]:
    return _WORD.findall(str(text).lower())


def build_vocabulary(texts: Sequence[str], size: int, min_count: int = 1) -> list[str]:
    """The `size` most frequent words seen at least `min_count` times (ties broken alphabetically,
    so every rank builds the same list)."""
    counts = Counter(w for t in texts for w in words(t))
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return ranked[:size]


MINILM_VECTORS = "minilm"
"""model.word_vectors value: word vectors from all-MiniLM-L6-v2's input embeddings (offline, the wheel)."""


def minilm_word_vectors(vocabulary: Sequence[str], dim: int) -> Tensor:
    """[len(vocabulary), dim] word vectors that need no download: each word's vector is the mean of
    its word pieces' input (token) embeddings in all-MiniLM-L6-v2 (384-d, from the PyPI wheel),
    projected onto the vocabulary's first `dim` principal components, each scaled to unit standard
    deviation. Semantically close words keep close vectors, which is all 003's encoding asks of
    Word2Vec; the projection makes them as short as the paper's (12-d in [49])."""
    from itmatch.data.encoders import build_text_encoder

    encoder = build_text_encoder("minilm")
    table = encoder.model.get_input_embeddings().weight.detach().float().cpu()
    pieces = encoder.tokenizer(list(vocabulary), add_special_tokens=False)["input_ids"]
    vectors = torch.stack([table[ids].mean(0) if ids else torch.zeros(table.shape[1]) for ids in pieces])
    centred = vectors - vectors.mean(0)
    if dim > min(centred.shape):
        raise ValueError(f"model.word_dim={dim}: MiniLM word vectors of {len(vocabulary)} words give at most "
                         f"{min(centred.shape)} components")
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:dim].T
    return projected / projected.std(0).clamp_min(1e-8)


class WordPrep:
    """Captions -> [N, length] word ids (0 pads, 1 unknown); with `shift` and a training rng, 004's
    position shift puts a random number of pads before the words."""

    reads = "texts"

    def __init__(self, vocabulary: Sequence[str], length: int, shift: bool) -> None:
        self.index = {w: i + 2 for i, w in enumerate(vocabulary)}
        self.length, self.shift = length, shift

    def __call__(self, texts: Sequence[str], *, train: bool = False,
                 rng: Optional[np.random.Generator] = None) -> Tensor:
        out = np.zeros((len(texts), self.length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.index.get(w, UNK) for w in words(text)][:self.length]
            start = int(rng.integers(0, self.length - len(ids) + 1)) if train and self.shift and rng is not None else 0
            out[row, start:start + len(ids)] = ids
        return torch.from_numpy(out)


class WordTower(nn.Module):
    """Shared by the word-level towers: the vocabulary (extra state) and its preparer."""

    trainable = True
    eval_batch = 1024

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg, self.vocabulary = cfg, []
        self.prepare = WordPrep([], cfg.text_max_length, cfg.position_shift)

    def fit_vocabulary(self, texts: Sequence[str]) -> None:
        self.set_extra_state({"vocabulary": build_vocabulary(texts, self.cfg.vocab_size, self.cfg.vocab_min_count)})
        self._init_word_vectors()

    def get_extra_state(self) -> dict[str, Any]:
        return {"vocabulary": list(self.vocabulary)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.vocabulary = list(state["vocabulary"])
        self.prepare = WordPrep(self.vocabulary, self.cfg.text_max_length, self.cfg.position_shift)

    def _lookup_weight(self) -> Tensor:
        raise NotImplementedError

    def _init_word_vectors(self) -> None:
        """Rows of the lookup from a local word-vector text file ("word v1 v2 ..." a line), or from
        MiniLM's input token embeddings (`minilm`, see `minilm_word_vectors`)."""
        path = self.cfg.word_vectors
        if not path:
            return
        if path == MINILM_VECTORS:
            with torch.no_grad():
                weight = self._lookup_weight()
                weight[2:2 + len(self.vocabulary)] = minilm_word_vectors(self.vocabulary, weight.shape[1]).to(weight)
            log.info("text tower: %d vocabulary words initialised from MiniLM's token embeddings", len(self.vocabulary))
            return
        weight, index, found = self._lookup_weight(), {w: i + 2 for i, w in enumerate(self.vocabulary)}, 0
        with torch.no_grad(), open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip().split(" ")
                if parts[0] in index and len(parts) - 1 == weight.shape[1]:
                    weight[index[parts[0]]] = torch.tensor([float(v) for v in parts[1:]])
                    found += 1
        log.info("text tower: %d of %d vocabulary words initialised from %s", found, len(self.vocabulary), Path(path))


class _Residual(nn.Module):
    """A 1×2 convolution residual block over word positions (004: ResNet bottlenecks over text)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 2, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 2, bias=False)
        self.bn2 = nn.BatchNorm1d(width)

    def forward(self, x: Tensor) -> Tensor:
        same = lambda conv, t: conv(F.pad(t, (0, 1)))  # noqa: E731  (a 1x2 kernel keeps the length)
        return F.relu(x + self.bn2(same(self.conv2, F.relu(self.bn1(same(self.conv1, x))))))


class TextCNNTower(WordTower):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        # The lookup as a 1×1 convolution over one-hot words is an embedding table (same weights).
        self.lookup = nn.Embedding(cfg.vocab_size + 2, cfg.word_dim, padding_idx=PAD)
        self.widen = nn.Conv1d(cfg.word_dim, cfg.text_width, 1, bias=False)
        self.blocks = nn.Sequential(*[_Residual(cfg.text_width) for _ in range(cfg.text_blocks)])
        self.out_dim = cfg.text_width
        self.stages = [self.lookup, self.widen, *self.blocks]

    def _lookup_weight(self) -> Tensor:
        return self.lookup.weight

    def forward(self, ids: Tensor) -> Tensor:
        x = self.blocks(self.widen(self.lookup(ids).transpose(1, 2)))  # [N, width, length]
        return x.mean(dim=2)  # average pooling over positions, pads included (fixed length, as 004)


class GRUTower(WordTower):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.lookup = nn.Embedding(cfg.vocab_size + 2, cfg.word_dim, padding_idx=PAD)
        self.rnn = nn.GRU(cfg.word_dim, cfg.text_width // 2, batch_first=True, bidirectional=True)
        self.out_dim = 2 * (cfg.text_width // 2)
        self.stages = [self.lookup, self.rnn]

    def _lookup_weight(self) -> Tensor:
        return self.lookup.weight

    def forward(self, ids: Tensor) -> Tensor:
        mask = (ids != PAD).unsqueeze(-1).to(self.lookup.weight.dtype)
        hidden, _ = self.rnn(self.lookup(ids))
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # mean over the words


__all__ = ["GRUTower", "TextCNNTower", "WordPrep", "WordTower", "build_vocabulary", "words", "minilm_word_vectors",
           "MINILM_VECTORS"]
