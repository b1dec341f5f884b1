"""Greedy decoding for Retro and GPT with a KV cache and per-chunk retrieval.

Layout of a batch: each prompt is left-padded so it ends on a chunk boundary (the reference set
the chunk length to the prompt length for the same effect: with the causal shift, a chunk's
neighbors only help from its last token on), then whole pad chunks are added on the left so all
rows end at the same position. Pad positions hold ``pad_id`` (the tokenizer's pad, so a
padded chunk decodes to the text the caller's retrieval expects) and are masked out of attention. Row ``b``'s own chunk
``j`` (0 = its first chunk holding a prompt token) is padded chunk ``j + offset[b]``.

Retrieval: ``neighbors_fn(b, j, chunk_tokens)`` is called once for every chunk of a row when the
chunk completes: for the prompt's chunks before the first forward pass, then whenever a
generated token ends a chunk (the call happens before that token goes through the model, since
the token ending chunk j is the first to use chunk j's neighbors). It returns ``(tokens (k,R),
mask (k,R))`` or None (no neighbors). Rows that have stopped are not asked again.

With ``use_cache=True`` each new token costs one incremental forward (self-attention keys and
values cached, the encoder run once per completed chunk); ``use_cache=False`` re-runs the whole
sequence, encoder included, for every new token as the reference did (for benchmarks/tests).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import PipelineError
from .model import KVCache, Retro


def _as_neighbors(result, k: int, R: int, where: str, pad_id: int):
    """Normalise a neighbors_fn result to int64 (k,R) tokens and bool (k,R) mask (None: masked)."""
    tokens = torch.full((k, R), pad_id, dtype=torch.long)
    mask = torch.zeros(k, R, dtype=torch.bool)
    if result is None:
        return tokens, mask
    try:
        got_tokens, got_mask = result
    except (TypeError, ValueError):
        raise PipelineError(f"{where}: neighbors_fn must return (tokens, mask) or None") from None
    got_tokens = torch.as_tensor(np.asarray(got_tokens), dtype=torch.long)
    got_mask = torch.as_tensor(np.asarray(got_mask), dtype=torch.bool)
    if got_tokens.dim() != 2 or got_tokens.shape != got_mask.shape or got_tokens.shape[1] > R:
        raise PipelineError(
            f"{where}: neighbors_fn returned tokens {tuple(got_tokens.shape)} and mask "
            f"{tuple(got_mask.shape)}; expected equal shapes (k, <= {R})"
        )
    n, r = min(k, got_tokens.shape[0]), got_tokens.shape[1]
    tokens[:n, :r] = got_tokens[:n]
    mask[:n, :r] = got_mask[:n]
    return tokens, mask


@torch.no_grad()
def greedy_generate(model: Retro, prompts: list[list[int]], max_new_tokens: int, eod_id: int,
                    neighbors_fn=None, use_cache: bool = True, pad_id: int | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt; returns the new tokens per prompt.

    A row stops after emitting ``eod_id`` (kept as its last token; -1: never) or
    ``max_new_tokens`` tokens. ``neighbors_fn`` is only used by a Retro model (see the module
    docstring). ``pad_id`` fills padded positions: the generate stage gives the tokenizer's pad;
    by default id 0, which every vocabulary has (a masked position may hold any id, but the
    chunks handed to ``neighbors_fn`` hold it, so it is one fixed id).
    """
    cfg = model.config
    L = cfg.chunk_length
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise PipelineError("greedy_generate: empty prompt (the first token needs a context)")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    B = len(prompts)
    if pad_id is None:
        pad_id = 0

    # Layout: left-pad every prompt to a chunk boundary, then to the longest prompt.
    own_chunks = [-(-len(p) // L) for p in prompts]
    prompt_len = max(own_chunks) * L
    total = prompt_len + max_new_tokens
    tokens = torch.full((B, total), pad_id, dtype=torch.long)
    pad_mask = torch.ones(B, total, dtype=torch.bool)
    offset = []  # padded chunk index of row b's chunk 0
    for b, p in enumerate(prompts):
        tokens[b, prompt_len - len(p):prompt_len] = torch.as_tensor(p, dtype=torch.long)
        pad_mask[b, :prompt_len - len(p)] = False
        offset.append(max(own_chunks) - own_chunks[b])

    retro = cfg.retro and neighbors_fn is not None
    k, R = cfg.num_neighbors, cfg.neighbor_length
    n_chunks = total // L
    nb_tokens = torch.full((B, n_chunks, k, R), pad_id, dtype=torch.long)
    nb_mask = torch.zeros(B, n_chunks, k, R, dtype=torch.bool)
    done = [False] * B

    def retrieve(chunks):
        """Call neighbors_fn for padded chunks ``chunks`` of every live row."""
        if not retro:
            return
        for c in chunks:
            for b in range(B):
                j = c - offset[b]
                if j < 0 or done[b]:
                    continue
                chunk = tokens[b, c * L:(c + 1) * L].tolist()
                nb_tokens[b, c], nb_mask[b, c] = _as_neighbors(
                    neighbors_fn(b, j, chunk), k, R, f"neighbors_fn(b={b}, j={j})", pad_id)

    def neighbors_for(start, end):
        """Neighbors of the chunks completing in positions [start, end) (None if none at all)."""
        lo, hi = start // L, end // L
        if not retro or hi == lo or not nb_mask[:, lo:hi].any():
            return None, None
        return nb_tokens[:, lo:hi].to(device), nb_mask[:, lo:hi].to(device)

    out = [[] for _ in range(B)]
    cache = KVCache(model, B, total, pad_mask.to(device)) if use_cache else None
    retrieve(range(prompt_len // L))
    pos = 0  # tokens[:, :pos] have gone through the model (cached mode)
    cur = prompt_len  # tokens[:, :cur] are known
    while True:
        if use_cache:
            nb, nm = neighbors_for(pos, cur)
            logits = model(tokens[:, pos:cur].to(device), nb, nm, cache=cache)[:, -1]
            pos = cur
        else:  # the reference's way: the whole sequence again, with a fresh cache
            nb, nm = neighbors_for(0, cur)
            fresh = KVCache(model, B, cur, pad_mask[:, :cur].to(device))
            logits = model(tokens[:, :cur].to(device), nb, nm, cache=fresh)[:, -1]
        next_tokens = logits.argmax(dim=-1).cpu()
        tokens[:, cur] = next_tokens
        for b in range(B):
            if not done[b]:
                out[b].append(int(next_tokens[b]))
                done[b] = int(next_tokens[b]) == eod_id or len(out[b]) >= max_new_tokens
        cur += 1
        if all(done):
            return out
        if cur % L == 0:  # the token just appended ends chunk cur // L - 1
            retrieve([cur // L - 1])
