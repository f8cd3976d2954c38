"""Near-duplicate removal of clips by embeddings: cosine distance, greedy, per group.

Pure NumPy. Embeddings are compared by cosine distance ``1 - cos(a, b)`` in float32, in
[0, 2]. Rows are L2-normalised first; an all-zero row stays zero and so has distance exactly 1
to everything. Non-finite embeddings are an error. Similarities are matrix products over
chunks of rows, so memory stays bounded (about ``_CELLS`` float32 cells per chunk) whatever
the sizes.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

_CELLS = 1 << 22  # similarity cells (float32) per chunk: 16 MiB
_BLOCK = 256  # new clips resolved per greedy block


def _unit(vectors: np.ndarray, name: str) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"{name} must be [N,D], got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{name} has non-finite values")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def _chunks(queries: np.ndarray, bank: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows of ``queries``, their cosine similarities [rows, M] to ``bank``), chunk by chunk."""
    rows = max(1, _CELLS // max(len(bank), 1))
    for start in range(0, len(queries), rows):
        part = slice(start, start + rows)
        yield part, queries[part] @ bank.T


def _distance(similarity: np.ndarray) -> np.ndarray:
    return np.clip(np.float32(1) - similarity, 0, 2).astype(np.float32)


def nearest(queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ``bank`` row of each query by cosine distance: (index int64[N], distance f32[N]).

    Ties go to the lowest bank index. With an empty bank the index is -1 and the distance +inf.
    """
    queries, bank = _unit(queries, "queries"), _unit(bank, "bank")
    index = np.full(len(queries), -1, np.int64)
    distance = np.full(len(queries), np.inf, np.float32)
    if len(bank):
        for part, sims in _chunks(queries, bank):
            index[part] = sims.argmax(axis=1)
            distance[part] = _distance(np.take_along_axis(sims, index[part, None], 1)[:, 0])
    return index, distance


def _codes(groups: Sequence[str] | None, other: Sequence[str] | None, n: int, m: int,
           ) -> tuple[np.ndarray, np.ndarray]:
    """Integer group codes of the new clips and of the existing ones (one group when None)."""
    if groups is None:
        return np.zeros(n, np.int64), np.zeros(m, np.int64)
    codes = np.unique(np.array([*groups, *other], dtype=str), return_inverse=True)[1]
    return codes[:n], codes[n:]


def _best_in_group(queries: np.ndarray, query_groups: np.ndarray, bank: np.ndarray,
                   bank_groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: the most similar bank row of its own group (index, -1 if none, and
    similarity, -inf if none) and the distance to the nearest bank row of any group."""
    n = len(queries)
    index, sim, novelty = np.full(n, -1, np.int64), np.full(n, -np.inf, np.float32), \
        np.full(n, np.inf, np.float32)
    if len(bank):
        for part, sims in _chunks(queries, bank):
            novelty[part] = _distance(sims.max(axis=1))
            sims[query_groups[part, None] != bank_groups[None, :]] = -np.inf
            index[part] = sims.argmax(axis=1)
            sim[part] = np.take_along_axis(sims, index[part, None], 1)[:, 0]
        index[sim == -np.inf] = -1
    return index, sim, novelty


def mark_duplicates(embeddings: np.ndarray, *, ids: Sequence[str],
                    groups: Sequence[str] | None = None, threshold: float,
                    existing: np.ndarray | None = None, existing_ids: Sequence[str] | None = None,
                    existing_groups: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Greedy near-duplicate marking of new clips, in the given order.

    Every existing (lake) clip counts as kept. Clip i is compared with the kept clips of its
    group (``groups[i]``; ``groups=None`` puts everything in one group): the existing ones and
    the new clips before it that were kept. If the most similar of them is at cosine distance
    strictly less than ``threshold``, clip i is a duplicate of it; otherwise clip i is kept.
    Ties between equally near kept clips go to an existing clip, then to the earliest.
    ``groups`` and ``existing_groups`` are given together (or both None) when there are
    existing clips.

    Returns (``duplicate_of``: the id of that kept clip, or ``""`` for a kept clip;
    ``novelty`` float32[N]: cosine distance to the nearest existing clip of any group, +inf
    when there are none).
    """
    new = _unit(embeddings, "embeddings")
    old = _unit(np.zeros((0, new.shape[1])) if existing is None else existing, "existing")
    existing_ids = list(existing_ids or [])
    if len(ids) != len(new) or len(existing_ids) != len(old) or old.shape[1] != new.shape[1]:
        raise ValueError(f"embeddings {new.shape} / {len(ids)} ids, existing {old.shape} / "
                         f"{len(existing_ids)} existing_ids")
    if len(old) and (groups is None) != (existing_groups is None):
        raise ValueError("give groups and existing_groups together, or neither")
    if groups is not None and (len(groups) != len(new) or len(existing_groups or []) != len(old)):
        raise ValueError("groups / existing_groups must match the embeddings in length")
    new_groups, old_groups = _codes(groups, existing_groups if len(old) else [], len(new), len(old))
    old_index, old_sim, novelty = _best_in_group(new, new_groups, old, old_groups)

    duplicate_of = [""] * len(new)
    kept = np.zeros(len(new), np.int64)  # positions of the kept new clips, in order
    kept_vecs = np.zeros_like(new)  # their embeddings, row k for kept[k]
    n_kept = 0
    for start in range(0, len(new), _BLOCK):
        block = np.arange(start, min(start + _BLOCK, len(new)))
        prior_index, prior_sim = _best_in_group(
            new[block], new_groups[block], kept_vecs[:n_kept], new_groups[kept[:n_kept]])[:2]
        inner = new[block] @ new[block].T
        inner[new_groups[block, None] != new_groups[None, block]] = -np.inf
        kept_here: list[int] = []  # offsets in the block of the clips kept so far
        for offset, i in enumerate(block):
            # candidates in tie-break order: existing, kept in earlier blocks, kept in this one
            best_sim, best_id = old_sim[i], existing_ids[old_index[i]] if old_index[i] >= 0 else None
            if prior_sim[offset] > best_sim:
                best_sim, best_id = prior_sim[offset], ids[kept[prior_index[offset]]]
            if kept_here:
                row = inner[offset, kept_here]
                j = int(row.argmax())
                if row[j] > best_sim:
                    best_sim, best_id = row[j], ids[block[kept_here[j]]]
            if best_id is not None and _distance(np.float32(best_sim)) < threshold:
                duplicate_of[i] = best_id
            else:
                kept_here.append(offset)
        kept[n_kept:n_kept + len(kept_here)] = block[kept_here]
        kept_vecs[n_kept:n_kept + len(kept_here)] = new[block[kept_here]]
        n_kept += len(kept_here)
    return duplicate_of, novelty


def clip_embedding(frame_embeddings: np.ndarray) -> np.ndarray:
    """A clip's embedding: the mean of its frames' embeddings [T,D], L2-normalised (float32[D]).

    A zero mean stays the zero vector; no frames, or non-finite values, is an error.
    """
    frames = np.asarray(frame_embeddings, np.float32)
    if frames.ndim != 2 or not len(frames):
        raise ValueError(f"frame_embeddings must be [T>0,D], got shape {frames.shape}")
    return _unit(frames.mean(axis=0, keepdims=True), "frame_embeddings")[0]
