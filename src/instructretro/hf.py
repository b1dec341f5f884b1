"""Hugging Face decoders in and out: import a local HF folder as our model, export ours to one.

Import (``load_hf_model``): ``config.json`` gives the architecture as ``ModelConfig`` data
(``read_hf_config``), the safetensors weights (one file, or shards listed by
``model.safetensors.index.json``) are renamed to our parameter names (``read_hf_state_dict``).
Families: Llama 2/3 (with Llama 3's ``rope_scaling``), Mistral, Qwen2/2.5, GPT-2 and StableLM.
The Retro additions (encoder, CCA, neighbors, chunk length) come from the caller's preset; the
new CCA outputs are gated by ``tanh(gate)`` with the gate at 0, so at step 0 a Retro built on an
imported decoder gives that decoder's logits whatever the neighbors.

Export (``export_hf``): the decoder of one of our checkpoints (a GPT, or a Retro's decoder used
without retrieval) to the transformers class that computes the same function: our own
architecture (LayerNorm-1p, partial rotary with rotate-half, SwiGLU, no biases, untied) is
StableLM's (the LayerNorm gain stored as ``1 + weight``); imported families go back to their
class. CCA and the encoder do not transfer: no transformers class holds them.

``check`` (``make hf-check HF=<folder>``) compares our model built from a folder with
transformers' own: largest logit difference on random tokens and a greedy 32-token decode.

A pickle-only ``pytorch_model.bin`` is refused without being opened (unpickling runs code).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from .errors import PipelineError
from .model import ModelConfig, Retro, load_decoder_weights

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "stablelm")
REFUSED = {  # model_type: why (families we know and do not convert)
    "mixtral": "mixture-of-experts", "qwen2_moe": "mixture-of-experts", "qwen3_moe": "mixture-of-experts",
    "deepseek_v2": "mixture-of-experts", "deepseek_v3": "mixture-of-experts", "dbrx": "mixture-of-experts",
    "olmoe": "mixture-of-experts", "granitemoe": "mixture-of-experts", "jamba": "mixture-of-experts",
    "phimoe": "mixture-of-experts", "switch_transformers": "mixture-of-experts",
}
# The ModelConfig fields a caller (the preset) supplies; everything else comes from config.json.
RETRO_KEYS = ("retro", "cca_layers", "encoder_layers", "num_neighbors", "chunk_length", "seq_length",
              "cca_rotary", "cca_gate", "init_std", "name")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


# ----------------------------------------------------------------------------- reading a folder


def is_hf_folder(path) -> bool:
    """True for a folder whose ``config.json`` names a ``model_type`` (ours never does)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError):
        return False
    return isinstance(raw, dict) and "model_type" in raw


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path}: not found")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PipelineError(f"{path}: malformed JSON ({getattr(exc, 'msg', None) or type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _get(raw: dict, key: str, path: Path, default=None, kind=int):
    """raw[key] (or default when absent/null) checked to be of ``kind``."""
    value = raw.get(key)
    if value is None:
        if default is None:
            raise PipelineError(f"{path}: missing key '{key}'")
        return default
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok:
        raise PipelineError(f"{path}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _rope(raw: dict, path: Path, default_fraction: float) -> dict:
    """rotary_base, rotary_percent and rope_scaling from transformers 5's ``rope_parameters``
    or the earlier top-level ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor``."""
    params = raw.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise PipelineError(f"{path}: 'rope_parameters' must be an object, got {params!r}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    fraction = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", default_fraction))
    scaling = raw.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind not in ("llama3", "default"):
            raise PipelineError(f"{path}: rope scaling of type {kind!r} is not supported (only 'llama3')")
        scaling = None if kind == "default" else {
            "rope_type": "llama3", **{k: scaling.get(k) for k in
                                      ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings")}}
    return {"rotary_base": float(theta), "rotary_percent": float(fraction), "rope_scaling": scaling}


def _architecture(raw: dict, path: Path) -> dict:
    """ModelConfig fields (architecture only) of a supported family's config.json."""
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        why = REFUSED.get(model_type, "not a supported family")
        raise PipelineError(f"{path}: model_type {model_type!r} ({why}) is not supported; "
                            f"supported: {', '.join(FAMILIES)}")
    if model_type == "gpt2":
        hidden = _get(raw, "n_embd", path)
        act = raw.get("activation_function", "gelu_new")
        mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
        if mlp is None:
            raise PipelineError(f"{path}: GPT-2 activation_function {act!r} is not supported")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
            if raw.get(key, want) != want:
                raise PipelineError(f"{path}: GPT-2 with '{key}': {raw[key]!r} is not supported")
        return dict(vocab_size=_get(raw, "vocab_size", path), n_layers=_get(raw, "n_layer", path),
                    hidden=hidden, heads=_get(raw, "n_head", path),
                    ffn_hidden=_get(raw, "n_inner", path, default=4 * hidden),
                    norm="layernorm", mlp=mlp, linear_bias=True, qkv_bias=True,
                    norm_eps=float(_get(raw, "layer_norm_epsilon", path, 1e-5, float)),
                    learned_positions=_get(raw, "n_positions", path, raw.get("max_position_embeddings")),
                    tie_embeddings=_get(raw, "tie_word_embeddings", path, True, bool))
    hidden = _get(raw, "hidden_size", path)
    heads = _get(raw, "num_attention_heads", path)
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise PipelineError(f"{path}: hidden_act {act!r} is not supported for {model_type} (only 'silu')")
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise PipelineError(f"{path}: head_dim {head_dim} x {heads} heads != hidden_size {hidden} is not supported")
    for key in ("attention_bias", "mlp_bias", "qk_layernorm", "use_parallel_residual"):
        if raw.get(key):
            raise PipelineError(f"{path}: '{key}': true is not supported")
    fields = dict(vocab_size=_get(raw, "vocab_size", path), n_layers=_get(raw, "num_hidden_layers", path),
                  hidden=hidden, heads=heads, ffn_hidden=_get(raw, "intermediate_size", path),
                  kv_heads=_get(raw, "num_key_value_heads", path, heads),
                  tie_embeddings=_get(raw, "tie_word_embeddings", path, False, bool),
                  **_rope(raw, path, 0.25 if model_type == "stablelm" else 1.0))
    if fields["kv_heads"] == heads:
        fields["kv_heads"] = 0  # plain multi-head attention: our default layout
    if model_type == "stablelm":
        fields.update(norm="layernorm", qkv_bias=_get(raw, "use_qkv_bias", path, False, bool),
                      norm_eps=float(_get(raw, "layer_norm_eps", path, 1e-5, float)))
    else:
        fields.update(norm="rmsnorm", qkv_bias=model_type == "qwen2",
                      norm_eps=float(_get(raw, "rms_norm_eps", path, 1e-6, float)))
    return fields


def _max_positions(raw: dict) -> int:
    return raw.get("n_positions") or raw.get("max_position_embeddings") or 2048


def _sliding_window(raw: dict) -> int | None:
    if raw.get("model_type") == "qwen2" and not raw.get("use_sliding_window"):
        return None
    return raw.get("sliding_window") if raw.get("model_type") in ("mistral", "qwen2") else None


def read_hf_config(folder, **retro) -> ModelConfig:
    """Our ModelConfig for the HF model in ``folder``: the architecture from its config.json,
    the Retro additions from ``retro`` (keys ``RETRO_KEYS``; defaults: ``retro=False``,
    ``chunk_length=64``, ``seq_length`` the largest multiple of it up to min(max positions, 2048),
    ``cca_gate=True``). A model without an ``lm_head`` weight has tied embeddings."""
    path = Path(folder) / "config.json"
    raw = _read_json(path)
    unknown = sorted(set(retro) - set(RETRO_KEYS))
    if unknown:
        raise PipelineError(f"{path}: {unknown} come from this config.json, not from the preset")
    fields = _architecture(raw, path)
    if not fields["tie_embeddings"] and "lm_head.weight" not in _weight_names(Path(folder)):
        fields["tie_embeddings"] = True  # a missing output layer means tied (Qwen2.5 small, Llama 3.2)
    chunk = retro.get("chunk_length", 64)
    if isinstance(chunk, int) and chunk > 0:
        retro.setdefault("seq_length", max(chunk, min(_max_positions(raw), 2048) // chunk * chunk))
    retro = {"retro": False, "cca_gate": True, "name": raw["model_type"],
             "init_std": float(raw.get("initializer_range", 0.02)), **retro}
    window = _sliding_window(raw)
    seq = retro.get("seq_length")
    if window and isinstance(seq, int) and window < seq:
        raise PipelineError(f"{path}: sliding_window {window} is shorter than seq_length {seq} "
                            "(sliding-window attention is not supported)")
    try:
        return ModelConfig(**fields, **retro)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {str(exc).replace('param ', '')}") from None


# ----------------------------------------------------------------------------- weights


def _safetensors_files(folder: Path) -> tuple[dict[str, Path] | None, Path]:
    """(name -> file) from the shard index, or (None, single file). Refuses pickle checkpoints."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise PipelineError(f"{index}: no 'weight_map' object of tensor name -> shard file")
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise PipelineError(f"{folder / shard}: shard listed in {index.name} is missing")
        return {name: folder / shard for name, shard in weight_map.items()}, index
    if single.is_file():
        return None, single
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickles:
        raise PipelineError(f"{folder / pickles[0]}: pickle checkpoints are refused (loading one can run code); "
                            "convert it to safetensors (model.safetensors) where you trust it")
    raise PipelineError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PipelineError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


def _weight_names(folder: Path) -> set[str]:
    """Tensor names stored in the folder (read from the index or the file header only)."""
    try:
        weight_map, source = _safetensors_files(folder)
    except PipelineError:
        return set()  # read_hf_state_dict reports it
    if weight_map is not None:
        return set(weight_map)
    try:
        return set(_open(source).keys())
    except PipelineError:
        return set()


class _Weights:
    """Lazy access to the tensors of a folder by HF name, with errors naming the file."""

    def __init__(self, folder: Path):
        self.weight_map, self.source = _safetensors_files(folder)
        self.handles = {}
        names = self.weight_map if self.weight_map is not None else self._handle(self.source).keys()
        self.names = set(names)

    def _handle(self, path: Path):
        if path not in self.handles:
            self.handles[path] = _open(path)
        return self.handles[path]

    def has(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise PipelineError(f"{self.source}: lacks tensor '{name}' (missing or partial shards?)")
        path = self.weight_map[name] if self.weight_map is not None else self.source
        handle = self._handle(path)
        if name not in handle.keys():
            raise PipelineError(f"{path}: lacks tensor '{name}' that {self.source.name} places there")
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # safetensors raises several kinds for truncated data
            raise PipelineError(f"{path}: cannot read tensor '{name}' ({str(exc).splitlines()[0][:200]})") from None


def _hf_prefix(weights: _Weights, model_type: str) -> str:
    if model_type == "gpt2":
        return "transformer." if weights.has("transformer.wte.weight") else ""
    return "model."


def _convert_in(get, config: ModelConfig, model_type: str, prefix: str) -> dict[str, torch.Tensor]:
    """HF tensors (``get(name)``) -> our state dict (decoder only)."""
    sd = {}
    p = prefix
    if model_type == "gpt2":  # Conv1D stores (in, out): transpose to Linear's (out, in)
        sd["embed.weight"] = get(f"{p}wte.weight")
        sd["pos_embed.weight"] = get(f"{p}wpe.weight")
        for i in range(config.n_layers):
            h, o = f"{p}h.{i}.", f"layers.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                sd[f"{o}{ours}.weight"], sd[f"{o}{ours}.bias"] = get(f"{h}{theirs}.weight"), get(f"{h}{theirs}.bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                sd[f"{o}{ours}.weight"] = get(f"{h}{theirs}.weight").t().contiguous()
                sd[f"{o}{ours}.bias"] = get(f"{h}{theirs}.bias")
        sd["final_norm.weight"], sd["final_norm.bias"] = get(f"{p}ln_f.weight"), get(f"{p}ln_f.bias")
        return sd
    norms = ("weight", "bias") if config.norm == "layernorm" else ("weight",)
    sd["embed.weight"] = get(f"{p}embed_tokens.weight")
    for i in range(config.n_layers):
        h, o = f"{p}layers.{i}.", f"layers.{i}."
        for ours, theirs in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
            for kind in norms:
                sd[f"{o}{ours}.{kind}"] = get(f"{h}{theirs}.{kind}")
        sd[f"{o}attn.qkv.weight"] = torch.cat([get(f"{h}self_attn.{x}_proj.weight") for x in "qkv"])
        if config.qkv_bias:
            sd[f"{o}attn.qkv.bias"] = torch.cat([get(f"{h}self_attn.{x}_proj.bias") for x in "qkv"])
        sd[f"{o}attn.proj.weight"] = get(f"{h}self_attn.o_proj.weight")
        sd[f"{o}mlp.gate_up.weight"] = torch.cat([get(f"{h}mlp.gate_proj.weight"), get(f"{h}mlp.up_proj.weight")])
        sd[f"{o}mlp.down.weight"] = get(f"{h}mlp.down_proj.weight")
    for kind in norms:
        sd[f"final_norm.{kind}"] = get(f"{p}norm.{kind}")
    if not config.tie_embeddings:
        sd["lm_head.weight"] = get("lm_head.weight")
    return sd


def _expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Our decoder's parameter shapes (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        model = Retro(dataclasses.replace(config, retro=False))
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def read_hf_state_dict(folder, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The decoder weights of the HF model in ``folder`` under our parameter names (dtype as
    stored). ``config`` is ``read_hf_config``'s. Every error names the file."""
    folder = Path(folder)
    model_type = _read_json(folder / "config.json").get("model_type")
    weights = _Weights(folder)
    prefix = _hf_prefix(weights, model_type)
    embed_name = f"{prefix}wte.weight" if model_type == "gpt2" else f"{prefix}embed_tokens.weight"
    if weights.has(embed_name):
        rows = weights(embed_name).shape[0]
        if rows != config.vocab_size:
            raise PipelineError(f"{folder / 'config.json'}: vocab_size {config.vocab_size} does not match the "
                                f"{rows} rows of '{embed_name}' in {weights.source.name}")
    sd = _convert_in(weights, config, model_type, prefix)
    for name, shape in _expected_shapes(config).items():
        if name not in sd:
            raise PipelineError(f"{weights.source}: no tensor for our '{name}'")
        if tuple(sd[name].shape) != shape:
            raise PipelineError(f"{weights.source}: '{name}' has shape {tuple(sd[name].shape)}; "
                                f"config.json gives {shape}")
    return sd


def load_hf_model(folder, **retro) -> Retro:
    """Our model (fp32, CPU) built from the HF folder with its weights loaded; with
    ``retro=True`` the encoder and the gated CCA are new (Retro's logits equal the imported
    model's at step 0)."""
    config = read_hf_config(folder, **retro)
    state = read_hf_state_dict(folder, config)
    model = Retro(config)
    try:
        load_decoder_weights(model, state)
    except PipelineError as exc:
        raise PipelineError(f"{folder}: {exc}") from None
    return model
