"""Retro model: gradient-based invariants, retrieval switched off, GPT weights, config, FLOPs."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from instructretro.errors import PipelineError
from instructretro.model import (KVCache, ModelConfig, Retro, default_cca_layers, flops_per_token,
                                 load_decoder_weights, swiglu_ffn_hidden)

L = 4  # chunk length of the test models


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**kw):
    base = dict(vocab_size=40, n_layers=3, hidden=32, heads=2, seq_length=16, chunk_length=L,
                cca_layers=(1, 3), encoder_layers=2, num_neighbors=2)
    return ModelConfig(**{**base, **kw})


def make_batch(config, B=3, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, config.vocab_size, (B, T), generator=g)
    C, k, R = T // config.chunk_length, config.num_neighbors, config.neighbor_length
    neighbors = torch.randint(3, config.vocab_size, (B, C, k, R), generator=g)
    mask = torch.rand(B, C, k, R, generator=g) > 0.2
    mask[0, 1, 1] = False  # one neighbor fully masked
    return tokens, neighbors, mask


def forward_with_embedding_grads(model, tokens, neighbors, mask, loss_of_logits):
    """Run forward, backprop ``loss_of_logits(logits)``; return grads of the token embeddings
    (B,T,h) and of the neighbor embeddings (B,C,k,R,h)."""
    outputs = []

    def keep(_module, _inputs, out):
        out.retain_grad()
        outputs.append(out)

    handle = model.embed.register_forward_hook(keep)
    try:
        logits = model(tokens, neighbors, mask)
        loss_of_logits(logits).backward()
    finally:
        handle.remove()
    token_grad = outputs[0].grad
    B, C, k, R = neighbors.shape
    neighbor_grad = outputs[1].grad.view(B, C, k, R, -1)
    return token_grad, neighbor_grad


@pytest.fixture(scope="module")
def retro():
    torch.manual_seed(0)
    return Retro(tiny_config()).double()


def test_forward_shapes_and_finite(retro):
    tokens, neighbors, mask = make_batch(retro.config)
    logits = retro(tokens, neighbors, mask)
    assert logits.shape == (3, 16, 40)
    assert torch.isfinite(logits).all()


def test_sample_outputs_do_not_depend_on_other_samples(retro):
    tokens, neighbors, mask = make_batch(retro.config)
    tg, ng = forward_with_embedding_grads(retro, tokens, neighbors, mask, lambda lg: lg[1].sum())
    assert tg[1].abs().sum() > 0 and ng[1].abs().sum() > 0
    for other in (0, 2):
        assert tg[other].abs().sum() == 0
        assert ng[other].abs().sum() == 0


@pytest.mark.parametrize("t", [0, 5, 10, 15])
def test_token_depends_on_no_later_token(retro, t):
    tokens, neighbors, mask = make_batch(retro.config)
    tg, _ = forward_with_embedding_grads(retro, tokens, neighbors, mask, lambda lg: lg[:, t].sum())
    assert tg[:, t + 1:].abs().sum() == 0
    assert (tg[:, :t + 1].abs().sum(-1) > 0).all()  # and on every earlier one


@pytest.mark.parametrize("t", [0, L - 2, L - 1, 2 * L - 2, 2 * L - 1, 3 * L + 1, 4 * L - 1])
def test_token_sees_only_neighbors_of_chunks_ended_at_or_before_it(retro, t):
    tokens, neighbors, mask = make_batch(retro.config)
    _, ng = forward_with_embedding_grads(retro, tokens, neighbors, mask, lambda lg: lg[:, t].sum())
    per_chunk = ng.abs().sum(dim=(0, 2, 3, 4))  # (C,)
    attended = (t + 1) // L - 1  # the last chunk that ended at or before t (-1: none yet)
    for j in range(per_chunk.numel()):
        if j > attended:  # chunk j ends after t
            assert per_chunk[j] == 0, f"token {t} must not depend on chunk {j}'s neighbors"
        elif j == attended:  # directly through CCA (earlier chunks reach t through earlier tokens)
            assert per_chunk[j] > 0, f"token {t} should use chunk {j}'s neighbors"


def test_masked_neighbor_tokens_contribute_nothing(retro):
    tokens, neighbors, mask = make_batch(retro.config)
    _, ng = forward_with_embedding_grads(retro, tokens, neighbors, mask, lambda lg: lg.sum())
    assert ng[~mask].abs().sum() == 0
    assert ng[mask].abs().sum() > 0
    changed = torch.where(mask, neighbors, torch.randint_like(neighbors, 3, 40))
    with torch.no_grad():
        torch.testing.assert_close(retro(tokens, changed, mask), retro(tokens, neighbors, mask),
                                   rtol=0, atol=1e-12)


def test_all_neighbors_masked_equals_retrieval_off_and_gpt():
    torch.manual_seed(1)
    retro = Retro(tiny_config()).double()
    gpt = Retro(tiny_config(retro=False)).double()
    fresh = load_decoder_weights(gpt, retro.state_dict())  # Retro -> GPT: encoder, CCA dropped
    assert fresh == []
    tokens, neighbors, mask = make_batch(retro.config)
    with torch.no_grad():
        masked = retro(tokens, neighbors, torch.zeros_like(mask))
        off = retro(tokens)
        plain = gpt(tokens, neighbors, mask)  # GPT ignores neighbors
        used = retro(tokens, neighbors, mask)
    assert torch.equal(masked, off)
    assert torch.equal(off, plain)
    # with neighbors, tokens before the end of chunk 0 are unchanged, later ones are not
    assert torch.equal(used[:, :L - 1], off[:, :L - 1])
    assert not torch.allclose(used[:, L - 1:], off[:, L - 1:])


def test_same_seed_gives_same_decoder_weights_for_retro_and_gpt():
    torch.manual_seed(7)
    retro = Retro(tiny_config())
    torch.manual_seed(7)
    gpt = Retro(tiny_config(retro=False))
    rs = retro.state_dict()
    for name, tensor in gpt.state_dict().items():
        assert torch.equal(rs[name], tensor), name


def test_gpt_state_dict_loads_into_retro():
    torch.manual_seed(2)
    gpt = Retro(tiny_config(retro=False)).double()
    torch.manual_seed(3)
    retro = Retro(tiny_config()).double()
    fresh = load_decoder_weights(retro, gpt.state_dict())
    assert fresh and all(Retro.is_retro_parameter(n) for n in fresh)
    assert set(fresh) == set(retro.state_dict()) - set(gpt.state_dict())
    tokens, _, _ = make_batch(retro.config)
    with torch.no_grad():
        assert torch.equal(retro(tokens), gpt(tokens))
    # the documented alternative: load_state_dict(strict=False) misses exactly the Retro params
    result = Retro(tiny_config()).load_state_dict(gpt.state_dict(), strict=False)
    assert set(result.missing_keys) == set(fresh) and not result.unexpected_keys


def test_load_decoder_weights_rejects_other_decoders():
    gpt = Retro(tiny_config(retro=False, hidden=48))
    with pytest.raises(PipelineError, match="shape"):
        load_decoder_weights(Retro(tiny_config()), gpt.state_dict())
    partial = {k: v for k, v in Retro(tiny_config()).state_dict().items() if "lm_head" not in k}
    with pytest.raises(PipelineError, match="lacks decoder parameters"):
        load_decoder_weights(Retro(tiny_config()), partial)


def test_parameter_names_and_no_linear_biases(retro):
    names = dict(retro.named_parameters())
    linear = [m for m in retro.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.bias is None for m in linear)
    assert names["embed.weight"].data_ptr() != names["lm_head.weight"].data_ptr()  # untied
    assert "layers.0.cca.q.weight" in names and "layers.1.cca.q.weight" not in names  # CCA at 1, 3
    assert "layers.2.cca.q.weight" in names
    gpt = Retro(tiny_config(retro=False))
    assert not any(Retro.is_retro_parameter(n) for n, _ in gpt.named_parameters())


def test_incremental_forward_matches_full_forward(retro):
    tokens, neighbors, mask = make_batch(retro.config, B=2)
    with torch.no_grad():
        full = retro(tokens, neighbors, mask)
        cache = KVCache(retro, 2, 16)
        pieces, start = [], 0
        for size in (3, 1, 1, 6, 1, 4):  # crosses chunk boundaries inside and at piece ends
            lo, hi = start // L, (start + size) // L
            pieces.append(retro(tokens[:, start:start + size], neighbors[:, lo:hi], mask[:, lo:hi],
                                cache=cache))
            start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-10)


def test_neighbor_shape_mismatch_is_a_pipeline_error(retro):
    tokens, neighbors, mask = make_batch(retro.config)
    with pytest.raises(PipelineError, match="neighbors must have shape"):
        retro(tokens, neighbors[:, :2], mask[:, :2])


def test_config_rules_and_validation():
    assert default_cca_layers(12) == (6, 9, 12)
    assert default_cca_layers(24) == (9, 12, 15, 18, 21, 24)
    assert default_cca_layers(48)[:2] == (9, 12) and default_cca_layers(48)[-1] == 48
    assert swiglu_ffn_hidden(1024) == 2688 and swiglu_ffn_hidden(8192) == 21824
    assert swiglu_ffn_hidden(16) >= 16 and swiglu_ffn_hidden(16) % 8 == 0
    cfg = tiny_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(PipelineError, match="model.heads"):
        tiny_config(heads=5)
    with pytest.raises(PipelineError, match="outside"):
        tiny_config(cca_layers=(4,))
    with pytest.raises(PipelineError, match="no CCA layer"):
        tiny_config(cca_layers=None)  # 3 layers: the default rule gives none
    assert tiny_config(cca_layers=None, retro=False).cca_layers == ()
    with pytest.raises(PipelineError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})


@pytest.mark.parametrize("retro_flag", [False, True])
def test_flops_per_token_matches_counted_flops(retro_flag):
    """flops_per_token agrees with torch's FLOP counter on forward + backward (within 10%;
    the counter charges causal attention at full T and CCA's padded query groups)."""
    cfg = tiny_config(retro=retro_flag, hidden=64, heads=4, vocab_size=256, seq_length=32,
                      chunk_length=8, num_neighbors=2)
    model = Retro(cfg)
    tokens = torch.randint(3, 256, (2, 32))
    neighbors = torch.randint(3, 256, (2, 4, 2, 16))
    with FlopCounterMode(display=False) as counter:
        model(tokens, neighbors if retro_flag else None).sum().backward()
    counted = counter.get_total_flops() / tokens.numel()
    assert abs(flops_per_token(cfg) - counted) / counted < 0.10


def copy_task_loss(*, vocab: int, seq: int, batch: int, chunk: int, lr: float, steps: int = 100,
                   train_from: int = 0, **config) -> float:
    """Train a 2-layer width-32 model (``config``: ModelConfig overrides such as ``retro``,
    ``cca_rotary``) with AdamW on random token streams whose chunk j's neighbor is chunk j + its
    continuation, aligned with the text; the loss is taken on positions ``train_from`` onward.
    Returns the last step's loss on the tokens that can see a neighbor (``chunk - 1`` onward)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, n_layers=2, hidden=32, heads=2, seq_length=seq, chunk_length=chunk,
                      cca_layers=(1, 2), num_neighbors=1, **config)
    model = Retro(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(3, vocab, (batch, seq + chunk), generator=g)
        neighbors = torch.stack([x[:, j * chunk:(j + 2) * chunk] for j in range(seq // chunk)], dim=1)[:, :, None]
        logits = model(x[:, :seq], neighbors)
        loss = F.cross_entropy(logits.reshape(-1, vocab), x[:, 1:seq + 1].reshape(-1), reduction="none")
        loss = loss.view(batch, seq)
        loss[:, train_from:].mean().backward()
        opt.step()
        opt.zero_grad()
    return loss[:, chunk - 1:].mean().item()


def test_retro_learns_to_copy_continuations_from_its_neighbors():
    """End to end through encoder and CCA: random token streams whose chunk j's neighbor is
    chunk j + its continuation. Only Retro can predict tokens after the first chunk; GPT stays
    at chance (ln 13 = 2.56 nats) on them. 100 AdamW steps of a 2-layer width-32 model."""
    task = dict(vocab=16, seq=16, batch=32, chunk=L, lr=3e-3)
    retro_loss, gpt_loss = copy_task_loss(retro=True, **task), copy_task_loss(retro=False, **task)
    print(f"copy task after 100 steps: Retro {retro_loss:.2f} nats, GPT {gpt_loss:.2f} nats")
    assert gpt_loss > 2.3
    assert retro_loss < 1.9, f"Retro did not learn to copy from neighbors: {retro_loss:.2f} nats"


def test_cca_rotary_positions_make_aligned_copying_fast():
    """Relative positions in CCA (the RETRO paper's choice, ``cca_rotary``): a query gets the
    rotary position it would have in an aligned neighbor, so "the neighbor token after mine" is a
    fixed offset that a head finds quickly; by content alone it takes far longer."""
    task = dict(vocab=64, seq=32, batch=16, chunk=8, lr=8e-3, train_from=7)  # trained on copyable tokens
    with_rotary, without = copy_task_loss(cca_rotary=True, **task), copy_task_loss(cca_rotary=False, **task)
    print(f"aligned copy, chunk 8, 100 steps: cca_rotary {with_rotary:.2f} nats, without {without:.2f} (ln 61 = 4.11)")
    assert with_rotary < 1.0  # measured 0.23
    assert without > with_rotary + 2.0  # measured 3.97


def test_cca_query_positions():
    """The query at position i sits at chunk_length - 1 + (i + 1) % chunk_length: the last token of
    a chunk at L - 1 (aligned with that token in the chunk's neighbor), the next one at L."""
    from instructretro.model import cca_query_rope, rope_at
    cfg = tiny_config(chunk_length=4, seq_length=16)
    cos, sin = cca_query_rope(2, 7, cfg, torch.device("cpu"), torch.float32)
    expected = torch.tensor([6, 3, 4, 5, 6, 3, 4])  # positions 2 .. 8
    ref_cos, ref_sin = rope_at(expected, cfg, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    old = ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "cca_rotary"})
    assert old.cca_rotary is False  # configs saved before the field existed keep their behaviour
