"""Stage tokenizer: the tokenizer folder every later stage reads (``--out``, ``data/tokenizer``).

Without ``tokenizer.model`` it trains a SentencePiece BPE model on a bounded sample of the
database corpus into ``spm.model``; training on the database corpus alone means a change to the
pretraining corpus never changes the tokenizer, so it never invalidates the retrieval database.
``tokenizer.model`` may instead name our own SentencePiece ``.model`` (copied to ``spm.model``)
or a Hugging Face model folder: then only its tokenizer files (``tokenizer.json`` or
``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json`` and the others of
``tokenizer.HF_TOKENIZER_FILES``) are copied, never its weights or ``config.json``, so new
weights with the same tokenizer leave the folder, and every stage that reads only it, unchanged.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from instructretro import data, params as P, tokenizer
from instructretro.errors import PipelineError, cli
from instructretro.io import atomic_path


def build_tokenizer(db_corpus: str, vocab_size: int, sample_bytes: int, existing: str, out: Path) -> dict:
    """Train (or copy from ``existing``) the tokenizer folder ``out``; return the training stats."""
    stats: dict = {}
    source = Path(existing) if existing else None
    if source is not None and not source.exists():
        raise PipelineError(f"params.yaml: tokenizer.model points to {existing}, which does not exist")
    if source is not None:
        tokenizer.Tokenizer(source)  # a bad file is named as the user wrote it, not as the copy
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        if source is not None and source.is_dir() and tokenizer.is_hf_tokenizer_folder(source):
            for name in tokenizer.HF_TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
        elif source is not None:
            shutil.copyfile(source / tokenizer.SPM_FILE if source.is_dir() else source, tmp / tokenizer.SPM_FILE)
        else:
            texts = (d.text for d in data.iter_documents(db_corpus))
            try:
                (tmp / tokenizer.SPM_FILE).write_bytes(tokenizer.train(texts, vocab_size, sample_bytes, stats))
            except tokenizer.TrainingError as exc:
                raise PipelineError(f"{db_corpus}: {exc}") from None
        tokenizer.Tokenizer(tmp)  # validates the reserved ids / the EOS
    return stats


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/tokenizer")
    args = ap.parse_args(argv)
    p = P.load(args.params)
    vocab = P.positive("tokenizer.vocab_size", p.get("tokenizer.vocab_size", int))
    sample = P.positive("tokenizer.sample_bytes", p.get("tokenizer.sample_bytes", int))
    stats = build_tokenizer(p.get("corpus.db", str), vocab, sample, p.get("tokenizer.model", str), Path(args.out))
    tok = tokenizer.Tokenizer(args.out)
    split = stats.get("long_lines_split", 0)
    print(f"tokenizer: wrote {args.out} ({tok.kind}, {tok.vocab_size} tokens, end-of-document id {tok.eod_id})"
          + (f"; {split} lines over {tokenizer.MAX_TRAIN_LINE_BYTES} bytes were split at spaces for training"
             if split else ""))


if __name__ == "__main__":
    main()
