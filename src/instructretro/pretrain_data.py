"""Pretraining batches: samples of one split, each with the neighbor tokens of its chunks.

A sample is ``seq_length`` tokens (``SampleLayout`` in ``chunks``): ``C = seq_length //
chunk_length`` query chunks. Query chunk row ``q`` of the split has up to K neighbor ids in
``neighbors.h5`` (row ``q`` = ``SampleLayout.chunks[q]``, -1 = none); the model reads the first
``k`` of them, each as the neighbor chunk plus its continuation (``2 * chunk_length`` tokens,
from ``NeighborTokens``). A batch is a dict of tensors::

    tokens (B, T) int64, labels (B, T) int64, loss_mask (B, T) float32,
    neighbors (B, C, k, R) int64, neighbor_mask (B, C, k, R) bool      (Retro only)
    fact_mask (B, T) float32                                           (when facts are known)

``fact_mask`` marks the positions whose *label* is a token stating a fact: the synthetic world
records each fact's character span (``fact_spans``) and we map spans to tokens with the
SentencePiece offsets. Validation with *shuffled* neighbors gives every sample the neighbors of
the sample half the split away, so it never gets its own: if the model uses retrieval, that
loss is higher. Validation with *no* neighbors is the same weights with retrieval switched
off: set against GPT, it says how much of a Retro run's lead is its decoder and how much is
what it reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .chunks import SampleLayout
from .data import corpus_files, document_id
from .errors import PipelineError
from .tokenizer import Tokenizer
from .tokenstore import TokenStore

NeighborTokensFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------------------------
# Fact tokens


def token_char_spans(tok: Tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` and the (n, 2) character span of each token.

    Byte-fallback pieces of one character share its span (all but the last are empty in
    SentencePiece's mapping; we give each the character they belong to).
    """
    mapping = tok.sp.encode_as_offset_mapping(text)
    spans = np.asarray(mapping["offsets"], dtype=np.int64).reshape(-1, 2)
    spans[:, 1] = np.maximum(spans[:, 1], spans[:, 0] + 1)
    return list(mapping["ids"]), spans


def fact_token_flags(tok: Tokenizer, text: str, fact_spans: list, where: str) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` and a bool per token: does the token overlap a fact's characters?"""
    ids, spans = token_char_spans(tok, text)
    flags = np.zeros(len(ids), dtype=bool)
    for span in fact_spans:
        if (not isinstance(span, (list, tuple)) or len(span) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                or not 0 <= span[0] < span[1] <= len(text)):
            raise PipelineError(f"{where}: each of 'fact_spans' must be [start, end] with "
                                f"0 <= start < end <= {len(text)} (text length), got {span!r}")
        flags |= (spans[:, 0] < span[1]) & (spans[:, 1] > span[0])
    return ids, flags


def fact_flags_for_store(corpus: str | os.PathLike, tok: Tokenizer, store: TokenStore) -> dict[int, np.ndarray] | None:
    """Per-document fact-token flags for the documents of ``store`` (index -> bool per token).

    Reads ``fact_spans`` from the corpus's JSON-lines records (matched to the store by document
    id). Returns None when no record of the corpus has ``fact_spans`` (e.g. a plain-text
    corpus): the fact-token loss is then not measured. Documents whose tokens differ from the
    store's mean the tokenizer is not the one that built the store: that is an error.
    """
    index_of = {int(d): i for i, d in enumerate(store.doc_ids)}
    flags: dict[int, np.ndarray] = {}
    seen_spans = False
    for file in corpus_files(corpus):
        if file.suffix not in (".jsonl", ".json"):
            continue
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if '"fact_spans"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PipelineError(f"{file}:{lineno}: malformed JSON ({exc.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    continue
                spans = rec.get("fact_spans")
                if not isinstance(spans, list):
                    raise PipelineError(f"{file}:{lineno}: 'fact_spans' must be a list of [start, end]")
                seen_spans = True
                i = index_of.get(document_id(rec["text"]))
                if i is None or i in flags:
                    continue  # the other split, or a duplicate text
                ids, doc_flags = fact_token_flags(tok, rec["text"], spans, f"{file}:{lineno}")
                if len(ids) != len(store.doc(i)) or not np.array_equal(np.asarray(ids), store.doc(i)):
                    raise PipelineError(f"{file}:{lineno}: tokens differ from the token store "
                                        f"{store.folder}; was it built with this tokenizer?")
                flags[i] = doc_flags
    return flags if seen_spans else None


# --------------------------------------------------------------------------------------------
# Samples


class PretrainSamples:
    """The samples of one split as batches, with neighbor tokens when a model is Retro.

    ``neighbor_ids`` is the split's (n_query_chunks, K) array from ``neighbors.h5`` (None for
    GPT); ``neighbor_tokens`` maps ids (..., k) to (tokens, mask) (..., k, 2*chunk_length);
    ``fact_flags`` comes from :func:`fact_flags_for_store`.
    """

    def __init__(self, store: TokenStore, chunk_length: int, seq_length: int,
                 neighbor_ids: np.ndarray | None = None, neighbor_tokens: NeighborTokensFn | None = None,
                 num_neighbors: int = 0, fact_flags: dict[int, np.ndarray] | None = None):
        self.layout = SampleLayout(store, chunk_length, seq_length)
        self.chunk_length = chunk_length
        self.seq_length = seq_length
        self.chunks_per_sample = self.layout.chunks_per_sample
        self.k = num_neighbors
        self.neighbor_tokens = neighbor_tokens
        self.neighbor_ids = None
        self.fact_flags = fact_flags
        if num_neighbors > 0:
            if neighbor_ids is None or neighbor_tokens is None:
                raise PipelineError("a Retro model needs neighbor ids and neighbor tokens")
            if neighbor_ids.ndim != 2 or len(neighbor_ids) != len(self.layout.chunks):
                raise PipelineError(
                    f"neighbors for split {store.split!r} have shape {neighbor_ids.shape}, expected "
                    f"({len(self.layout.chunks)}, K): one row per query chunk of {store.folder} "
                    f"with chunk_length {chunk_length}; rerun query-neighbors")
            if neighbor_ids.shape[1] < num_neighbors:
                raise PipelineError(f"the model reads {num_neighbors} neighbors but only "
                                    f"{neighbor_ids.shape[1]} were saved per chunk (query.num_neighbors_save)")
            self.neighbor_ids = np.ascontiguousarray(neighbor_ids[:, :num_neighbors], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.layout)

    def sample_neighbor_ids(self, s: int) -> np.ndarray:
        m = self.chunks_per_sample
        return self.neighbor_ids[s * m : (s + 1) * m]

    def fact_mask(self, s: int) -> np.ndarray:
        """1.0 where the label is a fact token (label at position i is the next token)."""
        cl = self.chunk_length
        out = np.zeros(self.seq_length, dtype=np.float32)
        for j, (doc, start, length) in enumerate(self.layout.sample_rows(s)):
            flags = self.fact_flags.get(int(doc)) if doc >= 0 else None
            if flags is None:
                continue
            nxt = flags[start + 1 : start + length + 1]  # labels: the tokens after each position
            out[j * cl : j * cl + len(nxt)] = nxt
        return out

    def batch(self, indices, shuffled_neighbors: bool = False) -> dict[str, torch.Tensor]:
        """The batch of samples ``indices``; with ``shuffled_neighbors`` sample ``s`` reads the
        neighbors of sample ``(s + n // 2) % n``."""
        parts = [self.layout.sample(int(s)) for s in indices]
        batch = {
            "tokens": torch.from_numpy(np.stack([p[0] for p in parts])),
            "labels": torch.from_numpy(np.stack([p[1] for p in parts])),
            "loss_mask": torch.from_numpy(np.stack([p[2] for p in parts])),
        }
        if self.k > 0:
            n = len(self)
            src = [(int(s) + n // 2) % n if shuffled_neighbors else int(s) for s in indices]
            ids = np.stack([self.sample_neighbor_ids(s) for s in src])  # (B, C, k)
            tokens, mask = self.neighbor_tokens(ids)
            batch["neighbors"] = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
            batch["neighbor_mask"] = torch.from_numpy(np.asarray(mask, dtype=bool))
        if self.fact_flags is not None:
            batch["fact_mask"] = torch.from_numpy(np.stack([self.fact_mask(int(s)) for s in indices]))
        return batch


# --------------------------------------------------------------------------------------------
# Which samples each step reads


class TrainOrder:
    """Sample indices for (step, micro batch, rank): epochs of seeded permutations.

    Position ``p`` in the stream of samples is in epoch ``p // n``; each epoch is a fresh
    permutation of the n samples. The mapping depends only on the position, so a resumed run
    reads exactly the samples the uninterrupted run would have read.
    """

    def __init__(self, num_samples: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int):
        if num_samples <= 0:
            raise PipelineError("the train split has no samples")
        self.n, self.mb, self.ga, self.world, self.rank, self.seed = num_samples, micro_batch, grad_accum, world_size, rank, seed
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> np.ndarray:
        first = ((step * self.ga + micro) * self.world + self.rank) * self.mb
        pos = np.arange(first, first + self.mb)
        return np.array([self.permutation(int(p // self.n))[p % self.n] for p in pos], dtype=np.int64)


def eval_indices(num_samples: int, eval_batches: int, micro_batch: int, world_size: int, rank: int) -> list[np.ndarray]:
    """This rank's validation batches: a fixed, evenly spread subset of at most
    ``eval_batches * micro_batch * world_size`` samples (all of them when the split is smaller)."""
    total = min(num_samples, eval_batches * micro_batch * world_size)
    chosen = np.unique(np.linspace(0, num_samples - 1, total).round().astype(np.int64)) if total else np.zeros(0, np.int64)
    batches = [chosen[i : i + micro_batch] for i in range(0, len(chosen), micro_batch)]
    return batches[rank::world_size]


# --------------------------------------------------------------------------------------------
# Loading the stage's inputs


def read_neighbor_ids(path: str | os.PathLike, split: str) -> np.ndarray:
    """The ``split`` dataset of ``neighbors.h5`` as an int64 array (n_query_chunks, K)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: neighbors file not found (run query-neighbors)")
    with h5py.File(path, "r") as f:
        if split not in f:
            raise PipelineError(f"{path}: no dataset {split!r} (has {sorted(f.keys())})")
        return np.asarray(f[split][...], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# The pretraining run (what stages/pretrain.py calls)


def fingerprint(paths, params: dict) -> str:
    """A short hash of ``params`` and the given input files (small files by content, large ones
    by size): the key of a run's resume folder, so a changed input never resumes another run."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            if not f.exists():
                continue
            size = f.stat().st_size
            h.update(str(size).encode())
            if size <= 64 << 20:
                h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


@dataclass
class PretrainInputs:
    """Paths of the stage's inputs."""

    tokens: str = "data/tokens/pretrain"
    neighbors: str = "data/neighbors/neighbors.h5"
    db_tokens: str = "data/tokens/db"
    embeddings: str = "data/db/embeddings.h5"
    tokenizer: str = "data/tokenizer/spm.model"
    corpus: str = ""  # the pretraining corpus, for fact spans ("" = do not measure)


def load_split(inputs: PretrainInputs, model_config, split: str, fact_flags: bool = False,
               neighbor_tokens=None) -> PretrainSamples:
    """The samples of ``split`` for ``model_config`` (neighbors only for a Retro model)."""
    store = TokenStore(inputs.tokens, split)
    k = model_config.num_neighbors if model_config.retro else 0
    ids = read_neighbor_ids(inputs.neighbors, split) if k else None
    if k and neighbor_tokens is None:
        from .neighbors import NeighborTokens

        neighbor_tokens = NeighborTokens(inputs.db_tokens, inputs.embeddings, model_config.chunk_length)
    flags = None
    if fact_flags and inputs.corpus:
        flags = fact_flags_for_store(inputs.corpus, Tokenizer(inputs.tokenizer), store)
    return PretrainSamples(store, model_config.chunk_length, model_config.seq_length, ids,
                           neighbor_tokens if k else None, k, flags)


def without_retrieval(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its neighbors: the model then runs with retrieval switched off
    (``neighbors=None``, the same logits as every neighbor masked), i.e. Retro's decoder alone."""
    return {k: v for k, v in batch.items() if k not in ("neighbors", "neighbor_mask")}


def validation_fn(model, valid: PretrainSamples, cfg, rank: int, world: int, device, shuffled: bool = True):
    """``eval_fn`` for the training loop: val loss (and fact-token loss), and for Retro two
    controls on the same samples: shuffled neighbors (``loss_shuffled``: does the model read
    *its* neighbors?) and no neighbors at all (``loss_no_retrieval``: how good is the decoder
    that trained beside retrieval, on its own?)."""
    from .train import evaluate, lm_loss

    batches = eval_indices(len(valid), cfg.eval_batches, cfg.micro_batch, world, rank)
    controls = shuffled and valid.k > 0
    names = ("loss", "loss_facts") if valid.fact_flags is not None else ("loss",)
    names += ("loss_no_retrieval",) if controls else ()

    def loss_fn(m, batch):  # each batch is built once for both the loss and its no-retrieval control
        out = lm_loss(m, batch)
        if controls:
            out["loss_no_retrieval"] = lm_loss(m, without_retrieval(batch))["loss"]
        return out

    def run() -> dict:
        out = evaluate(model, (valid.batch(b) for b in batches), loss_fn, device, names)
        if controls:
            mixed = evaluate(model, (valid.batch(b, shuffled_neighbors=True) for b in batches), lm_loss, device, ("loss",))
            out["loss_shuffled"] = mixed["loss"]
        return out

    return run


def _truncate_live_log(live_dir: Path, step: int) -> None:
    """Drop DVCLive rows logged after ``step`` (a run killed after its last checkpoint)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines:
            continue
        header, rows = lines[0], lines[1:]
        col = header.split("\t").index("step") if "step" in header.split("\t") else None
        if col is None:
            continue
        keep = [r for r in rows if int(r.split("\t")[col]) <= step]
        tsv.write_text("\n".join([header, *keep]) + "\n")


def run_pretrain(inputs: PretrainInputs, model_config, cfg, out: str | os.PathLike | None,
                 work_root: str | os.PathLike, live_dir: str | os.PathLike | None,
                 init_from: str = "", skip_train: bool = False, stop_after: int | None = None) -> dict | None:
    """Train (or, with ``skip_train``, only evaluate ``init_from``), export to ``out`` (unless
    None), return the metrics.

    Resume checkpoints live in ``work_root/<fingerprint>``: a restarted run with the same
    inputs and params continues from the last one; any change starts a fresh folder. With
    ``stop_after`` the run stops at that step with a resume checkpoint and returns None.
    """
    from . import train as T
    from .model import Retro

    rank, world = T.init_distributed()
    if skip_train and not init_from:
        raise PipelineError("params.yaml: 'pretrain.skip_train' needs 'pretrain.init_from' (the checkpoint to evaluate)")
    torch.manual_seed(cfg.seed)
    if skip_train:
        model = T.load_model(init_from)
        model_config = model.config
    else:
        model = Retro(model_config)
        fresh = T.init_from_checkpoint(model, init_from) if init_from else []
        if init_from and is_main():
            print(f"pretrain: decoder weights from {init_from}; {len(fresh)} retrieval tensors fresh")
    n_params = sum(p.numel() for p in model.parameters())

    train_set = None if skip_train else load_split(inputs, model_config, "train")
    valid = load_split(inputs, model_config, "valid", fact_flags=True,
                       neighbor_tokens=getattr(train_set, "neighbor_tokens", None))
    if len(valid) == 0:
        raise PipelineError(f"{inputs.tokens}: the valid split is empty (set tokenize.pretrain_valid_fraction > 0)")

    start, summary = 0, {}
    if skip_train:
        from deepspeed.accelerator import get_accelerator

        device = torch.device(get_accelerator().device_name())
        model.to(device)
        if cfg.precision == "bf16":
            model.to(torch.bfloat16)
        final = validation_fn(model, valid, cfg, rank, world, device)()
        engine = model
    else:
        key = fingerprint([inputs.tokens, inputs.neighbors if model_config.retro else inputs.tokens,
                           *([Path(init_from) / "model.safetensors"] if init_from else [])],
                          {"train": dataclasses.asdict(cfg), "model": model_config.to_dict(),
                           "init_from": init_from, "world": world})
        work_dir = Path(work_root) / key
        engine = T.build_engine(model, cfg)
        start = T.resume(engine, work_dir)
        live = None
        if is_main() and live_dir is not None:
            from dvclive import Live

            if start:
                T.restore_live(live_dir, work_dir)  # DVC removed the outputs before this run
                _truncate_live_log(Path(live_dir), start)
            if start < cfg.steps:  # a finished run's restored log stays as it is (summary included)
                live = Live(str(live_dir), resume=start > 0, report=None, save_dvc_exp=False, dvcyaml=None)
        if start and is_main():
            print(f"pretrain: resumed from {work_dir} at step {start}")
        order = TrainOrder(len(train_set), cfg.micro_batch, cfg.grad_accum, world, rank, cfg.seed)
        evaluate_now = validation_fn(engine, valid, cfg, rank, world, engine.device)
        summary = T.train(engine, cfg, lambda step, micro: train_set.batch(order.indices(step, micro)),
                          T.lm_loss, evaluate_now, work_dir, start_step=start, live=live, stop_after=stop_after)
        if stop_after is not None and stop_after < cfg.steps:
            if live is not None:
                live.end()
            return None
        kept = work_dir / "summary.json"  # the training numbers of a finished run, for a rerun
        if "val/loss" in summary:
            final = {k[4:]: v for k, v in summary.items() if k.startswith("val/")}
            if is_main():
                kept.write_text(json.dumps({k: summary.get(k) for k in ("train/loss", "mean_tokens_per_s")}))
        else:  # resumed at the end (e.g. only evaluation code changed): evaluate the loaded weights
            final = evaluate_now()
            if kept.is_file():
                summary = json.loads(kept.read_text())
        if live is not None:
            live.end()

    metrics = {
        "model": model_config.name, "retro": bool(model_config.retro), "parameters": int(n_params),
        "steps": cfg.steps if not skip_train else 0, "resumed_at": start,
        "val_loss": final["loss"], "val_ppl": math.exp(final["loss"]),
        "val_loss_shuffled": final.get("loss_shuffled"),
        "val_loss_no_retrieval": final.get("loss_no_retrieval"),
        "val_loss_facts": final.get("loss_facts"),
        "train_loss": summary.get("train/loss"),
        "tokens_per_s": summary.get("mean_tokens_per_s"),
        "valid_samples_evaluated": min(len(valid), cfg.eval_batches * cfg.micro_batch * world),
    }
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    if out is not None:
        T.export_checkpoint(engine, model_config, out, extra={"steps": metrics["steps"], "init_from": init_from})
    return metrics


def is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def preset_training(preset: dict, world_size: int) -> dict:
    """A preset's pretraining recipe (``presets.training``) as TrainConfig fields, for the
    ``pretrain.*`` params left null: the global batch is split into micro batches per process."""
    steps = int(preset["iterations"])
    micro = int(preset["micro_batch"])
    return {
        "steps": steps, "micro_batch": micro,
        "grad_accum": max(1, int(preset["global_batch"]) // (micro * world_size)),
        "lr": preset["lr"], "min_lr": preset["min_lr"],
        "warmup": int(round(preset.get("warmup_fraction", 0.0) * steps)),
        "weight_decay": preset["weight_decay"], "beta1": preset["betas"][0], "beta2": preset["betas"][1],
        "clip": preset["grad_clip"],
    }
