"""Documents added while serving: an overlay searched beside the retrieval database.

The database (embeddings, populated index, token store) is a DVC output and is never written
here. Documents added through the server live in an *overlay*: their chunks (cut exactly as the
database cuts a document: ``chunk_length`` tokens of our tokenizer, never crossing the
document), embedded with the database's encoder, kept in one file
(``data/serve/overlay.npz`` by default) and searched with an exact inner-product index of
their own. A query searches both and merges the candidates by score (both indexes score the
same L2-normalised embeddings by inner product).

Chunk ids: the database's chunks keep their ids ``0 .. N-1``; overlay chunk ``i`` is ``N + i``.
:class:`LiveRetriever` has the interface ``generate.answer_questions`` uses (``search``,
``chunk_text``, ``neighbor_tokens``), so the generate code runs over the database plus the
overlay unchanged.

Atomicity: an add or a delete builds the whole new overlay (arrays and index) aside, writes the
file atomically (``io.atomic_path``), and only then swaps it in; a failure at any step leaves
the file and the searched overlay as they were. Readers take the current overlay once per
search, so a search never sees half an update.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .errors import PipelineError
from .io import atomic_path
from .retrieval import Retriever
from .tokenizer import whole_character_span

OVERLAY_VERSION = 1
MAX_DOCUMENT_CHARS = 100_000  # one added document
MAX_ID_CHARS = 200


@dataclass
class OverlayState:
    """An immutable snapshot of the overlay: documents, their chunks and an index over them."""

    ids: list[str] = field(default_factory=list)  # document ids, in insertion order
    texts: list[str] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)  # per document, int64
    chunks: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))  # (doc, start, length)
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    index: object = None

    def __len__(self) -> int:
        return len(self.chunks)

    def with_index(self, dim: int) -> "OverlayState":
        index = faiss.IndexFlatIP(dim)
        if len(self.embeddings):
            index.add(np.ascontiguousarray(self.embeddings, dtype=np.float32))
        self.index = index
        return self


def document_id(text: str) -> str:
    """The id a document gets when none is given: a short hash of its text."""
    return "doc-" + hashlib.blake2b(text.encode("utf8"), digest_size=8).hexdigest()


class LiveRetriever:
    """The database's :class:`~instructretro.retrieval.Retriever` plus the overlay of added documents.

    ``path`` is the overlay file; it is read at start (a corrupt file is a one-line error naming
    it) and rewritten on every change.
    """

    def __init__(self, base: Retriever, path: str | os.PathLike | None):
        self.base = base
        self.path = Path(path) if path else None  # None: added documents live in memory only
        self.encoder = base.encoder
        self.encode = base.encoder.encode  # query embedding; the server puts a batching Coalescer here
        self.tokenizer = base.tokenizer
        self.chunk_length = base.chunk_length
        self.n_base = len(base)
        self._write_lock = threading.Lock()  # one add/delete at a time; searches never wait
        self.state = self._load()

    # ------------------------------------------------------------------ persistence

    def _describe(self) -> dict:
        return {"version": OVERLAY_VERSION, "encoder": self.encoder.model_name, "dim": int(self.encoder.dim),
                "chunk_length": int(self.chunk_length), "vocab_size": int(self.tokenizer.vocab_size)}

    def _load(self) -> OverlayState:
        if self.path is None or not self.path.exists():
            return OverlayState(embeddings=np.zeros((0, self.encoder.dim), np.float32)).with_index(self.encoder.dim)
        try:
            with np.load(self.path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                tokens, offsets = z["tokens"].astype(np.int64), z["offsets"].astype(np.int64)
                chunks, emb = z["chunks"].astype(np.int64), z["embeddings"].astype(np.float32)
            ids, texts = meta["ids"], meta["texts"]
            ok = (len(ids) == len(texts) == len(offsets) - 1 and chunks.ndim == 2 and chunks.shape[1] == 3
                  and emb.shape == (len(chunks), self.encoder.dim) and offsets[-1] == len(tokens)
                  and (len(chunks) == 0 or (chunks[:, 0].min() >= 0 and chunks[:, 0].max() < len(ids))))
        except Exception as exc:  # a truncated zip, bad JSON, missing array: all one message
            raise PipelineError(f"{self.path}: corrupt serve overlay ({type(exc).__name__}); "
                                "move it away to start with no added documents") from None
        if not ok:
            raise PipelineError(f"{self.path}: corrupt serve overlay (arrays do not match); "
                                "move it away to start with no added documents")
        expect = self._describe()
        got = {k: meta.get(k) for k in expect}
        if got != expect:
            raise PipelineError(f"{self.path}: serve overlay was built with {got}, the database now has {expect}; "
                                "move it away to start with no added documents")
        docs = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(ids))]
        return OverlayState(list(ids), list(texts), docs, chunks, emb).with_index(self.encoder.dim)

    def _save(self, state: OverlayState) -> None:
        if self.path is None:
            return
        tokens = np.concatenate(state.tokens) if state.tokens else np.zeros(0, np.int64)
        offsets = np.cumsum([0] + [len(t) for t in state.tokens]).astype(np.int64)
        meta = {**self._describe(), "ids": state.ids, "texts": state.texts}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), tokens=tokens.astype(np.int32), offsets=offsets,
                 chunks=state.chunks, embeddings=state.embeddings.astype(np.float32))
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(buf.getvalue())

    # ------------------------------------------------------------------ changes

    def add_documents(self, documents: list[dict]) -> list[dict]:
        """Add ``[{text, id?}]``; returns ``[{id, chunks}]``. All or nothing.

        A document whose id is already in the overlay replaces it (same id, new text).
        """
        with self._write_lock:
            old = self.state
            prepared = []
            for d in documents:
                text = d["text"]
                doc_id = d.get("id") or document_id(text)
                tokens = np.asarray(self.tokenizer.encode(text), dtype=np.int64)
                rows = [(s, min(self.chunk_length, len(tokens) - s)) for s in range(0, len(tokens), self.chunk_length)]
                texts = [self._chunk_text_of(tokens, s, n) for s, n in rows]
                prepared.append((doc_id, text, tokens, rows, texts))
            all_texts = [t for *_, texts in prepared for t in texts]
            emb = self.encoder.encode(all_texts) if all_texts else np.zeros((0, self.encoder.dim), np.float32)
            keep = np.linalg.norm(emb, axis=1) > 0  # a chunk with no encoder tokens is not searchable, as in embed
            replaced = {doc_id for doc_id, *_ in prepared}
            docs = []  # (id, text, tokens, chunk rows (start, length), embeddings) of the new overlay
            for i, doc_id in enumerate(old.ids):
                if doc_id not in replaced:  # an added id that exists already replaces that document
                    sel = old.chunks[:, 0] == i
                    docs.append((doc_id, old.texts[i], old.tokens[i], old.chunks[sel, 1:], old.embeddings[sel]))
            report, e = [], 0
            for doc_id, text, tokens, rows, _ in prepared:
                sel = keep[e:e + len(rows)]
                docs.append((doc_id, text, tokens, np.array(rows, dtype=np.int64).reshape(-1, 2)[sel], emb[e:e + len(rows)][sel]))
                report.append({"id": doc_id, "chunks": int(sel.sum())})
                e += len(rows)
            ids = [d[0] for d in docs]
            texts = [d[1] for d in docs]
            toks = [d[2] for d in docs]
            chunk_rows = [np.column_stack([np.full(len(d[3]), i, dtype=np.int64), d[3]]) for i, d in enumerate(docs)]
            embs = [d[4] for d in docs]
            new = OverlayState(ids, texts, toks,
                               np.concatenate(chunk_rows).astype(np.int64) if chunk_rows else old.chunks[:0],
                               np.concatenate(embs).astype(np.float32) if embs else old.embeddings[:0])
            new.with_index(self.encoder.dim)
            self._save(new)  # atomic: on failure neither the file nor the searched overlay changed
            self.state = new
            return report

    def delete_document(self, doc_id: str) -> bool:
        """Remove one added document; False if no such id."""
        with self._write_lock:
            old = self.state
            if doc_id not in old.ids:
                return False
            i = old.ids.index(doc_id)
            keep = old.chunks[:, 0] != i
            chunks = old.chunks[keep].copy()
            chunks[chunks[:, 0] > i, 0] -= 1
            new = OverlayState(old.ids[:i] + old.ids[i + 1:], old.texts[:i] + old.texts[i + 1:],
                               old.tokens[:i] + old.tokens[i + 1:], chunks, old.embeddings[keep])
            new.with_index(self.encoder.dim)
            self._save(new)
            self.state = new
            return True

    def documents(self) -> list[dict]:
        s = self.state
        return [{"id": d, "chunks": int((s.chunks[:, 0] == i).sum()), "chars": len(s.texts[i])} for i, d in enumerate(s.ids)]

    def _chunk_text_of(self, tokens: np.ndarray, start: int, length: int) -> str:
        b, e = whole_character_span(tokens, start, start + length, self.tokenizer.continuation_mask)
        return self.tokenizer.decode(tokens[b:e])

    # ------------------------------------------------------------------ search

    def __len__(self) -> int:
        return self.n_base + len(self.state)

    def search_scored(self, texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids (len(texts), n) int64 best first (-1 pads) and their scores (inner products)."""
        texts = list(texts)
        state = self.state
        ids = np.full((len(texts), n), -1, dtype=np.int64)
        scores = np.full((len(texts), n), -np.inf, dtype=np.float32)
        if not texts or n <= 0:
            return ids, scores
        queries = np.ascontiguousarray(self.encode(texts), dtype=np.float32)
        live = np.flatnonzero(np.linalg.norm(queries, axis=1) > 0)  # empty text: no neighbors
        if not len(live):
            return ids, scores
        parts_s, parts_i = [], []
        nb = min(n, self.n_base)
        if nb > 0:
            s, i = self.base.index.search(queries[live], nb)
            parts_s.append(s), parts_i.append(i)
        no = min(n, len(state))
        if no > 0:
            s, i = state.index.search(queries[live], no)
            parts_s.append(s), parts_i.append(np.where(i >= 0, i + self.n_base, -1))
        if not parts_s:
            return ids, scores
        s, i = np.concatenate(parts_s, axis=1), np.concatenate(parts_i, axis=1)
        s = np.where(i >= 0, s, -np.inf)
        order = np.argsort(-s, axis=1, kind="stable")[:, :n]  # ties: the database first, then the overlay
        top_s, top_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        top_i = np.where(np.isfinite(top_s), top_i, -1)
        ids[live, : top_i.shape[1]] = top_i
        scores[live, : top_s.shape[1]] = top_s
        return ids, scores

    def search(self, texts: list[str], n: int, exclude_doc_ids=None) -> np.ndarray:
        """Like ``Retriever.search`` over the database and the overlay (no exclusions)."""
        if exclude_doc_ids is not None:
            raise PipelineError("LiveRetriever.search: exclude_doc_ids is not supported while serving")
        return self.search_scored(texts, n)[0]

    def doc_id(self, chunk_id: int) -> str:
        """The document id of a chunk: the database's stable id (as a string) or the added id."""
        if chunk_id < self.n_base:
            return str(int(self.base.doc_ids[chunk_id]))
        state = self.state
        return state.ids[int(state.chunks[chunk_id - self.n_base, 0])]

    def source(self, chunk_id: int) -> str:
        return "database" if chunk_id < self.n_base else "added"

    def _overlay_tokens(self, state: OverlayState, j: int) -> tuple[np.ndarray, int]:
        """Chunk ``j`` of the overlay with its continuation, and the chunk's own length."""
        d, start, length = (int(x) for x in state.chunks[j])
        return state.tokens[d][start:start + 2 * self.chunk_length], length

    def neighbor_tokens(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (..., k, 2*chunk_length), mask) as ``Retriever.neighbor_tokens``, overlay ids included."""
        ids = np.asarray(ids, dtype=np.int64)
        base_ids = np.where(ids < self.n_base, ids, -1)
        tokens, mask = self.base.neighbor_tokens(base_ids)
        over = np.argwhere(ids >= self.n_base)
        if len(over):
            state = self.state
            tokens, mask = tokens.copy(), mask.copy()
            for idx in map(tuple, over):
                t, _ = self._overlay_tokens(state, int(ids[idx]) - self.n_base)
                tokens[idx] = self.base.neighbors.store.eod_id  # the database's end-of-document
                mask[idx] = False
                tokens[idx][: len(t)] = t
                mask[idx][: len(t)] = True
        return tokens, mask

    def chunk_text(self, chunk_id: int, continuation: bool = True) -> str:
        if chunk_id < self.n_base:
            return self.base.chunk_text(chunk_id, continuation)
        t, length = self._overlay_tokens(self.state, chunk_id - self.n_base)
        return self.tokenizer.decode(t if continuation else t[:length])
