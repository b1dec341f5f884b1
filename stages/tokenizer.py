"""Stage tokenizer: train a SentencePiece BPE model on a bounded sample of the database corpus
(or copy an existing ``.model`` named in params) to ``--out``.

Training on the database corpus alone means a change to the pretraining corpus never changes
the tokenizer, so it never invalidates the retrieval database.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from instructretro import data, params as P, tokenizer
from instructretro.errors import PipelineError, cli
from instructretro.io import atomic_path


def build_tokenizer(db_corpus: str, vocab_size: int, sample_bytes: int, existing: str, out: Path) -> dict:
    """Train (or copy ``existing``) the tokenizer to ``out``; return the training stats."""
    stats: dict = {}
    with atomic_path(out) as tmp:
        if existing:
            if not Path(existing).is_file():
                raise PipelineError(f"params.yaml: tokenizer.model points to {existing}, which does not exist")
            tokenizer.Tokenizer(existing)  # a bad file is named as the user wrote it, not as the copy
            shutil.copyfile(existing, tmp)
        else:
            texts = (d.text for d in data.iter_documents(db_corpus))
            try:
                tmp.write_bytes(tokenizer.train(texts, vocab_size, sample_bytes, stats))
            except tokenizer.TrainingError as exc:
                raise PipelineError(f"{db_corpus}: {exc}") from None
        tokenizer.Tokenizer(tmp)  # validates the reserved ids
    return stats


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/tokenizer/spm.model")
    args = ap.parse_args(argv)
    p = P.load(args.params)
    vocab = P.positive("tokenizer.vocab_size", p.get("tokenizer.vocab_size", int))
    sample = P.positive("tokenizer.sample_bytes", p.get("tokenizer.sample_bytes", int))
    stats = build_tokenizer(p.get("corpus.db", str), vocab, sample, p.get("tokenizer.model", str), Path(args.out))
    split = stats.get("long_lines_split", 0)
    print(f"tokenizer: wrote {args.out} ({tokenizer.Tokenizer(args.out).vocab_size} pieces)"
          + (f"; {split} lines over {tokenizer.MAX_TRAIN_LINE_BYTES} bytes were split at spaces for training"
             if split else ""))


if __name__ == "__main__":
    main()
