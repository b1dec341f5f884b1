"""Named model presets: architecture plus per-preset training defaults.

``get(name, **overrides) -> ModelConfig`` builds the architecture; ``training(name)`` and
``sft(name)`` give the hyperparameters the pretrain and sft stages start from (params override
them). Architectures of 843m/2b/4b/43b (layers/hidden/heads, seq 4096, SwiGLU, RoPE 0.5) follow
the reference recipe; their vocab is the reference's 256k multilingual SentencePiece size, so
parameter counts match the names only at that vocab (a stage passes its tokenizer's size).
``tiny`` is ours: the CPU default, about 2.4 M parameters at vocab 4096. ``100m`` is ours too:
a GPU-budget size (12/768/12, vocab 4096) for the Retro-vs-GPT comparison of
``bench/gpu_fidelity.sh``. Each preset also has a GPU recipe (``device_recipe``: bf16, ZeRO
stage, micro batch, activation checkpointing) that training takes on a GPU for null params.

Parameter counts at each preset's vocab (Retro includes encoder and CCA; printed by
``pytest -s tests/test_presets.py``, built on the meta device):

====== ====== ====== ===== ===== ====== ========== ============== ==============
preset layers hidden heads ffn   vocab  CCA layers Retro          GPT
====== ====== ====== ===== ===== ====== ========== ============== ==============
tiny   4      128    4     320   4096   2, 4       2,380,032      1,804,544
100m   12     768    12    2048  4096   6, 9, 12   114,871,296    91,264,512
843m   24     1024   16    2688  256000 9..24 /3   877,520,896    823,232,512
2b     32     2048   32    5440  256000 9..30 /3   2,906,714,112  2,655,260,672
4b     48     2560   32    6784  256000 9..48 /3   5,620,311,040  5,070,361,600
43b    48     8192   64    21824 256000 9..48 /3   48,461,856,768 42,825,433,088
====== ====== ====== ===== ===== ====== ========== ============== ==============
"""

from __future__ import annotations

from .errors import PipelineError
from .model import ModelConfig

REFERENCE_VOCAB = 256000

# Architecture per preset (fields of ModelConfig; the rest take their defaults). init_std is
# ours: 0.02 at width 1024 and below, 0.02 * sqrt(1024 / hidden) above.
ARCHITECTURES: dict[str, dict] = {
    "tiny": dict(vocab_size=4096, n_layers=4, hidden=128, heads=4, seq_length=256, chunk_length=64,
                 cca_layers=(2, 4), encoder_layers=2, num_neighbors=1, init_std=0.02),
    "100m": dict(vocab_size=4096, n_layers=12, hidden=768, heads=12, seq_length=1024,
                 num_neighbors=2, init_std=0.02),
    "843m": dict(vocab_size=REFERENCE_VOCAB, n_layers=24, hidden=1024, heads=16, seq_length=4096,
                 num_neighbors=2, init_std=0.02),
    "2b": dict(vocab_size=REFERENCE_VOCAB, n_layers=32, hidden=2048, heads=32, seq_length=4096,
               num_neighbors=2, init_std=0.014),
    "4b": dict(vocab_size=REFERENCE_VOCAB, n_layers=48, hidden=2560, heads=32, seq_length=4096,
               num_neighbors=2, init_std=0.0125),
    "43b": dict(vocab_size=REFERENCE_VOCAB, n_layers=48, hidden=8192, heads=64, seq_length=4096,
                num_neighbors=2, init_std=0.007),
}

# Pretraining defaults. 843m: the reference's 800m Retro pretraining (global batch 128,
# lr 2.5e-5 -> 2.5e-6 cosine, wd 0.1, betas 0.9/0.95). Larger sizes: ours, lr scaled down with
# width. tiny: ours, sized for a few minutes on 2 CPU cores (the lr sweep in the README decides),
# with Retro's encoder and CCA ramped in over the first quarter (``retrieval_warmup``: a fresh CCA
# at the full lr held the decoder back on real text, docs/findings.md).
_PRETRAIN_BASE = dict(lr_schedule="cosine", weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0,
                      warmup_fraction=0.01, micro_batch=1, global_batch=128, iterations=10000)
TRAINING: dict[str, dict] = {
    "tiny": {**_PRETRAIN_BASE, "lr": 1e-3, "min_lr": 1e-4, "warmup_fraction": 0.05, "retrieval_warmup_fraction": 0.25,
             "micro_batch": 8, "global_batch": 8, "iterations": 600},
    "100m": {**_PRETRAIN_BASE, "lr": 1e-3, "min_lr": 1e-4, "warmup_fraction": 0.05,
             "micro_batch": 16, "global_batch": 32, "iterations": 2000},
    "843m": {**_PRETRAIN_BASE, "lr": 2.5e-5, "min_lr": 2.5e-6},
    "2b": {**_PRETRAIN_BASE, "lr": 2e-5, "min_lr": 2e-6},
    "4b": {**_PRETRAIN_BASE, "lr": 1.5e-5, "min_lr": 1.5e-6},
    "43b": {**_PRETRAIN_BASE, "lr": 9e-6, "min_lr": 9e-7},
}

# Instruction tuning: one table per preset, everything SFT takes from the preset except how it
# runs on the device (precision, ZeRO stage, micro batch on a GPU, checkpointing, offload: the
# device recipe below, applied to SFT exactly as to pretraining). 843m: the reference (batch 128,
# lr 5e-6 constant, 1000 iterations, betas 0.9/0.98, wd 0.01, clip 1.0, sequence 4096); the other
# big sizes reuse it; tiny: ours (docs/sft.md: at lr 3e-4 / 300 steps the tiny model had not
# learned the answer format; 2e-3 cosine / 600 steps has), with a 512-token sequence: room for two
# 128-token contexts in prompt mode.
_SFT_BASE = dict(lr=5e-6, lr_schedule="constant", weight_decay=0.01, betas=(0.9, 0.98),
                 grad_clip=1.0, micro_batch=1, global_batch=128, iterations=1000, seq_length=4096, warmup=0)
SFT: dict[str, dict] = {
    "tiny": {**_SFT_BASE, "lr": 2e-3, "lr_schedule": "cosine", "micro_batch": 8, "global_batch": 8,
             "iterations": 600, "seq_length": 512, "warmup": 20},
    "100m": {**_SFT_BASE, "lr": 1e-4, "lr_schedule": "cosine", "micro_batch": 16, "global_batch": 32,
             "iterations": 300, "seq_length": 1024, "warmup": 10},
    "843m": dict(_SFT_BASE),
    "2b": dict(_SFT_BASE),
    "4b": dict(_SFT_BASE),
    "43b": dict(_SFT_BASE),
}

# How a preset trains on GPUs (pretrain and SFT keys left null take these on a GPU; on CPU:
# fp32, ZeRO 0, no checkpointing, no offload, the preset's micro batch). Sized by
# ``python -m instructretro.estimate`` for 8 x 80 GB at the preset's sequence length (4096 for
# the big presets) and global batch 128, leaving 15% of each GPU free (tests/test_estimate.py
# keeps them equal); another machine runs the estimator for its own settings.
CPU_RECIPE = dict(precision="fp32", zero_stage=0, activation_checkpointing=False,
                  offload_optimizer="none", offload_params="none")
GPU_RECIPES: dict[str, dict] = {
    "tiny": dict(precision="bf16", zero_stage=0, micro_batch=8, activation_checkpointing=False),
    "100m": dict(precision="bf16", zero_stage=0, micro_batch=16, activation_checkpointing=False),
    "843m": dict(precision="bf16", zero_stage=2, micro_batch=4, activation_checkpointing=False),
    "2b": dict(precision="bf16", zero_stage=1, micro_batch=2, activation_checkpointing=False),
    "4b": dict(precision="bf16", zero_stage=1, micro_batch=1, activation_checkpointing=False),
    # 16 bytes/param / 8 GPUs is 97 GB for 43b: the optimizer state goes to host memory
    "43b": dict(precision="bf16", zero_stage=3, micro_batch=2, activation_checkpointing=True,
                offload_optimizer="cpu"),
}
RECIPE_KEYS = ("precision", "zero_stage", "micro_batch", "activation_checkpointing",
               "offload_optimizer", "offload_params")

NAMES = tuple(ARCHITECTURES)

# What a preset gives an imported decoder (``pretrain.init_from`` a Hugging Face folder): the
# architecture comes from the folder's config.json, these fields from the preset and params.
RETRO_ADDITIONS = ("retro", "cca_layers", "encoder_layers", "num_neighbors", "chunk_length", "seq_length")


def retro_additions(config: ModelConfig) -> dict:
    """The Retro parts and sample layout of ``config`` (``RETRO_ADDITIONS``) and its name (the
    preset, which names the training and SFT recipes), for ``hf.read_hf_config``."""
    return {**{k: getattr(config, k) for k in RETRO_ADDITIONS}, "name": config.name}


def _check(name: str) -> None:
    if name not in ARCHITECTURES:
        raise PipelineError(f"param 'model.name' is {name!r}; expected one of {list(NAMES)}")


def get(name: str, **overrides) -> ModelConfig:
    """ModelConfig of preset ``name`` with ``overrides`` (ModelConfig fields) applied.

    An override of ``None`` is ignored, so a stage can pass optional params straight through.
    """
    _check(name)
    fields = {**ARCHITECTURES[name], "name": name}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in ModelConfig.__dataclass_fields__:
            raise PipelineError(f"param 'model.{key}' is not a model field")
        fields[key] = tuple(value) if key == "cca_layers" else value
    return ModelConfig(**fields)


def training(name: str) -> dict:
    """Pretraining defaults of preset ``name`` (a fresh dict: lr, min_lr, batch, ...)."""
    _check(name)
    return dict(TRAINING[name])


def sft(name: str) -> dict:
    """Instruction-tuning defaults of preset ``name`` (a fresh dict)."""
    _check(name)
    return dict(SFT[name])


def train_fields(table: dict, recipe: dict | None = None) -> dict:
    """A preset's table entry (``training`` or ``sft``) and its device recipe as ``TrainConfig``
    fields, the one translation pretraining and SFT share: ``iterations`` -> ``steps``,
    ``betas`` -> ``beta1``/``beta2``, ``grad_clip`` -> ``clip``, ``lr``, ``weight_decay``; the
    micro batch is the recipe's (on a GPU) or else the table's; precision, ZeRO stage,
    checkpointing and offload are the recipe's."""
    recipe = dict(recipe or {})
    micro = int(recipe.pop("micro_batch", table["micro_batch"]))
    return {**recipe, "steps": int(table["iterations"]), "micro_batch": micro, "lr": table["lr"],
            "weight_decay": table["weight_decay"], "beta1": table["betas"][0], "beta2": table["betas"][1],
            "clip": table["grad_clip"]}


def device_recipe(name: str, gpu: bool) -> dict:
    """Precision, ZeRO stage, activation checkpointing, offload (and on a GPU the micro batch)
    of preset ``name`` on this kind of device: the GPU recipe, or the CPU one (fp32, ZeRO 0)."""
    _check(name)
    if not gpu:
        return dict(CPU_RECIPE)
    return {**CPU_RECIPE, **GPU_RECIPES[name]}
