"""Greedy decoding: cached == uncached == plain forward, batching, retrieval schedule."""

import numpy as np
import pytest
import torch

from instructretro.decoding import greedy_generate
from instructretro.errors import PipelineError
from instructretro.model import ModelConfig, Retro

L = 8
EOD = 2
PROMPT_LENGTHS = (5, 13, 8, 1, 17)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model(retro=True, seed=0, vocab=50):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, n_layers=3, hidden=32, heads=2, seq_length=64,
                      chunk_length=L, cca_layers=(1, 3), num_neighbors=2, retro=retro)
    return Retro(cfg).double().eval()


def prompts(lengths=PROMPT_LENGTHS, seed=0):
    g = np.random.default_rng(seed)
    return [[int(x) for x in g.integers(3, 50, n)] for n in lengths]


class Neighbors:
    """A neighbors_fn that depends only on the chunk's tokens and records its calls."""

    def __init__(self, k=2, R=2 * L, none_for=()):
        self.k, self.R, self.none_for = k, R, set(none_for)
        self.calls = []

    def __call__(self, b, j, chunk_tokens):
        self.calls.append((b, j, list(chunk_tokens)))
        if (b, j) in self.none_for:
            return None
        g = np.random.default_rng(abs(hash(tuple(chunk_tokens))) % 2**32)
        return g.integers(3, 50, (self.k, self.R)), g.random((self.k, self.R)) > 0.25


@pytest.mark.parametrize("retro", [True, False])
def test_cached_equals_uncached_for_a_batch_of_different_lengths(retro):
    m = model(retro)
    fn_a, fn_b = Neighbors(), Neighbors()
    cached = greedy_generate(m, prompts(), 20, EOD, neighbors_fn=fn_a, use_cache=True)
    uncached = greedy_generate(m, prompts(), 20, EOD, neighbors_fn=fn_b, use_cache=False)
    assert cached == uncached
    assert fn_a.calls == fn_b.calls
    assert all(1 <= len(o) <= 20 for o in cached)
    assert (len(fn_a.calls) > 0) == retro


def test_batched_equals_one_prompt_at_a_time():
    m = model()
    batched = greedy_generate(m, prompts(), 20, EOD, neighbors_fn=Neighbors())
    single = [greedy_generate(m, [p], 20, EOD, neighbors_fn=Neighbors())[0] for p in prompts()]
    assert batched == single


def test_matches_plain_forward_argmax_without_padding():
    """Prompts of equal length on a chunk boundary: greedy == argmax of the training forward."""
    m = model(seed=3)
    ps = prompts((16, 16), seed=1)
    fn = Neighbors()
    out = greedy_generate(m, ps, 12, eod_id=-1, neighbors_fn=fn)  # eod -1: never stops early
    seqs = torch.tensor(ps)
    for _ in range(12):
        T = seqs.shape[1]
        C = T // L
        nb = torch.zeros(2, C, 2, 2 * L, dtype=torch.long)
        mask = torch.zeros(2, C, 2, 2 * L, dtype=torch.bool)
        for b in range(2):
            for j in range(C):
                t, mk = Neighbors()(b, j, seqs[b, j * L:(j + 1) * L].tolist())
                nb[b, j], mask[b, j] = torch.as_tensor(t), torch.as_tensor(mk)
        with torch.no_grad():
            nxt = m(seqs, nb, mask)[:, -1].argmax(-1)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
    assert out == seqs[:, 16:].tolist()


def test_neighbors_fn_called_once_per_chunk_when_it_completes():
    m = model(seed=1)
    fn = Neighbors()
    ps = prompts()
    pad = 7  # the tokenizer's pad: what a padded chunk handed to neighbors_fn holds
    out = greedy_generate(m, ps, 30, EOD, neighbors_fn=fn, pad_id=pad)
    # every row: its own chunks, numbered from its first chunk holding a prompt token
    for b, (p, o) in enumerate(zip(ps, out)):
        padded = [pad] * (-len(p) % L) + p
        seq = padded + o
        calls = [(j, toks) for bb, j, toks in fn.calls if bb == b]
        # chunks whose last token went through the model while the row was live: the prompt's,
        # then one per chunk boundary crossed by the generated tokens (the last one is not fed)
        expected = (len(padded) + len(o) - 1) // L
        assert [j for j, _ in calls] == list(range(expected))
        for j, toks in calls:
            assert toks == seq[j * L:(j + 1) * L]
    # order: all prompt chunks first, then generation chunks in the order they complete
    n_prompt = sum(-(-len(p) // L) for p in ps)
    assert all(j < -(-len(ps[b]) // L) for b, j, _ in fn.calls[:n_prompt])
    later = [(j + (max(-(-len(p) // L) for p in ps) - -(-len(ps[b]) // L))) for b, j, _ in fn.calls[n_prompt:]]
    assert later == sorted(later)  # padded chunk index never decreases


def test_neighbors_change_the_answer_and_none_means_masked():
    m = model(seed=2)
    with_nb = greedy_generate(m, prompts(), 16, EOD, neighbors_fn=Neighbors())
    without = greedy_generate(m, prompts(), 16, EOD, neighbors_fn=None)
    assert with_nb != without
    all_none = Neighbors(none_for={(b, j) for b in range(5) for j in range(20)})
    assert greedy_generate(m, prompts(), 16, EOD, neighbors_fn=all_none) == without


def test_fewer_neighbors_are_padded_and_bad_shapes_rejected():
    m = model()
    out = greedy_generate(m, prompts((9,)), 4, EOD, neighbors_fn=Neighbors(k=1, R=10))
    assert len(out[0]) >= 1
    with pytest.raises(PipelineError, match="neighbors_fn"):
        greedy_generate(m, prompts((9,)), 4, EOD, neighbors_fn=Neighbors(R=3 * L))
    with pytest.raises(PipelineError, match="empty prompt"):
        greedy_generate(m, [[]], 4, EOD)


def test_stops_at_eod_and_max_new_tokens():
    m = model(seed=4)
    free = greedy_generate(m, prompts(), 10, eod_id=-1)
    assert all(len(o) == 10 for o in free)
    eod = free[0][3]  # pretend the 4th token of row 0 is the end of document
    out = greedy_generate(m, prompts(), 10, eod_id=eod)
    assert out[0] == free[0][:free[0].index(eod) + 1]
    for o, f in zip(out, free):
        assert o == (f[:f.index(eod) + 1] if eod in f else f)
    assert greedy_generate(m, prompts(), 0, EOD) == [[] for _ in PROMPT_LENGTHS]


def retrieval_state_bytes(cache) -> int:
    """Bytes of every tensor the cache holds besides self-attention keys/values and the pad mask."""
    total = 0
    for name, value in vars(cache).items():
        if name in ("k", "v", "pad_mask"):
            continue
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        total += sum(t.numel() * t.element_size() for t in items if torch.is_tensor(t))
    return total


def test_retrieval_part_of_the_cache_does_not_grow_with_the_chunks_decoded():
    """Decoding attends only to the last completed chunk: the cache keeps that chunk's neighbor
    keys/values per CCA layer (and the incomplete chunk's encoder context), whatever the length."""
    from instructretro.model import KVCache

    m = model()
    sizes = {n: retrieval_state_bytes(KVCache(m, 3, n * L)) for n in (2, 8, 32)}
    assert len(set(sizes.values())) == 1 and sizes[2] > 0, sizes
    cfg = m.config
    per_chunk = 3 * cfg.heads * cfg.num_neighbors * cfg.neighbor_length * cfg.head_dim * 8  # float64
    assert sizes[2] < 2 * len(cfg.cca_layers) * per_chunk + 3 * L * cfg.hidden * 8 + 3 * 64 * 2, sizes

    # decoding 5 chunks beyond the prompt keeps the same tensors, and still equals uncached decoding
    seen = []
    original = KVCache.advance

    def advance(self, *args):
        original(self, *args)
        seen.append(retrieval_state_bytes(self))

    KVCache.advance = advance
    try:
        cached = greedy_generate(m, prompts((13, 3)), 5 * L, EOD + 1000, neighbors_fn=Neighbors())
    finally:
        KVCache.advance = original
    assert len(seen) == 5 * L and len(set(seen)) == 1
    assert cached == greedy_generate(m, prompts((13, 3)), 5 * L, EOD + 1000, neighbors_fn=Neighbors(), use_cache=False)
