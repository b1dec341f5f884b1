"""SentencePiece BPE tokenizer with reserved ids for padding and end-of-document.

Ids: 0 = pad, 1 = unk, 2 = end-of-document (EOD). Text is not normalised and whitespace is
kept as is (newline is its own piece, unknown characters fall back to bytes), so
``decode(encode(text)) == text`` for any UTF-8 text.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from .errors import PipelineError

PAD_ID = 0
UNK_ID = 1
EOD_ID = 2


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise PipelineError(f"{path}: tokenizer model not found")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise PipelineError(f"{path}: not a SentencePiece model ({str(exc).splitlines()[0][:200]})") from None
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOD_ID:
            raise PipelineError(
                f"{path}: tokenizer must reserve pad={PAD_ID} and eos/EOD={EOD_ID} "
                f"(has pad={self.sp.pad_id()}, eos={self.sp.eos_id()})"
            )

    pad_id = PAD_ID
    eod_id = EOD_ID

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (PAD_ID, EOD_ID)]
        return self.sp.decode(ids)

    @functools.cached_property
    def continuation_mask(self) -> np.ndarray:
        """``mask[id]`` is True for the byte-fallback pieces ``<0x80>`` .. ``<0xBF>``: UTF-8
        continuation bytes, which only complete a character begun by an earlier token."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                mask[i] = 0x80 <= int(self.sp.id_to_piece(i)[1:-1], 16) <= 0xBF
        return mask


def whole_character_span(tokens: np.ndarray, begin: int, end: int, continuation: np.ndarray) -> tuple[int, int]:
    """``(begin, end)`` moved so that ``tokens[begin:end]`` decodes to whole characters.

    A character spelt by byte-fallback tokens across an edge belongs to the span where it
    starts: continuation-byte tokens at ``begin`` are left to the span before (``begin > 0``),
    and those right after ``end`` are taken in (a UTF-8 character has at most 3 of them).
    """
    b, e = begin, end
    while 0 < begin and b < end and b < begin + 3 and continuation[tokens[b]]:
        b += 1
    while e < len(tokens) and e < end + 3 and continuation[tokens[e]]:
        e += 1
    return b, e


class TrainingError(PipelineError):
    """SentencePiece refused the training text (the stage names the corpus)."""


# SentencePiece skips (or fails on) sentences over its max_sentence_length bytes; longer lines
# are cut into pieces of at most this many bytes for training, at a space where there is one.
MAX_TRAIN_LINE_BYTES = 1 << 14


def split_long_line(line: str, limit: int = MAX_TRAIN_LINE_BYTES) -> list[str]:
    """``line`` in pieces of at most ``limit`` UTF-8 bytes, cut after the last space of each
    piece (or, in a piece without spaces, between two characters)."""
    pieces = []
    data = line.encode("utf-8")
    while len(data) > limit:
        head = data[:limit].decode("utf-8", errors="ignore")  # whole characters only
        cut = head.rfind(" ")
        head = head[: cut + 1] if cut > 0 else head
        pieces.append(head)
        data = data[len(head.encode("utf-8")) :]
    pieces.append(data.decode("utf-8"))
    return [p for p in pieces if p.strip()]


def _sample_lines(texts: Iterable[str], max_bytes: int, stats: dict) -> Iterator[str]:
    used = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            pieces = [line] if len(line) * 4 <= MAX_TRAIN_LINE_BYTES else split_long_line(line)
            if len(pieces) > 1:
                stats["long_lines_split"] = stats.get("long_lines_split", 0) + 1
            for piece in pieces:
                used += len(piece.encode("utf-8"))
                yield piece
        if used >= max_bytes:
            return


def train(texts: Iterable[str], vocab_size: int, sample_bytes: int, stats: dict | None = None) -> bytes:
    """Train a BPE model on the first ``sample_bytes`` of ``texts``; return the model bytes.

    Lines longer than ``MAX_TRAIN_LINE_BYTES`` are split for training; ``stats`` (if given) gets
    ``long_lines_split``, the number of such lines."""
    stats = stats if stats is not None else {}
    stats.setdefault("long_lines_split", 0)
    lines = list(_sample_lines(texts, sample_bytes, stats))
    if not lines:
        raise PipelineError("tokenizer: no text to train on (the database corpus is empty)")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            eos_id=EOD_ID,
            bos_id=-1,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=["\n"],
            allow_whitespace_only_pieces=True,
            split_digits=True,
            hard_vocab_limit=False,
            character_coverage=1.0,
            max_sentence_length=1 << 16,  # > MAX_TRAIN_LINE_BYTES
            shuffle_input_sentence=False,
            input_sentence_size=0,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise TrainingError(f"tokenizer: SentencePiece training failed: {str(exc).splitlines()[0]}") from None
    return model.getvalue()
