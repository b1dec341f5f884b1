"""Stage sft: instruction-tune the pretrained Retro on the blend in ``sft.blend``.

Loads the exported checkpoint ``sft.init_from``, builds the blend (prompt format, loss mask,
truncation, retrieval mode ``sft.retrieval``), trains with DeepSpeed, validates on a held-out
part of each dataset, exports ``config.json`` + ``model.safetensors`` like pretrain, and writes
``val_loss`` and the blend table (samples drawn and epochs per dataset) to the metrics.
Resume checkpoints go to ``--work/<key>`` every ``sft.save_interval`` steps, as in pretrain: a
killed run started again continues from its last one (``resumed_at`` in the metrics).

``--estimate`` prints what the full run of ``--model`` costs (here and on GPUs) and exits;
``--smoke`` proves the plumbing of a big preset on any machine: one optimizer step of one
sample of the real ``--model`` graph (fresh weights) with a sequence of two chunks, written to
a scratch folder, then the estimated cost of the full run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from instructretro import checkpoint, dist, params as P, presets, sft
from instructretro.errors import PipelineError, cli
from instructretro.estimate import print_cost
from instructretro.io import write_json
from instructretro.model import Retro
from instructretro.tokenizer import Tokenizer


def read_params(p: P.Params) -> dict:
    """Every ``sft.*`` key this stage reads (plus ``retro.chunk_length``), checked."""
    out = {
        "init_from": p.get("sft.init_from", str),
        "blend": p.get("sft.blend"),
        "valid_fraction": p.get("sft.valid_fraction", float),
        "valid_samples": P.positive("sft.valid_samples", p.get("sft.valid_samples", int)),
        "system": p.get("sft.system", str),
        "retrieval": p.get("sft.retrieval", str, choices=sft.RETRIEVAL_MODES),
        "num_contexts": p.get("sft.num_contexts", int),
        "num_neighbors": p.get("sft.num_neighbors", (int, type(None))),
        "nprobe": P.positive("sft.nprobe", p.get("sft.nprobe", int)),
        "efsearch": P.positive("sft.efsearch", p.get("sft.efsearch", int)),
        "seed": p.get("sft.seed", int),
        "eval_interval": P.positive("sft.eval_interval", p.get("sft.eval_interval", int)),
        "save_interval": P.positive("sft.save_interval", p.get("sft.save_interval", int)),
        "chunk_length": P.positive("retro.chunk_length", p.get("retro.chunk_length", int)),
        "overrides": {k: p.get(f"sft.{k}") for k in sft.TRAIN_KEYS},
    }
    if not 0.0 <= out["valid_fraction"] < 1.0:
        raise PipelineError(f"{p.source}: param 'sft.valid_fraction' must be in [0, 1), got {out['valid_fraction']}")
    if out["num_contexts"] < 0:
        raise PipelineError(f"{p.source}: param 'sft.num_contexts' must be >= 0")
    return out


def make_retriever(args, p: P.Params, s: dict):
    """The Retriever over the populated index, with the database's own encoder (``embed.*``)."""
    if s["retrieval"] == "none":
        return None
    from instructretro.embed import encoder_from_params
    from instructretro.retrieval import Retriever

    return Retriever(args.embeddings, args.index, args.db_tokens, args.tokenizer, encoder=encoder_from_params(p),
                     chunk_length=s["chunk_length"], nprobe=s["nprobe"], efsearch=s["efsearch"])


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--db-tokens", default="data/tokens/db")
    ap.add_argument("--embeddings", default="data/db/embeddings.h5")
    ap.add_argument("--index", default="data/index/populated", help="the populated index folder (add-index)")
    ap.add_argument("--out", default="data/checkpoints/sft")
    ap.add_argument("--metrics", default="metrics/sft.json")
    ap.add_argument("--live", default="dvclive/sft")
    ap.add_argument("--work", default="data/work/sft", help="resume checkpoints (persist)")
    ap.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                    help="stop after this many steps with a resume checkpoint (a later run continues)")
    ap.add_argument("--smoke", action="store_true", help="one step of the --model preset's real graph")
    ap.add_argument("--estimate", action="store_true", help="print the cost of the --model preset's SFT run and exit")
    ap.add_argument("--model", default=None, help="preset for --smoke / --estimate (default: model.name)")
    ap.add_argument("--blend-records", default="data/sft-blend", help="what the sft-blend@<name> stages "
                    "wrote (checked to match every blend file; skipped when the folder does not exist)")
    ap.add_argument("--local_rank", type=int, default=None)  # set by the deepspeed launcher
    args = ap.parse_args(argv)
    p = P.load(args.params)
    s = read_params(p)
    tok = Tokenizer(args.tokenizer)
    torch.manual_seed(s["seed"])

    if args.estimate:
        name = args.model or p.get("model.name", str)
        config = presets.get(name, vocab_size=tok.vocab_size, chunk_length=s["chunk_length"])
        with torch.device("meta"):
            n_params = Retro(config).num_parameters()
        print(f"sft: {name} Retro, {n_params:,} parameters at vocab {tok.vocab_size}")
        print_cost(config, sft.sft_settings(name, s["overrides"]))
        return
    blend = sft.parse_blend(s["blend"], p.source, out=args.out)  # before any slow loading
    for name in sft.check_stamps(blend, args.blend_records, p.source, prune=dist.is_rank0()):
        if dist.is_rank0():
            print(f"sft: removed {args.blend_records}/{name}.json (no longer in sft.blend)")
    unavailable = None
    if args.smoke:
        name = args.model or p.get("model.name", str)
        config = presets.get(name, vocab_size=tok.vocab_size, chunk_length=s["chunk_length"])
        settings = sft.sft_settings(name, s["overrides"])
        full = dict(settings)
        settings.update(steps=1, global_batch=1, micro_batch=1, seq_length=2 * s["chunk_length"],
                        precision="bf16" if torch.cuda.is_available() else "fp32", zero_stage=0)
        print(f"sft smoke: one step of the {name} graph ({config.n_layers} layers, hidden {config.hidden}, "
              f"vocab {config.vocab_size}), fresh weights, sequence {settings['seq_length']}")
        args.out = str(Path(tempfile.mkdtemp(prefix="sft-smoke-")) / "checkpoint")
        unavailable = None if Path(args.index).exists() else f"{args.index} not built yet"
    else:
        config = checkpoint.read_config(s["init_from"])
        tok.check_fits(config.vocab_size, Path(s["init_from"]) / "config.json")
        checkpoint.check_tokenizer(s["init_from"], args.tokenizer)
        sft.check_retrieval(config, s["retrieval"], p.source)
        settings = full = sft.sft_settings(config.name, s["overrides"])

    # records that carry their prompt passages (ctxs) need no search: no encoder, no index
    searched = s["retrieval"] != "none" and not sft.all_given_contexts(blend, s["retrieval"])
    metrics = sft.run_sft(
        config, settings, s, blend, tok, args.out, args.work, args.live,
        open_retriever=lambda: make_retriever(args, p, s), retrieval_unavailable=unavailable,
        embed_params=p.section("embed") if searched else None,
        inputs=[s["init_from"], *[e.path for e in blend], args.tokenizer,
                *([args.db_tokens, args.embeddings, args.index] if searched else [])],
        code=[__file__], stop_after=args.stop_after, smoke=args.smoke, full_settings=full)
    if args.smoke and dist.is_rank0():
        print_cost(config, full)
    if metrics is not None:
        write_json(args.metrics, metrics)


if __name__ == "__main__":
    main()
