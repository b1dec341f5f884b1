"""Stage generate@<task>: answer one QA task of ``generate.tasks`` with the instruction-tuned model.

``generate.tasks`` maps a task name to ``{path, style}``; dvc.yaml runs one stage per task
(``foreach`` over the mapping, named ``generate@<name>``) whose params are its own entry
``generate.tasks.<name>`` and the shared ``generate.*`` settings, so each task's QA file is a
dependency of its own stage and adding a task leaves the others up to date. Writes ``--out``
(``data/answers/<task>.jsonl``: question, prediction, gold answers, retrieved chunk ids, and with
retrieval the ``contexts`` texts in the prompt and the ``encoder_neighbors`` ``{id, text}`` the
encoder saw) and ``--metrics`` (questions, prompts cut, contexts dropped, tokens, speed). The retrieval mode, prompt contexts and decoding limits are
params; see ``instructretro.generate``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from instructretro import data, params as P
from instructretro.checkpoint import check_tokenizer, checkpoint_precision, load_model, read_config
from instructretro.decoding import greedy_generate
from instructretro.dist import init_distributed, local_device
from instructretro.errors import PipelineError, cli
from instructretro.generate import answer_questions, parse_task, read_settings
from instructretro.io import write_json, write_jsonl
from instructretro.tokenizer import Tokenizer


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--task", required=True, help="a name in generate.tasks")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--db-tokens", default="data/tokens/db")
    ap.add_argument("--embeddings", default="data/db/embeddings.h5")
    ap.add_argument("--index", default="data/index/populated", help="the populated index folder (add-index)")
    ap.add_argument("--out", required=True, help="answers, JSON lines")
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)

    p = P.load(args.params)
    settings = read_settings(p)
    entry = p.get(f"generate.tasks.{args.task}", default=None)  # only its own entry: its stage's param
    if entry is None:
        raise PipelineError(f"{args.params}: no task named {args.task!r} in 'generate.tasks' "
                            "(a mapping name -> {path, style})")
    task = parse_task(args.task, entry, source=args.params)
    checkpoint = p.get("generate.checkpoint", str)
    max_questions = p.get("generate.max_questions", int)  # 0: all; a quick look at a big set
    chunk_length = P.positive("retro.chunk_length", p.get("retro.chunk_length", int))
    threads = p.get("generate.threads", int)  # 0: torch's default
    if threads > 0:
        torch.set_num_threads(threads)

    records = list(data.iter_qa(task.path))  # validates every line before any work
    if max_questions > 0:
        records = records[:max_questions]
    torch.manual_seed(0)
    # Under the launcher each rank decodes a share of the batches on its own accelerator
    # (cuda:LOCAL_RANK), in the precision the checkpoint was trained in; rank 0 writes.
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = init_distributed() if multi else (0, 1)
    check_tokenizer(checkpoint, args.tokenizer)
    tok = Tokenizer(args.tokenizer)
    tok.check_fits(read_config(checkpoint).vocab_size, Path(checkpoint) / "config.json")
    dtype = torch.bfloat16 if checkpoint_precision(checkpoint) == "bf16" else torch.float32
    model = load_model(checkpoint, device=local_device(), dtype=dtype).eval()
    config = model.config
    if config.chunk_length != chunk_length:
        raise PipelineError(f"{checkpoint}: model chunk_length {config.chunk_length} != param 'retro.chunk_length' {chunk_length}")
    retriever = None
    given = settings.retrieval == "prompt" and all("ctxs" in r for r in records)  # nothing to search
    if settings.retrieval != "none" and not given:  # the database's own encoder (embed.*), as query-neighbors and sft use
        from instructretro.embed import encoder_from_params
        from instructretro.retrieval import Retriever

        retriever = Retriever(args.embeddings, args.index, args.db_tokens, args.tokenizer,
                              encoder=encoder_from_params(p), chunk_length=chunk_length,
                              nprobe=P.positive("generate.nprobe", p.get("generate.nprobe", int)),
                              efsearch=P.positive("generate.efsearch", p.get("generate.efsearch", int)))

    t0 = time.time()
    with torch.inference_mode():
        answers, counts = answer_questions(
            model, tok, records, settings, generate_fn=greedy_generate, retriever=retriever,
            seq_length=config.seq_length, chunk_length=chunk_length,
            num_neighbors=config.num_neighbors if config.retro else 0, style=task.style,
            desc=f"generate {task.name}", rank=rank, world_size=world)
    seconds = time.time() - t0
    if rank != 0:
        return
    write_jsonl(args.out, answers)
    counts["seconds"] = round(seconds, 2)
    counts["new_tokens_per_s"] = round(counts["new_tokens"] / max(seconds, 1e-9), 1)
    counts["retrieval"] = settings.retrieval
    write_json(args.metrics, counts)
    print(f"generate {task.name}: {counts['questions']} questions, {counts['new_tokens']} new tokens "
          f"in {seconds:.1f}s, {counts['prompts_cut']} prompts cut, {counts['contexts_dropped']} contexts dropped")


if __name__ == "__main__":
    main()
