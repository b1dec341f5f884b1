"""Serve the instruction-tuned model over HTTP (``make serve``): OpenAI-compatible completions,
retrieval, and documents added while serving. docs/qa.md describes every endpoint.

One process holds the model, the database and its overlay of added documents
(``overlay.LiveRetriever``) and a decoding worker (``batching.Batcher``). Request handlers are
async (Starlette on uvicorn); the model work runs in threads, so a request that waits for its
batch holds no event loop. Questions go through ``ask.Assistant.answer`` (the generate stage's
code); completions and chat build their prompts with the generate module's pieces and decode
through the same worker. Bad input is a 4xx JSON error ``{"error": {"message", "type", "param"}}``
of one sentence and never stops the server.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path

import anyio
import numpy as np
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from .ask import Assistant, add_path_args, assistant_from_args
from .batching import Batcher, Busy, Coalescer
from .errors import PipelineError, cli
from .generate import MODES, EncoderNeighbors, clean_prediction, prompt_budget
from .model import KVCache
from .overlay import MAX_DOCUMENT_CHARS, MAX_ID_CHARS
from .prompts import STYLES, prompt_segments

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_DOCUMENTS = 64  # per request
MAX_TOP_LOGPROBS = 20
MAX_RETRIEVE_K = 100
MAX_PROMPTS = 64  # prompts in one completions request


class BadRequest(Exception):
    """A client error: HTTP ``status`` with a one-sentence message."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


def error_response(message: str, status: int, param=None, kind="invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


# ----------------------------------------------------------------------------- request fields


def _field(body: dict, name: str, types, default=None, required: bool = False):
    """``body[name]`` checked against ``types`` (bool is not an int here)."""
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"'{name}' is required.", param=name)
        return default
    value = body[name]
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        raise BadRequest(f"'{name}' must be {_type_names(types)}, not a boolean.", param=name)
    if not isinstance(value, types):
        raise BadRequest(f"'{name}' must be {_type_names(types)}, not {type(value).__name__}.", param=name)
    return value


def _type_names(types) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


async def _json_body(request: Request) -> dict:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refused before it is read
        raise BadRequest(f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}.", status=413)
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"the request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}.", status=413)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc.__class__.__name__}: {str(exc).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object.")
    return data


# ----------------------------------------------------------------------------- the service


class Service:
    """The loaded assistant, the decoding worker and the request logic (no HTTP in here)."""

    def __init__(self, assistant: Assistant, model_name: str = "instructretro", max_batch: int = 16,
                 max_queue: int = 64, gather_ms: float = 0.0):
        self.a = assistant
        self.model_name = model_name
        self.batcher = Batcher(assistant.model, max_batch=max_batch, max_queue=max_queue, gather_s=gather_ms / 1000)
        # the retrieval queries of requests that arrive together are embedded together too
        assistant.retriever.encode = Coalescer(assistant.retriever.encoder.encode, max_items=max_batch,
                                               max_queue=max_queue, name="encode-batcher", gather_s=gather_ms / 1000)
        self.tok = assistant.tokenizer
        self.cfg = assistant.config
        self.L = assistant.chunk_length
        self.max_tokens_limit = self.cfg.seq_length - self.L  # at least one chunk of prompt
        self.started = time.time()

    # ---------------------------------------------------------------- shared checks

    def check_model(self, body: dict) -> None:
        name = _field(body, "model", str)
        if name is not None and name != self.model_name:
            raise BadRequest(f"unknown model '{name}'; this server has '{self.model_name}'.", status=404,
                             param="model", kind="model_not_found")

    def settings(self, body: dict, max_tokens_default: int | None = None):
        retrieval = _field(body, "retrieval", str)
        if retrieval is not None and retrieval not in MODES:
            raise BadRequest(f"'retrieval' must be one of {list(MODES)}, not '{retrieval}'.", param="retrieval")
        if retrieval in ("encoder", "both") and self.a.num_neighbors <= 0:
            raise BadRequest(f"retrieval '{retrieval}' needs a Retro model; this one has no encoder.", param="retrieval")
        num_contexts = _field(body, "num_contexts", int)
        if num_contexts is not None and not 0 <= num_contexts <= MAX_RETRIEVE_K:
            raise BadRequest(f"'num_contexts' must be between 0 and {MAX_RETRIEVE_K}.", param="num_contexts")
        max_tokens = _field(body, "max_tokens", int)
        if max_tokens is None:
            max_tokens = _field(body, "max_completion_tokens", int)
        if max_tokens is not None and not 0 <= max_tokens <= self.max_tokens_limit:
            raise BadRequest(f"'max_tokens' is {max_tokens}; this model takes 0 to {self.max_tokens_limit}.",
                             param="max_tokens")
        if max_tokens is None:
            max_tokens = max_tokens_default if max_tokens_default is not None else self.a.settings.max_new_tokens
        temperature = _field(body, "temperature", (int, float))
        if temperature is not None and temperature < 0:
            raise BadRequest("'temperature' must be >= 0.", param="temperature")
        n = _field(body, "n", int, 1)
        if n != 1:
            raise BadRequest("only 'n' = 1 is supported (decoding is greedy).", param="n")
        return self.a.settings_for(retrieval, num_contexts, max_tokens)

    @staticmethod
    def stops(body: dict) -> list[str]:
        stop = body.get("stop")
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise BadRequest("'stop' must be a string or a list of at most 4 strings.", param="stop")
        return [s for s in stop if s]

    # ---------------------------------------------------------------- retrieval

    def retrieve(self, query: str, k: int) -> list[dict]:
        ids, scores = self.a.retriever.search_scored([query], k)
        r = self.a.retriever
        return [{"id": int(i), "doc_id": r.doc_id(int(i)), "source": r.source(int(i)), "score": round(float(s), 6),
                 "text": r.chunk_text(int(i), continuation=False)} for i, s in zip(ids[0], scores[0]) if i >= 0]

    def _contexts(self, query: str, settings) -> tuple[list[str], list[dict]]:
        """The prompt contexts (texts with continuation) for ``query`` in modes prompt/both."""
        if settings.retrieval not in ("prompt", "both") or settings.num_contexts == 0 or not query.strip():
            return [], []
        ids, scores = self.a.retriever.search_scored([query], settings.num_contexts)
        r = self.a.retriever
        chunks = [{"id": int(i), "doc_id": r.doc_id(int(i)), "source": r.source(int(i)), "score": round(float(s), 6),
                   "used": "prompt", "text": r.chunk_text(int(i), continuation=True)}
                  for i, s in zip(ids[0], scores[0]) if i >= 0]
        return [c["text"] for c in chunks], chunks

    def _encoder(self, settings):
        if settings.retrieval not in ("encoder", "both"):
            return None
        return EncoderNeighbors(self.a.retriever, self.tok, self.a.num_neighbors, self.L)

    def _encoder_chunks(self, enc, row: int = 0) -> list[dict]:
        if enc is None:
            return []
        r = self.a.retriever
        seen = dict.fromkeys(i for _, ids in sorted(enc.calls.get(row, [])) for i in ids if i >= 0)
        return [{"id": int(i), "doc_id": r.doc_id(int(i)), "source": r.source(int(i)), "score": None,
                 "used": "encoder", "text": r.chunk_text(int(i), continuation=True)} for i in seen]

    # ---------------------------------------------------------------- decoding

    def _fit(self, context_ids: list[list[int]], tail: list[int], budget: int, what: str) -> tuple[list[int], int]:
        """Contexts dropped from the last until ``contexts + tail`` fits ``budget``; the tail must fit alone."""
        if len(tail) > budget:
            raise BadRequest(f"the {what} is {len(tail)} tokens; with max_tokens the model takes at most {budget} "
                             f"(seq_length {self.cfg.seq_length}).", param="prompt" if what == "prompt" else "messages")
        for n in range(len(context_ids), -1, -1):
            ids = [t for c in context_ids[:n] for t in c] + tail
            if len(ids) <= budget:
                return ids, n
        return tail, 0

    def _decode(self, prompt: list[int], max_tokens: int, enc) -> list[int]:
        if max_tokens == 0:
            return []
        if enc is not None:
            enc.prefetch([prompt])
        out = self.batcher.generate(self.a.model, [prompt], max_tokens, self.tok.eod_id, neighbors_fn=enc,
                                    pad_id=self.tok.pad_id)[0]
        return out

    def _cut(self, new: list[int], stops: list[str]) -> tuple[list[int], str, str]:
        """New tokens without EOD, their text cut at the first stop, and the finish reason."""
        finish = "length"
        if self.tok.eod_id in new:
            new, finish = new[: new.index(self.tok.eod_id)], "stop"
        text = self.tok.decode(new)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            cut = min(hits)
            text, finish = text[:cut], "stop"
            keep = 0
            while keep < len(new) and len(self.tok.decode(new[: keep + 1])) <= cut:
                keep += 1
            new = new[:keep]
        return new, text, finish

    def score(self, context: list[int], prompt: list[int], new: list[int], enc, top: int) -> tuple[list, list]:
        """Log-probabilities of ``prompt + new`` after ``context`` (None for the very first token)
        and the ``top`` most likely tokens at each position, by one forward pass laid out as the
        decoder lays the sequence out (left-padded to a chunk boundary at the end of the prompt)."""
        ids = context + prompt + new
        L = self.L
        pad = -(len(context) + len(prompt)) % L
        T = pad + len(ids)
        tokens = torch.full((1, T), self.tok.pad_id, dtype=torch.long)
        tokens[0, pad:] = torch.as_tensor(ids, dtype=torch.long)
        pad_mask = torch.zeros(1, T, dtype=torch.bool)
        pad_mask[0, pad:] = True
        model = self.a.model
        device = next(model.parameters()).device
        nb = nm = None
        if enc is not None and self.cfg.retro and T // L > 0:
            k, R = self.cfg.num_neighbors, self.cfg.neighbor_length
            nb = torch.full((1, T // L, k, R), self.tok.pad_id, dtype=torch.long)
            nm = torch.zeros(1, T // L, k, R, dtype=torch.bool)
            for c in range(T // L):
                got = enc(0, c, tokens[0, c * L:(c + 1) * L].tolist())
                if got is not None:
                    t, m = (torch.as_tensor(np.asarray(x)) for x in got)
                    nb[0, c, : t.shape[0], : t.shape[1]], nm[0, c, : m.shape[0], : m.shape[1]] = t, m.bool()
            nb, nm = nb.to(device), nm.to(device)
        with torch.inference_mode():
            cache = KVCache(model, 1, T, pad_mask.to(device))
            logits = model(tokens.to(device), nb, nm, cache=cache)[0].float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        start = len(context)
        token_lp, top_lp = [], []
        for t in range(start, len(ids)):
            if t == 0:
                token_lp.append(None), top_lp.append(None)
                continue
            row = logp[pad + t - 1]
            token_lp.append(float(row[ids[t]]))
            if top > 0:
                vals, idx = row.topk(top)
                top_lp.append({self._piece(int(i)): float(v) for v, i in zip(vals, idx)})
            else:
                top_lp.append({})
        return token_lp, top_lp

    def _piece(self, i: int) -> str:
        if self.tok.sp is None:  # a Hugging Face tokenizer.json: the token's own text
            return self.tok.decode([i]) or self.tok.id_to_token(i)
        piece = self.tok.sp.id_to_piece(i)
        return self.tok.sp.decode([i]) if piece.startswith("<0x") else piece.replace("\u2581", " ")

    def token_strings(self, ids: list[int]) -> tuple[list[str], list[int], str]:
        """Each token's text and character offset in the decoded text, and the text."""
        texts, offsets, prev = [], [], ""
        for k in range(len(ids)):
            cur = self.tok.decode(ids[: k + 1])
            offsets.append(len(prev) if cur.startswith(prev) else len(cur))
            texts.append(cur[len(prev):] if cur.startswith(prev) else self._piece(ids[k]))
            prev = cur
        return texts, offsets, prev

    # ---------------------------------------------------------------- endpoints' work

    def _prompt_ids(self, prompt, param="prompt") -> tuple[list[int], str]:
        if isinstance(prompt, str):
            return self.tok.encode(prompt), prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.tok.vocab_size]
            if bad:
                raise BadRequest(f"token id {bad[0]} is outside the vocabulary (0 to {self.tok.vocab_size - 1}).", param=param)
            return list(prompt), self.tok.decode(prompt)
        raise BadRequest("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists.",
                         param=param)

    def complete(self, body: dict) -> dict:
        """POST /v1/completions (not streamed; streaming replays this result)."""
        self.check_model(body)
        settings = self.settings(body, max_tokens_default=16 if "max_tokens" not in body else None)
        stops = self.stops(body)
        echo = _field(body, "echo", bool, False)
        logprobs = _field(body, "logprobs", int)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}.", param="logprobs")
        prompt = body.get("prompt")
        if prompt is None:
            raise BadRequest("'prompt' is required.", param="prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = prompt
        else:
            prompts = [prompt]
        if not prompts:
            raise BadRequest("'prompt' is empty.", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise BadRequest(f"at most {MAX_PROMPTS} prompts per request.", param="prompt")
        parsed = [self._prompt_ids(p) for p in prompts]
        if any(not ids for ids, _ in parsed) and settings.max_new_tokens > 0:
            raise BadRequest("an empty prompt has nothing to continue.", param="prompt")
        budget = (self.cfg.seq_length if settings.max_new_tokens == 0
                  else prompt_budget(self.cfg.seq_length, settings.max_new_tokens, self.L))
        choices, n_prompt, n_new = [], 0, 0
        for index, (ids, text) in enumerate(parsed):
            ctx_texts, ctx_chunks = self._contexts(text, settings)
            ctx_ids = self.tok.encode_batch([f"{c.strip()}\n\n" for c in ctx_texts]) if ctx_texts else []
            full, used = self._fit(ctx_ids, ids, budget, "prompt")
            context = full[: len(full) - len(ids)]
            enc = self._encoder(settings)
            new = self._decode(full, settings.max_new_tokens, enc)
            new, new_text, finish = self._cut(new, stops)
            choice = {"index": index, "text": (text if echo else "") + new_text, "logprobs": None,
                      "finish_reason": finish,
                      "retrieval": {"mode": settings.retrieval,
                                    "chunks": ctx_chunks[:used] + self._encoder_chunks(enc)}}
            if logprobs is not None:
                shown = (ids if echo else []) + new
                lp, top = self.score(context, ids, new, enc, logprobs)
                lp, top = (lp, top) if echo else (lp[len(ids):], top[len(ids):])
                toks, offsets, _ = self.token_strings(shown)
                if echo and text != self.tok.decode(ids):  # offsets into the text as sent
                    offsets = [min(o, len(text)) for o in offsets]
                choice["logprobs"] = {"tokens": toks, "token_logprobs": lp, "top_logprobs": top, "text_offset": offsets}
            choices.append(choice)
            n_prompt += len(full)
            n_new += len(new)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    def chat(self, body: dict) -> dict:
        """POST /v1/chat/completions (not streamed; streaming replays this result)."""
        self.check_model(body)
        settings = self.settings(body)
        stops = self.stops(body)
        if body.get("logprobs"):
            raise BadRequest("'logprobs' is supported on /v1/completions only.", param="logprobs")
        messages = _field(body, "messages", list, required=True)
        system, turns = None, []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), (str, list)):
                raise BadRequest("each message must be an object with 'role' system, user or assistant and a "
                                 "string 'content'.", param="messages")
            content = m["content"]
            if isinstance(content, list):  # the parts form: [{"type": "text", "text": ...}]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                    raise BadRequest("message content parts must be text parts.", param="messages")
                content = "".join(p["text"] for p in content)
            if m["role"] == "system":
                system = content if system is None else system + "\n" + content
            else:
                turns.append((m["role"], content))
        if not turns or turns[-1][0] != "user":
            raise BadRequest("the last message must be from the user.", param="messages")
        system = self.a.settings.system if system is None else system
        question = turns[-1][1]
        ctx_texts, ctx_chunks = self._contexts(question, settings)
        budget = prompt_budget(self.cfg.seq_length, max(settings.max_new_tokens, 1), self.L)
        # as generate.fit_prompt: each segment encoded on its own; contexts dropped from the last
        head = self.tok.encode(prompt_segments(system, [], [])[0][0])
        ctx_ids = self.tok.encode_batch([f"{c.strip()}\n\n" for c in ctx_texts]) if ctx_texts else []
        tail = [t for ids in self.tok.encode_batch([s for s, _ in prompt_segments("", turns)[1:]]) for t in ids]
        if len(head) + len(tail) > budget:
            raise BadRequest(f"the conversation is {len(head) + len(tail)} tokens; with max_tokens the model "
                             f"takes at most {budget} (seq_length {self.cfg.seq_length}).", param="messages")
        body_ids, used = self._fit(ctx_ids, tail, budget - len(head), "conversation")
        full = head + body_ids
        enc = self._encoder(settings)
        new = self._decode(full, settings.max_new_tokens, enc)
        new, text, finish = self._cut(new, stops)
        content = clean_prediction(text, "long")
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": finish}],
                "retrieval": {"mode": settings.retrieval, "chunks": ctx_chunks[:used] + self._encoder_chunks(enc)},
                "usage": {"prompt_tokens": len(full), "completion_tokens": len(new),
                          "total_tokens": len(full) + len(new)}}

    def ask(self, body: dict) -> dict:
        """POST /v1/ask: one question answered exactly as the generate stage answers it."""
        self.check_model(body)
        question = _field(body, "question", str, required=True)
        if not question.strip():
            raise BadRequest("'question' is empty.", param="question")
        style = _field(body, "style", str, "short")
        if style not in STYLES:
            raise BadRequest(f"'style' must be one of {sorted(STYLES)}.", param="style")
        settings = self.settings(body)
        if settings.max_new_tokens == 0:
            raise BadRequest("'max_tokens' must be at least 1 to answer.", param="max_tokens")
        return self.a.answer([question], settings, style=style, generate_fn=self.batcher.generate)[0]

    def add_documents(self, body: dict) -> dict:
        docs = _field(body, "documents", list, required=True)
        if not docs:
            raise BadRequest("'documents' is empty.", param="documents")
        if len(docs) > MAX_DOCUMENTS:
            raise BadRequest(f"at most {MAX_DOCUMENTS} documents per request.", param="documents")
        clean, seen = [], set()
        for n, d in enumerate(docs):
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise BadRequest(f"document {n} must be an object with a string 'text'.", param="documents")
            if not d["text"].strip():
                raise BadRequest(f"document {n} has an empty 'text'.", param="documents")
            if len(d["text"]) > MAX_DOCUMENT_CHARS:
                raise BadRequest(f"document {n} is {len(d['text'])} characters; the limit is {MAX_DOCUMENT_CHARS}.",
                                 status=413, param="documents")
            doc_id = d.get("id")
            if doc_id is not None and (not isinstance(doc_id, str) or not doc_id.strip() or len(doc_id) > MAX_ID_CHARS
                                       or "/" in doc_id):
                raise BadRequest(f"document {n}: 'id' must be a non-empty string of at most {MAX_ID_CHARS} "
                                 "characters without '/'.", param="documents")
            if doc_id is not None and doc_id in seen:
                raise BadRequest(f"document id '{doc_id}' appears twice in the request.", param="documents")
            seen.add(doc_id)
            clean.append({"text": d["text"], "id": doc_id})
        added = self.a.retriever.add_documents(clean)
        return {"object": "list", "data": added}

    def health(self) -> dict:
        r = self.a.retriever
        return {"status": "ok", "model": self.model_name, "checkpoint": str(self.a.checkpoint),
                "retrieval": self.a.settings.retrieval, "database_chunks": r.n_base,
                "added_documents": len(r.state.ids), "added_chunks": len(r.state),
                "queue": self.batcher.waiting, "max_batch": self.batcher.max_batch,
                "batches": self.batcher.batches, "decoded_prompts": self.batcher.prompts,
                "uptime_s": round(time.time() - self.started, 1)}


# ----------------------------------------------------------------------------- HTTP


def _sse(events) -> StreamingResponse:
    async def gen():
        for e in events:
            yield f"data: {json.dumps(e, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _stream_completion(svc: Service, result: dict) -> StreamingResponse:
    """The finished completion as server-sent events: one event per generated token piece."""
    events = []
    base = {k: result[k] for k in ("id", "created", "model")} | {"object": "text_completion"}
    for ch in result["choices"]:
        pieces = _pieces(svc, ch["text"])
        for n, piece in enumerate(pieces):
            extra = {"retrieval": ch["retrieval"]} if n == 0 else {}
            events.append(base | {"choices": [{"index": ch["index"], "text": piece, "logprobs": None,
                                               "finish_reason": None} | extra]})
        events.append(base | {"choices": [{"index": ch["index"], "text": "", "logprobs": None,
                                           "finish_reason": ch["finish_reason"]}]})
    return _sse(events)


def _stream_chat(svc: Service, result: dict) -> StreamingResponse:
    base = {k: result[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    ch = result["choices"][0]
    events = [base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}], "retrieval": result["retrieval"]}]
    for piece in _pieces(svc, ch["message"]["content"]):
        events.append(base | {"choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}]})
    events.append(base | {"choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": ch["finish_reason"]}],
                          "usage": result["usage"]})
    return _sse(events)


def _pieces(svc: Service, text: str) -> list[str]:
    """``text`` split at token boundaries (joined, the pieces are the text)."""
    if not text:
        return []
    texts, _, _ = svc.token_strings(svc.tok.encode(text))
    return texts if "".join(texts) == text else [text]


def create_app(svc: Service) -> Starlette:
    def endpoint(fn, threaded=True):
        async def handler(request: Request):
            try:
                if threaded:
                    return await anyio.to_thread.run_sync(fn, request, await _body_or_none(request))
                return await fn(request)
            except BadRequest as exc:
                return error_response(str(exc), exc.status, exc.param, exc.kind)
            except Busy as exc:
                return error_response(f"the server is busy: {exc}; retry shortly.", 503, kind="server_busy",
                                      headers={"Retry-After": "1"})
            except PipelineError as exc:
                return error_response(str(exc).splitlines()[0], 400)
            except Exception as exc:  # never kill the server; say what failed in one line
                return error_response(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                      500, kind="server_error")
        return handler

    async def _body_or_none(request: Request):
        return await _json_body(request) if request.method == "POST" else None

    def completions(request, body):
        result = svc.complete(body)
        return _stream_completion(svc, result) if _field(body, "stream", bool, False) else JSONResponse(result)

    def chat(request, body):
        result = svc.chat(body)
        return _stream_chat(svc, result) if _field(body, "stream", bool, False) else JSONResponse(result)

    def retrieve(request, body):
        query = _field(body, "query", str, required=True)
        k = _field(body, "k", int, 5)
        if not 1 <= k <= MAX_RETRIEVE_K:
            raise BadRequest(f"'k' must be between 1 and {MAX_RETRIEVE_K}.", param="k")
        return JSONResponse({"object": "list", "data": svc.retrieve(query, k)})

    def documents_post(request, body):
        return JSONResponse(svc.add_documents(body))

    def documents_get(request, body):
        return JSONResponse({"object": "list", "data": svc.a.retriever.documents()})

    def documents_delete(request, body):
        doc_id = request.path_params["doc_id"]
        if not svc.a.retriever.delete_document(doc_id):
            raise BadRequest(f"no added document with id '{doc_id}'.", status=404, param="id", kind="not_found")
        return JSONResponse({"id": doc_id, "object": "document", "deleted": True})

    def ask(request, body):
        return JSONResponse(svc.ask(body))

    def models(request, body):
        return JSONResponse({"object": "list", "data": [{"id": svc.model_name, "object": "model",
                                                         "created": int(svc.started), "owned_by": "instructretro"}]})

    def health(request, body):
        return JSONResponse(svc.health())

    # lm-evaluation-harness's "remote" tokenizer (vLLM's endpoints): lm-eval then tokenizes as we do
    def tokenizer_info(request, body):
        return JSONResponse({"eos_token": svc.tok.id_to_token(svc.tok.eod_id), "bos_token": None,
                             "pad_token": svc.tok.id_to_token(svc.tok.pad_id), "model_max_length": svc.cfg.seq_length})

    def tokenize(request, body):
        text = _field(body, "prompt", str, required=True)
        eos = svc.tok.id_to_token(svc.tok.eod_id)
        return JSONResponse({"tokens": [svc.tok.eod_id] if text == eos else svc.tok.encode(text)})

    def detokenize(request, body):
        tokens = _field(body, "tokens", list, required=True)
        ids, text = svc._prompt_ids(tokens, param="tokens") if tokens else ([], "")
        return JSONResponse({"prompt": text})

    async def page(request):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        what = "route" if status == 404 else "method"
        return error_response(f"no {what} {request.method} {request.url.path}.", status, kind="not_found")

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
        Route("/v1/ask", endpoint(ask), methods=["POST"]),
        Route("/v1/retrieve", endpoint(retrieve), methods=["POST"]),
        Route("/v1/documents", endpoint(documents_post), methods=["POST"]),
        Route("/v1/documents", endpoint(documents_get), methods=["GET"]),
        Route("/v1/documents/{doc_id:path}", endpoint(documents_delete), methods=["DELETE"]),
        Route("/tokenizer_info", endpoint(tokenizer_info), methods=["GET"]),
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(description="Serve the instruction-tuned model (docs/qa.md).")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-name", default="instructretro", help="the model id clients name")
    ap.add_argument("--max-batch", type=int, default=16, help="prompts decoded together (1: batching off)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting to decode before 503")
    ap.add_argument("--gather-ms", type=float, default=0.0,
                    help="with batching, wait up to this long after a request for others to join its batch")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: generate.threads or torch's default)")
    add_path_args(ap)
    args = ap.parse_args(argv)
    if args.max_batch < 1 or args.max_queue < 1:
        raise PipelineError("serve: --max-batch and --max-queue must be >= 1")
    assistant = assistant_from_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    svc = Service(assistant, args.model_name, args.max_batch, args.max_queue, args.gather_ms)
    import uvicorn

    print(f"serving {args.model_name} ({assistant.checkpoint}) on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(create_app(svc), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
