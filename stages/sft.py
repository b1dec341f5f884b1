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
import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

from instructretro import params as P, presets, sft, train
from instructretro.errors import PipelineError, cli
from instructretro.io import write_json
from instructretro.model import Retro, flops_per_token
from instructretro.tokenizer import Tokenizer
from instructretro.workdir import DigestCache, WorkDir, code_files, content_key, library_versions, rank0_key


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


def check_declared(blend: list, dvc_yaml: str, source: str) -> None:
    """Every blend file must be a dependency of the sft stage in ``dvc_yaml`` (skipped without
    one), so that DVC reruns the stage when the file changes."""
    import yaml

    path = Path(dvc_yaml)
    if not path.is_file():
        return
    stage = (yaml.safe_load(path.read_text()) or {}).get("stages", {}).get("sft", {})
    missing = sft.undeclared_entries(blend, stage.get("deps", []) if isinstance(stage, dict) else [])
    if missing:
        name = missing[0]
        raise PipelineError(f"{source}: param 'sft.blend.{name}': its file is not a dependency of stage sft; add "
                            f"'- ${{sft.blend.{name}.path}}' to the sft deps in {path} (one line per blend entry)")


def make_retriever(args, p: P.Params, s: dict):
    """The Retriever over the populated index, with the database's own encoder (``embed.*``)."""
    if s["retrieval"] == "none":
        return None
    from instructretro.embed import encoder_from_params
    from instructretro.retrieval import Retriever

    return Retriever(args.embeddings, args.index, args.db_tokens, args.tokenizer, encoder=encoder_from_params(p),
                     chunk_length=s["chunk_length"], nprobe=s["nprobe"], efsearch=s["efsearch"])


def open_work(args, s: dict, settings: dict, cfg, blend, p: P.Params, rank: int, world: int) -> WorkDir:
    """The locked work folder of this run's resume checkpoints, ``--work/<key>``. The key (rank
    0's, for every rank) hashes the params (``sft.*``, ``embed.*``, ``retro.chunk_length``), the
    training settings and library versions, every input by content (the checkpoint, the blend
    files, tokenizer, database, index) and the code (this script and its imports): ``workdir``. A run of this key that had finished is never
    resumed (its folder is emptied), so a forced rerun trains from scratch."""
    params = {"sft": s, "settings": settings, "train": dataclasses.asdict(cfg), "world": world,
              "versions": library_versions("torch", "deepspeed", "transformers", "faiss-cpu", "faiss-gpu"),
              "embed": p.section("embed") if s["retrieval"] != "none" else None}
    inputs = [s["init_from"], *[e.path for e in blend], args.tokenizer, args.db_tokens, args.embeddings, args.index]
    key = rank0_key(lambda: content_key(params, inputs, code_files(__file__), DigestCache(args.work)))
    work = WorkDir(args.work, key, lock=rank == 0)
    if rank == 0 and (train.latest_step(work.dir) or 0) >= cfg.steps:
        work.clear()
    train.barrier()
    return work


def machine_flops() -> float:
    """fp32 matmul FLOP/s of this machine (a 0.2 s probe), for cost estimates."""
    a = torch.randn(1024, 1024)
    a @ a
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.2:
        a @ a
        n += 1
    return n * 2 * 1024**3 / (time.perf_counter() - t0)


def cost_line(config, settings: dict, flops_per_s: float, where: str) -> str:
    """One line: tokens, FLOPs and time of the full run at ``flops_per_s``."""
    tokens = settings["steps"] * settings["global_batch"] * settings["seq_length"]
    flops = flops_per_token(config, settings["seq_length"]) * tokens
    secs = flops / flops_per_s
    human = f"{secs / 86400:.1f} days" if secs > 86400 else f"{secs / 3600:.1f} h" if secs > 3600 else f"{secs / 60:.1f} min"
    return (f"sft cost: {settings['steps']} steps x {settings['global_batch']} x {settings['seq_length']} tokens "
            f"= {tokens:.2e} tokens, {flops:.2e} FLOPs: about {human} {where}")


def print_cost(config, settings: dict) -> None:
    """The full run's cost here (at this machine's fp32 matmul speed, a lower bound) and on GPUs."""
    here = machine_flops()
    print(cost_line(config, settings, here, f"here at best ({here / 1e9:.0f} GFLOP/s fp32 matmul)"))
    h100 = 8 * 989e12 * 0.4  # 8 H100s, bf16 dense peak, 40% model FLOPs utilisation
    print(cost_line(config, settings, h100, "on 8 H100 GPUs at 40% MFU"))


def _finite(x) -> float | None:
    return round(x, 6) if x is not None and math.isfinite(x) else None


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--db-tokens", default="data/tokens/db")
    ap.add_argument("--embeddings", default="data/db/embeddings.h5")
    ap.add_argument("--index", default="data/index/populated.faiss")
    ap.add_argument("--out", default="data/checkpoints/sft")
    ap.add_argument("--metrics", default="metrics/sft.json")
    ap.add_argument("--live", default="dvclive/sft")
    ap.add_argument("--work", default="data/work/sft", help="resume checkpoints (persist)")
    ap.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                    help="stop after this many steps with a resume checkpoint (a later run continues)")
    ap.add_argument("--smoke", action="store_true", help="one step of the --model preset's real graph")
    ap.add_argument("--estimate", action="store_true", help="print the cost of the --model preset's SFT run and exit")
    ap.add_argument("--model", default=None, help="preset for --smoke / --estimate (default: model.name)")
    ap.add_argument("--dvc-yaml", default="dvc.yaml", help="where the sft stage's deps are declared (checked "
                    "to list every blend file; skipped when the file does not exist)")
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
    check_declared(blend, args.dvc_yaml, p.source)
    if args.smoke:
        name = args.model or p.get("model.name", str)
        config = presets.get(name, vocab_size=tok.vocab_size, chunk_length=s["chunk_length"])
        settings = sft.sft_settings(name, s["overrides"])
        full = dict(settings)
        settings.update(steps=1, global_batch=1, micro_batch=1, seq_length=2 * s["chunk_length"],
                        precision="bf16" if torch.cuda.is_available() else "fp32", zero_stage=0)
        print(f"sft smoke: one step of the {name} graph ({config.n_layers} layers, hidden {config.hidden}, "
              f"vocab {config.vocab_size}), fresh weights, sequence {settings['seq_length']}")
        model = Retro(config)
        args.out = str(Path(tempfile.mkdtemp(prefix="sft-smoke-")) / "checkpoint")
    else:
        config = train.read_config(s["init_from"])
        tok.check_fits(config.vocab_size, Path(s["init_from"]) / "config.json")
        settings = sft.sft_settings(config.name, s["overrides"])
        model = None  # built below with the run's ZeRO stage (partitioned at creation at ZeRO-3)
        full = settings

    rank, world = train.init_distributed()
    cfg = sft.train_config(settings, world, seed=s["seed"], eval_interval=s["eval_interval"],
                           save_interval=s["save_interval"])
    if model is None:
        model = train.build_model(config, cfg, weights=s["init_from"])
    print(f"sft: {config.name} model, {model.num_parameters():,} parameters, retrieval={s['retrieval']}")
    retriever = make_retriever(args, p, s) if not (args.smoke and not Path(args.index).exists()) else None
    retrieval = s["retrieval"] if retriever is not None or s["retrieval"] == "none" else "none"
    if retrieval != s["retrieval"]:
        print(f"sft smoke: {args.index} not built yet, so retrieval=none for the smoke step")
    num_neighbors = s["num_neighbors"] or config.num_neighbors
    sdata = sft.build_data(blend, tok, seq_length=settings["seq_length"], chunk_length=s["chunk_length"],
                           num_draws=cfg.steps * settings["global_batch"], retrieval=retrieval, retriever=retriever,
                           num_contexts=s["num_contexts"], num_neighbors=num_neighbors, system=s["system"],
                           valid_fraction=s["valid_fraction"], valid_samples=4 if args.smoke else s["valid_samples"],
                           seed=s["seed"], rank=rank, world_size=world)
    if rank == 0:
        print(sft.format_report(sdata.report))
    if not args.smoke and settings["steps"] * settings["global_batch"] * settings["seq_length"] > 5e7 \
            and not torch.cuda.is_available():
        print_cost(config, full)

    work = None if args.smoke else open_work(args, s, settings, cfg, blend, p, rank, world)
    engine = train.build_engine(model, cfg)
    start = train.resume(engine, work.dir) if work is not None else 0
    if start and rank == 0:
        print(f"sft: resumed from {work.dir} at step {start}")
    live = train.open_live(args.live, work.dir, start) if rank == 0 and work is not None else None
    t0 = time.perf_counter()
    last = sft.finetune(engine, cfg, sdata, chunk_length=s["chunk_length"], retriever=retriever, rank=rank,
                        world_size=world, live=live, work_dir=work.dir if work is not None else None,
                        start_step=start, stop_after=args.stop_after)
    if live is not None:
        live.end()
    if args.stop_after is not None and args.stop_after < cfg.steps:
        print(f"sft: stopped after {args.stop_after} steps; run again to continue")
        return
    seconds = time.perf_counter() - t0
    export_config = dataclasses.replace(config, seq_length=max(config.seq_length, settings["seq_length"]))
    train.export_checkpoint(engine, export_config, args.out,
                            extra={"stage": "sft", "steps": cfg.steps, "precision": cfg.precision,
                                   "tokenizer_sha256": tok.digest})
    if work is not None:
        train.barrier()
        if rank == 0:
            work.finish()  # exported: nothing left to resume
    if rank != 0:
        return
    if args.smoke:
        size = sum(f.stat().st_size for f in Path(args.out).iterdir())
        reloaded = train.read_config(args.out)
        shutil.rmtree(Path(args.out).parent)
        print(f"sft smoke: one step (forward, backward, AdamW, validation) in {seconds:.1f} s, train loss "
              f"{last['train/loss']:.3f}, val loss {last.get('val/loss', float('nan')):.3f}; exported "
              f"{size / 1e9:.2f} GB ({reloaded.name}, read back, then deleted)")
        print_cost(config, full)
        return
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
    write_json(args.metrics, metrics)
    print(f"sft: {cfg.steps} steps in {seconds:.0f} s, val_loss {metrics['val_loss']:.4f}")


if __name__ == "__main__":
    main()
