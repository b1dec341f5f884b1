"""The pipeline's tokenizer: our SentencePiece BPE, or the tokenizer of a Hugging Face model.

``Tokenizer(path)`` reads one of:

- our SentencePiece model (a ``.model`` file, or a folder holding ``spm.model``): ids 0 = pad,
  1 = unk, 2 = end-of-document (EOD). Text is not normalised and whitespace is kept as is
  (newline is its own piece, unknown characters fall back to bytes), so
  ``decode(encode(text)) == text`` for any UTF-8 text;
- a Hugging Face tokenizer folder: ``tokenizer.json`` (the ``tokenizers`` library) or else a
  SentencePiece ``tokenizer.model``, with ``tokenizer_config.json`` / ``special_tokens_map.json``
  naming the special tokens. Its EOS is the end-of-document; its pad is its pad token, or the EOS
  when it has none (padded positions are outside the loss and masked out of attention). Text is
  encoded without the special tokens a model adds around a sequence (no BOS): documents, chunks
  and prompt segments are encoded piece by piece and joined with EOS.

No other module assumes particular ids: they read ``pad_id`` / ``eod_id`` from the tokenizer
(or ``eod_id`` from a token store's meta). ``digest`` hashes the tokenizer's files, so a
checkpoint can record the tokenizer it was trained with.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from .errors import PipelineError
from .io import read_json

# Our SentencePiece model's reserved ids (``train`` writes them; only this module uses them).
PAD_ID = 0
UNK_ID = 1
EOD_ID = 2

SPM_FILE = "spm.model"  # our own model inside the tokenizer folder
# The files of a Hugging Face tokenizer (the tokenizer stage copies these, never the weights).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def is_hf_tokenizer_folder(path: str | os.PathLike) -> bool:
    """A folder with ``tokenizer.json`` or ``tokenizer.model`` (and not our ``spm.model``)."""
    p = Path(path)
    return p.is_dir() and not (p / SPM_FILE).is_file() and any(
        (p / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def _special_token(folder: Path, name: str) -> tuple[str | None, Path | None]:
    """The content of special token ``name`` (e.g. ``eos_token``) and the file naming it."""
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / fname
        if not path.is_file():
            continue
        raw = read_json(path)
        value = raw.get(name) if isinstance(raw, dict) else None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value, path
    return None, None


def _byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): each byte is spelt by one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Tokenizer:
    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if path.is_dir() and (path / SPM_FILE).is_file():
            path = path / SPM_FILE
        self.path = path
        self.sp = None  # the SentencePiece processor (ours, or an HF folder's tokenizer.model)
        self.hf = None  # the tokenizers.Tokenizer of an HF folder's tokenizer.json
        if path.is_dir():
            self._open_hf(path)
            return
        if not path.is_file():
            raise PipelineError(f"{path}: tokenizer model not found")
        self.sp = self._open_spm(path)
        if self.sp.pad_id() != PAD_ID or self.sp.eos_id() != EOD_ID:
            raise PipelineError(
                f"{path}: tokenizer must reserve pad={PAD_ID} and eos/EOD={EOD_ID} "
                f"(has pad={self.sp.pad_id()}, eos={self.sp.eos_id()})"
            )
        self.pad_id, self.eod_id = PAD_ID, EOD_ID
        self.files = [path]

    @staticmethod
    def _open_spm(path: Path):
        try:
            return spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise PipelineError(f"{path}: not a SentencePiece model ({str(exc).splitlines()[0][:200]})") from None

    def _open_hf(self, folder: Path) -> None:
        """A Hugging Face tokenizer folder: ``tokenizer.json``, else ``tokenizer.model``."""
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            path = folder / "tokenizer.json"
            try:
                self.hf = HFTokenizer.from_file(str(path))
            except Exception as exc:  # the library raises plain Exception on a bad file
                raise PipelineError(f"{path}: not a tokenizers tokenizer.json ({str(exc).splitlines()[0][:200]})") from None
            to_id = self.hf.token_to_id
        elif (folder / "tokenizer.model").is_file():
            path = folder / "tokenizer.model"
            self.sp = self._open_spm(path)

            def to_id(piece: str) -> int | None:
                i = self.sp.piece_to_id(piece)
                return i if self.sp.id_to_piece(i) == piece else None
        else:
            raise PipelineError(f"{folder}: no tokenizer.json or tokenizer.model (not a Hugging Face tokenizer folder)")
        self.files = [folder / f for f in HF_TOKENIZER_FILES if (folder / f).is_file()]
        eos, named_in = _special_token(folder, "eos_token")
        eod = to_id(eos) if eos is not None else None
        if eod is None and self.sp is not None and self.sp.eos_id() >= 0:
            eod = self.sp.eos_id()  # the SentencePiece model's own EOS
        if eod is None:
            where = named_in or folder / "tokenizer_config.json"
            what = f"its eos_token {eos!r} is not in the vocabulary of {path.name}" if eos else "it names no eos_token"
            raise PipelineError(f"{where}: {what}; the pipeline ends every document with the tokenizer's EOS")
        pad, _ = _special_token(folder, "pad_token")
        pad_id = to_id(pad) if pad is not None else None
        if pad_id is None and self.sp is not None and self.sp.pad_id() >= 0:
            pad_id = self.sp.pad_id()
        self.eod_id = int(eod)
        self.pad_id = int(pad_id) if pad_id is not None else self.eod_id

    @property
    def kind(self) -> str:
        """``sentencepiece`` (ours), ``hf-sentencepiece`` or ``hf-tokenizers``."""
        if self.hf is not None:
            return "hf-tokenizers"
        return "hf-sentencepiece" if self.path.is_dir() else "sentencepiece"

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 over the tokenizer's files (name and content): what a checkpoint records."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()

    @property
    def vocab_size(self) -> int:
        if self.hf is not None:
            return self.hf.get_vocab_size(with_added_tokens=True)
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=False).ids
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.hf is not None:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        return self.sp.encode(texts)

    def encode_with_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids of ``text`` and the (n, 2) character span ``[begin, end)`` of each token."""
        if self.hf is not None:
            enc = self.hf.encode(text, add_special_tokens=False)
            return list(enc.ids), np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        mapping = self.sp.encode_as_offset_mapping(text)
        return list(mapping["ids"]), np.asarray(mapping["offsets"], dtype=np.int64).reshape(-1, 2)

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry of id ``i`` (e.g. ``</s>`` for the EOS)."""
        return self.hf.id_to_token(int(i)) if self.hf is not None else self.sp.id_to_piece(int(i))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) not in (self.pad_id, self.eod_id)]
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=True)
        return self.sp.decode(ids)

    def check_fits(self, embedding_rows: int, model_file: str | os.PathLike) -> None:
        """Refuse a model whose embedding (``embedding_rows``, from ``model_file``) cannot hold
        this tokenizer's ids."""
        if self.vocab_size > embedding_rows:
            raise PipelineError(f"{self.files[0]}: vocabulary of {self.vocab_size} tokens is larger than the "
                                f"embedding of {model_file} ({embedding_rows} rows): the tokenizer is not the model's")

    @functools.cached_property
    def continuation_mask(self) -> np.ndarray:
        """``mask[id]`` is True for a token that starts with a UTF-8 continuation byte (0x80 ..
        0xBF): it only completes a character begun by an earlier token. Byte-fallback pieces
        ``<0x80>`` .. ``<0xBF>`` (SentencePiece, and tokenizers' byte fallback) and byte-level
        BPE tokens (GPT-2's alphabet) are recognised; other tokens are whole characters."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        if self.hf is None:
            for i in range(self.vocab_size):
                if self.sp.is_byte(i):
                    mask[i] = 0x80 <= int(self.sp.id_to_piece(i)[1:-1], 16) <= 0xBF
            return mask
        byte_piece = re.compile(r"<0x([0-9A-Fa-f]{2})>")
        byte_level = "ByteLevel" in json.dumps(json.loads(self.hf.to_str()).get("decoder"))
        chars = _byte_level_chars() if byte_level else {}
        for piece, i in self.hf.get_vocab(with_added_tokens=False).items():
            m = byte_piece.fullmatch(piece)
            first = int(m.group(1), 16) if m else chars.get(piece[:1]) if byte_level and piece else None
            if first is not None and i < len(mask):
                mask[i] = 0x80 <= first <= 0xBF
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
