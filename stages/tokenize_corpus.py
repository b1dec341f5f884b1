"""Stage tokenize@{db,pretrain}: encode one corpus into a token store (train and valid apart).

Documents are split into train and valid at random by a hash of their text, so the same
document lands in the same split in both corpora when the fractions agree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from instructretro import data, params as P
from instructretro.errors import PipelineError, cli
from instructretro.io import atomic_path, write_json
from instructretro.progress import progress
from instructretro.tokenizer import Tokenizer
from instructretro.tokenstore import TokenStoreWriter


def tokenize_corpus(corpus: str, tok: Tokenizer, valid_fraction: float, out: Path, batch: int = 256) -> dict:
    """Encode every document of ``corpus`` into a token store at ``out``; return the metrics."""
    skipped = data.SkipCounter()
    skipped_files = data.SkipCounter()
    t0 = time.time()
    with atomic_path(out) as tmp:
        writer = TokenStoreWriter(tmp, tok.vocab_size, tok.eod_id)
        docs = data.iter_documents(corpus, skipped, skipped_files)
        pending: list[data.Document] = []
        bar = progress(desc=f"tokenize {corpus}", unit="doc")

        def flush():
            for doc, ids in zip(pending, tok.encode_batch([d.text for d in pending])):
                if not ids:
                    skipped.add("no_tokens")
                    continue
                split = "valid" if data.is_valid_split(doc.doc_id, valid_fraction) else "train"
                writer.add(split, doc.doc_id, ids)
            bar.update(len(pending))
            pending.clear()

        for doc in docs:
            pending.append(doc)
            if len(pending) >= batch:
                flush()
        flush()
        bar.close()
        meta = writer.close({"corpus": corpus, "valid_fraction": valid_fraction})
        if meta["train_documents"] + meta["valid_documents"] == 0:
            raise PipelineError(f"{corpus}: corpus is empty (no non-blank documents)")
    metrics = {k: v for k, v in meta.items() if k.endswith(("_documents", "_tokens"))}
    metrics["dropped_documents"] = int(sum(skipped.values()))
    metrics["dropped_by_reason"] = dict(skipped)
    metrics["skipped_files"] = int(sum(skipped_files.values()))
    # hidden_file, other_extension, symlinked_folder, broken_symlink
    metrics["skipped_files_by_reason"] = dict(skipped_files)
    metrics["seconds"] = round(time.time() - t0, 2)
    return metrics


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("which", choices=["db", "pretrain"])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--metrics", required=True)
    args = ap.parse_args(argv)
    p = P.load(args.params)
    corpus = p.get(f"corpus.{args.which}", str)
    frac = p.get(f"tokenize.{args.which}_valid_fraction", float)
    if not 0.0 <= frac < 1.0:
        raise PipelineError(f"params.yaml: tokenize.{args.which}_valid_fraction must be in [0, 1), got {frac}")
    metrics = tokenize_corpus(corpus, Tokenizer(args.tokenizer), frac, Path(args.out))
    write_json(args.metrics, metrics)
    print(f"tokenize {args.which}: {metrics['train_documents']} train / {metrics['valid_documents']} valid documents, "
          f"{metrics['train_tokens'] + metrics['valid_tokens']} tokens, {metrics['dropped_documents']} dropped"
          + (f", {metrics['skipped_files']} files skipped {metrics['skipped_files_by_reason']}"
             if metrics["skipped_files"] else "")
          + ("; a symlinked folder is skipped: DVC does not look inside it, so give it as the corpus itself "
             "or copy it in" if metrics["skipped_files_by_reason"].get("symlinked_folder") else ""))


if __name__ == "__main__":
    main()
