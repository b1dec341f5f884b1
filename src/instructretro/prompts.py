"""The chat prompt format, shared by SFT, generation and anything that prompts the model.

A conversation is laid out as the reference does it: ``System: {system}\\n\\n``, then each
retrieved context followed by a blank line, then ``User: {q}\\n\\nAssistant:`` and
`` {answer}`` turns separated by a blank line. ``prompt_segments`` gives the layout as
``[(text, is_answer), ...]``; ``tokenize_segments`` encodes it segment by segment with the
answer mask SFT trains on. The QA prompt of generation (``qa_segments``, ``build_prompt``,
``encode_prompt``) is the same layout with one user turn in a prompt style (``STYLES``), so a
question is tokenized exactly as SFT tokenized its conversations.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .tokenizer import Tokenizer

def prompt_segments(system: str, turns: Sequence[tuple[str, str]], contexts: Sequence[str] = ()) -> list[tuple[str, bool]]:
    """The conversation as ``[(text, is_answer), ...]`` in the reference format.

    ``System: {system}\\n\\n``, then each context followed by a blank line, then
    ``User: {q}\\n\\nAssistant:`` and `` {answer}`` turns separated by a blank line. Joining the
    texts gives the prompt; a conversation that ends with a user turn ends with
    ``Assistant:``, ready for generation. Answers are stripped of surrounding whitespace.
    """
    segs = [(f"System: {system}\n\n", False)]
    segs += [(f"{c.strip()}\n\n", False) for c in contexts]
    for i, (role, text) in enumerate(turns):
        if role == "user":
            segs.append((f"User: {text.strip()}\n\nAssistant:", False))
        else:
            segs.append((" " + text.strip(), True))
            if i < len(turns) - 1:
                segs.append(("\n\n", False))
    return segs


def render(segments: Iterable[tuple[str, bool]]) -> str:
    """The text of a segment list."""
    return "".join(t for t, _ in segments)


def format_prompt(system: str, question: str, contexts: Sequence[str] = ()) -> str:
    """The single-turn prompt ``System: ...\\n\\n[contexts]User: {question}\\n\\nAssistant:``."""
    return render(prompt_segments(system, [("user", question)], contexts))


def tokenize_segments(tok, segments: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids ending in the tokenizer's EOD, a bool per token (answer or final EOD), and where
    the final answer starts.

    Segments are encoded one by one, so the answer mask is exact at the segment boundaries.
    """
    pieces = tok.encode_batch([t for t, _ in segments])
    tokens, answer = [], []
    final_start = 0
    for (_, is_answer), ids in zip(segments, pieces):
        if is_answer:
            final_start = len(tokens)
        tokens += ids
        answer += [is_answer] * len(ids)
    tokens.append(tok.eod_id)
    answer.append(True)
    return np.asarray(tokens, dtype=np.int64), np.asarray(answer, dtype=bool), final_start



# Prompt styles: the user turn and the start of the assistant turn that the answer continues.
STYLES = {
    "short": ("Answer the following question with a short span. {question}", "The answer is"),
    "long": ("Please give a full and complete answer for the question. {question}", ""),
}


def user_turn(question: str, style: str = "short") -> str:
    """The user's message: the task instruction then the question (a '?' is added if missing)."""
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return STYLES[style][0].format(question=question)


def qa_segments(question: str, contexts: Sequence[str], system: str, style: str = "short",
                answer_prefix: bool = True) -> list[str]:
    """The QA prompt as SFT lays out a conversation (``prompt_segments``): system,
    contexts, user turn, ``Assistant:``, then (``answer_prefix``) the style's `` The answer is``."""
    segs = [text for text, _ in prompt_segments(system, [("user", user_turn(question, style))], contexts)]
    prefix = STYLES[style][1]
    return segs + ([f" {prefix}"] if prefix and answer_prefix else [])


def build_prompt(question: str, contexts: Sequence[str], system: str, style: str = "short",
                 answer_prefix: bool = True) -> str:
    """The reference's QA prompt as text."""
    return "".join(qa_segments(question, contexts, system, style, answer_prefix))


def encode_prompt(tokenizer: Tokenizer, question: str, contexts: Sequence[str], system: str, style: str = "short",
                  answer_prefix: bool = True) -> list[int]:
    """Token ids of the prompt, each segment encoded on its own exactly as SFT encodes it."""
    segs = qa_segments(question, contexts, system, style, answer_prefix)
    return [i for ids in tokenizer.encode_batch(segs) for i in ids]

