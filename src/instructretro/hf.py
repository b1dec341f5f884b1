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
import os
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import check_fits, read_config, read_state_dict, read_tensor, safetensors_handle
from .errors import PipelineError
from .io import read_json_object
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
    for key, value in (("rope_theta", theta), ("partial_rotary_factor", fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PipelineError(f"{path}: '{key}' must be a number, got {value!r}")
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
    raw = read_json_object(path)
    unknown = sorted(set(retro) - set(RETRO_KEYS))
    if unknown:
        raise PipelineError(f"{path}: {unknown} come from this config.json, not from the preset")
    fields = _architecture(raw, path)
    names = _weight_names(Path(folder))  # empty when there are none to read (a config alone)
    if not fields["tie_embeddings"] and names and "lm_head.weight" not in names:
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
        weight_map = read_json_object(index).get("weight_map")
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
    return safetensors_handle(path)  # the shared reader: a truncated file is one line naming it


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
        return read_tensor(handle, path, name)


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
        if not config.tie_embeddings:
            sd["lm_head.weight"] = get("lm_head.weight")
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
    model_type = read_json_object(folder / "config.json").get("model_type")
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
    check_fits(config, str(Path(folder) / "config.json"))  # before reading or allocating the weights
    state = read_hf_state_dict(folder, config)
    seed = int(torch.randint(0, 2**62, ()).item())
    with torch.device("meta"):  # no random draws for the decoder weights about to be replaced
        model = Retro(config)
    model = model.to_empty(device="cpu")
    try:
        fresh = load_decoder_weights(model, state)
    except PipelineError as exc:
        raise PipelineError(f"{folder}: {exc}") from None
    model.reset_parameters(seed, only=set(fresh))  # the new encoder and CCA, as Retro initialises them
    return model


# ----------------------------------------------------------------------------- export


def export_family(config: ModelConfig) -> str:
    """The HF model_type whose class computes exactly our decoder, or a one-line PipelineError."""
    rotary = not config.learned_positions
    if (not rotary and config.norm == "layernorm" and config.mlp in ("gelu_tanh", "gelu") and config.linear_bias
            and config.tie_embeddings and not config.kv_heads):
        return "gpt2"
    if rotary and config.mlp == "swiglu" and not config.linear_bias:
        if config.norm == "rmsnorm" and config.rotary_percent == 1.0:
            return "qwen2" if config.qkv_bias else "llama"
        if config.norm in ("layernorm", "layernorm1p"):
            return "stablelm"
    raise PipelineError(
        f"no transformers class fits this architecture (norm {config.norm}, mlp {config.mlp}, "
        f"rotary_percent {config.rotary_percent}, learned_positions {config.learned_positions}, "
        f"linear_bias {config.linear_bias}, tie_embeddings {config.tie_embeddings})")


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "stablelm": "StableLmForCausalLM",
                 "gpt2": "GPT2LMHeadModel", "mistral": "MistralForCausalLM"}


def hf_config(config: ModelConfig, family: str, special: dict) -> dict:
    """config.json of the HF class ``family`` for our decoder (both the transformers 5
    ``rope_parameters`` and the earlier top-level rope keys). ``special``: bos/eos/pad ids."""
    common = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": config.vocab_size,
              "tie_word_embeddings": config.tie_embeddings, "torch_dtype": "float32", "use_cache": True,
              "initializer_range": config.init_std, **special}
    if family == "gpt2":
        return {**common, "n_embd": config.hidden, "n_layer": config.n_layers, "n_head": config.heads,
                "n_inner": config.ffn_hidden, "n_positions": config.learned_positions,
                "n_ctx": config.learned_positions, "layer_norm_epsilon": config.norm_eps,
                "activation_function": "gelu_new" if config.mlp == "gelu_tanh" else "gelu",
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True}
    rope = {"rope_type": "default", "rope_theta": config.rotary_base}
    if config.rope_scaling:
        rope = {**config.rope_scaling, "rope_theta": config.rotary_base}
    out = {**common, "hidden_size": config.hidden, "intermediate_size": config.ffn_hidden,
           "num_hidden_layers": config.n_layers, "num_attention_heads": config.heads,
           "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
           "max_position_embeddings": max(config.seq_length, 2048), "rope_theta": config.rotary_base,
           "rope_scaling": config.rope_scaling, "attention_dropout": 0.0}
    if family == "stablelm":
        rope["partial_rotary_factor"] = config.rotary_percent
        out.update(layer_norm_eps=config.norm_eps, partial_rotary_factor=config.rotary_percent,
                   use_qkv_bias=config.qkv_bias, qk_layernorm=False, use_parallel_residual=False,
                   hidden_dropout=0.0)
    else:
        out.update(rms_norm_eps=config.norm_eps)
        if family == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        else:
            out.update(use_sliding_window=False, sliding_window=None)
    return {**out, "rope_parameters": rope}


def _convert_out(sd: dict, config: ModelConfig, family: str) -> dict[str, torch.Tensor]:
    """Our decoder state dict -> the HF class's tensors (the inverse of ``_convert_in``)."""
    out = {}
    if family == "gpt2":
        p = "transformer."
        out[f"{p}wte.weight"], out[f"{p}wpe.weight"] = sd["embed.weight"], sd["pos_embed.weight"]
        for i in range(config.n_layers):
            h, o = f"{p}h.{i}.", f"layers.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{h}{theirs}.weight"], out[f"{h}{theirs}.bias"] = sd[f"{o}{ours}.weight"], sd[f"{o}{ours}.bias"]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
                out[f"{h}{theirs}.weight"] = sd[f"{o}{ours}.weight"].t()
                out[f"{h}{theirs}.bias"] = sd[f"{o}{ours}.bias"]
        out[f"{p}ln_f.weight"], out[f"{p}ln_f.bias"] = sd["final_norm.weight"], sd["final_norm.bias"]
        return out

    def norm(ours: str, theirs: str):
        if config.norm == "layernorm1p":  # LayerNorm-1p stores the gain minus one
            out[f"{theirs}.weight"], out[f"{theirs}.bias"] = sd[f"{ours}.weight"] + 1.0, sd[f"{ours}.bias"]
        else:
            for kind in ("weight", "bias") if config.norm == "layernorm" else ("weight",):
                out[f"{theirs}.{kind}"] = sd[f"{ours}.{kind}"]

    H, KV, d = config.heads, config.n_kv_heads, config.head_dim
    out["model.embed_tokens.weight"] = sd["embed.weight"]
    for i in range(config.n_layers):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        norm(f"{o}norm1", f"{h}input_layernorm")
        norm(f"{o}norm2", f"{h}post_attention_layernorm")
        kinds = ("weight", "bias") if config.qkv_bias else ("weight",)
        for kind in kinds:
            for x, t in zip("qkv", sd[f"{o}attn.qkv.{kind}"].split([H * d, KV * d, KV * d])):
                out[f"{h}self_attn.{x}_proj.{kind}"] = t
        out[f"{h}self_attn.o_proj.weight"] = sd[f"{o}attn.proj.weight"]
        out[f"{h}mlp.gate_proj.weight"], out[f"{h}mlp.up_proj.weight"] = sd[f"{o}mlp.gate_up.weight"].chunk(2)
        out[f"{h}mlp.down_proj.weight"] = sd[f"{o}mlp.down.weight"]
    norm("final_norm", "model.norm")
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _read_checkpoint(folder: Path) -> tuple[ModelConfig, dict]:
    """Config and weights of one of our exported checkpoints (config.json + model.safetensors)."""
    if is_hf_folder(folder):
        raise PipelineError(f"{folder / 'config.json'}: a Hugging Face folder, not one of our checkpoints")
    return read_config(folder), read_state_dict(folder)


def _sentencepiece_to_hf(model_file: Path, out: Path) -> dict:
    """Write a transformers tokenizer (tokenizer.json) that encodes like the SentencePiece model;
    return its special token ids."""
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        proto = import_protobuf().ModelProto()
        proto.ParseFromString(model_file.read_bytes())
    except (RuntimeError, OSError, ValueError) as exc:
        raise PipelineError(f"{model_file}: not a SentencePiece model ({str(exc).splitlines()[0][:200]})") from None
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    special = {f"{kind}_token": sp.id_to_piece(i)
               for kind, i in (("pad", sp.pad_id()), ("unk", sp.unk_id()), ("eos", sp.eos_id()), ("bos", sp.bos_id()))
               if i >= 0}
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(str(out))
    return {f"{kind}_token_id": (i if i >= 0 else None)
            for kind, i in (("pad", sp.pad_id()), ("eos", sp.eos_id()), ("bos", sp.bos_id()))}


def _copy_hf_tokenizer(folder: Path, out: Path) -> dict:
    """Copy an HF folder's tokenizer files; return the special token ids of its config.json."""
    copied = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not any(name in copied for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise PipelineError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    for name in copied:
        shutil.copyfile(folder / name, out / name)
    raw = read_json_object(folder / "config.json") if (folder / "config.json").is_file() else {}
    return {key: raw.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in raw}


def export_hf(checkpoint_folder, out_folder, tokenizer=None) -> str:
    """Write the decoder of our checkpoint as an HF folder (config.json, model.safetensors and the
    tokenizer: ``tokenizer`` is our SentencePiece model file or an HF folder whose tokenizer
    files are copied; None writes none). A Retro's encoder and CCA are left out (its decoder
    used without retrieval). Returns a one-line summary."""
    from safetensors.torch import save_file

    src, out = Path(checkpoint_folder), Path(out_folder)
    config, state = _read_checkpoint(src)
    family = export_family(config)
    decoder = {n: t for n, t in state.items() if not Retro.is_retro_parameter(n)}
    expected = _expected_shapes(config)
    if set(decoder) != set(expected):
        raise PipelineError(f"{src / 'model.safetensors'}: weights do not match config.json "
                            f"({len(set(decoder) ^ set(expected))} names differ)")
    tensors = {n: t.to(torch.float32).contiguous() for n, t in _convert_out(decoder, config, family).items()}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    special = {}
    if tokenizer is not None:
        tok = Path(tokenizer)
        if tok.is_dir():
            special = _copy_hf_tokenizer(tok, tmp)
        elif tok.is_file():
            special = _sentencepiece_to_hf(tok, tmp)
        else:
            raise PipelineError(f"{tok}: tokenizer not found")
    (tmp / "config.json").write_text(json.dumps(hf_config(config, family, special), indent=2, sort_keys=True) + "\n")
    save_file(dict(sorted(tensors.items())), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    dropped = len(state) - len(decoder)
    note = f"; {dropped} encoder/CCA tensors left out (no HF class holds them)" if dropped else ""
    return f"{out}: {ARCHITECTURES[family]} from {src}{note}"


# ----------------------------------------------------------------------------- hf-check


def check(folder, new_tokens: int = 32, seed: int = 0, rel_tol: float = 1e-4) -> tuple[bool, str]:
    """Compare our model built from the HF folder with transformers' own (fp32, CPU) on random
    tokens: the largest absolute logit difference (ok within ``rel_tol`` x max(1, largest
    |logit|)) and a greedy ``new_tokens`` decode, ours with the KV cache against transformers'
    ``generate``, token for token. Returns (ok, one line ending ``ok`` or ``MISMATCH``)."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    from .decoding import greedy_generate

    hf_logging.set_verbosity_error()  # the verdict is one line
    hf_logging.disable_progress_bar()

    folder = Path(folder)
    raw = read_json_object(folder / "config.json")
    max_positions = _max_positions(raw)
    chunk = 16 if max_positions >= 32 else 1  # the prompt is one chunk: no left padding
    ours = load_hf_model(folder, retro=False, chunk_length=chunk).eval()
    try:
        theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    except Exception as exc:  # transformers raises many kinds for a folder it cannot load
        raise PipelineError(f"{folder}: transformers cannot load it ({str(exc).splitlines()[0][:200]})") from None
    gen = torch.Generator().manual_seed(seed)
    T = min(64, max_positions)
    tokens = torch.randint(0, ours.config.vocab_size, (2, T), generator=gen)
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits
    diff = float((a - b).abs().max())
    tol = rel_tol * max(1.0, float(b.abs().max()))
    n = min(new_tokens, max_positions - chunk)
    prompt = tokens[:1, :chunk]
    mine = greedy_generate(ours, prompt.tolist(), n, eod_id=-1)[0]
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        reference = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    reference = reference[0, chunk:].tolist()
    first = next((i for i, (x, y) in enumerate(zip(mine, reference)) if x != y), None)
    same = first is None and len(mine) == len(reference)
    ok = diff <= tol and same
    decode = "equal" if same else f"differs from token {first if first is not None else min(len(mine), len(reference))}"
    line = (f"{folder}: {raw.get('model_type')} as {type(theirs).__name__}, max |logit diff| {diff:.2e} "
            f"(tolerance {tol:.1e}) on 2x{T} random tokens; greedy {n}-token decode (ours cached, "
            f"transformers generate) {decode}: {'ok' if ok else 'MISMATCH'}")
    return ok, line


# ----------------------------------------------------------------------------- command line


def _args(argv: list[str], allowed: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed or not value:
            raise PipelineError(f"expected {' '.join(f'{k}=...' for k in allowed)}, got {arg!r}")
        out[key] = value
    return out


USAGE = ("usage: python -m instructretro.hf check HF=<folder>\n"
         "       python -m instructretro.hf export CKPT=<our checkpoint> OUT=<folder> [TOKENIZER=<spm.model or HF folder>]")


def main(argv: list[str] | None = None) -> int:
    from .errors import cli

    argv = sys.argv[1:] if argv is None else argv

    @cli
    def run() -> int:
        if not argv or argv[0] not in ("check", "export"):
            print(USAGE, file=sys.stderr)
            return 2
        if argv[0] == "check":
            args = _args(argv[1:], ("HF",))
            if "HF" not in args:
                raise PipelineError("hf-check needs HF=<folder>")
            if not is_hf_folder(args["HF"]):
                raise PipelineError(f"{args['HF']}: not a Hugging Face model folder (no config.json with a model_type)")
            ok, line = check(args["HF"])
            print(line)
            return 0 if ok else 1
        args = _args(argv[1:], ("CKPT", "OUT", "TOKENIZER"))
        if "CKPT" not in args or "OUT" not in args:
            raise PipelineError("export-hf needs CKPT=<checkpoint folder> OUT=<folder>")
        print(export_hf(args["CKPT"], args["OUT"], args.get("TOKENIZER")))
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
