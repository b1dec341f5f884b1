"""The Retro model: a GPT decoder with chunked cross-attention to an encoder over neighbors.

Read top to bottom: configuration, building blocks (LayerNorm-1p, rotary embeddings, attention,
SwiGLU), the neighbor encoder, the decoder layer, the model, the decoding cache, FLOP counting.

Decoder: pre-norm GPT with rotary position embeddings on ``rotary_percent`` of each head's
dims, a SwiGLU MLP, LayerNorm-1p (gain stored zero-centred), untied input/output embeddings and
no linear biases. Retro adds

- an *encoder*: ``encoder_layers`` bidirectional layers over each neighbor's tokens (a neighbor
  is a chunk plus its continuation, ``2 * chunk_length`` tokens), embedded with the decoder's
  token embedding; its first layer cross-attends to the decoder hidden states of the chunk the
  neighbor was retrieved for (taken at the input of the first CCA layer);
- *chunked cross-attention* (CCA) in the decoder layers ``cca_layers`` (1-based), between self-
  attention and the MLP. CCA is shifted by ``chunk_length - 1``: the token at position ``i``
  attends to the neighbors of chunk ``(i + 1) // chunk_length - 1``, the last chunk that ended
  at or before ``i``; tokens before the end of the first chunk attend to nothing. Masked
  neighbor tokens contribute nothing, and a token with no valid neighbor token gets exactly
  zero from CCA, so all neighbors masked equals the decoder with retrieval switched off.

``retro=False`` builds the same decoder without encoder and CCA (GPT); its parameter names are
the decoder part of Retro's, so a GPT state dict loads into Retro (``load_decoder_weights``).

The decoder of an imported Hugging Face model (``hf.py``) is described by the same config, as
data: norm kind (``norm``), MLP kind (``mlp``), key/value heads (``kv_heads``, grouped-query
attention), biases (``qkv_bias``, ``linear_bias``), rotary fraction, base and ``rope_scaling``,
``learned_positions`` instead of rotary, and ``tie_embeddings``. ``cca_gate`` multiplies each
CCA output by ``tanh(g)`` with ``g`` initialised to 0, so a Retro built on a pretrained decoder
starts as exactly that decoder. The defaults are our own architecture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dist import rank
from .errors import PipelineError

# ----------------------------------------------------------------------------- configuration


def swiglu_ffn_hidden(hidden: int) -> int:
    """SwiGLU width of the reference: ``int(8h/3/64)*64``; tiny widths round 8h/3 up to 8."""
    ffn = int(8 * hidden / 3 / 64) * 64
    if ffn < hidden:  # the rule gives 0 below width 24 and less than h up to 47
        ffn = int(math.ceil(8 * hidden / 3 / 8)) * 8
    return ffn


def default_cca_layers(n_layers: int) -> tuple[int, ...]:
    """CCA layers of the reference (1-based): layer 6 and every 3rd after, from 9 if > 15 layers."""
    start = 9 if n_layers > 15 else 6
    return tuple(range(start, n_layers + 1, 3))


NORMS = ("layernorm1p", "layernorm", "rmsnorm")
MLPS = ("swiglu", "gelu_tanh", "gelu")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling) -> None:
    """Only Llama 3's frequency-dependent scaling is supported (others are refused)."""
    if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
        raise PipelineError(f"param 'model.rope_scaling': only rope_type 'llama3' is supported, got {scaling!r}")
    for key in LLAMA3_ROPE_KEYS:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise PipelineError(f"param 'model.rope_scaling': '{key}' must be a number > 0, got {value!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise PipelineError("param 'model.rope_scaling': 'high_freq_factor' must exceed 'low_freq_factor'")


@dataclass
class ModelConfig:
    """Everything that fixes the architecture; saved as ``config.json`` next to the weights."""

    vocab_size: int = 4096
    n_layers: int = 4
    hidden: int = 128
    heads: int = 4
    ffn_hidden: int = 0  # 0: the SwiGLU rule (swiglu_ffn_hidden)
    seq_length: int = 256
    chunk_length: int = 64
    retro: bool = True
    cca_layers: tuple[int, ...] | None = None  # 1-based; None: the reference rule
    encoder_layers: int = 2
    num_neighbors: int = 2  # k neighbors per chunk fed to the encoder
    rotary_percent: float = 0.5
    rotary_base: float = 10000.0
    cca_rotary: bool = True  # relative positions between decoder queries and neighbor tokens in CCA
    norm_eps: float = 1e-5
    init_std: float = 0.02
    norm: str = "layernorm1p"  # "layernorm1p" (gain stored as 1 + weight), "layernorm", "rmsnorm"
    mlp: str = "swiglu"  # "swiglu", "gelu_tanh" (GPT-2's), "gelu"
    kv_heads: int = 0  # key/value heads; 0: as many as query heads (fewer: grouped-query attention)
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
    linear_bias: bool = False  # biases on every decoder linear layer but the output layer (GPT-2)
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    learned_positions: int = 0  # > 0: a learned absolute position table of this size (GPT-2), no rotary in the decoder
    tie_embeddings: bool = False  # output layer = token embedding
    cca_gate: bool = False  # CCA output times tanh(gate), gate initialised to 0 (retrofit of a pretrained decoder)
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        for key in ("rotary_percent", "rotary_base", "norm_eps", "init_std"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PipelineError(f"param 'model.{key}' must be a number, got {value!r}")
        for key in ("rotary_base", "norm_eps", "init_std"):
            if getattr(self, key) <= 0:
                raise PipelineError(f"param 'model.{key}' must be > 0, got {getattr(self, key)!r}")
        if isinstance(self.ffn_hidden, bool) or not isinstance(self.ffn_hidden, int):
            raise PipelineError(f"param 'model.ffn_hidden' must be an integer, got {self.ffn_hidden!r}")
        if self.cca_layers is not None and (
                not isinstance(self.cca_layers, (list, tuple))
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.cca_layers)):
            raise PipelineError(f"param 'model.cca_layers' must be a list of layer numbers, got {self.cca_layers!r}")
        for key in ("vocab_size", "n_layers", "hidden", "heads", "seq_length", "chunk_length",
                    "encoder_layers", "num_neighbors"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise PipelineError(f"param 'model.{key}' must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise PipelineError(
                f"param 'model.hidden' ({self.hidden}) must be divisible by 'model.heads' ({self.heads})"
            )
        for key in ("retro", "cca_rotary", "qkv_bias", "linear_bias", "tie_embeddings", "cca_gate"):
            if not isinstance(getattr(self, key), bool):
                raise PipelineError(f"param 'model.{key}' must be true or false, got {getattr(self, key)!r}")
        for key, choices in (("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, key) not in choices:
                raise PipelineError(f"param 'model.{key}' must be one of {list(choices)}, got {getattr(self, key)!r}")
        for key in ("kv_heads", "learned_positions"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PipelineError(f"param 'model.{key}' must be an integer >= 0, got {value!r}")
        if self.kv_heads and self.heads % self.kv_heads:
            raise PipelineError(
                f"param 'model.heads' ({self.heads}) must be a multiple of 'model.kv_heads' ({self.kv_heads})"
            )
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.learned_positions and self.learned_positions < self.seq_length:
            raise PipelineError(
                f"param 'model.seq_length' ({self.seq_length}) exceeds the {self.learned_positions} learned positions"
            )
        if not 0.0 < self.rotary_percent <= 1.0:
            raise PipelineError(f"param 'model.rotary_percent' must be in (0, 1], got {self.rotary_percent}")
        if self.rotary_dim % 2:
            raise PipelineError(
                f"param 'model.rotary_percent': head dim {self.head_dim} x {self.rotary_percent} "
                "must give an even number of rotary dims"
            )
        if self.seq_length % self.chunk_length:
            raise PipelineError(
                f"param 'model.seq_length' ({self.seq_length}) must be a multiple of "
                f"chunk_length ({self.chunk_length})"
            )
        if self.ffn_hidden == 0:
            self.ffn_hidden = swiglu_ffn_hidden(self.hidden) if self.mlp == "swiglu" else 4 * self.hidden
        if self.ffn_hidden < 0:
            raise PipelineError(f"param 'model.ffn_hidden' must be >= 0, got {self.ffn_hidden}")
        if self.cca_layers is None:
            self.cca_layers = default_cca_layers(self.n_layers)
        self.cca_layers = tuple(sorted(set(int(i) for i in self.cca_layers)))
        bad = [i for i in self.cca_layers if not 1 <= i <= self.n_layers]
        if bad:
            raise PipelineError(
                f"param 'model.cca_layers': layers {bad} outside 1..n_layers ({self.n_layers})"
            )
        if self.retro and not self.cca_layers:
            raise PipelineError(
                f"param 'model.cca_layers': a Retro decoder of {self.n_layers} layers has no CCA "
                "layer under the default rule (layer 6 onward); list them, e.g. [2, 4]"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)

    @property
    def neighbor_length(self) -> int:
        """Tokens per neighbor: the retrieved chunk plus its continuation."""
        return 2 * self.chunk_length

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cca_layers"] = list(self.cca_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise PipelineError(f"{source}: expected a JSON object of model settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PipelineError(f"{source}: unknown model config keys {unknown}")
        d = {"cca_rotary": False, **d}  # configs written before the field existed had none
        try:
            return cls(**d)
        except PipelineError as exc:
            message = str(exc).replace("param 'model.", "'")  # the file's key, not a param
            raise PipelineError(f"{source}: {message}") from None


# ----------------------------------------------------------------------------- building blocks


class LayerNorm1p(nn.Module):
    """LayerNorm whose gain is stored zero-centred (applied as ``1 + weight``): weight decay
    pulls the gain towards 1, not 0."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight + 1.0, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): computed in float32, the gain applied in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden, config.norm_eps)
    if config.norm == "layernorm":
        return nn.LayerNorm(config.hidden, eps=config.norm_eps)
    return LayerNorm1p(config.hidden, config.norm_eps)


def rope_inv_freq(config: ModelConfig, device=None):
    """Inverse frequencies (rotary_dim / 2,) of the rotary embedding, with Llama 3's scaling:
    wavelengths beyond ``original_max_position_embeddings / low_freq_factor`` are stretched by
    ``factor``, those below ``... / high_freq_factor`` kept, and the band between interpolated."""
    rot = config.rotary_dim
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, rot, 2, device=device).float() / rot))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    between = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_at(positions, config: ModelConfig, dtype):
    """cos, sin of shape (P, rotary_dim) for a 1-D tensor of P positions."""
    inv_freq = rope_inv_freq(config, positions.device)
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_tables(start: int, length: int, config: ModelConfig, device, dtype):
    """cos, sin of shape (length, 1, rotary_dim) for positions start .. start+length-1,
    to broadcast over (B, T, heads, head_dim) queries and keys."""
    cos, sin = rope_at(torch.arange(start, start + length, device=device), config, dtype)
    return cos[:, None], sin[:, None]


def cca_query_rope(start: int, length: int, config: ModelConfig, device, dtype):
    """Rotary tables (length, rotary_dim) for CCA queries at positions start .. start+length-1.

    A query at position i attends to the neighbors of the chunk that ended at or before it, at
    offset j = (i + 1) % chunk_length past that chunk's last token. It gets the rotary position
    chunk_length - 1 + j: where it would sit in a neighbor (chunk + continuation) aligned with
    the text, whose tokens get positions 0 .. 2 * chunk_length - 1. So "the neighbor token after
    mine" is the fixed relative offset +1, as with the relative encoding of the RETRO paper.
    """
    L = config.chunk_length
    positions = (torch.arange(start, start + length, device=device) + 1) % L + L - 1
    return rope_at(positions, config, dtype)


def apply_rope(x, cos, sin):
    """Rotate the first ``rotary_dim`` dims of each head (rotate-half pairs i, i + rot/2)."""
    rot = cos.shape[-1]
    half = rot // 2
    x1, x2, x_pass = x.split([half, half, x.shape[-1] - rot], dim=-1)
    c, s = cos[..., :half], sin[..., :half]  # both halves of the tables hold the same angles
    parts = [x1 * c - x2 * s, x2 * c + x1 * s]  # (x1, x2) * cos + (-x2, x1) * sin, half by half
    if rot < x.shape[-1]:
        parts.append(x_pass)
    return torch.cat(parts, dim=-1)


def masked_attention(q, k, v, key_mask):
    """Attention of q (N,H,Tq,D) over k, v (N,H,S,D) where key_mask (N,S) says which keys count.

    A row with no valid key gets exactly zero (SDPA alone would give NaN): such rows attend to
    every key and the result is multiplied by 0, which keeps gradients finite too.
    """
    has_key = key_mask.any(dim=-1)
    safe = key_mask | ~has_key[:, None]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=safe[:, None, None, :])
    return y * has_key[:, None, None, None].to(y.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary embeddings (``rope`` None: none); causal in the
    decoder. With fewer key/value heads than query heads (grouped-query attention) query head
    ``i`` reads key/value head ``i // (heads / kv_heads)``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.heads, config.n_kv_heads, config.head_dim
        kv = self.kv_heads * self.head_dim
        self.qkv = nn.Linear(config.hidden, config.hidden + 2 * kv, bias=config.qkv_bias or config.linear_bias)
        self.proj = nn.Linear(config.hidden, config.hidden, bias=config.linear_bias)

    def forward(self, x, rope, causal=True, attn_mask=None, cache=None):
        """x (B,T,h). attn_mask (B,1,T,S) bool overrides ``causal``. ``cache`` is a
        (keys, values, start) triple: new keys/values are written at ``start`` and attention
        runs over everything cached so far."""
        B, T, _ = x.shape
        H, KV, d = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * KV, d)  # query heads, then key heads, then value heads
        qk, v = qkv.split([H + KV, KV], dim=2)  # split, not slices: backward joins instead of zero-filling
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys in one go
        q, k = qk.split([H, KV], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        if cache is not None:
            k_cache, v_cache, start = cache
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]
        gqa = {}
        if KV != H and attn_mask is None:  # SDPA shares each key/value head across its query heads
            gqa = {"enable_gqa": True}
        elif KV != H:
            k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None and T > 1, **gqa
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a context (no rotary: content-based lookup)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = config.heads, config.head_dim
        self.q = nn.Linear(config.hidden, config.hidden, bias=False)
        self.kv = nn.Linear(config.hidden, 2 * config.hidden, bias=False)
        self.proj = nn.Linear(config.hidden, config.hidden, bias=False)

    def project_kv(self, context):
        """context (..., S, h) -> keys, values (..., H, S, head_dim)."""
        *lead, S, _ = context.shape
        kv = self.kv(context).view(*lead, S, 2, self.heads, self.head_dim)
        k, v = kv.unbind(dim=-3)
        return k.transpose(-3, -2), v.transpose(-3, -2)

    def project_q(self, x):
        """x (B,T,h) -> queries (B,H,T,head_dim)."""
        B, T, _ = x.shape
        return self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def output(self, y):
        """y (B,H,T,head_dim) -> (B,T,h)."""
        B, _, T, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden, 2 * config.ffn_hidden, bias=config.linear_bias)
        self.down = nn.Linear(config.ffn_hidden, config.hidden, bias=config.linear_bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """Two-layer MLP with GELU (GPT-2: the tanh approximation)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        self.up = nn.Linear(config.hidden, config.ffn_hidden, bias=config.linear_bias)
        self.down = nn.Linear(config.ffn_hidden, config.hidden, bias=config.linear_bias)

    def forward(self, x):
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


def make_mlp(config: ModelConfig) -> nn.Module:
    return SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)


# ----------------------------------------------------------------------------- the encoder


class EncoderLayer(nn.Module):
    """Bidirectional layer over neighbor tokens; the first one also cross-attends to the
    decoder hidden states of the chunk the neighbors were retrieved for."""

    def __init__(self, config: ModelConfig, cross: bool):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = SelfAttention(config)
        if cross:
            self.cross_norm = make_norm(config)
            self.cross = CrossAttention(config)
        else:
            self.cross = None
        self.norm2 = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, x, rope, self_mask, context_kv, context_mask):
        x = x + self.attn(self.norm1(x), rope, causal=False, attn_mask=self_mask)
        if self.cross is not None:
            y = masked_attention(self.cross.project_q(self.cross_norm(x)), *context_kv, context_mask)
            x = x + self.cross.output(y)
        return x + self.mlp(self.norm2(x))


class RetroEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(EncoderLayer(config, cross=i == 0) for i in range(config.encoder_layers))
        self.norm = make_norm(config)
        self.checkpointing = False  # recompute each layer in backward (Retro.set_checkpointing)

    def forward(self, neighbors, neighbor_mask, context, context_mask=None):
        """Encode N chunks' neighbors.

        neighbors: embedded neighbor tokens (N, k, R, h); neighbor_mask (N, k, R) bool;
        context: decoder hidden states of each chunk (N, L, h), context_mask (N, L) or None.
        Returns (N, k, R, h).
        """
        N, k, R, h = neighbors.shape
        x = neighbors.reshape(N * k, R, h)
        rope = rope_tables(0, R, self.config, x.device, x.dtype)  # rotary also where the decoder has learned positions
        key_mask = neighbor_mask.reshape(N * k, R)
        # A neighbor with no valid token attends to all of its tokens (its output is never used).
        # The mask is always passed: deciding to drop it would read the mask on the host (a
        # device sync every forward).
        key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
        self_mask = key_mask[:, None, None, :]
        ck, cv = self.layers[0].cross.project_kv(context)  # (N, H, L, d), once per chunk
        ck = ck.repeat_interleave(k, dim=0)
        cv = cv.repeat_interleave(k, dim=0)
        if context_mask is None:
            context_mask = torch.ones(N, context.shape[1], dtype=torch.bool, device=x.device)
        context_mask = context_mask.repeat_interleave(k, dim=0)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, self_mask, (ck, cv), context_mask, use_reentrant=False)
            else:
                x = layer(x, rope, self_mask, (ck, cv), context_mask)
        return self.norm(x).view(N, k, R, h)


# ----------------------------------------------------------------------------- the decoder


def chunked_cross_attention(q, keys, values, key_mask, start, chunk_length, chunk_offset=0):
    """CCA of decoder queries over the neighbors of completed chunks.

    q (B,H,T,d): queries of positions start .. start+T-1. keys, values (B,C,H,S,d) and key_mask
    (B,C,S): neighbors of chunks chunk_offset .. chunk_offset+C-1 (S = k * neighbor length),
    which must include every chunk these queries attend to. The token at position i
    attends to chunk (i + 1) // chunk_length - 1; before the first chunk ends, to nothing.
    Positions are grouped into runs that attend to the same chunk, so one SDPA call does all.
    """
    B, H, T, d = q.shape
    L = chunk_length
    first = (start + 1) // L  # group a attends to chunk a - 1; a = 0: before chunk 0 ends
    last = (start + T) // L
    if first == last:  # all queries in one group (always so when decoding one token)
        front, group_len = 0, T
    else:
        front, group_len = (start + 1) % L, L
    back = (-(front + T)) % group_len
    G = (front + T + back) // group_len
    skip = 1 if first == 0 else 0  # group a = 0 attends to nothing: its output is zero
    n = G - skip
    if n == 0:
        return torch.zeros_like(q)
    qg = F.pad(q, (0, 0, front, back)).view(B, H, G, group_len, d).transpose(1, 2)[:, skip:]
    c0 = first - 1 + skip  # groups attend to the consecutive chunks c0 .. c0 + n - 1
    c0 -= chunk_offset
    k_g, v_g, m_g = keys[:, c0:c0 + n], values[:, c0:c0 + n], key_mask[:, c0:c0 + n]
    S = k_g.shape[-2]
    y = masked_attention(
        qg.reshape(B * n, H, group_len, d),
        k_g.reshape(B * n, H, S, d),
        v_g.reshape(B * n, H, S, d),
        m_g.reshape(B * n, S),
    )
    y = y.view(B, n, H, group_len, d).transpose(1, 2).reshape(B, H, n * group_len, d)
    return F.pad(y, (0, 0, skip * group_len, 0))[:, :, front:front + T]


class DecoderLayer(nn.Module):
    """Pre-norm layer: self-attention, then (Retro, CCA layers only) chunked cross-attention,
    then the MLP. With ``cca_gate`` the CCA output is scaled by ``tanh(cca_gate)`` (0 at init)."""

    def __init__(self, config: ModelConfig, cca: bool):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = SelfAttention(config)
        if cca:
            self.cca_norm = make_norm(config)
            self.cca = CrossAttention(config)
        else:
            self.cca = None
        self.cca_gate = nn.Parameter(torch.zeros(1)) if cca and config.cca_gate else None
        self.norm2 = make_norm(config)
        self.mlp = make_mlp(config)


class Retro(nn.Module):
    """Retro decoder (or plain GPT with ``config.retro=False``). See the module docstring."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Draw one seed, build under a forked RNG, then initialise decoder parameters first from
        # that seed: with the same torch seed, Retro and GPT get identical decoder weights.
        seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        with torch.random.fork_rng(devices=[]):
            self.embed = nn.Embedding(config.vocab_size, config.hidden)
            self.pos_embed = nn.Embedding(config.learned_positions, config.hidden) if config.learned_positions else None
            cca = set(config.cca_layers) if config.retro else set()
            self.layers = nn.ModuleList(DecoderLayer(config, i + 1 in cca) for i in range(config.n_layers))
            self.encoder = RetroEncoder(config) if config.retro else None
            self.final_norm = make_norm(config)
            # tied: the output layer is the token embedding (no parameter of its own)
            self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden, config.vocab_size, bias=False)
        self.checkpointing = False
        if self.lm_head is None and is_partitioned(self.embed.weight):
            import deepspeed  # ZeRO-3 gathers a module's own parameters; the output layer reuses embed's

            deepspeed.zero.register_external_parameter(self, self.embed.weight)
        self.reset_parameters(seed)

    def set_checkpointing(self, enabled: bool) -> "Retro":
        """Activation checkpointing: in training, each decoder and encoder layer keeps only its
        input and recomputes the rest in backward (same values; about a third more compute)."""
        self.checkpointing = bool(enabled)
        if self.encoder is not None:
            self.encoder.checkpointing = bool(enabled)
        return self

    # -- parameters

    @staticmethod
    def is_retro_parameter(name: str) -> bool:
        """True for encoder and CCA parameters (absent from the GPT decoder)."""
        return name.startswith("encoder.") or ".cca." in name or ".cca_norm." in name or name.endswith(".cca_gate")

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0, only: set[str] | None = None):
        """Normal(0, init_std) for weights, std / sqrt(2 * n_layers) for the projections into
        the residual stream, zeros for biases, the CCA gates and the stored LayerNorm-1p gains
        (ones for the gains of LayerNorm and RMSNorm); decoder parameters first, then Retro's.

        Parameters partitioned by ZeRO-3 (built under ``deepspeed.zero.Init``) are gathered one
        at a time, rank 0 writes them and ZeRO re-partitions them: the same values as an
        unpartitioned build from the same seed. Meta parameters are left as they are, and with
        ``only`` every parameter not named in it (no draws for them).
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2.0 * self.config.n_layers)
        gen = torch.Generator().manual_seed(seed)
        named = list(self.named_parameters())
        ordered = [p for p in named if not self.is_retro_parameter(p[0])]
        ordered += [p for p in named if self.is_retro_parameter(p[0])]
        for name, p in ordered:
            if p.is_meta or (only is not None and name not in only):
                continue
            shape = full_shape(p)
            writer = not is_partitioned(p) or rank() == 0  # others receive rank 0's values
            if "norm" in name.rsplit(".", 2)[-2]:
                one = self.config.norm != "layernorm1p" and name.endswith("weight")
                value = (torch.ones(shape) if one else torch.zeros(shape)) if writer else None
            elif name.endswith((".bias", ".cca_gate")):
                value = torch.zeros(shape) if writer else None
            elif name.endswith(("proj.weight", "down.weight")):
                value = torch.randn(shape, generator=gen) * out_std if writer else None
            else:
                value = torch.randn(shape, generator=gen) * std if writer else None
            assign_parameter(p, value)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (optionally without input embedding and output layer); the full
        count also for ZeRO-3 partitioned parameters."""
        n = sum(full_numel(p) for p in self.parameters())
        if exclude_embeddings:
            n -= full_numel(self.embed.weight) + (full_numel(self.lm_head.weight) if self.lm_head is not None else 0)
        return n

    # -- forward

    def forward(self, tokens, neighbors=None, neighbor_mask=None, cache: "KVCache | None" = None):
        """Logits (B,T,V) for tokens (B,T).

        neighbors (B,C,k,R) int64 and neighbor_mask (B,C,k,R) bool are the neighbors of the
        chunks that *complete* in this call: without a cache, chunks 0 .. T//chunk_length - 1
        (chunk j's neighbors are used by tokens from the last token of chunk j onward). A missing
        mask means every neighbor token is valid; ``neighbors=None`` switches retrieval off (same
        result as all masked). GPT ignores neighbors. With a ``KVCache`` the tokens continue the
        cached sequence at ``cache.pos`` and the cache is advanced.
        """
        cfg = self.config
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        L = cfg.chunk_length
        first_chunk = start // L  # chunks first_chunk .. first_chunk + n_new - 1 end in this call
        n_new = (start + T) // L - first_chunk
        if cache is None:  # retrieval needs a completed chunk with neighbors
            retrieval = cfg.retro and neighbors is not None and n_new > 0
        else:  # ... in this call or the last one completed before it
            retrieval = cfg.retro and (neighbors is not None or cache.has_neighbors)
        if cfg.retro and neighbors is not None:
            if neighbors.dim() != 4 or neighbors.shape[:2] != (B, n_new):
                raise PipelineError(
                    f"neighbors must have shape (batch={B}, chunks={n_new}, k, R) for {T} tokens "
                    f"from position {start}; got {tuple(neighbors.shape)}"
                )
            if neighbor_mask is None:
                neighbor_mask = torch.ones_like(neighbors, dtype=torch.bool)
            elif neighbor_mask.shape != neighbors.shape:
                raise PipelineError(
                    f"neighbor_mask shape {tuple(neighbor_mask.shape)} != neighbors shape {tuple(neighbors.shape)}"
                )
            neighbor_mask = neighbor_mask.bool()

        x = self.embed(tokens)
        if self.pos_embed is not None:  # learned positions count from each row's first real token
            positions = cache.positions(T) if cache is not None else torch.arange(T, device=tokens.device)
            last = int(positions.max()) if cache is not None else T - 1
            if last >= cfg.learned_positions:
                raise PipelineError(f"position {last} is beyond the {cfg.learned_positions} learned positions")
            x = x + self.pos_embed(positions)
        step = _Step(
            start=start, first_chunk=first_chunk, n_new=n_new, retrieval=retrieval, cache=cache,
            neighbors=neighbors, neighbor_mask=neighbor_mask,
            rope=rope_tables(start, T, cfg, x.device, x.dtype) if self.pos_embed is None else None,
            attn_mask=cache.self_attention_mask(T) if cache is not None else None,
            # CCA query positions are the same in every CCA layer: one table per call
            cca_rope=cca_query_rope(start, T, cfg, x.device, x.dtype) if retrieval and cfg.cca_rotary else None,
            first_cca=min((i for i, layer in enumerate(self.layers) if layer.cca is not None), default=-1),
        )
        recompute = self.checkpointing and cache is None and torch.is_grad_enabled()
        encoded = None
        for i, layer in enumerate(self.layers):
            if recompute:
                x, encoded = checkpoint(self._layer, i, x, encoded, step, use_reentrant=False)
            else:
                x, encoded = self._layer(i, x, encoded, step)
        if cache is not None:
            cache.advance(T, n_new, retrieval)
        x = self.final_norm(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

    def _layer(self, i: int, x, encoded, step: "_Step"):
        """Decoder layer ``i``: self-attention, CCA (running the encoder at the first CCA layer),
        MLP. Returns the new hidden states and the encoded neighbors (None before the encoder)."""
        layer = self.layers[i]
        cache = step.cache
        kv_slot = (cache.k[i], cache.v[i], step.start) if cache is not None else None
        x = x + layer.attn(layer.norm1(x), step.rope, attn_mask=step.attn_mask, cache=kv_slot)
        if layer.cca is not None and (step.retrieval or (cache is not None and i == step.first_cca)):
            h = layer.cca_norm(x)
            if i == step.first_cca:  # the encoder reads the decoder states entering the first CCA layer
                encoded = self._encode(h, step)
            if step.retrieval:
                keys, values, mask, offset = self._chunk_kv(i, layer, encoded, step)
                q = layer.cca.project_q(h)
                if step.cca_rope is not None:
                    q = apply_rope(q, *step.cca_rope)
                y = chunked_cross_attention(q, keys, values, mask, step.start, self.config.chunk_length, offset)
                y = layer.cca.output(y)
                x = x + (y * torch.tanh(layer.cca_gate) if layer.cca_gate is not None else y)
        return x + layer.mlp(layer.norm2(x)), encoded

    def _encode(self, h, step: "_Step"):
        """Run the encoder over the neighbors of the chunks completing in this call.

        h (B,T,hidden) are the normed decoder states at the first CCA layer; with a cache, the
        states of the chunk still incomplete after this call are kept, so that a chunk spanning
        several calls gets its full context. Returns (B, n_new, k, R, hidden) or None when
        there is nothing to encode.
        """
        B, T, hidden = h.shape
        L = self.config.chunk_length
        cache, first_chunk, n_new = step.cache, step.first_chunk, step.n_new
        if cache is not None:  # the states of chunk first_chunk from earlier calls, then these
            lead = step.start - first_chunk * L
            states = torch.cat([cache.context[:, :lead], h], dim=1) if lead else h
            rest = states[:, n_new * L:]
            cache.context[:, :rest.shape[1]] = rest
        if step.neighbors is None or n_new == 0:
            return None
        if cache is not None:
            context = states[:, :n_new * L]
            context_mask = cache.pad_mask[:, first_chunk * L:(first_chunk + n_new) * L]
            context_mask = context_mask.reshape(B * n_new, L)
        else:
            context = h[:, :n_new * L]
            context_mask = None
        context = context.reshape(B * n_new, L, hidden)
        k, R = step.neighbors.shape[2:]
        emb = self.embed(step.neighbors.reshape(B * n_new, k, R))
        out = self.encoder(emb, step.neighbor_mask.reshape(B * n_new, k, R), context, context_mask)
        return out.view(B, n_new, k, R, hidden)

    def _chunk_kv(self, i, layer, encoded, step: "_Step"):
        """Keys, values (B,C,H,k*R,d), mask (B,C,k*R) of this CCA layer and the index of their
        first chunk. Without a cache: every chunk of the call (from chunk 0). With a cache: the
        last chunk completed before the call (kept in the cache), then the new ones, of which
        the last is kept for the next call."""
        cache, n_new = step.cache, step.n_new
        if encoded is not None:
            B, C, k, R, hidden = encoded.shape
            keys, values = layer.cca.project_kv(encoded.reshape(B, C, k * R, hidden))
            if self.config.cca_rotary:  # each neighbor's tokens at positions 0 .. R-1
                positions = torch.arange(R, device=keys.device).repeat(k)
                keys = apply_rope(keys, *rope_at(positions, self.config, keys.dtype))
            mask = step.neighbor_mask.reshape(B, C, k * R)
        if cache is None:
            return keys, values, mask, 0
        if encoded is None and n_new > 0:  # chunks completing without neighbors: nothing to attend to
            keys = cache.chunk_k[i].new_zeros(cache.chunk_k[i].shape[0], n_new, *cache.chunk_k[i].shape[1:])
            values, mask = keys, cache.chunk_mask[i].new_zeros(keys.shape[0], n_new, keys.shape[-2])
        parts = []
        if step.first_chunk > 0:
            parts.append((cache.chunk_k[i][:, None], cache.chunk_v[i][:, None], cache.chunk_mask[i][:, None]))
        if n_new > 0:
            if keys.shape[-2] != cache.chunk_k[i].shape[-2]:
                raise PipelineError(
                    f"neighbors give {keys.shape[-2]} tokens per chunk; the cache holds "
                    f"num_neighbors x neighbor_length = {cache.chunk_k[i].shape[-2]}"
                )
            parts.append((keys, values, mask))
        if not parts:  # before the first chunk ends: nothing to attend to
            parts.append(tuple(t[i][:, None][:, :0] for t in (cache.chunk_k, cache.chunk_v, cache.chunk_mask)))
        keys, values, mask = (torch.cat(t, dim=1) if len(t) > 1 else t[0] for t in zip(*parts))
        if n_new > 0:  # torch.cat copied the old chunk, so it may be overwritten now
            cache.chunk_k[i].copy_(keys[:, -1])
            cache.chunk_v[i].copy_(values[:, -1])
            cache.chunk_mask[i].copy_(mask[:, -1])
        return keys, values, mask, max(step.first_chunk - 1, 0)


@dataclass
class _Step:
    """What every decoder layer of one forward call shares."""

    start: int
    first_chunk: int
    n_new: int
    retrieval: bool
    cache: "KVCache | None"
    neighbors: torch.Tensor | None
    neighbor_mask: torch.Tensor | None
    rope: tuple
    attn_mask: torch.Tensor | None
    cca_rope: tuple | None
    first_cca: int


# ----------------------------------------------------------------------------- ZeRO-3 parameters


def is_partitioned(p) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3 (its local data is a shard)."""
    return hasattr(p, "ds_id")


def full_shape(p) -> torch.Size:
    return p.ds_shape if is_partitioned(p) else p.shape


def full_numel(p) -> int:
    return p.ds_numel if is_partitioned(p) else p.numel()


@torch.no_grad()
def assign_parameter(p, value) -> None:
    """``p[...] = value`` (any dtype/device), also for a ZeRO-3 partitioned parameter: it is
    gathered, rank 0 writes ``value`` (other ranks may pass None) and it is re-partitioned."""
    if not is_partitioned(p):
        p.copy_(value)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        if rank() == 0:
            p.data.copy_(value)


# ----------------------------------------------------------------------------- decoding cache


class KVCache:
    """State for incremental decoding of a batch of left-padded sequences.

    Holds, per decoder layer, self-attention keys/values of every position so far. For Retro
    it holds only what the next token needs from retrieval: the normed decoder states of the
    chunk not yet complete (the encoder's context when it completes) and, per CCA layer,
    keys/values of the encoded neighbors of the last completed chunk (a token attends to no
    other chunk), so the encoder runs once per chunk and this part does not grow with the
    number of chunks. ``pad_mask`` (B, max_length) marks real tokens; pad positions are never
    attended to.
    """

    def __init__(self, model: Retro, batch_size: int, max_length: int, pad_mask=None):
        cfg = model.config
        p = next(model.parameters())
        device, dtype = p.device, p.dtype
        B, H, d = batch_size, cfg.n_kv_heads, cfg.head_dim
        self.pos = 0
        self.max_length = max_length
        self.chunk_length = cfg.chunk_length
        if pad_mask is None:
            pad_mask = torch.ones(B, max_length, dtype=torch.bool, device=device)
        self.pad_mask = pad_mask.to(device)
        self.has_padding = not bool(self.pad_mask.all())
        # learned positions: each token's position counted from its row's first real token
        self.position_ids = (self.pad_mask.long().cumsum(dim=1) - 1).clamp(min=0) if cfg.learned_positions else None
        self.k = [torch.zeros(B, H, max_length, d, device=device, dtype=dtype) for _ in model.layers]
        self.v = [torch.zeros(B, H, max_length, d, device=device, dtype=dtype) for _ in model.layers]
        self.has_neighbors = False  # the last completed chunk has a valid neighbor token
        if cfg.retro:
            S = cfg.num_neighbors * cfg.neighbor_length
            self.context = torch.zeros(B, cfg.chunk_length, cfg.hidden, device=device, dtype=dtype)
            cca = [i for i, layer in enumerate(model.layers) if layer.cca is not None]
            self.chunk_k = {i: torch.zeros(B, cfg.heads, S, d, device=device, dtype=dtype) for i in cca}
            self.chunk_v = {i: torch.zeros(B, cfg.heads, S, d, device=device, dtype=dtype) for i in cca}
            self.chunk_mask = {i: torch.zeros(B, S, dtype=torch.bool, device=device) for i in cca}

    def positions(self, T: int):
        """(B, T) positions of the next T tokens, counted from each row's first real token."""
        return self.position_ids[:, self.pos:self.pos + T]

    def self_attention_mask(self, T: int):
        """(B,1,T,pos+T) bool for T new queries, or None when plain causal attention is right."""
        start = self.pos
        if start + T > self.max_length:
            raise PipelineError(f"decoding past the cache length {self.max_length}")
        if not self.has_padding and (T == 1 or start == 0):
            return None
        q_pos = torch.arange(start, start + T, device=self.pad_mask.device)
        k_pos = torch.arange(start + T, device=self.pad_mask.device)
        causal = k_pos[None, :] <= q_pos[:, None]
        # every query may attend to itself, so a pad position never has an empty row
        valid = self.pad_mask[:, None, :start + T] | (k_pos[None, :] == q_pos[:, None])[None]
        return (causal[None] & valid)[:, None]

    def advance(self, T: int, n_new: int, retrieval: bool) -> None:
        """After a forward call of T tokens that completed ``n_new`` chunks."""
        self.pos += T
        if n_new == 0 or not hasattr(self, "chunk_mask"):
            return
        if not retrieval:  # the chunks completed without neighbors and CCA did not run
            for mask in self.chunk_mask.values():
                mask.zero_()
        # one host read per completed chunk (not per token)
        self.has_neighbors = any(bool(mask.any()) for mask in list(self.chunk_mask.values())[:1])

    def retrieval_bytes(self) -> int:
        """Bytes held for retrieval (encoder context, CCA keys/values/masks)."""
        if not hasattr(self, "chunk_k"):
            return 0
        tensors = [self.context, *self.chunk_k.values(), *self.chunk_v.values(), *self.chunk_mask.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- loading, FLOPs


def load_decoder_weights(model: Retro, state_dict: dict) -> list[str]:
    """Load a GPT (or Retro) state dict into ``model``; encoder and CCA stay as they are.

    Every decoder parameter must be present with the same shape. Returns the names left
    fresh (Retro's encoder and CCA parameters). The continued-pretraining path of InstructRetro.
    ZeRO-3 partitioned parameters are gathered and written one at a time.
    """
    own = dict(model.named_parameters())
    own.update({n: b for n, b in model.named_buffers() if n not in own})
    missing = [n for n in own if n not in state_dict and not Retro.is_retro_parameter(n)]
    if missing:
        raise PipelineError(f"checkpoint lacks decoder parameters {missing[:5]}")
    unexpected = [n for n in state_dict if n not in own and not Retro.is_retro_parameter(n)]
    if unexpected:
        raise PipelineError(f"checkpoint has parameters this model lacks: {unexpected[:5]}")
    for n in own:
        if n in state_dict and tuple(state_dict[n].shape) != tuple(full_shape(own[n])):
            raise PipelineError(
                f"checkpoint parameter {n} has shape {tuple(state_dict[n].shape)}, model {tuple(full_shape(own[n]))}"
            )
    load = {n: t for n, t in state_dict.items() if n in own}
    if any(is_partitioned(p) for p in own.values()):
        for n, t in load.items():
            assign_parameter(own[n], t)
    else:
        model.load_state_dict(load, strict=False)
    return [n for n in own if n not in load]


def flops_per_token(config: ModelConfig, seq_length: int | None = None) -> float:
    """Model FLOPs per trained decoder token (forward + backward = 3 x forward), counting the
    matmuls of decoder, LM head, CCA and the encoder's work on k x 2 x chunk_length neighbor
    tokens per chunk. Attention scores count causal self-attention at half of T keys."""
    T = seq_length or config.seq_length
    h, f, L = config.hidden, config.ffn_hidden, config.chunk_length
    kv = config.n_kv_heads * config.head_dim
    mlp = 3 * h * f if config.mlp == "swiglu" else 2 * h * f
    layer = 2 * (2 * h * h + 2 * h * kv + mlp)  # projections and MLP, per token
    fwd = config.n_layers * (layer + 2 * h * T) + 2 * h * config.vocab_size
    if config.retro:
        k, R = config.num_neighbors, config.neighbor_length
        per_token = k * R / L  # neighbor tokens encoded per decoder token
        enc_layer = layer + 4 * h * R  # bidirectional attention over R keys
        enc = config.encoder_layers * enc_layer + 2 * 2 * h * h + 4 * h * L  # + cross-attn q, out, scores
        enc_per_token = per_token * enc + 2 * 2 * h * h  # + context k, v once per chunk token
        cca = 2 * 2 * h * h + per_token * 2 * 2 * h * h + 4 * h * k * R  # q, out; k, v; scores
        fwd += enc_per_token + len(config.cca_layers) * cca
    return 3.0 * fwd
