"""Zero-shot open-domain QA with the instruction-tuned Retro (Step 5 of the recipe).

For each question we build the reference's short-span prompt, laid out and tokenized exactly
as the SFT stage lays out its conversations (``prompts.prompt_segments``):

    System: {system}\\n\\n{context 1}\\n\\n...{context n}\\n\\nUser: Answer the following question
    with a short span. {question}\\n\\nAssistant: The answer is

and decode greedily until end-of-document or ``max_new_tokens``. Where the contexts come from
is the retrieval mode:

- ``prompt``: embed the question with the database's encoder, search the index, and put the
  top-n chunks, each with its continuation, in the prompt (the reference's choice);
- ``encoder``: no contexts in the prompt; the Retro encoder gets the neighbors of every chunk
  of the sequence, retrieved again at each chunk boundary as generation proceeds (the chunk's
  own text is the query, as in pretraining);
- ``both``: the two together;
- ``none``: neither (closed-book).

A QA record that carries ``ctxs`` (given passages, e.g. DPR's for NQ-open) uses its first n
passages as the prompt contexts instead of searching the index (modes ``prompt`` and ``both``).

Prompts are fitted to the model's sequence length: the prompt may take
``seq_length - max_new_tokens`` tokens (rounded down to whole chunks, since the decoder
left-pads it to a chunk boundary); contexts are dropped from the last one until it fits, then
the prompt is cut from the left. Both are counted. Questions are decoded in batches sorted by
prompt length (less padding), and the answers are written back in the input order.

In ``encoder`` and ``both`` modes the prompt stops at ``Assistant:``, so that it ends on a chunk
boundary exactly where SFT's encoder-mode samples put the start of the answer (the chunk before
the answer is the one whose neighbors the answer sees); the model writes ``The answer is``
itself.

The prediction is the decoded continuation, cut at the end of its first line for short-span
answers (the model may go on to a new turn), with a generated ``The answer is`` removed, and
stripped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import PipelineError
from .params import positive
from .progress import progress
from .prompts import STYLES, encode_prompt
from .tokenizer import Tokenizer

MODES = ("prompt", "encoder", "both", "none")

# A task name is a DVC stage name suffix and a param key (generate.tasks.<name>): no dots.
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Task:
    """One QA task: answers go to ``<name>.jsonl``; ``style`` picks the prompt (see STYLES)."""

    name: str
    path: str
    style: str = "short"


def parse_task(name, entry, key: str = "generate.tasks", source: str = "params.yaml") -> Task:
    """Validate one entry ``name: {path, style?}`` of the ``generate.tasks`` mapping."""
    where = f"{source}: param '{key}.{name}'"
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise PipelineError(f"{source}: task name {name!r} in '{key}' must be letters, digits, '_' or '-'")
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        raise PipelineError(f"{where} must be a mapping with a string 'path' (and optional 'style')")
    unknown = set(entry) - {"path", "style"}
    if unknown:
        raise PipelineError(f"{where} has unknown keys {sorted(unknown)}; expected path, style")
    style = entry.get("style", "short")
    if style not in STYLES:
        raise PipelineError(f"{source}: param '{key}.{name}.style' is {style!r}; expected one of {sorted(STYLES)}")
    return Task(name, entry["path"], style)


def parse_tasks(value, key: str = "generate.tasks", source: str = "params.yaml") -> list[Task]:
    """Validate the ``generate.tasks`` param: a non-empty mapping ``name -> {path, style?}``.

    dvc.yaml makes one ``generate@<name>`` / ``score@<name>`` stage pair per entry, whose params
    are that entry alone, so adding a task leaves the other tasks' stages up to date.
    """
    if isinstance(value, list):
        raise PipelineError(f"{source}: param '{key}' is a list; write it as a mapping name -> {{path, style}}, "
                            "e.g. 'world_qa: {path: data/world/qa.jsonl, style: short}'")
    if not isinstance(value, dict) or not value:
        raise PipelineError(f"{source}: param '{key}' must be a non-empty mapping name -> {{path, style}}")
    return [parse_task(name, entry, key, source) for name, entry in value.items()]


# ----------------------------------------------------------------------------- fitting prompts (the format: prompts.py)


def prompt_budget(seq_length: int, max_new_tokens: int, chunk_length: int) -> int:
    """Tokens a prompt may take so that the chunk-aligned prompt plus the answer fit the model."""
    budget = (seq_length - max_new_tokens) // chunk_length * chunk_length
    if budget <= 0:
        raise PipelineError(
            f"params.yaml: generate.max_new_tokens ({max_new_tokens}) leaves no room for a prompt "
            f"in the model's seq_length ({seq_length}) with chunk_length {chunk_length}"
        )
    return budget


def fit_prompt(tokenizer: Tokenizer, question: str, contexts: Sequence[str], system: str, style: str,
               budget: int, answer_prefix: bool = True) -> tuple[list[int], int, bool]:
    """Tokenize the prompt within ``budget`` tokens.

    Returns ``(ids, contexts_used, cut)``: contexts are dropped from the last until the prompt
    fits; if even the prompt with no context is too long it is cut from the left (``cut``).
    """
    for n in range(len(contexts), -1, -1):
        ids = encode_prompt(tokenizer, question, contexts[:n], system, style, answer_prefix)
        if len(ids) <= budget:
            return ids, n, False
    return ids[-budget:], 0, True


def clean_prediction(text: str, style: str = "short") -> str:
    """Cut the generated text at the end of the answer, drop a generated answer prefix, strip."""
    for stop in ("\nUser:", "\nSystem:", "User:"):
        text = text.split(stop, 1)[0]
    if style == "short":
        text = text.strip().split("\n", 1)[0]
    text = text.strip()
    prefix = STYLES[style][1]
    if prefix and text.startswith(prefix):
        text = text[len(prefix):].strip()
    return text


# ----------------------------------------------------------------------------- retrieval


class EncoderNeighbors:
    """The ``neighbors_fn`` of the decoder in ``encoder`` / ``both`` mode.

    Called as ``fn(b, j, chunk_tokens)`` when chunk ``j`` of batch row ``b`` is complete; returns
    that chunk's ``k`` neighbors (tokens, mask) retrieved with the chunk's text as the query, or
    None for a chunk that is all padding. Chunks known in advance (the prompt's) are searched in
    one batch by :meth:`prefetch`; results are cached by chunk text (the query). Every call is recorded in
    ``calls[b]`` as ``(j, ids)`` so the answers can list the chunk ids the encoder saw.
    """

    def __init__(self, retriever, tokenizer: Tokenizer, k: int, chunk_length: int):
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.k = k
        self.chunk_length = chunk_length
        self.cache: dict[str, np.ndarray | None] = {}  # chunk text -> k neighbor ids
        self.calls: dict[int, list[tuple[int, list[int]]]] = {}

    def _search(self, texts: list[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for t in todo:
            if not t.strip():
                self.cache[t] = None  # padding only: no neighbors
        query = [t for t in todo if t.strip()]
        if query:
            ids = np.asarray(self.retriever.search(query, self.k), dtype=np.int64)
            for t, row in zip(query, ids):
                self.cache[t] = row

    def prefetch(self, prompts: list[list[int]]) -> None:
        """Retrieve, in one search, the neighbors of every chunk of the left-padded prompts."""
        cl = self.chunk_length
        texts = []
        for ids in prompts:
            padded = [self.tokenizer.pad_id] * (-len(ids) % cl) + list(ids)
            texts += [self.tokenizer.decode(padded[i : i + cl]) for i in range(0, len(padded), cl)]
        self._search(texts)

    def reset(self) -> None:
        """Forget the recorded calls (the cache stays: same chunk text, same neighbors)."""
        self.calls = {}

    def __call__(self, b: int, j: int, chunk_tokens):
        text = self.tokenizer.decode([int(t) for t in chunk_tokens])
        if text not in self.cache:
            self._search([text])
        ids = self.cache[text]
        if ids is None:
            return None
        self.calls.setdefault(b, []).append((int(j), [int(i) for i in ids]))
        return self.retriever.neighbor_tokens(ids)


# ----------------------------------------------------------------------------- answering


@dataclass
class Settings:
    """How to answer: retrieval mode, contexts in the prompt, decoding limits."""

    retrieval: str = "prompt"
    num_contexts: int = 5
    max_new_tokens: int = 64
    batch_size: int = 16
    system: str = ""


def read_settings(p) -> Settings:
    """The ``generate.*`` decoding and retrieval params, checked; the system prompt defaults to
    ``sft.system``, the one the model was instruction-tuned with."""
    system = p.get("generate.system", (str, type(None)))
    if p.get("generate.num_contexts", int) < 0:
        raise PipelineError(f"{p.source}: param 'generate.num_contexts' must be >= 0")
    return Settings(
        retrieval=p.get("generate.retrieval", str, choices=MODES),
        num_contexts=p.get("generate.num_contexts", int),
        max_new_tokens=positive("generate.max_new_tokens", p.get("generate.max_new_tokens", int)),
        batch_size=positive("generate.batch_size", p.get("generate.batch_size", int)),
        system=system if system is not None else p.get("sft.system", str),
    )


def prompt_contexts(records: list[dict], retriever, settings: Settings) -> list[tuple[list[str], list[int], str]]:
    """For each record: (context texts, their DB chunk ids, source) for the prompt.

    Source is ``given`` (the record's ctxs), ``retrieved`` (searched by the question), or ``none``.
    """
    out: list = [None] * len(records)
    n = settings.num_contexts
    if settings.retrieval in ("encoder", "none") or n == 0:
        return [([], [], "none") for _ in records]
    search = [i for i, r in enumerate(records) if "ctxs" not in r]
    for i, r in enumerate(records):
        if "ctxs" in r:
            out[i] = (list(r["ctxs"][:n]), [], "given")
    if search:
        ids = np.asarray(retriever.search([records[i]["question"] for i in search], n), dtype=np.int64)
        for i, row in zip(search, ids):
            row = [int(x) for x in row if x >= 0]
            out[i] = ([retriever.chunk_text(x, continuation=True) for x in row], row, "retrieved")
    return out


def answer_questions(model, tokenizer: Tokenizer, records: list[dict], settings: Settings, *,
                     generate_fn: Callable, retriever=None, seq_length: int, chunk_length: int,
                     num_neighbors: int = 0, style: str = "short", desc: str = "generate",
                     rank: int = 0, world_size: int = 1, show_progress: bool = True) -> tuple[list[dict], dict]:
    """Answer ``records`` (from ``data.iter_qa``); return the answer records and counts.

    ``generate_fn(model, prompts, max_new_tokens, eod_id, neighbors_fn=None, pad_id=None)`` is
    the greedy decoder (``decoding.greedy_generate``); it returns the new tokens of each prompt.
    It pads with the tokenizer's pad, the id ``EncoderNeighbors`` pads with.

    With several processes (torch.distributed started) every rank builds every prompt and the
    same length-sorted batches as one process would, decodes batches ``rank, rank + world_size,
    ...``, and the results are all-gathered: each question is decoded in the very batch one
    process puts it in, so the answers are the bytes of one process. (The prompt retrieval, one
    query per question, runs on every rank: the batches depend on every prompt's length.)
    """
    if settings.retrieval not in MODES:
        raise PipelineError(f"params.yaml: param 'generate.retrieval' is {settings.retrieval!r}; expected one of {list(MODES)}")
    if settings.retrieval != "none" and retriever is None and any("ctxs" not in r for r in records):
        raise PipelineError(f"generate: retrieval mode {settings.retrieval!r} needs the retrieval database")
    use_encoder = settings.retrieval in ("encoder", "both")
    if use_encoder and num_neighbors <= 0:
        raise PipelineError("generate: retrieval mode needs a Retro checkpoint (model.retro=true) to feed the encoder")
    budget = prompt_budget(seq_length, settings.max_new_tokens, chunk_length)
    contexts = prompt_contexts(records, retriever, settings)

    # With the encoder the prompt ends at "Assistant:" on a chunk boundary, as SFT aligns its
    # encoder-mode samples; the model then writes the answer prefix itself (cut off again).
    prompts, used, cut = [], [], 0
    for rec, (ctx, _, _) in zip(records, contexts):
        ids, n, was_cut = fit_prompt(tokenizer, rec["question"], ctx, settings.system, style, budget,
                                     answer_prefix=not use_encoder)
        prompts.append(ids)
        used.append(n)
        cut += was_cut

    encoder = EncoderNeighbors(retriever, tokenizer, num_neighbors, chunk_length) if use_encoder else None
    order = sorted(range(len(records)), key=lambda i: (len(prompts[i]), i))
    new_tokens: list = [None] * len(records)
    encoder_ids: list = [[] for _ in records]
    batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    mine = batches[rank::world_size]
    bar = progress(total=sum(map(len, mine)), desc=desc, unit="q", disable=rank != 0 or not show_progress)
    for batch in mine:
        batch_prompts = [prompts[i] for i in batch]
        if encoder is not None:
            encoder.reset()
            encoder.prefetch(batch_prompts)
        outs = generate_fn(model, batch_prompts, settings.max_new_tokens, tokenizer.eod_id,
                           neighbors_fn=encoder, pad_id=tokenizer.pad_id)
        for b, i in enumerate(batch):
            toks = list(outs[b])
            if tokenizer.eod_id in toks:
                toks = toks[: toks.index(tokenizer.eod_id)]
            new_tokens[i] = toks
            if encoder is not None:
                encoder_ids[i] = [ids for _, ids in sorted(encoder.calls.get(b, []))]
        bar.update(len(batch))
    bar.close()
    decoded = [sum(t is not None for t in new_tokens)]
    if world_size > 1:
        new_tokens, encoder_ids, decoded = _gather_answers(new_tokens, encoder_ids, world_size)

    answers = []
    for i, rec in enumerate(records):
        ctx_texts, ctx_ids, source = contexts[i]
        ans = {
            "question": rec["question"],
            "answer": rec["answer"],
            "prediction": clean_prediction(tokenizer.decode(new_tokens[i]), style),
            "context_source": source if used[i] else "none",
            "prompt_chunk_ids": ctx_ids[: used[i]] if source == "retrieved" else [],
            "encoder_chunk_ids": encoder_ids[i],
            "prompt_tokens": len(prompts[i]),
            "new_tokens": len(new_tokens[i]),
        }
        if settings.retrieval != "none":  # what the model was shown, so the gold can be looked up in it
            ans["contexts"] = list(ctx_texts[: used[i]])
        if use_encoder:
            seen = dict.fromkeys(x for ids in encoder_ids[i] for x in ids if x >= 0)
            ans["encoder_neighbors"] = [{"id": x, "text": retriever.chunk_text(x, continuation=True)} for x in seen]
        answers.append(ans)
    counts = {
        "questions": len(records),
        "prompts_cut": cut,
        "contexts_dropped": int(sum(len(c[0]) - u for c, u in zip(contexts, used))),
        "new_tokens": int(sum(len(t) for t in new_tokens)),
        "prompt_tokens": int(sum(len(p) for p in prompts)),
        "decoded_by_rank": decoded,  # questions each process decoded
    }
    return answers, counts


def _gather_answers(new_tokens: list, encoder_ids: list, world_size: int) -> tuple[list, list, list[int]]:
    """Merge every rank's decoded questions (``None`` where another rank decoded it); also
    return how many each rank decoded."""
    import torch.distributed as dist

    mine = {i: (t, encoder_ids[i]) for i, t in enumerate(new_tokens) if t is not None}
    parts: list = [None] * world_size
    dist.all_gather_object(parts, mine)  # on the current device, which init_distributed selected
    for part in parts:
        for i, (t, ids) in part.items():
            new_tokens[i], encoder_ids[i] = t, ids
    if any(t is None for t in new_tokens):
        raise PipelineError("generate: a question was decoded by no rank")
    return new_tokens, encoder_ids, [len(part) for part in parts]
