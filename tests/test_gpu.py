"""The GPU path (skipped without CUDA; ``bench/gpu_check.sh`` runs these on a GPU machine):
bf16 training step with the flash kernel on the causal path and no host sync, fused AdamW and
TF32 in the engine, generation with model and cache on the GPU, Faiss index training on GPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instructretro.model import KVCache, ModelConfig, Retro

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def config(retro=True, **kw):
    base = dict(vocab_size=512, n_layers=4, hidden=256, heads=4, seq_length=256, chunk_length=64,
                cca_layers=(2, 4), num_neighbors=2, retro=retro)
    return ModelConfig(**{**base, **kw})


def batch(cfg, B=2, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = cfg.seq_length
    tokens = torch.randint(3, cfg.vocab_size, (B, T + 1), generator=g)
    C, k, R = T // cfg.chunk_length, cfg.num_neighbors, cfg.neighbor_length
    nb = torch.randint(3, cfg.vocab_size, (B, C, k, R), generator=g)
    mask = torch.rand(B, C, k, R, generator=g) > 0.1
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device), nb.to(device), mask.to(device)


def test_bf16_causal_path_runs_on_the_flash_kernel():
    """GPT forward + backward in bf16 with SDPA restricted to flash attention: it raises if
    the causal self-attention cannot use the flash kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = Retro(config(retro=False)).cuda().bfloat16()
    tokens, labels, _, _ = batch(model.config)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        logits = model(tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in model.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_retro_training_step_has_no_host_sync(checkpointing):
    torch.manual_seed(0)
    model = Retro(config()).cuda().bfloat16().set_checkpointing(checkpointing)
    tokens, labels, nb, mask = batch(model.config)
    model(tokens, nb, mask).float().sum().backward()  # warm-up (lazy init may sync)
    model.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = model(tokens, nb, mask)
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters() if p.grad is not None)


@pytest.fixture()
def distributed():
    from instructretro import dist
    from instructretro import train as T

    saved = {k: os.environ.get(k) for k in DIST_ENV}
    dist.init_distributed()
    yield T
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_engine_uses_fused_adamw_and_tf32_and_trains(distributed):
    T = distributed
    cfg = T.TrainConfig(steps=20, micro_batch=2, lr=3e-3, min_lr=3e-4, warmup=2, precision="bf16",
                        activation_checkpointing=True)
    torch.manual_seed(0)
    engine = T.build_engine(T.build_model(config(), cfg), cfg)
    assert engine.device.type == "cuda"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    assert isinstance(inner, torch.optim.AdamW) and inner.defaults.get("fused") is True
    tokens, labels, nb, mask = batch(engine.module.config, device=engine.device)
    b = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(labels, dtype=torch.float),
         "neighbors": nb, "neighbor_mask": mask}
    before = T.evaluate(engine, [b], T.lm_loss)["loss"]
    T.train(engine, cfg, lambda s, m: b, T.lm_loss, progress=False)
    assert T.evaluate(engine, [b], T.lm_loss)["loss"] < before - 0.5  # one batch, 20 steps: memorised


def test_generate_keeps_model_and_cache_on_the_gpu():
    from instructretro.decoding import greedy_generate

    torch.manual_seed(0)
    model = Retro(config(seq_length=512)).cuda().bfloat16().eval()
    caches = []
    original = KVCache.__init__

    def record(self, *a, **k):
        original(self, *a, **k)
        caches.append(self)

    rng = np.random.default_rng(0)

    def neighbors_fn(b, j, chunk):
        return rng.integers(3, 512, (2, 128)), np.ones((2, 128), dtype=bool)

    KVCache.__init__ = record
    try:
        out = greedy_generate(model, [list(range(3, 80)), list(range(5, 40))], 70, eod_id=2,
                              neighbors_fn=neighbors_fn)
    finally:
        KVCache.__init__ = original
    assert all(1 <= len(o) <= 70 for o in out)
    c = caches[0]
    tensors = [*c.k, *c.v, c.context, *c.chunk_k.values(), *c.chunk_v.values(), c.pad_mask]
    assert all(t.is_cuda for t in tensors)
    assert c.k[0].dtype == torch.bfloat16


def test_faiss_trains_an_ivf_index_on_the_gpu():
    faiss = pytest.importorskip("faiss", reason="faiss not installed (the GPU bundle leaves faiss-gpu out: its runs "
                                             "read precomputed neighbors and contexts)")

    if faiss.get_num_gpus() == 0:
        pytest.fail("faiss sees no GPU: install faiss-gpu instead of faiss-cpu (make install on a GPU machine)")
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((64, 128)).astype("float32")
    x = (centers[rng.integers(0, 64, 40000)] + 0.1 * rng.standard_normal((40000, 128))).astype("float32")
    cpu = faiss.index_factory(128, "IVF256,Flat", faiss.METRIC_INNER_PRODUCT)
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, 0, cpu)
    gpu.train(x)
    gpu.add(x)
    gpu.nprobe = 16
    _, ids = gpu.search(x[:100], 1)
    exact = faiss.IndexFlatIP(128)
    exact.add(x)
    _, want = exact.search(x[:100], 1)
    assert (ids[:, 0] == want[:, 0]).mean() >= 0.95
    assert faiss.index_gpu_to_cpu(gpu).ntotal == 40000
