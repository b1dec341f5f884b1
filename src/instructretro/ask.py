"""Ask the instruction-tuned model one question from the shell (``make ask Q="..."``).

Loads what the generate stage loads (``generate.checkpoint``, the tokenizer, the database's
token store, embeddings and populated index, the ``embed.*`` encoder) and answers with the
generate stage's own code (``generate.answer_questions``, the ``generate.*`` settings, the
greedy decoder), so an answer equals the stage's answer to the same question. Documents added
through the server (the overlay, ``data/serve/overlay.npz``) are searched too; with none added
the retrieval is the stage's. Prints the answer, then the chunks the model was given (document
id, score, text); ``--json`` prints one JSON object instead.

``Assistant`` is the loaded model and database; the server (``instructretro.serve``) uses it too.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import numpy as np
import torch

from . import params as P
from .checkpoint import check_tokenizer, checkpoint_precision, load_model
from .decoding import greedy_generate
from .embed import encoder_from_params
from .errors import PipelineError, cli
from .generate import MODES, Settings, answer_questions, read_settings
from .overlay import LiveRetriever
from .prompts import STYLES
from .retrieval import Retriever
from .tokenizer import Tokenizer

# The paths the generate stage reads (its defaults in stages/generate.py, as dvc.yaml runs it).
DEFAULTS = {"tokenizer": "data/tokenizer", "db_tokens": "data/tokens/db",
            "embeddings": "data/db/embeddings.h5", "index": "data/index/populated",
            "overlay": "data/serve/overlay.npz"}


class RecordingRetriever:
    """A per-request view of the retriever that remembers the score of every chunk it returned,
    so an answer can list its chunks with scores (``generate`` itself only asks for ids)."""

    def __init__(self, retriever: LiveRetriever):
        self.retriever = retriever
        self.scores: dict[int, float] = {}

    def search(self, texts, n, exclude_doc_ids=None):
        ids, scores = self.retriever.search_scored(texts, n)
        for i, s in zip(ids.reshape(-1), scores.reshape(-1)):
            if i >= 0:
                self.scores[int(i)] = max(float(s), self.scores.get(int(i), -np.inf))
        return ids

    def chunk_text(self, chunk_id, continuation=True):
        return self.retriever.chunk_text(chunk_id, continuation)

    def neighbor_tokens(self, ids):
        return self.retriever.neighbor_tokens(ids)

    def describe(self, chunk_id: int, used: str) -> dict:
        """One chunk as the answers list it."""
        r = self.retriever
        return {"id": int(chunk_id), "doc_id": r.doc_id(chunk_id), "source": r.source(chunk_id),
                "score": round(self.scores.get(int(chunk_id), float("nan")), 6), "used": used,
                "text": r.chunk_text(chunk_id, continuation=True)}


class Assistant:
    """The SFT checkpoint, tokenizer, database + overlay, and the ``generate.*`` settings."""

    def __init__(self, params_path: str = "params.yaml", tokenizer: str = DEFAULTS["tokenizer"],
                 db_tokens: str = DEFAULTS["db_tokens"], embeddings: str = DEFAULTS["embeddings"],
                 index: str = DEFAULTS["index"], overlay: str | None = DEFAULTS["overlay"],
                 checkpoint: str | None = None):
        p = P.load(params_path)
        self.settings = read_settings(p)
        self.checkpoint = checkpoint or p.get("generate.checkpoint", str)
        chunk_length = P.positive("retro.chunk_length", p.get("retro.chunk_length", int))
        threads = p.get("generate.threads", int)
        if threads > 0:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        check_tokenizer(self.checkpoint, tokenizer)
        dtype = torch.bfloat16 if checkpoint_precision(self.checkpoint) == "bf16" else torch.float32
        # one process: the first GPU if there is one, as the stage's local_device() gives it (without
        # importing DeepSpeed, which prints to stdout and takes seconds)
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.model = load_model(self.checkpoint, device=device, dtype=dtype).eval()
        self.config = self.model.config
        if self.config.chunk_length != chunk_length:
            raise PipelineError(f"{self.checkpoint}: model chunk_length {self.config.chunk_length} "
                                f"!= param 'retro.chunk_length' {chunk_length}")
        self.chunk_length = chunk_length
        self.tokenizer = Tokenizer(tokenizer)
        base = Retriever(embeddings, index, db_tokens, tokenizer, encoder=encoder_from_params(p),
                         chunk_length=chunk_length,
                         nprobe=P.positive("generate.nprobe", p.get("generate.nprobe", int)),
                         efsearch=P.positive("generate.efsearch", p.get("generate.efsearch", int)))
        self.retriever = LiveRetriever(base, overlay or None)
        self.num_neighbors = self.config.num_neighbors if self.config.retro else 0

    def settings_for(self, retrieval: str | None = None, num_contexts: int | None = None,
                     max_new_tokens: int | None = None) -> Settings:
        """The params' settings with a request's overrides."""
        s = self.settings
        return replace(s, retrieval=s.retrieval if retrieval is None else retrieval,
                       num_contexts=s.num_contexts if num_contexts is None else num_contexts,
                       max_new_tokens=s.max_new_tokens if max_new_tokens is None else max_new_tokens)

    def answer(self, questions: list[str], settings: Settings | None = None, style: str = "short",
               generate_fn=greedy_generate) -> list[dict]:
        """Answer questions as the generate stage does; each answer also lists its ``chunks``."""
        settings = settings or self.settings
        recorder = RecordingRetriever(self.retriever)
        records = [{"question": q, "answer": []} for q in questions]
        with torch.inference_mode():
            answers, _ = answer_questions(
                self.model, self.tokenizer, records, settings, generate_fn=generate_fn,
                retriever=recorder if settings.retrieval != "none" else None,
                seq_length=self.config.seq_length, chunk_length=self.chunk_length,
                num_neighbors=self.num_neighbors, style=style, show_progress=False)
        out = []
        for a in answers:
            chunks = [recorder.describe(i, "prompt") for i in a["prompt_chunk_ids"]]
            seen = {c["id"] for c in chunks}
            for ids in a["encoder_chunk_ids"]:
                for i in ids:
                    if i >= 0 and i not in seen:
                        seen.add(i)
                        chunks.append(recorder.describe(i, "encoder"))
            out.append({"question": a["question"], "answer": a["prediction"], "retrieval": settings.retrieval,
                        "chunks": chunks, "prompt_tokens": a["prompt_tokens"], "new_tokens": a["new_tokens"]})
        return out


def format_answer(a: dict) -> str:
    lines = [a["answer"], ""]
    if not a["chunks"]:
        lines.append(f"(no retrieved chunks: retrieval {a['retrieval']})")
    for n, c in enumerate(a["chunks"], 1):
        text = " ".join(c["text"].split())
        lines.append(f"[{n}] document {c['doc_id']} ({c['source']}, {c['used']}), score {c['score']:.4f}")
        lines.append(f"    {text}")
    return "\n".join(lines)


def add_path_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoint", default=None, help="exported checkpoint (default: generate.checkpoint)")
    ap.add_argument("--tokenizer", default=DEFAULTS["tokenizer"])
    ap.add_argument("--db-tokens", default=DEFAULTS["db_tokens"])
    ap.add_argument("--embeddings", default=DEFAULTS["embeddings"])
    ap.add_argument("--index", default=DEFAULTS["index"])
    ap.add_argument("--overlay", default=DEFAULTS["overlay"], help="added documents ('' for none)")


def assistant_from_args(args) -> Assistant:
    return Assistant(args.params, args.tokenizer, args.db_tokens, args.embeddings, args.index,
                     args.overlay or None, args.checkpoint)


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("question", help="the question")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--retrieval", choices=MODES, default=None, help="override generate.retrieval")
    ap.add_argument("--num-contexts", type=int, default=None, help="override generate.num_contexts")
    ap.add_argument("--style", choices=sorted(STYLES), default="short")
    add_path_args(ap)
    args = ap.parse_args(argv)
    if not args.question.strip():
        raise PipelineError("ask: the question is empty")
    if args.num_contexts is not None and args.num_contexts < 0:
        raise PipelineError("ask: --num-contexts must be >= 0")
    assistant = assistant_from_args(args)
    answer = assistant.answer([args.question], assistant.settings_for(args.retrieval, args.num_contexts),
                              style=args.style)[0]
    if args.json:
        json.dump(answer, sys.stdout, ensure_ascii=False)
        print()
    else:
        print(format_answer(answer))


if __name__ == "__main__":
    main()
