"""Streaming readers for every input format the pipeline accepts.

- Corpus: JSON lines with a ``text`` field (Megatron's loose-json; other fields ignored;
  ``.jsonl``, ``.ndjson``, ``.jsonlines``, ``.json-lines``, ``.json``), a ``.txt`` file (one
  document), a single file of another extension judged by its content, or a folder of such
  files (any case) read recursively in path order; hidden files and folders and symlinked
  folders are skipped and counted.
- QA: NQ-open JSON lines ``{"question": str, "answer": [str, ...], "ctxs": [...]?}``.
- Instructions: conversations ``{"system"?: str, "messages": [{"role", "content"}, ...]}``
  (``"conversations": [{"from", "value"}]`` is accepted too) or alpaca-style
  ``{"instruction", "input"?, "output"}``; as JSON lines or one JSON list.

Readers yield one record at a time, so memory stays bounded for corpora larger than RAM. Bad
input raises :class:`PipelineError` naming the file and the 1-based line number.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import PipelineError


@dataclass(frozen=True)
class Document:
    text: str
    doc_id: int  # stable 64-bit id: a hash of the text, equal across corpora
    source: str  # "file:line" for messages


def document_id(text: str) -> int:
    """Stable 64-bit id of a document: the same text gets the same id in every corpus."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_valid_split(doc_id: int, valid_fraction: float) -> bool:
    """Deterministic random train/valid split from the document id alone.

    The same document lands in the same split whichever corpus it appears in, as long as the
    fraction is the same.
    """
    return (doc_id >> 16) % 1_000_000 < round(valid_fraction * 1_000_000)


JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".jsonlines", ".json-lines", ".json")
TEXT_SUFFIXES = (".txt",)
CORPUS_SUFFIXES = TEXT_SUFFIXES + JSON_LINES_SUFFIXES
BOM = "\ufeff"
SNIFF_BYTES = 1 << 16  # bytes a single file of another extension is judged by


def is_json_lines(path: Path) -> bool:
    """Whether a corpus file is read as JSON lines: by its extension (``.jsonl``, ``.ndjson``,
    ``.jsonlines``, ``.json-lines``, ``.json``, any case) for a corpus folder's files and
    ``.txt``; a single file of another extension by its content (:func:`sniff_format`)."""
    suffix = path.suffix.lower()
    if suffix in JSON_LINES_SUFFIXES:
        return True
    if suffix in TEXT_SUFFIXES:
        return False
    return sniff_format(path) == "jsonl"


def sniff_format(path: Path) -> str:
    """``jsonl`` when the first non-blank line of the file is a JSON object, ``text`` when its
    first 64 KiB are UTF-8 text; anything else (NUL bytes, invalid UTF-8: a binary file) is an
    error naming the file."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            raise PipelineError(f"{path}: neither JSON lines nor UTF-8 text (invalid UTF-8 at byte {exc.start}); "
                                "a corpus file is JSON lines (.jsonl, .ndjson) or plain text (.txt)") from None
        text = head[: exc.start].decode("utf-8")
    if "\0" in text:
        raise PipelineError(f"{path}: neither JSON lines nor UTF-8 text (it holds NUL bytes); a corpus file is "
                            "JSON lines (.jsonl, .ndjson) or plain text (.txt)")
    first = next((line for line in text.removeprefix(BOM).splitlines() if line.strip()), "")
    if first.lstrip().startswith("{"):
        try:
            return "jsonl" if isinstance(json.loads(first), dict) else "text"
        except (json.JSONDecodeError, RecursionError):
            return "text"
    return "text"


def _walk(root: Path, skipped_files: "SkipCounter") -> list[Path]:
    """The files under ``root`` in path order. A symlinked folder is skipped and counted
    (``symlinked_folder``): DVC does not look inside one when it hashes a dependency folder, so
    a change there would never rerun the stage. A symlinked file is read (DVC hashes its
    content); a link that points nowhere is counted (``broken_symlink``)."""
    files: list[Path] = []

    def visit(folder: Path) -> None:
        for p in sorted(folder.iterdir(), key=lambda q: q.name):
            if p.is_dir():
                if p.is_symlink():
                    skipped_files.add("symlinked_folder")
                else:
                    visit(p)
            elif p.is_file():
                files.append(p)
            elif p.is_symlink():
                skipped_files.add("broken_symlink")

    visit(root)
    return files


def corpus_files(path: str | os.PathLike, skipped_files: "SkipCounter | None" = None) -> list[Path]:
    """The files of a corpus: the path itself, or a folder's files in path order.

    A folder is read recursively; symlinked folders inside it are skipped and counted (see
    :func:`_walk`; give the linked folder itself as the corpus, or copy it in). Extensions are
    case-insensitive (``.txt``, and the JSON-lines ``.jsonl``, ``.ndjson``, ``.jsonlines``,
    ``.json-lines``, ``.json``; ``d.JSONL`` counts). Hidden files and everything in hidden
    folders (a name starting with ``.``) and files with other extensions are skipped and
    counted in ``skipped_files`` (``hidden_file``, ``other_extension``).
    """
    path = Path(path)
    skipped_files = skipped_files if skipped_files is not None else SkipCounter()
    if path.is_dir():
        files = []
        for p in _walk(path, skipped_files):
            if any(part.startswith(".") for part in p.relative_to(path).parts):
                skipped_files.add("hidden_file")
            elif p.suffix.lower() not in CORPUS_SUFFIXES:
                skipped_files.add("other_extension")
            else:
                files.append(p)
        if not files:
            raise PipelineError(f"{path}: folder holds no corpus files ({', '.join(CORPUS_SUFFIXES)}; "
                                f"hidden files and folders and symlinked folders are skipped)")
        return files
    if not path.exists():
        raise PipelineError(f"{path}: corpus file not found")
    return [path]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Decoded lines with 1-based numbers; a UTF-8 byte-order mark at the file start is dropped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PipelineError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
            yield lineno, (line[1:] if lineno == 1 and line.startswith(BOM) else line)


def _check_surrogates(where: str, value) -> None:
    """A JSON ``\\ud800`` escape that is not half of a pair gives a str that is not Unicode."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = f"{ord(exc.object[exc.start]):04x}"
        raise PipelineError(f"{where}: lone UTF-16 surrogate \\u{bad} in a string "
                            "(a \\uD800-\\uDFFF escape must be half of a pair)") from None


def _parse_json(where: str, text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{where}: malformed JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise PipelineError(f"{where}: JSON nested too deeply to read") from None
    if "\\u" in text and re.search(r"\\u[dD][89a-fA-F]", text):
        _check_surrogates(where, value)
    return value


def _json_line(path: Path, lineno: int, line: str):
    return _parse_json(f"{path}:{lineno}", line)


class SkipCounter(dict):
    """Counts documented skips by reason, e.g. ``{"blank_document": 3}``."""

    def add(self, reason: str, n: int = 1) -> None:
        self[reason] = self.get(reason, 0) + n


def iter_documents(path: str | os.PathLike, skipped: SkipCounter | None = None,
                   skipped_files: SkipCounter | None = None) -> Iterator[Document]:
    """Yield the documents of a corpus in a fixed order. Blank documents are skipped and counted
    in ``skipped``; files a folder holds but the corpus does not read in ``skipped_files``."""
    skipped = skipped if skipped is not None else SkipCounter()
    for file in corpus_files(path, skipped_files):
        if is_json_lines(file):
            for lineno, line in _lines(file):
                if not line.strip():
                    continue
                rec = _json_line(file, lineno, line)
                if not isinstance(rec, dict) or "text" not in rec:
                    raise PipelineError(f"{file}:{lineno}: expected a JSON object with a 'text' field")
                text = rec["text"]
                if not isinstance(text, str):
                    raise PipelineError(f"{file}:{lineno}: 'text' must be a string, got {type(text).__name__}")
                if not text.strip():
                    skipped.add("blank_document")
                    continue
                yield Document(text, document_id(text), f"{file}:{lineno}")
        else:
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = raw[: exc.start].count(b"\n") + 1
                raise PipelineError(f"{file}:{line}: invalid UTF-8 ({exc.reason})") from None
            text = text[1:] if text.startswith(BOM) else text
            if not text.strip():
                skipped.add("blank_document")
                continue
            yield Document(text, document_id(text), f"{file}:1")


def _records(path: Path) -> Iterator[tuple[int, object]]:
    """JSON lines, or one JSON list (``.json`` starting with '[') with the list index as line."""
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    if path.suffix.lower() == ".json":
        with open(path, "rb") as f:
            head = f.read(64).removeprefix(BOM.encode()).lstrip()
        if head.startswith(b"["):
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PipelineError(f"{path}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
            data = _parse_json(str(path), text.removeprefix(BOM))
            for i, rec in enumerate(data, 1):
                yield i, rec
            return
    for lineno, line in _lines(path):
        if line.strip():
            yield lineno, _json_line(path, lineno, line)


def iter_qa(path: str | os.PathLike) -> Iterator[dict]:
    """Yield NQ-open records ``{"question", "answer": [..], "ctxs"?: [..]}``, validated.

    An empty gold answer (``""`` or blanks) is an error naming the file and line (it would
    count as matched by an empty prediction), and so is a file with no questions.
    """
    path = Path(path)
    count = 0
    for lineno, rec in _records(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise PipelineError(f"{where}: expected a JSON object")
        q = rec.get("question")
        if not isinstance(q, str) or not q.strip():
            raise PipelineError(f"{where}: 'question' must be a non-empty string")
        ans = rec.get("answer", rec.get("answers"))
        if isinstance(ans, str):
            ans = [ans]
        if not isinstance(ans, list) or not ans or not all(isinstance(a, str) for a in ans):
            raise PipelineError(f"{where}: 'answer' must be a non-empty list of strings")
        if any(not a.strip() for a in ans):
            raise PipelineError(f"{where}: 'answer' holds an empty gold answer; remove it from the list")
        out = {"question": q, "answer": ans}
        ctxs = _ctxs(rec, where)
        if ctxs is not None:
            out["ctxs"] = ctxs
        count += 1
        yield out
    if count == 0:
        raise PipelineError(f"{path}: no questions in the QA file")


def _ctxs(rec: dict, where: str) -> list[str] | None:
    """A record's given passages ``ctxs`` (strings or ``{"title", "text"}``) as texts; None if absent."""
    ctxs = rec.get("ctxs")
    if ctxs is None:
        return None
    if not isinstance(ctxs, list):
        raise PipelineError(f"{where}: 'ctxs' must be a list")
    texts = []
    for c in ctxs:
        if isinstance(c, str):
            texts.append(c)
        elif isinstance(c, dict) and isinstance(c.get("text"), str):
            title = c.get("title")
            texts.append(f"{title}\n{c['text']}" if isinstance(title, str) and title else c["text"])
        else:
            raise PipelineError(f"{where}: each of 'ctxs' must be a string or {{'title', 'text'}}")
    return texts


ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "system": "system"}


def _system(rec: dict, where: str) -> str:
    system = rec.get("system")
    if system is None:
        return ""
    if not isinstance(system, str):
        raise PipelineError(f"{where}: 'system' must be a string, got {type(system).__name__}")
    return system


def _with_ctxs(conv: dict, rec: dict, where: str) -> dict:
    ctxs = _ctxs(rec, where)
    return conv if ctxs is None else {**conv, "ctxs": ctxs}


def iter_conversations(path: str | os.PathLike, fmt: str = "auto") -> Iterator[dict]:
    """Yield ``{"system": str, "turns": [(role, text), ...]}`` from conversation or alpaca records
    (plus ``"ctxs"``: the record's given prompt passages, when it carries them, as in QA files).

    ``fmt`` is ``conversation``, ``alpaca`` or ``auto`` (decided per record by its keys). A
    conversation must alternate user/assistant and end with an assistant turn. ``system`` is a
    string or absent/null; an empty (or blank) user or assistant text is an error naming the file
    and line, as is a file with no records.
    """
    path = Path(path)
    count = 0
    for lineno, rec in _records(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise PipelineError(f"{where}: expected a JSON object")
        kind = fmt
        if kind == "auto":
            kind = "alpaca" if "instruction" in rec else "conversation"
        if kind == "alpaca":
            ins, inp, out = rec.get("instruction"), rec.get("input", ""), rec.get("output")
            if inp is None:
                inp = ""
            if not isinstance(ins, str) or not isinstance(out, str) or not isinstance(inp, str):
                raise PipelineError(f"{where}: alpaca record needs string 'instruction' and 'output' (and optional 'input')")
            if not ins.strip():
                raise PipelineError(f"{where}: alpaca 'instruction' is empty")
            if not out.strip():
                raise PipelineError(f"{where}: alpaca 'output' (the assistant answer) is empty")
            user = ins if not inp.strip() else f"{ins}\n\n{inp}"
            count += 1
            yield _with_ctxs({"system": _system(rec, where), "turns": [("user", user), ("assistant", out)]}, rec, where)
            continue
        if kind != "conversation":
            raise PipelineError(f"{where}: unknown instruction format {fmt!r} (use conversation, alpaca or auto)")
        msgs = rec.get("messages", rec.get("conversations"))
        if not isinstance(msgs, list) or not msgs:
            raise PipelineError(f"{where}: conversation record needs a non-empty 'messages' list")
        turns = []
        system = _system(rec, where)
        for m in msgs:
            if not isinstance(m, dict):
                raise PipelineError(f"{where}: each message must be an object")
            role = m.get("role", m.get("from"))
            text = m.get("content", m.get("value"))
            role = ROLES.get(str(role).lower()) if role is not None else None
            if role is None or not isinstance(text, str):
                raise PipelineError(f"{where}: message needs role user/assistant and string content")
            if role == "system":  # a system message in the list stands for the record's system prompt
                system = system or text
                continue
            if not text.strip():
                raise PipelineError(f"{where}: empty {role} message")
            turns.append((role, text))
        if not turns or turns[-1][0] != "assistant" or any(turns[i][0] == turns[i + 1][0] for i in range(len(turns) - 1)):
            raise PipelineError(f"{where}: turns must alternate user/assistant and end with an assistant turn")
        count += 1
        yield _with_ctxs({"system": system, "turns": turns}, rec, where)
    if count == 0:
        raise PipelineError(f"{path}: no records in the instruction file")
