"""How much of the text to predict could a model copy from the neighbors it is given?

Not a test: a diagnostic of the retrieval data, before any training. For every scored position
of a split (the label is the next token), it looks at the neighbors that position's chunked
cross-attention reads (those of the last chunk that ended at or before it, the same tensors the
pretrain stage trains on) and counts:

- ``label in nb``: the label token occurs somewhere in those neighbors;
- ``bigram in nb``: the pair (current token, label) occurs in them, so a copy by content
  (find my token in the neighbor, read the one after it) could produce the label;
- ``prev-token copy``: the probability such a copy gives the label when it spreads its
  attention evenly over every occurrence of the current token (0 where there is none);
- ``unambiguous``: every occurrence of the current token is followed by the label.

The same counts with *shuffled* neighbors (each sample reads those of the sample half the split
away, as ``val_loss_shuffled`` does) are the chance level. Rows: labels that state a fact (the
default world records them), the other labels, all. Run it after ``dvc repro query-neighbors``::

    .venv/bin/python experiments/neighbor_overlap.py               # valid split, params.yaml
    .venv/bin/python experiments/neighbor_overlap.py --split train --max-samples 500
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "stages"))

from instructretro import params as P  # noqa: E402
from instructretro.pretrain_data import load_split  # noqa: E402
from instructretro.tokenstore import TokenStore  # noqa: E402
from pretrain import add_input_args, inputs_from_args, model_config_from_params  # noqa: E402

COLUMNS = ("label in nb", "bigram in nb", "prev-token copy", "unambiguous")


def overlap_counts(tokens, labels, fact_mask, neighbors, neighbor_mask, chunk_length: int, counts) -> None:
    """Add one sample's counts to ``counts`` (keys ``(row, column)`` and ``(row, "n")``).

    tokens, labels, fact_mask (T,); neighbors, neighbor_mask (C, k, R).
    """
    L = chunk_length
    for i in range(L - 1, len(labels)):
        c = (i + 1) // L - 1  # the chunk whose neighbors position i reads
        nb = neighbors[c][neighbor_mask[c]].tolist()
        row = "fact" if fact_mask is not None and fact_mask[i] else "other"
        x, y = int(tokens[i]), int(labels[i])
        after = [nb[p + 1] for p in range(len(nb) - 1) if nb[p] == x]
        for r in (row, "all"):
            counts[r, "n"] += 1
            counts[r, "label in nb"] += y in nb
            counts[r, "bigram in nb"] += y in after
            counts[r, "prev-token copy"] += after.count(y) / len(after) if after else 0.0
            counts[r, "unambiguous"] += bool(after) and all(a == y for a in after)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(ap)
    ap.add_argument("--split", choices=("train", "valid"), default="valid")
    ap.add_argument("--max-samples", type=int, default=0, help="0: every sample of the split")
    args = ap.parse_args(argv)
    p = P.load(args.params)
    vocab = TokenStore(args.tokens, "train").vocab_size
    config = dataclasses.replace(model_config_from_params(p, vocab), retro=True)  # neighbors even for GPT params
    inputs = inputs_from_args(args, p)
    samples = load_split(inputs, config, args.split, fact_flags=True)
    n = len(samples) if args.max_samples <= 0 else min(args.max_samples, len(samples))
    tables = {}
    for shuffled in (False, True):
        counts = defaultdict(float)
        for s in range(n):
            b = samples.batch([s], shuffled_neighbors=shuffled)
            fm = b["fact_mask"][0].numpy() if "fact_mask" in b else None
            overlap_counts(b["tokens"][0].numpy(), b["labels"][0].numpy(), fm, b["neighbors"][0].numpy(),
                           b["neighbor_mask"][0].numpy().astype(bool), config.chunk_length, counts)
        tables["shuffled" if shuffled else "own"] = counts
    print(f"neighbor overlap: {args.split} split, {n} samples of {config.seq_length} tokens, "
          f"chunk {config.chunk_length}, k={config.num_neighbors} neighbor(s) of {config.neighbor_length} tokens")
    print(f"{'labels':8s} {'count':>7s}  " + "  ".join(f"{c:>15s}" for c in COLUMNS) + "   (shuffled neighbors in brackets)")
    own, sh = tables["own"], tables["shuffled"]
    for row in ("fact", "other", "all"):
        if not own[row, "n"]:
            continue
        cells = [f"{own[row, c] / own[row, 'n']:.3f} ({sh[row, c] / max(sh[row, 'n'], 1):.3f})" for c in COLUMNS]
        print(f"{row:8s} {int(own[row, 'n']):7d}  " + "  ".join(f"{c:>15s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
