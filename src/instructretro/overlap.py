"""How much of a chunk its neighbors already contain: RETRO's leakage measure (sections 2.6, 4.4).

The overlap of a chunk with the neighbors the model reads for it is the longest run of
consecutive tokens that the chunk shares with any one of them (each neighbor is its chunk plus
its continuation, ``2 * chunk_length`` tokens), as a fraction of the chunk's length. 1.0 means
the whole chunk is in a neighbor; 0 means not one token is.

:func:`longest_common_run` computes it for many chunks at once: the classic dynamic programme
``run[i, j] = run[i-1, j-1] + 1 if chunk[i] == neighbor[j] else 0``, one step per chunk
position, each step comparing that token of every chunk with every token of all its neighbors
in one numpy operation. Cost: ``chunk_length`` steps over an (n, k * R) array; nothing else is
read than the tokens given.

A token that is not real (a short chunk's padding, a masked neighbor position, a missing
neighbor of id -1) is marked by a negative id here and matches nothing.
"""

from __future__ import annotations

import numpy as np

# RETRO's buckets: a chunk falls into the first bucket whose upper bound its overlap does not exceed
BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def longest_common_run(chunks: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    """Per neighbor, the longest run of tokens it shares with its chunk.

    ``chunks`` int (n, L); ``neighbors`` int (n, k, R). Negative ids are not tokens (padding,
    masked positions) and never match. Returns int64 (n, k): the length of the longest common
    substring of ``chunks[i]`` and ``neighbors[i, j]``.
    """
    chunks = np.asarray(chunks)
    neighbors = np.asarray(neighbors)
    n, L = chunks.shape
    _, k, R = neighbors.shape
    # a run may not continue from one neighbor into the next: a non-token column between them
    flat = np.concatenate([neighbors, np.full((n, k, 1), -1, neighbors.dtype)], axis=2).reshape(n, k * (R + 1))
    real = flat >= 0
    run = np.zeros((n, k * (R + 1)), dtype=np.int32)  # run[:, j]: common run ending at chunk[i], neighbor[j]
    best = np.zeros((n, k * (R + 1)), dtype=np.int32)
    for i in range(L):
        token = chunks[:, i : i + 1]
        match = (flat == token) & real & (token >= 0)  # (n, k*(R+1)): this chunk token vs every neighbor token
        shifted = np.zeros_like(run)
        shifted[:, 1:] = run[:, :-1]  # the run that ended one token earlier on both sides
        run = np.where(match, shifted + 1, 0)
        np.maximum(best, run, out=best)
    return best.reshape(n, k, R + 1).max(axis=2).astype(np.int64)


def chunk_overlap(chunks: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    """The fraction (n,) of each chunk (n, L) that its neighbors (n, k, R) hold as one run:
    the longest common run with any neighbor over the chunk's real tokens (a chunk without
    real tokens has overlap 0)."""
    length = (np.asarray(chunks) >= 0).sum(axis=1)
    runs = longest_common_run(chunks, neighbors).max(axis=1, initial=0)
    return np.where(length > 0, runs / np.maximum(length, 1), 0.0)


def bucket_of(overlap: np.ndarray) -> np.ndarray:
    """The bucket index (0 .. 7) of each overlap: the first of :data:`BUCKETS` not below it."""
    return np.searchsorted(np.asarray(BUCKETS), np.asarray(overlap) - 1e-9, side="left").clip(0, len(BUCKETS) - 1)


def with_ids(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Token ids with every position outside ``mask`` set to -1 (not a token)."""
    return np.where(np.asarray(mask, dtype=bool), np.asarray(tokens), -1)


def filter_neighbors(neighbor_tokens: np.ndarray, neighbor_mask: np.ndarray, chunks: np.ndarray,
                     max_overlap: float) -> np.ndarray:
    """The leakage filter: ``neighbor_mask`` (..., k, R) with every neighbor whose overlap with
    its chunk (``chunks`` (..., L), -1 = not a token) exceeds ``max_overlap`` masked out whole,
    as a missing neighbor is."""
    mask = np.asarray(neighbor_mask, dtype=bool)
    *lead, k, R = mask.shape
    ids = with_ids(neighbor_tokens, mask).reshape(-1, k, R)
    chunks = np.asarray(chunks).reshape(-1, np.shape(chunks)[-1])
    length = np.maximum((chunks >= 0).sum(axis=1), 1)[:, None]
    drop = longest_common_run(chunks, ids) / length > max_overlap  # (n, k)
    return mask & ~drop.reshape(*lead, k, 1)
