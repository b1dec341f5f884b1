"""How much of Retro's gain is copying: loss by neighbor overlap, Retro against GPT (stage leakage).

RETRO (Borgeaud et al., sections 2.6 and 4.4) splits the evaluation chunks by how much of each
chunk the neighbors the model reads already hold, and compares Retro with the baseline in each
split. :func:`run_leakage` does that for the two exported checkpoints of the pipeline (pretrain
and pretrain-gpt) on the validation samples the pretrain stage evaluates:

- the neighbors a chunk is read with are those retrieved for the *previous* chunk of its sample
  (chunked cross-attention is shifted by one chunk), each its chunk plus continuation, masked
  exactly as the batch hands them to the model (``PretrainSamples.batch``); the first chunk of
  a sample reads none and is counted apart (``chunks_without_neighbors``);
- the overlap is the longest run of tokens the chunk shares with one of them, as a fraction of
  the chunk's tokens (``overlap``);
- a chunk's loss is the mean next-token loss of predicting its tokens (positions ``u*L - 1``
  to ``(u+1)*L - 2``, every one of which reads the previous chunk's neighbors), from the same
  per-token cross-entropy as validation (``train.token_losses``), for Retro, for GPT on the
  same tokens, and for Retro reading the shuffled neighbors of the validation control;
- the chunks fall into RETRO's buckets (overlap <= 12.5%, 25%, ..., 100%).

With a ``max_overlap`` the same samples are also evaluated with the leakage filter (neighbors
holding more than that fraction of their chunk masked out): the filtered loss next to the
unfiltered, per bucket and over the whole evaluation.

The database is read only where the evaluated chunks' neighbors are: one batch of samples at a
time, through ``dbfile.NeighborTokens``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import load_model
from .errors import PipelineError
from .overlap import BUCKETS, bucket_of, chunk_overlap, with_ids
from .pretrain import without_retrieval
from .pretrain_data import PretrainInputs, all_eval_batches, load_split
from .train import token_losses

LOSSES = ("retro", "gpt", "retro_shuffled", "retro_filtered")


@dataclass
class ChunkTable:
    """One row per chunk that reads neighbors: its overlap, its loss tokens and the loss sums."""

    rows: np.ndarray  # (n,) int64: the chunk's row in the split's query chunks (SampleLayout.chunks)
    overlap: np.ndarray  # (n,) float64
    tokens: np.ndarray  # (n,) int64: loss tokens of the chunk
    sums: dict[str, np.ndarray]  # loss name -> (n,) float64 sum of token losses


def bucket_name(i: int) -> str:
    lo = 0.0 if i == 0 else BUCKETS[i - 1]
    return f"{100 * lo:g}-{100 * BUCKETS[i]:g}%"


def chunk_losses(ce: torch.Tensor, loss_mask: torch.Tensor, chunk_length: int) -> np.ndarray:
    """(B, C + 1) sums of the masked per-token losses ``ce`` (B, T) by the chunk whose tokens
    are the labels: column ``u`` holds positions ``u*L - 1 .. (u+1)*L - 2``, which predict the
    tokens of chunk ``u`` and all read the neighbors of chunk ``u - 1`` (column 0: chunk 0
    after its first token, reading none); column ``C`` the last position, which predicts the
    next sample's first token."""
    B, T = ce.shape
    x = torch.cat([torch.zeros(B, 1, device=ce.device), (ce.float() * loss_mask.to(ce.device).float())], dim=1)
    per_chunk = x[:, :T].reshape(B, T // chunk_length, chunk_length).sum(-1)
    return torch.cat([per_chunk, x[:, T:]], dim=1).double().cpu().numpy()


@torch.no_grad()
def chunk_table(retro, gpt, valid, batches, device, max_overlap: float | None = None,
                timings: dict | None = None) -> tuple[ChunkTable, dict]:
    """The overlap and losses of every chunk of ``batches`` (sample indices) that reads
    neighbors; and the same sums for the first chunks of the samples (which read none)."""
    cl = valid.chunk_length
    retro.eval(), gpt.eval()
    rows: dict[str, list] = {"rows": [], "overlap": [], "tokens": [], **{k: [] for k in LOSSES}}
    first: dict[str, float] = {"chunks": 0, "tokens": 0.0, **{k: 0.0 for k in LOSSES}}
    timings = timings if timings is not None else {}
    for b in batches:
        batch = valid.batch(b)
        mask = batch["loss_mask"]
        t0 = time.perf_counter()
        sums = {"retro": chunk_losses(token_losses(retro, _to(batch, device)), mask, cl),
                "gpt": chunk_losses(token_losses(gpt, _to(without_retrieval(batch), device)), mask, cl),
                "retro_shuffled": chunk_losses(token_losses(retro, _to(valid.batch(b, shuffled_neighbors=True), device)),
                                               mask, cl)}
        if max_overlap is not None:
            kept = valid.batch(b, max_overlap=max_overlap)
            sums["retro_filtered"] = chunk_losses(token_losses(retro, _to(kept, device)), mask, cl)
        timings["forward_s"] = timings.get("forward_s", 0.0) + time.perf_counter() - t0

        t0 = time.perf_counter()
        B, C = mask.shape[0], mask.shape[1] // cl
        chunks = with_ids(batch["tokens"].numpy(), mask.numpy() > 0).reshape(B, C, cl)
        neighbors = with_ids(batch["neighbors"].numpy(), batch["neighbor_mask"].numpy())  # (B, C, k, R)
        # chunk c + 1 reads the neighbors retrieved for chunk c
        overlap = chunk_overlap(chunks[:, 1:].reshape(B * (C - 1), cl),
                                neighbors[:, :-1].reshape(B * (C - 1), *neighbors.shape[2:])).reshape(B, C - 1)
        timings["overlap_s"] = timings.get("overlap_s", 0.0) + time.perf_counter() - t0
        timings["chunks"] = timings.get("chunks", 0) + B * (C - 1)

        counts = chunk_losses(torch.ones(mask.shape), mask, cl)  # (B, C + 1) loss tokens, as the sums
        real = counts[:, 1:C] > 0  # chunks with loss tokens (the split's padding chunks have none)
        rows["rows"].append((np.asarray(b)[:, None] * C + np.arange(1, C)[None, :])[real])
        rows["overlap"].append(overlap[real])
        rows["tokens"].append(counts[:, 1:C][real])
        first["tokens"] += float(counts[:, 0].sum() + counts[:, C].sum())
        first["chunks"] += int((mask.reshape(B, C, cl)[:, 0].sum(-1) > 0).sum())
        for name, s in sums.items():
            rows[name].append(s[:, 1:C][real])
            first[name] += float(s[:, 0].sum() + s[:, C].sum())
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in rows.items()}
    table = ChunkTable(cat["rows"].astype(np.int64), cat["overlap"].astype(np.float64), cat["tokens"].astype(np.int64),
                       {k: cat[k].astype(np.float64) for k in LOSSES if len(rows[k])})
    return table, first


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _mean(total: float, tokens: float) -> float | None:
    return total / tokens if tokens > 0 else None


def summarize(table: ChunkTable, first: dict, max_overlap: float | None) -> dict:
    """metrics/leakage.json: per bucket the chunks, tokens and losses; the totals."""
    bucket = bucket_of(table.overlap)
    buckets = {}
    for i in range(len(BUCKETS)):
        sel = bucket == i
        tokens = float(table.tokens[sel].sum())
        losses = {f"{k}_loss": _mean(float(table.sums[k][sel].sum()), tokens) for k in table.sums}
        lead = (losses["gpt_loss"] - losses["retro_loss"]) if tokens else None
        buckets[bucket_name(i)] = {"max_overlap": BUCKETS[i], "chunks": int(sel.sum()), "tokens": int(tokens),
                                   "retro_loss": losses["retro_loss"], "gpt_loss": losses["gpt_loss"],
                                   "retro_lead": lead, "retro_loss_shuffled": losses["retro_shuffled_loss"],
                                   **({"retro_loss_filtered": losses["retro_filtered_loss"]}
                                      if "retro_filtered" in table.sums else {})}
    tokens = float(table.tokens.sum())
    every = tokens + first["tokens"]  # every loss token of the evaluated samples

    def total(name):
        return _mean(float(table.sums[name].sum()) + first[name], every) if name in table.sums else None

    return {
        "chunks": int(len(table.overlap)),
        "tokens": int(tokens),
        "chunks_without_neighbors": int(first["chunks"]),
        "mean_overlap": float(table.overlap.mean()) if len(table.overlap) else None,
        "retro_lead": _mean(float(table.sums["gpt"].sum() - table.sums["retro"].sum()), tokens),
        "max_overlap": max_overlap,
        "val_loss": total("retro"),
        "val_loss_filtered": total("retro_filtered"),
        "gpt_val_loss": total("gpt"),
        "buckets": buckets,
    }


def plot_rows(summary: dict) -> list[dict]:
    """The plot's rows: per non-empty bucket, its upper bound (percent) and the three losses."""
    out = []
    for b in summary["buckets"].values():
        if b["chunks"]:
            out.append({"overlap": 100 * b["max_overlap"], "retro_loss": b["retro_loss"], "gpt_loss": b["gpt_loss"],
                        "retro_loss_shuffled": b["retro_loss_shuffled"]})
    return out


def run_leakage(inputs: PretrainInputs, retro_ckpt: str | os.PathLike, gpt_ckpt: str | os.PathLike,
                max_overlap: float | None = None, max_samples: int = 0, batch_size: int = 8,
                device=None) -> tuple[dict, dict]:
    """The leakage metrics of two exported checkpoints (Retro, GPT) on the valid split of
    ``inputs``; also the timings (forward passes and overlap, seconds; chunks)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    retro, gpt = load_model(retro_ckpt, device), load_model(gpt_ckpt, device)
    rc, gc = retro.config, gpt.config
    if not rc.retro or not rc.num_neighbors:
        raise PipelineError(f"{retro_ckpt}: not a Retro checkpoint (config.json: retro false or no neighbors)")
    if (rc.chunk_length, rc.seq_length, rc.vocab_size) != (gc.chunk_length, gc.seq_length, gc.vocab_size):
        raise PipelineError(f"{gpt_ckpt}: chunk length, sequence length or vocabulary differ from {retro_ckpt}'s; "
                            "the two must be trained on the same tokens")
    valid = load_split(inputs, rc, "valid")
    if len(valid) == 0:
        raise PipelineError(f"{inputs.tokens}: the valid split is empty: nothing to evaluate")
    limit = len(valid) if max_samples <= 0 else min(max_samples, len(valid))
    batches = all_eval_batches(len(valid), -(-limit // batch_size), batch_size, 1)
    timings: dict = {}
    table, first = chunk_table(retro, gpt, valid, batches, device, max_overlap, timings)
    metrics = {"samples": sum(len(b) for b in batches), **summarize(table, first, max_overlap)}
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    return metrics, timings
