"""001 Eq. 8 (§5.6): image-sentence retrieval ranked by the combined distance

    D(x, y) = (1 - α) d(x, y) + α d_rp(x, y)

of an image-sentence model (d) and a region-phrase model (d_rp: the mean over the sentence's
phrases of the distance from each phrase to its best-matching region proposal of the image).

Distances, for either network in either role:
- embedding network (and CCA, 2-Way Net, ensembles: unit embeddings): the Euclidean distance of
  the unit embeddings, sqrt(2 - 2 cos) (SPEC §2), which ranks exactly as the cosine does;
- similarity network: its score p is a logit (the logistic loss, Eq. 7, makes σ(p) the probability
  that the pair matches), so d = 2 σ(-p) = 2 (1 - P(match)): in [0, 2] like the unit-sphere
  distance, and decreasing in p, so it ranks as p does.

The two models see the same images and sentences through two stores of one folder: the
image-sentence split (image ids, caption ids, caption texts) and the region-phrase split of the
same name (each picture's proposals, each phrase's caption id), lined up by those ids
(`align`; `itmatch.phrases.sentences` writes the sentences of a Flickr30K Entities folder with
the reader's ids). Regions are the proposals only (at test time no ground-truth box is known).
Where d_rp is undefined (a sentence without visual phrases, an image without proposals) D = d.

The metrics are the plain retrieval metrics' keys with the prefix `eq8_`, ranked by -D with the
same code (pessimistic ties, chunked), so at α = 0 they are the plain metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from itmatch.data.phrase_store import PhraseSplit
from itmatch.data.sources import DataError
from itmatch.data.store import SplitRows
from itmatch.eval.retrieval import ScoreFn, retrieval_metrics
from itmatch.phrases.metrics import PairDistance, combine_distances, sentence_region_distance, unit_distance

PREFIX = "eq8_"


def score_distance(scores: Tensor, learned: bool) -> Tensor:
    """Scores -> distances (float64, lower is closer): sqrt(2 - 2 cos) for cosines, 2 σ(-p) for a
    similarity network's logit p (module docstring)."""
    s = scores.double()
    return 2.0 * torch.sigmoid(-s) if learned else unit_distance(s)


@dataclass
class Alignment:
    """Where the image-sentence split's rows are in the region-phrase split."""

    image_regions: np.ndarray  # [I, P] region rows (proposals) of each sentence-split image, -1 padding
    phrase_rows: np.ndarray  # [M] phrase rows whose sentence is in the sentence split
    phrase_sentence: np.ndarray  # [M] that sentence's caption row in the sentence split


def align(split: SplitRows, phrases: PhraseSplit, where: str = "eq8") -> Alignment:
    """Line up a sentence split with a region-phrase split of the same images by image and caption
    id; a DataError (one line, naming `where`) when they are not the same images and sentences:
    an image without a picture there, no phrase in any sentence, a phrase its sentence lacks."""
    pictures = np.asarray(phrases.picture_ids)
    at = np.clip(np.searchsorted(pictures, split.image_ids), 0, max(len(pictures) - 1, 0))
    missing = np.flatnonzero(pictures[at] != split.image_ids) if len(pictures) else np.arange(len(split.image_ids))
    if missing.size:
        raise DataError(f"{where}: {missing.size} of the {len(split.image_ids)} images are not in the region-phrase "
                        f"data, e.g. image id {int(split.image_ids[missing[0]])}: both must describe the same images "
                        "(train the image-sentence model on karpathy:<root>/dataset_sentences.json, "
                        "itmatch.phrases.sentences)")
    row_of = {int(c): r for r, c in enumerate(split.caption_ids)}
    sentence = np.array([row_of.get(int(c), -1) for c in phrases.phrase_caption], dtype=np.int64)
    rows = np.flatnonzero(sentence >= 0)
    if rows.size == 0:
        raise DataError(f"{where}: none of the {len(split)} sentences has a phrase in the region-phrase data: "
                        "the sentences are not that data's (caption ids differ)")
    for r in rows:  # the caption ids could coincide by chance: the phrase must be words of its sentence
        text, phrase = split.texts[sentence[r]].lower(), phrases.texts[r].lower()
        if f" {phrase} " not in f" {text} ":
            raise DataError(f"{where}: caption id {int(phrases.phrase_caption[r])} reads {split.texts[sentence[r]]!r}, "
                            f"which does not contain its phrase {phrases.texts[r]!r}: the sentences are not the "
                            "region-phrase data's")
    return Alignment(phrases.proposal_rows[at], rows, sentence[rows])


def sentence_distance(img: Tensor, txt: Tensor, score_fn: Optional[ScoreFn] = None, *,
                      chunk: int = 1024) -> Tensor:
    """d of Eq. 8: [I, S] float64 distances of every image to every sentence (`score_fn`: a
    similarity network's pair scorer, else the cosine of unit embeddings)."""
    rows = []
    for i in range(0, len(img), chunk):
        q = img[i:i + chunk]
        s = q @ txt.T if score_fn is None else torch.cat(
            [score_fn(q, txt[j:j + chunk]) for j in range(0, len(txt), chunk)], dim=1)
        rows.append(score_distance(s, learned=score_fn is not None))
    return torch.cat(rows) if rows else torch.zeros(0, len(txt), dtype=torch.float64)


def pair_distance_of(model: nn.Module, pairs: int = 8192) -> Optional[PairDistance]:
    """The region-phrase model's region-phrase distance: None (cosine) for an embedding model, the
    learned score through `score_distance` for a similarity network, `pairs` at a time through its
    head (whose first layer is 512 wide whatever the embedding width)."""
    pair_scores = getattr(model, "pair_scores", None)
    if pair_scores is None:
        return None
    device = next(model.parameters()).device

    @torch.no_grad()
    def distance(regions: Tensor, phrases: Tensor) -> Tensor:  # [i, R, D], [m, D] -> [i, m, R]
        i, R, D = regions.shape
        r = regions[:, None, :, :].expand(i, len(phrases), R, D).reshape(-1, D)
        p = phrases[None, :, None, :].to(regions.dtype).expand(i, len(phrases), R, D).reshape(-1, D)
        scores = torch.cat([pair_scores(r[k:k + pairs].to(device), p[k:k + pairs].to(device)).float().cpu()
                            for k in range(0, len(r), pairs)]) if len(r) else r.new_zeros(0)
        return score_distance(scores.view(i, len(phrases), R), learned=True)

    return distance


def combined_distance(d: Tensor, phrase_model: nn.Module, region_emb: Tensor, phrase_emb: Tensor,
                      alignment: Alignment, alpha: float) -> Tensor:
    """Eq. 8's D [I, S] from d and the region-phrase model's embeddings of the aligned split."""
    was_training = phrase_model.training
    phrase_model.eval()
    try:
        d_rp = sentence_region_distance(region_emb, torch.from_numpy(alignment.image_regions),
                                        phrase_emb[torch.from_numpy(alignment.phrase_rows)],
                                        torch.from_numpy(alignment.phrase_sentence), d.shape[1],
                                        pair_distance=pair_distance_of(phrase_model))
    finally:
        phrase_model.train(was_training)
    return combine_distances(d, d_rp, alpha)


def ranking_metrics(D: Tensor, caption_image: np.ndarray, *, chunk: int = 1024) -> dict[str, float]:
    """The retrieval metrics of a distance matrix [I, S], ranked by -D with `retrieval_metrics`:
    rows and columns pass through as their indices, the score looks them up."""
    scores = -D

    def lookup(images: Tensor, texts: Tensor) -> Tensor:
        return scores[images[:, 0].long()][:, texts[:, 0].long()]

    index = lambda n: torch.arange(n, dtype=torch.float64)[:, None]  # noqa: E731
    return retrieval_metrics(index(D.shape[0]), index(D.shape[1]), torch.from_numpy(caption_image), chunk=chunk,
                             score_fn=lookup)


def eq8_metrics(img: Tensor, txt: Tensor, split: SplitRows, phrase_model: nn.Module, region_emb: Tensor,
                phrase_emb: Tensor, phrases: PhraseSplit, *, alpha: float, score_fn: Optional[ScoreFn] = None,
                chunk: int = 1024, where: str = "eq8", alignment: Optional[Alignment] = None) -> dict[str, float]:
    """`eq8_`-prefixed retrieval metrics of the sentence split ranked by Eq. 8's D: `img`, `txt`
    the image-sentence model's embeddings of `split` (`score_fn` its pair scorer, if a similarity
    network), `region_emb`, `phrase_emb` the region-phrase model's of `phrases` (`embed_split`)."""
    alignment = alignment or align(split, phrases, where)
    d = sentence_distance(img, txt, score_fn, chunk=chunk)
    D = combined_distance(d, phrase_model, region_emb, phrase_emb, alignment, alpha)
    return {PREFIX + k: v for k, v in ranking_metrics(D, split.caption_image, chunk=chunk).items()}


def evaluate_eq8(model: nn.Module, img: Tensor, txt: Tensor, split: SplitRows, phrase_model: nn.Module,
                 phrases: PhraseSplit, *, alpha: float, chunk: int = 1024, where: str = "eq8") -> dict[str, float]:
    """`eq8_metrics` for an image-sentence model whose embeddings of `split` are `img`, `txt`
    (`embed_split`): the region-phrase model embeds its split here (regions and phrases once)."""
    from itmatch.eval.evaluate import _pair_scorer, embed_split

    alignment = align(split, phrases, where)  # before any embedding: bad data fails fast
    region_emb, phrase_emb = embed_split(phrase_model, phrases)
    return eq8_metrics(img, txt, split, phrase_model, region_emb, phrase_emb, phrases, alpha=alpha,
                       score_fn=_pair_scorer(model), chunk=chunk, alignment=alignment)


__all__ = ["PREFIX", "score_distance", "Alignment", "align", "sentence_distance", "pair_distance_of",
           "combined_distance", "ranking_metrics", "eq8_metrics",
           "evaluate_eq8"]
