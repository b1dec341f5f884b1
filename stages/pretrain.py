"""Stage pretrain: train Retro (or, with model.retro=false, the GPT baseline) with DeepSpeed on
the pretraining tokens and their neighbors; export the checkpoint; validation perplexity.

One process on CPU (no launcher); on GPUs the same script under the ``deepspeed`` launcher
(``make pretrain GPUS=8``). ``--eval-only CKPT`` is the reference's ``--skip-train``: the
validation metrics of an exported checkpoint, nothing trained or exported.

``pretrain.init_from`` may name a Hugging Face decoder folder: the architecture then comes from
its ``config.json`` and the preset supplies only the Retro additions (``presets.RETRO_ADDITIONS``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from instructretro import hf, params as P, presets
from instructretro.dist import is_rank0
from instructretro.errors import PipelineError, cli
from instructretro.io import write_json
from instructretro.pretrain import check_global_batch, preset_training, run_pretrain
from instructretro.pretrain_data import PretrainInputs
from instructretro.tokenizer import Tokenizer
from instructretro.tokenstore import TokenStore
from instructretro.train import TrainConfig


def model_config_from_params(p, vocab_size: int, gpt: bool = False, init_from: str = "", tokenizer: str = ""):
    """The ModelConfig of ``model.name`` with the ``model.*`` overrides (null = the preset's),
    the tokenizer's vocab and the data's chunk and sequence lengths; ``gpt`` forces
    ``model.retro`` false (the stage pretrain-gpt).

    With ``init_from`` a Hugging Face folder, the architecture is the folder's (``config.json``)
    and the preset and ``model.*`` give only the Retro additions; the tokenizer's vocabulary
    (``tokenizer``, the folder the token stores were made with) must fit its embedding."""
    section = p.section("model")
    name = p.get("model.name", str)
    retro = p.get("model.retro", bool) and not gpt
    overrides = {k: v for k, v in section.items() if k not in ("name", "retro")}
    for key in ("vocab_size", "seq_length", "chunk_length"):
        if overrides.get(key) is not None:
            raise PipelineError(f"{p.source}: param 'model.{key}' is set by the data (tokenizer / retro.*); remove it")
    overrides.update(retro=retro, vocab_size=vocab_size,
                     chunk_length=P.positive("retro.chunk_length", p.get("retro.chunk_length", int)),
                     seq_length=P.positive("retro.seq_length", p.get("retro.seq_length", int)))
    config = presets.get(name, **overrides)
    if not (init_from and hf.is_hf_folder(init_from)):
        return config
    for key, value in section.items():
        if key not in ("name", *presets.RETRO_ADDITIONS) and value is not None:
            raise PipelineError(f"{p.source}: param 'model.{key}' is set by {Path(init_from) / 'config.json'} "
                                "(pretrain.init_from); remove it")
    config = hf.read_hf_config(init_from, **presets.retro_additions(config))
    Tokenizer(tokenizer).check_fits(config.vocab_size, Path(init_from) / "config.json")
    return config


def add_input_args(ap: argparse.ArgumentParser) -> None:
    """``--params`` and the stage's inputs (what tokenize, embed and query-neighbors wrote)."""
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tokens", default="data/tokens/pretrain")
    ap.add_argument("--neighbors", default="data/neighbors/neighbors.h5")
    ap.add_argument("--db-tokens", default="data/tokens/db")
    ap.add_argument("--embeddings", default="data/db/embeddings.h5")
    ap.add_argument("--tokenizer", default="data/tokenizer")


def inputs_from_args(args, p) -> PretrainInputs:
    return PretrainInputs(args.tokens, args.neighbors, args.db_tokens, args.embeddings, args.tokenizer,
                          p.get("corpus.pretrain", str))


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    add_input_args(ap)
    ap.add_argument("--out", default="data/checkpoints/pretrain")
    ap.add_argument("--work", default="data/work/pretrain", help="resume checkpoints (persist)")
    ap.add_argument("--live", default="dvclive/pretrain", help="DVCLive folder (plots)")
    ap.add_argument("--metrics", default="metrics/pretrain.json")
    ap.add_argument("--eval-only", metavar="CKPT", default="",
                    help="only evaluate this exported checkpoint; write --metrics, train nothing")
    ap.add_argument("--max-overlap", type=float, default=None, metavar="FRACTION",
                    help="with --eval-only: also the validation loss with the leakage filter (neighbors holding more "
                         "than this fraction of the chunk they are read for masked out), val_loss_filtered")
    ap.add_argument("--gpt", action="store_true",
                    help="train the GPT baseline whatever model.retro says (stage pretrain-gpt; reads no neighbors)")
    ap.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                    help="stop after this many steps with a resume checkpoint (a later run continues)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)

    p = P.load(args.params)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by the launcher; splits a preset's batch
    model_name = p.get("model.name", str)
    preset = presets.training(model_name)
    device_recipe = presets.device_recipe(model_name, gpu=torch.cuda.is_available())  # for null params
    check_global_batch(p, model_name, preset, world, device_recipe.get("micro_batch"))
    defaults = preset_training(preset, world, p.get("pretrain.micro_batch", (int, type(None))), device_recipe)
    cfg = TrainConfig.from_params(p, "pretrain", {k: v for k, v in defaults.items() if v is not None})
    init_from = p.get("pretrain.init_from", str)
    skip_train = p.get("pretrain.skip_train", bool)
    if args.max_overlap is not None:
        if not args.eval_only:
            raise PipelineError("--max-overlap filters neighbors at evaluation: give it with --eval-only CKPT")
        if not 0.0 <= args.max_overlap <= 1.0:
            raise PipelineError(f"--max-overlap is a share of the chunk, between 0 and 1; got {args.max_overlap}")
    if args.eval_only:
        init_from, skip_train = args.eval_only, True
    if args.eval_only and not Path(init_from).is_dir():  # make eval-ppl CKPT=...
        raise PipelineError(f"--eval-only (make eval-ppl CKPT=...): {init_from} is not a checkpoint folder "
                            "(an exported checkpoint: config.json + model.safetensors)")
    if init_from and not Path(init_from).is_dir():
        raise PipelineError(f"{args.params}: 'pretrain.init_from' is {init_from}, which is not a checkpoint folder")
    inputs = inputs_from_args(args, p)
    vocab = TokenStore(args.tokens, "train").vocab_size
    model_config = model_config_from_params(p, vocab, gpt=args.gpt, init_from=init_from, tokenizer=args.tokenizer)

    metrics = run_pretrain(inputs, model_config, cfg, None if args.eval_only else args.out, args.work,
                           None if args.eval_only else args.live, init_from, skip_train, args.stop_after,
                           code=[__file__], max_overlap=args.max_overlap)
    if metrics is None:
        print(f"pretrain: stopped after {args.stop_after} steps; run again to continue", file=sys.stderr)
    elif is_rank0():
        write_json(args.metrics, metrics)
        shuffled, alone = metrics["val_loss_shuffled"], metrics["val_loss_no_retrieval"]
        facts = metrics["val_loss_facts"]
        print(f"pretrain: {metrics['model']} {'Retro' if metrics['retro'] else 'GPT'}, {metrics['steps']} steps, "
              f"val_loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.2f})"
              + (f", shuffled neighbors {shuffled:.4f}" if shuffled is not None else "")
              + (f", no retrieval {alone:.4f}" if alone is not None else "")
              + (f", fact tokens {facts:.4f}" if facts is not None else "")
              + (f", filtered at overlap {args.max_overlap} {metrics['val_loss_filtered']:.4f}"
                 if metrics.get("val_loss_filtered") is not None else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
