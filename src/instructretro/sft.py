"""Instruction tuning (SFT) of a pretrained Retro: Step 4 of the InstructRetro recipe.

Read top to bottom:

1. Presets: the SFT training defaults per model preset (843m: batch 128, lr 5e-6 constant,
   1000 iterations, betas 0.9/0.98, weight decay 0.01, clip 1.0).
2. Blend: instruction datasets ``name -> {path, format, prob}``, each file named by its own
   path; each is split into a train part and a held-out part by a hash of each record.
3. Prompt format of the reference: ``System: <system>\\n\\n`` then ``User: ...\\n\\nAssistant: ...``
   turns. The loss covers the assistant answer tokens and the final end-of-document token only.
4. Fitting a conversation into ``seq_length``: the final answer is kept whole and the prompt
   is truncated from the left (the context side); a sample whose final answer cannot fit is
   dropped. Both are counted.
5. Retrieval modes (``sft.retrieval``):
   - ``prompt`` (the reference's choice): the top-n DB chunks for the user turn, with their
     continuation, go into the prompt as context; the Retro encoder gets no neighbors.
   - ``encoder``: every chunk of the sample retrieves its own k neighbors, which go through the
     Retro encoder as in pretraining. The prompt is left-padded with PAD so the final answer
     starts on a chunk boundary: chunk j's neighbors only reach tokens from the last token of
     chunk j on, so this is what lets the question's neighbors inform the first answer token.
   - ``none``: no retrieval (the ablation).
6. Sampling: a deterministic schedule over the blend that tracks the probabilities exactly,
   epoch-wise shuffles inside each dataset, and the report of samples drawn and epochs.
7. Batches and the masked loss.
8. Training glue on top of ``instructretro.train``.
9. The run (``run_sft``, shaped like ``pretrain.run_pretrain``): what ``stages/sft.py`` calls.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace as dataclasses_replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import data
from .blend import FORMATS, BlendEntry, blend_stamp, check_stamps, parse_blend  # noqa: F401 (sft.* API)
from .errors import PipelineError
from .prompts import prompt_segments, tokenize_segments

# ----------------------------------------------------------------------------------------------
# 1. Presets: SFT training defaults per model preset (``presets.SFT``, with the device recipe
# applied as for pretraining: ``presets.train_fields``). ``None`` in params means "the preset's".

# The sft.* training keys; ``null`` in params means "the preset's value".
TRAIN_KEYS = ("seq_length", "steps", "global_batch", "micro_batch", "lr", "lr_schedule", "warmup",
              "beta1", "beta2", "weight_decay", "clip", "zero_stage", "precision",
              "activation_checkpointing", "offload_optimizer", "offload_params", "retrieval_warmup")
RETRIEVAL_MODES = ("prompt", "encoder", "none")


def sft_settings(preset: str, overrides: dict | None = None, gpu: bool | None = None) -> dict:
    """The SFT training settings of ``preset`` with every non-``None`` override applied.

    The preset's SFT table (``presets.SFT``) and its device recipe (``presets.device_recipe``:
    on a GPU, ``gpu`` defaulting to whether one is present, the GPU recipe's precision, ZeRO
    stage, micro batch, checkpointing and offload; on CPU fp32 and ZeRO 0), translated by
    ``presets.train_fields`` exactly as pretraining's.
    """
    from . import presets

    if preset not in presets.SFT:
        raise PipelineError(f"model preset {preset!r} (model.name / the checkpoint's config) has no SFT "
                            f"defaults; expected one of {sorted(presets.SFT)}")
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    table = presets.sft(preset)
    out = {"seq_length": table["seq_length"], "warmup": table["warmup"], "global_batch": table["global_batch"],
           "retrieval_warmup": table.get("retrieval_warmup", 0),
           "lr_schedule": table["lr_schedule"],
           **presets.train_fields(table, presets.device_recipe(preset, gpu=gpu))}
    for key, value in (overrides or {}).items():
        if key not in out:
            raise PipelineError(f"params.yaml: unknown SFT training key 'sft.{key}'; expected one of {sorted(out)}")
        if value is not None:
            out[key] = value
    if (overrides or {}).get("warmup") is None:  # the preset's warmup never outlasts a shorter run
        out["warmup"] = min(out["warmup"], out["steps"])
    if out["lr_schedule"] not in ("constant", "cosine"):
        raise PipelineError(f"params.yaml: param 'sft.lr_schedule' is {out['lr_schedule']!r}; expected constant or cosine")
    return out


def check_retrieval(config, retrieval: str, source: str = "params.yaml") -> None:
    """Refuse ``sft.retrieval: encoder`` for a GPT checkpoint: it has no encoder to feed, and
    retrieving for it would cost the search and change nothing."""
    if retrieval == "encoder" and not config.retro:
        raise PipelineError(f"{source}: param 'sft.retrieval' is 'encoder', but the checkpoint is a GPT "
                            "(model.retro=false: no encoder to feed); use prompt or none, or a Retro checkpoint")


# ----------------------------------------------------------------------------------------------
# 2. Blend. The entries, their check and the record each sft-blend@<name> stage writes live in
# blend.py (that stage reads them without the training code); here: each dataset's split.


def record_key(conv: dict) -> int:
    """A stable 64-bit hash of a parsed conversation (decides its train/held-out split)."""
    return data.document_id(json.dumps([conv["system"], conv["turns"]], ensure_ascii=False))


def load_split(entry: BlendEntry, valid_fraction: float) -> tuple[list[dict], list[dict]]:
    """Parse one dataset of the blend; return its (train, held-out) conversations in file order."""
    if not entry.path.is_file():
        raise PipelineError(f"{entry.path}: SFT dataset {entry.name!r} not found (param 'sft.blend.{entry.name}.path')")
    train, valid = [], []
    for conv in data.iter_conversations(entry.path, entry.format):
        (valid if data.is_valid_split(record_key(conv), valid_fraction) else train).append(conv)
    if not train:
        raise PipelineError(f"{entry.path}: SFT dataset {entry.name!r} has no training records")
    return train, valid


# ----------------------------------------------------------------------------------------------
# 3. Prompt format: prompts.py.


# ----------------------------------------------------------------------------------------------
# 4. Fitting a sample into the sequence.


@dataclass
class Sample:
    """One fitted conversation: ``tokens`` (n,) ending in EOD and ``answer`` (n,) bool.

    The model reads ``tokens[:-1]`` and predicts ``tokens[1:]``; the loss mask is ``answer[1:]``,
    so ``n - 1 <= seq_length``. ``neighbors`` (C, k) are DB chunk ids per input chunk
    (encoder mode only), -1 = none.
    """

    tokens: np.ndarray
    answer: np.ndarray
    truncated: bool = False
    neighbors: np.ndarray | None = None
    contexts: list[int] = field(default_factory=list)

    @property
    def inputs(self) -> np.ndarray:
        return self.tokens[:-1]

    @property
    def labels(self) -> np.ndarray:
        return self.tokens[1:]

    @property
    def loss_mask(self) -> np.ndarray:
        return self.answer[1:]


def fit_sample(tokens: np.ndarray, answer: np.ndarray, final_start: int, seq_length: int,
               align: int = 0, pad_id: int | None = None) -> Sample | None:
    """Fit ``tokens`` into ``seq_length`` model inputs; ``None`` if the final answer cannot fit.

    The final answer (from ``final_start``, EOD included) is kept whole; the prompt before it is
    cut from the left until the whole sample fits. With ``align`` (the chunk length, encoder
    mode) the prompt is also cut to at most a multiple of ``align`` tokens and left-padded with
    ``pad_id`` (the tokenizer's pad, as the generate stage pads its prompts; default the
    sample's final EOD) to exactly such a multiple, so that the final
    answer starts on a chunk boundary; padding is outside the loss. A sample needs at least one
    prompt token (one whole chunk when aligned).
    """
    n_answer = len(tokens) - final_start
    budget = seq_length + 1 - n_answer  # room for the prompt
    if align:
        budget = (budget // align) * align
    if budget < max(1, align):
        return None
    prompt, prompt_answer = tokens[:final_start], answer[:final_start]
    truncated = len(prompt) > budget
    if truncated:
        prompt, prompt_answer = prompt[len(prompt) - budget :], prompt_answer[len(prompt) - budget :]
    pad = (-len(prompt)) % align if align else 0
    if align and len(prompt) == 0:
        pad = align
    pad_id = int(tokens[-1]) if pad_id is None else pad_id
    out_tokens = np.concatenate([np.full(pad, pad_id, dtype=np.int64), prompt, tokens[final_start:]])
    out_answer = np.concatenate([np.zeros(pad, dtype=bool), prompt_answer, answer[final_start:]])
    return Sample(out_tokens, out_answer, truncated)


# ----------------------------------------------------------------------------------------------
# 5. Retrieval modes. ``retriever`` is an ``instructretro.retrieval.Retriever`` (or anything
#    with ``search(texts, n) -> ids (len, n)``, ``chunk_text(id, continuation=True)`` and
#    ``neighbor_tokens(ids) -> (tokens, mask)``).


def last_user_turn(conv: dict) -> str:
    """The user turn that the final answer answers: the query for prompt-mode retrieval."""
    return [text for role, text in conv["turns"] if role == "user"][-1]


def search_batched(retriever, texts: list[str], n: int, batch: int = 256, desc: str = "retrieve",
                   rank: int = 0, world_size: int = 1) -> np.ndarray:
    """``retriever.search`` over ``texts`` in batches with a progress bar; empty texts get -1.

    With several processes each rank searches one contiguous share of the texts and the ids
    are all-gathered, so every rank returns the whole table (searched once, not once per rank).
    """
    from .progress import progress

    share = -(-len(texts) // world_size)
    lo, hi = min(len(texts), rank * share), min(len(texts), (rank + 1) * share)
    out = np.full((len(texts), n), -1, dtype=np.int64)
    live = [i for i in range(lo, hi) if texts[i].strip()]
    for b in progress(range(0, len(live), batch), desc=desc, unit="batch", disable=rank != 0):
        idx = live[b : b + batch]
        ids = np.asarray(retriever.search([texts[i] for i in idx], n), dtype=np.int64).reshape(len(idx), -1)
        out[idx, : ids.shape[1]] = ids[:, :n]
    if world_size > 1:
        from .dist import all_gather_rows

        out = all_gather_rows(out, share, lo, hi)
    return out


def chunk_queries(tok, inputs: np.ndarray, chunk_length: int) -> list[str]:
    """The text of each chunk of ``inputs`` (the last chunk may be short): encoder-mode queries."""
    return [tok.decode(inputs[j : j + chunk_length]) for j in range(0, len(inputs), chunk_length)]


# ----------------------------------------------------------------------------------------------
# 6. Sampling over the blend.


def blend_schedule(probs: Sequence[float], n: int) -> np.ndarray:
    """Dataset index of each of ``n`` draws; after every draw each dataset's count is within one
    of ``prob * draws`` (greedy: take the dataset furthest below its share). Deterministic."""
    probs = np.asarray(probs, dtype=np.float64)
    counts = np.zeros(len(probs), dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        d = int(np.argmax(probs * (i + 1) - counts))
        counts[d] += 1
        out[i] = d
    return out


def epoch_order(size: int, n: int, seed: int, dataset: int) -> np.ndarray:
    """The first ``n`` indices of back-to-back shuffled epochs of ``range(size)``."""
    epochs = -(-n // size)
    rng = np.random.default_rng([seed, dataset])
    return np.concatenate([rng.permutation(size) for _ in range(epochs)])[:n] if n else np.zeros(0, np.int64)


def draw(sizes: Sequence[int], probs: Sequence[float], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws from the blend: (dataset index, record index inside that dataset) each (n,)."""
    which = blend_schedule(probs, n)
    index = np.empty(n, dtype=np.int64)
    for d, size in enumerate(sizes):
        pos = np.flatnonzero(which == d)
        index[pos] = epoch_order(size, len(pos), seed, d)
    return which, index


# ----------------------------------------------------------------------------------------------
# Building the data set of a run (sections 2-6 together).


@dataclass
class SFTData:
    """Fitted train and held-out samples per dataset, the draw, and the counts for the report."""

    names: list[str]
    probs: list[float]
    train: list[list[Sample]]
    valid: list[list[Sample]]
    which: np.ndarray
    index: np.ndarray
    report: dict

    def drawn(self, i: int) -> Sample:
        return self.train[self.which[i]][self.index[i]]


def all_given_contexts(blend: list[BlendEntry], retrieval: str) -> bool:
    """True when prompt-mode retrieval needs no search: every record of the blend carries its
    passages (``ctxs``, e.g. precomputed by ``bench/gpu_suite.py prepare``)."""
    return retrieval == "prompt" and all(
        "ctxs" in c for entry in blend if entry.path.is_file() for c in data.iter_conversations(entry.path, entry.format))


def build_data(blend: list[BlendEntry], tok, *, seq_length: int, chunk_length: int, num_draws: int,
               retrieval: str = "none", retriever=None, num_contexts: int = 2, num_neighbors: int = 2,
               system: str = "", valid_fraction: float = 0.05, valid_samples: int = 200,
               seed: int = 1234, rank: int = 0, world_size: int = 1) -> SFTData:
    """Load, split, format, retrieve, fit and draw: everything the SFT run trains and validates on.

    With several processes (``rank`` of ``world_size``, torch.distributed started) each rank
    retrieves a share of the queries and every rank gets the whole data set."""
    if retrieval not in RETRIEVAL_MODES:
        raise PipelineError(f"params.yaml: param 'sft.retrieval' is {retrieval!r}; expected one of {list(RETRIEVAL_MODES)}")
    if retrieval != "none" and retriever is None and not all_given_contexts(blend, retrieval):
        raise PipelineError(f"sft.retrieval={retrieval} needs a retriever (the populated index)")
    if seq_length % chunk_length:
        raise PipelineError(f"params.yaml: SFT seq_length {seq_length} must be a multiple of retro.chunk_length {chunk_length}")
    report, train, valid = {}, [], []
    for entry in blend:
        parts = load_split(entry, valid_fraction)
        rng = np.random.default_rng([seed, 7, len(train)])
        held = parts[1]
        if len(held) > valid_samples:
            held = [held[i] for i in sorted(rng.choice(len(held), valid_samples, replace=False))]
        counts = {"records": len(parts[0]) + len(parts[1]), "held_out": len(parts[1]), "valid_used": len(held)}
        fitted = []
        for name, convs in (("train", parts[0]), ("valid", held)):
            contexts = None  # searched for the records that carry no given passages (``ctxs``)
            search = [c for c in convs if "ctxs" not in c]
            if retrieval == "prompt" and num_contexts > 0 and search:
                found = iter(search_batched(retriever, [last_user_turn(c) for c in search], num_contexts,
                                            desc=f"retrieve {entry.name}/{name}", rank=rank, world_size=world_size))
                contexts = [next(found) if "ctxs" not in c else () for c in convs]
            samples, truncated, dropped = [], 0, 0
            for i, conv in enumerate(convs):
                ctx_ids = [int(c) for c in contexts[i] if c >= 0] if contexts is not None else []
                ctx = [retriever.chunk_text(c, continuation=True) for c in ctx_ids]
                if retrieval == "prompt" and "ctxs" in conv:
                    ctx = list(conv["ctxs"][:num_contexts])
                segs = prompt_segments(conv["system"] or system, conv["turns"], ctx)
                toks, ans, start = tokenize_segments(tok, segs)
                s = fit_sample(toks, ans, start, seq_length, align=chunk_length if retrieval == "encoder" else 0,
                               pad_id=tok.pad_id)
                if s is None:
                    dropped += 1
                    continue
                truncated += s.truncated
                s.contexts = ctx_ids
                samples.append(s)
            if retrieval == "encoder" and samples:
                attach_neighbors(samples, tok, retriever, chunk_length, num_neighbors,
                                 desc=f"neighbors {entry.name}/{name}", rank=rank, world_size=world_size)
            counts[f"{name}_truncated"], counts[f"{name}_dropped"] = truncated, dropped
            fitted.append(samples)
        if not fitted[0]:
            raise PipelineError(f"{entry.path}: every training record of SFT dataset {entry.name!r} is too long "
                                f"for seq_length {seq_length} (dropped {counts['train_dropped']})")
        train.append(fitted[0])
        valid.append(fitted[1])
        report[entry.name] = counts
    probs = [e.prob for e in blend]
    which, index = draw([len(t) for t in train], probs, num_draws, seed)
    for d, entry in enumerate(blend):
        c = report[entry.name]
        c["prob"] = round(probs[d], 6)
        c["train_samples"] = len(train[d])
        c["drawn"] = int((which == d).sum())
        c["epochs"] = round(c["drawn"] / len(train[d]), 4)
    return SFTData([e.name for e in blend], probs, train, valid, which, index, report)


def attach_neighbors(samples: list[Sample], tok, retriever, chunk_length: int, k: int, desc: str = "neighbors",
                     rank: int = 0, world_size: int = 1) -> None:
    """Encoder mode: retrieve ``k`` neighbors for every chunk of every sample's inputs (split
    over the ranks as in :func:`search_batched`)."""
    queries, owner = [], []
    for i, s in enumerate(samples):
        q = chunk_queries(tok, s.inputs, chunk_length)
        queries += q
        owner += [i] * len(q)
    ids = search_batched(retriever, queries, k, desc=desc, rank=rank, world_size=world_size)
    owner = np.asarray(owner)
    for i, s in enumerate(samples):
        s.neighbors = ids[owner == i]


def format_report(report: dict) -> str:
    """The blend table: dataset, prob, train samples, drawn, epochs, truncated, dropped."""
    lines = [f"{'dataset':<16}{'prob':>8}{'samples':>9}{'drawn':>9}{'epochs':>9}{'trunc':>7}{'dropped':>8}"]
    for name, c in report.items():
        lines.append(f"{name:<16}{c['prob']:>8.3f}{c['train_samples']:>9}{c['drawn']:>9}{c['epochs']:>9.2f}"
                     f"{c['train_truncated']:>7}{c['train_dropped']:>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# 7. Batches and the loss.


def collate(samples: Sequence[Sample], chunk_length: int, retriever=None, datasets: Sequence[int] | None = None) -> dict:
    """Right-pad samples to a common length (a multiple of ``chunk_length``) as a batch dict.

    ``tokens``, ``labels`` (B, T) int64 and ``loss_mask`` (B, T) float32; in encoder mode also
    ``neighbors`` / ``neighbor_mask`` (B, C, k, 2 * chunk_length) from the retriever; with
    ``datasets`` a ``dataset`` (B,) index for per-dataset validation losses.
    """
    import torch

    T = max(len(s.inputs) for s in samples)
    T = -(-T // chunk_length) * chunk_length
    B = len(samples)
    # Right padding comes after every real token and outside the loss (causal attention): any
    # id serves; the samples' own end-of-document (their last token) is one in the vocabulary.
    eod = int(samples[0].tokens[-1])
    tokens = np.full((B, T), eod, dtype=np.int64)
    labels = np.full((B, T), eod, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.float32)
    for b, s in enumerate(samples):
        n = len(s.inputs)
        tokens[b, :n], labels[b, :n], mask[b, :n] = s.inputs, s.labels, s.loss_mask
    batch = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels), "loss_mask": torch.from_numpy(mask)}
    if samples[0].neighbors is not None:
        C, k = T // chunk_length, samples[0].neighbors.shape[1]
        ids = np.full((B, C, k), -1, dtype=np.int64)
        for b, s in enumerate(samples):
            ids[b, : len(s.neighbors)] = s.neighbors
        ntok, nmask = retriever.neighbor_tokens(ids)
        batch["neighbors"] = torch.as_tensor(np.asarray(ntok, dtype=np.int64))
        batch["neighbor_mask"] = torch.as_tensor(np.asarray(nmask, dtype=bool))
    if datasets is not None:
        batch["dataset"] = torch.as_tensor(np.asarray(datasets, dtype=np.int64))
    return batch


def make_loss_fn(names: Sequence[str] = ()):
    """``loss_fn(model, batch) -> {"loss": (sum, count), "loss_<name>": ...}`` over answer tokens.

    Per-dataset entries appear when the batch has ``dataset`` (validation); every name is always
    present (count 0 when absent) so that all processes report the same keys.
    """
    import torch
    import torch.nn.functional as F

    def loss_fn(model, batch):
        logits = model(batch["tokens"], batch.get("neighbors"), batch.get("neighbor_mask"))
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        ce = ce.view_as(batch["loss_mask"]) * batch["loss_mask"]
        out = {"loss": (ce.sum(), batch["loss_mask"].sum())}
        if "dataset" in batch:
            per_sample, count = ce.sum(1), batch["loss_mask"].sum(1)
            for d, name in enumerate(names):
                sel = batch["dataset"] == d
                out[f"loss_{name}"] = (per_sample[sel].sum(), count[sel].sum())
        return out

    return loss_fn


# ----------------------------------------------------------------------------------------------
# 8. Training.


def train_config(settings: dict, world_size: int, *, seed: int, eval_interval: int, save_interval: int):
    """The ``train.TrainConfig`` of an SFT run (global batch = micro x accumulation x ranks)."""
    from .train import TrainConfig

    per_step = settings["micro_batch"] * world_size
    if settings["global_batch"] % per_step:
        raise PipelineError(f"params.yaml: sft global_batch {settings['global_batch']} is not a multiple of "
                            f"micro_batch {settings['micro_batch']} x {world_size} processes")
    lr = float(settings["lr"])
    cfg = TrainConfig(steps=settings["steps"], micro_batch=settings["micro_batch"],
                      grad_accum=settings["global_batch"] // per_step, lr=lr,
                      min_lr=lr if settings["lr_schedule"] == "constant" else lr / 10, warmup=settings["warmup"],
                      weight_decay=settings["weight_decay"], beta1=settings["beta1"], beta2=settings["beta2"],
                      clip=settings["clip"], zero_stage=settings["zero_stage"], precision=settings["precision"],
                      activation_checkpointing=bool(settings.get("activation_checkpointing", False)),
                      offload_optimizer=settings.get("offload_optimizer", "none"),
                      offload_params=settings.get("offload_params", "none"),
                      retrieval_warmup=settings.get("retrieval_warmup", 0),
                      seed=seed, eval_interval=min(eval_interval, settings["steps"]), eval_batches=1,
                      save_interval=save_interval)
    cfg.validate("params.yaml: param 'sft.")
    cfg.validate_memory("params.yaml: param 'sft.")
    return cfg


def finetune(engine, cfg, sdata: SFTData, *, chunk_length: int, retriever=None, rank: int = 0, world_size: int = 1,
             eval_micro_batch: int = 8, live=None, progress: bool = True, work_dir=None, start_step: int = 0,
             stop_after: int | None = None) -> dict:
    """Instruction-tune ``engine`` on ``sdata``'s draw; validate on its held-out samples.

    Draw ``i`` of the schedule is sample ``b`` of micro batch ``micro`` of process ``rank`` at
    optimizer step ``step`` with ``i = step * global + (micro * world + rank) * micro_batch + b``,
    a function of the position only: a run resumed at ``start_step`` from a checkpoint in
    ``work_dir`` (saved every ``cfg.save_interval`` steps) sees the batches an uninterrupted
    run sees. Returns the last logged values, ``val/loss`` and per-dataset ``val/loss_<name>``
    included.
    """
    from . import train as T

    global_batch = cfg.micro_batch * cfg.grad_accum * world_size
    if len(sdata.which) < cfg.steps * global_batch:
        raise PipelineError(f"sft: {len(sdata.which)} samples drawn, the run needs {cfg.steps * global_batch}")

    def batch_fn(step: int, micro: int) -> dict:
        base = step * global_batch + (micro * world_size + rank) * cfg.micro_batch
        return collate([sdata.drawn(i) for i in range(base, base + cfg.micro_batch)], chunk_length, retriever)

    every = [(d, s) for d, samples in enumerate(sdata.valid) for s in samples]
    valid = every[rank::world_size]
    valid.sort(key=lambda ds: len(ds[1].tokens))  # similar lengths together: less padding
    # Every rank runs as many forward passes (the most any rank has; ZeRO-3 gathers parameters
    # in each), a rank short of batches, or with no held-out sample at all, pads with one that
    # counts zero tokens.
    pad_to = -(-len(every[::world_size]) // eval_micro_batch)

    def eval_batches():
        for i in range(0, len(valid), eval_micro_batch):
            part = valid[i : i + eval_micro_batch]
            yield collate([s for _, s in part], chunk_length, retriever, [d for d, _ in part])

    loss_fn = make_loss_fn(sdata.names)
    names = ["loss", *(f"loss_{n}" for n in sdata.names)]
    eval_fn = None
    if every:
        pad_batch = collate([every[0][1]], chunk_length, retriever, [every[0][0]])
        eval_fn = lambda: T.evaluate(engine, eval_batches(), loss_fn, engine.device, names,  # noqa: E731
                                     pad_to=pad_to, pad_batch=pad_batch)
    return T.train(engine, cfg, batch_fn, loss_fn, eval_fn=eval_fn, work_dir=work_dir, start_step=start_step,
                   live=live, progress=progress, stop_after=stop_after)


# ----------------------------------------------------------------------------------------------
# 9. The run: what ``stages/sft.py`` calls.


def run_key(s: dict, settings: dict, cfg, world: int, embed_params: dict | None, inputs: list, code=()) -> dict:
    """What the resume key of an SFT run hashes (``workdir``): the params (``sft.*``, ``embed.*``
    with retrieval, ``retro.chunk_length``), the training settings and library versions, every
    input by content (the checkpoint, the blend files, tokenizer, database, index) and the code
    (this module's imports and the ``code`` files, e.g. the stage script)."""
    import dataclasses

    from .workdir import code_files, library_versions

    return {"params": {"sft": s, "settings": settings, "train": dataclasses.asdict(cfg), "world": world,
                       "versions": library_versions("torch", "deepspeed", "transformers", "faiss-cpu", "faiss-gpu"),
                       "embed": embed_params},
            "inputs": inputs, "code": code_files(__file__, *code)}


def _finite(x) -> float | None:
    return round(x, 6) if x is not None and math.isfinite(x) else None


def run_sft(config, settings: dict, s: dict, blend: list, tok, out: str | os.PathLike, work_root, live_dir,
            *, open_retriever=None, retrieval_unavailable: str | None = None, embed_params: dict | None = None,
            inputs: list = (), code=(), stop_after: int | None = None, smoke: bool = False,
            full_settings: dict | None = None) -> dict | None:
    """Instruction-tune the checkpoint ``s["init_from"]`` (``smoke``: fresh weights of ``config``,
    one step, no work folder) on ``blend``; export it to ``out``; return the metrics (rank 0;
    other ranks and a run stopped by ``stop_after`` return None).

    ``open_retriever()`` gives the Retriever for ``s["retrieval"]`` (not called when the mode is
    ``none``, or when ``retrieval_unavailable`` says why there is none: the run then uses
    ``none``). Resume checkpoints live in ``work_root/<key>`` (``run_key``), locked while the
    run lasts; a killed run started again continues from its last checkpoint; a finished run
    deletes its folder (``train.open_work`` / ``fit`` / ``finish``).
    """
    import time

    import torch

    from . import train as T
    from .checkpoint import tokenizer_record
    from .dist import init_distributed

    rank, world = init_distributed()
    cfg = train_config(settings, world, seed=s["seed"], eval_interval=s["eval_interval"],
                       save_interval=s["save_interval"])
    if smoke:
        from .model import Retro

        model = Retro(config)
    else:
        model = T.build_model(config, cfg, weights=s["init_from"])  # partitioned at creation at ZeRO-3
    print(f"sft: {config.name} model, {model.num_parameters():,} parameters, retrieval={s['retrieval']}")
    given = all_given_contexts(blend, s["retrieval"])  # every record carries its prompt passages: no search
    retriever = None if s["retrieval"] == "none" or retrieval_unavailable or given else open_retriever()
    retrieval = s["retrieval"] if retriever is not None or s["retrieval"] == "none" or given else "none"
    if retrieval != s["retrieval"]:
        print(f"sft smoke: {retrieval_unavailable}, so retrieval=none for the smoke step")
    num_neighbors = s["num_neighbors"] or config.num_neighbors
    sdata = build_data(blend, tok, seq_length=settings["seq_length"], chunk_length=s["chunk_length"],
                       num_draws=cfg.steps * settings["global_batch"], retrieval=retrieval, retriever=retriever,
                       num_contexts=s["num_contexts"], num_neighbors=num_neighbors, system=s["system"],
                       valid_fraction=s["valid_fraction"], valid_samples=4 if smoke else s["valid_samples"],
                       seed=s["seed"], rank=rank, world_size=world)
    if rank == 0:
        print(format_report(sdata.report))
    if not smoke and settings["steps"] * settings["global_batch"] * settings["seq_length"] > 5e7 \
            and not torch.cuda.is_available():
        from .estimate import print_cost

        print_cost(config, full_settings or settings)

    work = None if smoke else T.open_work(work_root, run_key(s, settings, cfg, world, embed_params, list(inputs), code),
                                          cfg.steps, rank)
    t0 = time.perf_counter()

    def loop(engine, start, live):
        return finetune(engine, cfg, sdata, chunk_length=s["chunk_length"], retriever=retriever, rank=rank,
                        world_size=world, live=live, work_dir=work.dir if work is not None else None,
                        start_step=start, stop_after=stop_after)

    engine, start, last = T.fit(model, cfg, work, live_dir, loop, "sft")
    if stop_after is not None and stop_after < cfg.steps:
        print(f"sft: stopped after {stop_after} steps; run again to continue")
        return None
    seconds = time.perf_counter() - t0
    export_config = dataclasses_replace(config, seq_length=max(config.seq_length, settings["seq_length"]))
    T.finish(engine, export_config, out, {"stage": "sft", "steps": cfg.steps, "precision": cfg.precision,
                                               "tokenizer": tokenizer_record(tok.path)}, work)
    if rank != 0:
        return None
    if smoke:
        import shutil

        from .checkpoint import read_config

        size = sum(f.stat().st_size for f in Path(out).iterdir())
        reloaded = read_config(out)
        shutil.rmtree(Path(out).parent)
        print(f"sft smoke: one step (forward, backward, AdamW, validation) in {seconds:.1f} s, train loss "
              f"{last['train/loss']:.3f}, val loss {last.get('val/loss', float('nan')):.3f}; exported "
              f"{size / 1e9:.2f} GB ({reloaded.name}, read back, then deleted)")
        return None
    metrics = {
        "val_loss": _finite(last.get("val/loss")),
        "val_loss_by_dataset": {n: _finite(last.get(f"val/loss_{n}")) for n in sdata.names},
        "train_loss": round(last["train/loss"], 6),
        "steps": cfg.steps,
        "resumed_at": start,
        "retrieval": retrieval,
        "truncated": sum(c["train_truncated"] + c["valid_truncated"] for c in sdata.report.values()),
        "dropped": sum(c["train_dropped"] + c["valid_dropped"] for c in sdata.report.values()),
        "blend": {n: {k: c[k] for k in ("prob", "train_samples", "drawn", "epochs", "held_out")}
                  for n, c in sdata.report.items()},
    }
    print(f"sft: {cfg.steps} steps in {seconds:.0f} s, val_loss {metrics['val_loss']:.4f}")
    return metrics
