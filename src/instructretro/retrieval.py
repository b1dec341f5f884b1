"""Retrieval at run time (SFT prompts, generation): text in, DB chunk ids, tokens and texts out.

``Retriever`` embeds query texts with the same encoder as the database, searches the populated
index (with ``nprobe`` / ``efSearch``), optionally drops chunks of given documents, and reads the
neighbors back as tokens (chunk + continuation, see ``dbfile.NeighborTokens``) or as text.
"""

from __future__ import annotations

import os

import numpy as np

from .embed import Encoder
from .dbfile import NeighborTokens
from .errors import PipelineError
from .index import read_index, set_search_params
from .tokenizer import Tokenizer


class Retriever:
    """Search the retrieval database with free text.

    ``encoder`` is an :class:`Encoder` or an ``embed.encoder`` path ('' = default); it must be
    the encoder the database was embedded with (checked against the embeddings file).
    """

    def __init__(self, embeddings_h5: str | os.PathLike, index_path: str | os.PathLike,
                 db_tokens_dir: str | os.PathLike, tokenizer_path: str | os.PathLike,
                 encoder: Encoder | str | os.PathLike = "", chunk_length: int = 64,
                 nprobe: int | None = None, efsearch: int | None = None, precision: str = "auto"):
        self.encoder = encoder if isinstance(encoder, Encoder) else Encoder(encoder, precision=precision)
        self.neighbors = NeighborTokens(db_tokens_dir, embeddings_h5, chunk_length)
        self.doc_ids = self.neighbors.db.as_array("doc_ids")  # memory-mapped: only the candidates' rows are read
        dim = int(self.neighbors.db.attrs.get("dim", 0))
        built_with = str(self.neighbors.db.attrs.get("encoder", ""))
        if dim != self.encoder.dim or built_with.split(" (")[0] != self.encoder.model_name:
            raise PipelineError(f"{embeddings_h5}: database embedded with {built_with!r} ({dim}-d), "
                                f"but the retriever's encoder is {self.encoder.name!r} ({self.encoder.dim}-d)")
        self.index = read_index(index_path)
        if self.index.ntotal != len(self.doc_ids):
            raise PipelineError(f"{index_path}: index holds {self.index.ntotal} vectors, {embeddings_h5} has {len(self.doc_ids)} chunks")
        set_search_params(self.index, nprobe, efsearch)
        self.tokenizer = Tokenizer(tokenizer_path)
        self.chunk_length = chunk_length

    def __len__(self) -> int:
        return len(self.doc_ids)

    def search(self, texts: list[str], n: int, exclude_doc_ids=None) -> np.ndarray:
        """Ids (len(texts), n) int64 of the nearest DB chunks, best first, padded with -1.

        ``exclude_doc_ids``: stable document ids whose chunks are skipped, either one collection
        for every text or one collection per text.
        """
        texts = list(texts)
        out = np.full((len(texts), n), -1, dtype=np.int64)
        if not texts or n <= 0:
            return out
        per_text = _per_text_exclusions(exclude_doc_ids, len(texts))
        queries = self.encoder.encode(texts)
        live = np.flatnonzero(np.linalg.norm(queries, axis=1) > 0)  # empty text: no neighbors
        want = min(len(self), n if per_text is None else max(4 * n, n + 64))
        while len(live):
            _, cand = self.index.search(np.ascontiguousarray(queries[live]), want)
            short = []
            for r, q in enumerate(live):
                ids = cand[r][cand[r] >= 0]
                if per_text is not None and len(per_text[q]):
                    ids = ids[~np.isin(self.doc_ids[ids], per_text[q])]
                out[q, : min(n, len(ids))] = ids[:n]
                if len(ids) < n and want < len(self):
                    short.append(q)
            if not short:
                break
            live, want = np.asarray(short), min(len(self), 4 * want)
        return out

    def neighbor_tokens(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (..., k, 2*chunk_length) int64, mask bool): each chunk plus its continuation."""
        return self.neighbors(ids)

    def chunk_text(self, chunk_id: int, continuation: bool = True) -> str:
        """The text of a DB chunk (with its continuation by default); '' for id -1."""
        if chunk_id < 0:
            return ""
        tokens, mask = self.neighbors(np.array([chunk_id]))
        keep = mask[0] if continuation else mask[0] & (np.arange(mask.shape[1]) < self.neighbors.chunks[chunk_id, 2])
        return self.tokenizer.decode(tokens[0][keep])


def _per_text_exclusions(exclude, n_texts: int):
    """Normalise ``exclude_doc_ids`` to a list of uint64 arrays (one per text) or None."""
    if exclude is None:
        return None
    items = list(exclude)
    nested = len(items) == n_texts and all(isinstance(e, (list, tuple, set, frozenset, np.ndarray)) for e in items)
    if nested:
        return [np.asarray(sorted(int(x) for x in e), dtype=np.uint64) for e in items]
    shared = np.asarray(sorted(int(x) for x in items), dtype=np.uint64)
    return [shared] * n_texts
