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


# ----------------------------------------------------------------------------- memory for big models


def saved_bytes(fn):
    """Run ``fn()`` and return (its result, bytes of the distinct storages autograd saved for
    backward, parameters excluded)."""
    params = set()
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del params
    return out, sum(storages.values())


@pytest.mark.parametrize("retro_flag", [True, False])
def test_activation_checkpointing_gives_the_same_loss_and_grads_with_less_saved(retro_flag):
    torch.manual_seed(0)
    model = Retro(tiny_config(retro=retro_flag, n_layers=4, cca_layers=(2, 4))).double()
    tokens, neighbors, mask = make_batch(model.config)
    runs = []
    for flag in (False, True):
        model.set_checkpointing(flag)
        model.zero_grad()
        logits, saved = saved_bytes(lambda: model(tokens, neighbors, mask))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.roll(-1, 1).reshape(-1))
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved))
    (loss0, grads0, saved0), (loss1, grads1, saved1) = runs
    torch.testing.assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-9, atol=1e-12, msg=name)
    assert saved1 < 0.6 * saved0, (saved1, saved0)  # layer inputs (and logits) only


def test_training_forward_and_backward_read_nothing_back_to_the_host(retro, monkeypatch):
    """A host read of a device tensor (bool(), item(), tolist(), int(), float()) is a GPU sync:
    none in the training step, also with masked neighbors (encoder and CCA masks)."""
    tokens, neighbors, mask = make_batch(retro.config)

    def refuse(*_a, **_k):
        raise AssertionError("host read of a tensor in the training step")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    logits = retro(tokens, neighbors, mask)
    logits.sum().backward()
    monkeypatch.undo()
    retro.zero_grad()


@pytest.fixture()
def one_process_group():
    """torch.distributed with one gloo process (ZeRO needs it); the environment is restored."""
    import os

    from instructretro import dist

    from instructretro import train as T

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    dist.init_distributed()
    yield T
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _stats(named):
    return {n: (float(t.detach().double().mean()), float(t.detach().double().std()) if t.numel() > 1 else 0.0)
            for n, t in named}


def test_zero3_init_builds_partitioned_with_the_same_initialisation(one_process_group):
    """Built under deepspeed.zero.Init (ZeRO-3) every parameter is partitioned at creation;
    reset_parameters gathers each one, so per-tensor mean/std (and values) equal a plain build."""
    import deepspeed

    T = one_process_group
    config = tiny_config(n_layers=4, cca_layers=(2, 4), hidden=64, heads=4, init_std=0.05)
    train_cfg = T.TrainConfig(steps=1, micro_batch=1, zero_stage=3, lr=1e-3, min_lr=1e-4, warmup=0)
    torch.manual_seed(5)
    plain = Retro(config)
    torch.manual_seed(5)
    zero = T.build_model(config, train_cfg)
    params = dict(zero.named_parameters())
    assert all(hasattr(p, "ds_id") for p in params.values())  # partitioned, not a plain build
    assert zero.num_parameters() == plain.num_parameters()
    gathered = {}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for n, p in params.items():
            gathered[n] = p.detach().clone()
    want, got = _stats(plain.named_parameters()), _stats(gathered.items())
    assert got.keys() == want.keys()
    for n in want:
        assert got[n] == pytest.approx(want[n], rel=1e-6, abs=1e-9), n
        torch.testing.assert_close(gathered[n], dict(plain.named_parameters())[n].detach(), rtol=0, atol=0)
    stds = [got[n][1] for n in got if n.endswith("qkv.weight")]
    assert stds and all(s == pytest.approx(0.05, rel=0.1) for s in stds)  # initialised, not left empty


def test_zero3_model_loads_gpt_decoder_weights(one_process_group):
    import deepspeed

    T = one_process_group
    train_cfg = T.TrainConfig(steps=1, micro_batch=1, zero_stage=3, lr=1e-3, min_lr=1e-4, warmup=0)
    torch.manual_seed(1)
    gpt = Retro(tiny_config(retro=False))
    torch.manual_seed(2)
    retro = T.build_model(tiny_config(), train_cfg)
    fresh = load_decoder_weights(retro, gpt.state_dict())
    assert fresh and all(Retro.is_retro_parameter(n) for n in fresh)
    params = dict(retro.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for n, p in gpt.named_parameters():
            torch.testing.assert_close(params[n].detach(), p.detach(), rtol=0, atol=0, msg=n)


def test_deepspeed_config_memory_options_and_optimizer_per_device():
    from instructretro import train as T

    base = dict(steps=1, micro_batch=1, lr=1e-3, min_lr=1e-4, warmup=0)
    gpu = T.deepspeed_config(T.TrainConfig(**base), 1, device="cuda")["optimizer"]["params"]
    cpu = T.deepspeed_config(T.TrainConfig(**base), 1, device="cpu")["optimizer"]["params"]
    assert gpu["torch_adam"] and gpu["fused"] is True and "foreach" not in gpu
    assert cpu["torch_adam"] and cpu["foreach"] is True and "fused" not in cpu
    d = T.deepspeed_config(T.TrainConfig(**base, zero_stage=3, offload_optimizer="cpu", offload_params="nvme",
                                         offload_nvme_path="/scratch"), 8, device="cuda")
    zero = d["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/scratch"}
    assert "torch_adam" not in d["optimizer"]["params"]  # ZeRO's CPU Adam updates offloaded state
    assert "offload_param" not in T.deepspeed_config(T.TrainConfig(**base), 1, device="cpu")["zero_optimization"]
    with pytest.raises(PipelineError, match="offload_params' needs zero_stage 3"):
        T.TrainConfig(**base, zero_stage=2, offload_params="cpu").validate_memory()
    with pytest.raises(PipelineError, match="offload_optimizer' needs zero_stage >= 1"):
        T.TrainConfig(**base, offload_optimizer="cpu").validate_memory()
    with pytest.raises(PipelineError, match="offload_optimizer' must be one of"):
        T.TrainConfig(**base, zero_stage=1, offload_optimizer="disk").validate_memory()


def test_tf32_is_switched_on_for_gpus_only():
    from instructretro import train as T

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        assert not T.enable_tf32("cpu") and matmul.fp32_precision == "ieee"
        assert T.enable_tf32("cuda") and matmul.fp32_precision == conv.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def test_freeze_decoder_trains_only_encoder_and_cca(one_process_group):
    """Retrofitting: decoder weights do not change and are not in the optimizer; the loss on
    a copy task (neighbors hold the continuation) goes down through encoder and CCA alone."""
    T = one_process_group
    torch.manual_seed(0)
    config = tiny_config(vocab_size=32, n_layers=2, cca_layers=(1, 2), encoder_layers=1, num_neighbors=1,
                         seq_length=16)
    model = Retro(config)
    decoder_before = {n: p.detach().clone() for n, p in model.named_parameters() if not Retro.is_retro_parameter(n)}
    cfg = T.TrainConfig(steps=60, micro_batch=8, lr=1e-2, min_lr=1e-3, warmup=2, eval_interval=60, save_interval=10**6,
                        freeze_decoder=True, clip=1.0)
    engine = T.build_engine(model, cfg)
    in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        assert p.requires_grad == Retro.is_retro_parameter(n), n
        assert (id(p) in in_optimizer) == Retro.is_retro_parameter(n), n

    def batch_fn(step, micro):  # random tokens; each chunk's neighbor is the chunk after it
        g = torch.Generator().manual_seed(step)
        seq = torch.randint(3, 32, (8, 16 + 2 * L + 1), generator=g)
        tokens, labels = seq[:, :16], seq[:, 1:17]
        nb = torch.stack([seq[:, (c + 1) * L - 1:(c + 3) * L - 1] for c in range(16 // L)], 1)[:, :, None]
        return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(8, 16), "neighbors": nb}

    held_out = [batch_fn(10**6, 0)]
    before = T.evaluate(engine, held_out, T.lm_loss)["loss"]
    T.train(engine, cfg, batch_fn, T.lm_loss, progress=False)
    after = T.evaluate(engine, held_out, T.lm_loss)["loss"]
    assert after < before - 0.1, (before, after)  # 3.46 -> 3.28 in 60 steps
    for n, p in model.named_parameters():
        if n in decoder_before:
            torch.testing.assert_close(p.detach(), decoder_before[n], rtol=0, atol=0, msg=n)
    with pytest.raises(PipelineError, match="freeze_decoder' needs a Retro model"):
        T.freeze_decoder(Retro(tiny_config(retro=False)))


def test_zero3_tied_output_layer_and_grouped_heads_compute_the_plain_model(one_process_group):
    """Tied embeddings under ZeRO-3: the output layer reads the embedding, a parameter of another
    module, which is registered with ZeRO so it is gathered there too; logits and the training
    step's loss equal a plain build's (GQA and RMSNorm as for an imported Llama)."""
    T = one_process_group
    config = tiny_config(n_layers=2, cca_layers=(2,), hidden=64, heads=4, kv_heads=2, norm="rmsnorm",
                         tie_embeddings=True, cca_gate=True)
    train_cfg = T.TrainConfig(steps=1, micro_batch=1, zero_stage=3, lr=1e-3, min_lr=1e-4, warmup=0)
    torch.manual_seed(6)
    plain = Retro(config)
    torch.manual_seed(6)
    engine = T.build_engine(T.build_model(config, train_cfg), train_cfg)
    tokens = torch.randint(0, config.vocab_size, (1, config.seq_length))
    with torch.no_grad():
        torch.testing.assert_close(engine(tokens), plain(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_build_model_with_weights_loads_an_export(one_process_group, tmp_path, zero_stage):
    """SFT's build: the exported weights replace the initialisation (read tensor by tensor; at
    ZeRO-3 into partitioned parameters); a checkpoint of another architecture is refused."""
    import deepspeed

    from instructretro import checkpoint

    T = one_process_group
    torch.manual_seed(3)
    source = Retro(tiny_config())
    checkpoint.export_checkpoint(source, source.config, tmp_path / "ckpt")
    train_cfg = T.TrainConfig(steps=1, micro_batch=1, zero_stage=zero_stage, lr=1e-3, min_lr=1e-4, warmup=0)
    torch.manual_seed(4)
    model = T.build_model(source.config, train_cfg, weights=tmp_path / "ckpt")
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero_stage == 3):
        for n, p in source.named_parameters():
            torch.testing.assert_close(params[n].detach(), p.detach(), rtol=0, atol=0, msg=n)
    with pytest.raises(PipelineError, match="names differ"):
        T.build_model(tiny_config(retro=False), train_cfg, weights=tmp_path / "ckpt")
