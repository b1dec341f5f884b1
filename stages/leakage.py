"""Stage leakage: Retro's and GPT's validation loss by how much of each chunk the neighbors the
model reads already hold (RETRO's leakage analysis), and with ``leakage.max_overlap`` the
validation loss with the leakage filter next to the unfiltered one.

Writes ``--metrics`` (per overlap bucket: chunks, tokens, Retro, GPT and shuffled-neighbor loss,
Retro's lead) and ``--plot`` (loss against overlap, a CSV that dvc.yaml draws).
"""

from __future__ import annotations

import argparse
import sys

from instructretro import params as P
from instructretro.errors import cli
from instructretro.io import write_json
from instructretro.leakage import plot_rows, run_leakage
from instructretro.pretrain_data import PretrainInputs


def write_csv(path, rows: list[dict]) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0]) if rows else ["overlap", "retro_loss", "gpt_loss", "retro_loss_shuffled"]
    lines = [",".join(fields)] + [",".join(f"{r[f]:.6g}" if r[f] is not None else "" for f in fields) for r in rows]
    Path(path).write_text("\n".join(lines) + "\n")


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--retro", default="data/checkpoints/pretrain", help="exported Retro checkpoint")
    ap.add_argument("--gpt", default="data/checkpoints/pretrain-gpt", help="exported GPT checkpoint (the baseline)")
    ap.add_argument("--tokens", default="data/tokens/pretrain")
    ap.add_argument("--neighbors", default="data/neighbors/neighbors.h5")
    ap.add_argument("--db-tokens", default="data/tokens/db")
    ap.add_argument("--embeddings", default="data/db/embeddings.h5")
    ap.add_argument("--metrics", default="metrics/leakage.json")
    ap.add_argument("--plot", default="metrics/leakage.csv", help="loss against overlap per bucket (CSV)")
    args = ap.parse_args(argv)

    p = P.load(args.params)
    max_overlap = p.get("leakage.max_overlap", (float, type(None)))
    max_samples = p.get("leakage.max_samples", int)
    batch_size = p.get("leakage.batch_size", int)  # > 0: params.KNOWN checks the range
    inputs = PretrainInputs(args.tokens, args.neighbors, args.db_tokens, args.embeddings)
    metrics, t = run_leakage(inputs, args.retro, args.gpt, max_overlap, max_samples, batch_size)
    write_json(args.metrics, metrics)
    write_csv(args.plot, plot_rows(metrics))
    per = 1000 / max(t["chunks"], 1)
    print(f"leakage: {metrics['chunks']} chunks of {metrics['samples']} samples; overlap {t['overlap_s'] * per:.3f} s "
          f"per 1,000 chunks, forward passes {t['forward_s'] * per:.2f} s", file=sys.stderr)
    for name, b in metrics["buckets"].items():
        if b["chunks"]:
            print(f"  overlap {name:>10}: {b['chunks']:5d} chunks, Retro {b['retro_loss']:.4f}, GPT {b['gpt_loss']:.4f}, "
                  f"lead {b['retro_lead']:+.4f}, shuffled {b['retro_loss_shuffled']:.4f}", file=sys.stderr)
    if max_overlap is not None:
        print(f"leakage: val_loss {metrics['val_loss']:.4f}, filtered at {max_overlap} {metrics['val_loss_filtered']:.4f}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
