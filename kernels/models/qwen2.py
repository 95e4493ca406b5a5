"""A Qwen2-family decoder made only of this library's kernels (Qwen2 / Qwen2.5, Llama, Qwen3).

Numerics follow transformers' eager forward in the model dtype, component by component:

    h = embed(ids)                                        # gather, no rounding
    cos, sin = rope_cos_sin(positions, inv_freq)          # f32 angles, cast to the model dtype
    per layer:
      x = rms_norm(h, w_in)                               # "hf" recipe
      q, k, v = linear(x, Wq, bq), linear(x, Wk, bk), linear(x, Wv, bv)   # f32 acc, +bias, 1 rounding
      (Qwen3) q, k = rms_norm(q, w_qn), rms_norm(k, w_kn) # over the head dim, before RoPE
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      a = gqa_attention(q, k, v, causal, window)          # eager recipe, see kernels/attention.py
      h = h + linear(a, Wo)                               # residual add rounds to the model dtype
      x = rms_norm(h, w_post)
      g, u = linear(x, Wg), linear(x, Wu)
      m = round(round(silu_f32(g)) * u)                   # Qwen2MLP's activation product
      h = h + linear(m, Wd)
    logits = lm_head(rms_norm(h, w_final), W_head or the tied embedding table)

Parameters are a dict pytree of arrays stored ``[in, out]`` (see ``params_from_hf``),
except the embedding table and the untied head, both ``[V, D]`` as HF stores them.
Options that change the computation's structure live in the hashable ``Config``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention import gqa_attention
from kernels.embedding import embed
from kernels.projection import linear, lm_head
from kernels.rms_norm import rms_norm
from kernels.rope import apply_rope, rope_cos_sin, rope_frequencies
from kernels.swiglu import silu_f32

FAMILIES = ("qwen2", "llama", "qwen3", "mistral")
LAYER_COMPONENTS = (
    "input_layernorm", "q_proj", "k_proj", "v_proj", "q_rope", "k_rope", "attention", "o_proj",
    "attn_residual", "post_attention_layernorm", "gate_proj", "up_proj", "act_product", "down_proj",
    "mlp_residual",
)
MODEL_COMPONENTS = ("embedding", "final_norm", "logits")


@dataclass(frozen=True)
class Config:
    """The structural options of a decoder (hashable: a static argument of ``jit``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: tuple = ()  # the rope parameters' extra keys, as sorted (key, value) pairs
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2's q/k/v projections have a bias; Llama's and Qwen3's do not
    qk_norm: bool = False  # Qwen3: RMSNorm of q and k over the head dim before RoPE
    layer_types: tuple = ()  # "full_attention" | "sliding_attention" per layer
    sliding_window: int | None = None
    model_type: str = "qwen2"

    @property
    def groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, d: dict) -> Config:
        """From a transformers config.json dict (legacy rope_theta/rope_scaling or rope_parameters)."""
        mt = d.get("model_type", "qwen2")
        if mt not in FAMILIES:
            raise ValueError(f"Config.from_hf: model_type must be one of {list(FAMILIES)}, got {mt!r}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"Config.from_hf: the config has no {key!r}")
        n = d["num_attention_heads"]
        kv = d.get("num_key_value_heads") or n
        head_dim = d.get("head_dim") or d["hidden_size"] // n
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        prf = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        layers = d["num_hidden_layers"]
        window = d.get("sliding_window")
        if mt == "qwen2":
            window = window if d.get("use_sliding_window", False) else None
        layer_types = d.get("layer_types")
        if layer_types is None:
            mwl = d.get("max_window_layers", layers)
            layer_types = ["sliding_attention" if window is not None and (mt != "qwen2" or i >= mwl)
                           else "full_attention" for i in range(layers)]
        if len(layer_types) != layers:
            raise ValueError(f"Config.from_hf: layer_types has {len(layer_types)} entries for {layers} layers")
        bias = True if mt == "qwen2" else bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=layers, num_attention_heads=n, num_key_value_heads=kv, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rope_type=rope_type,
            rope_scaling=tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items())),
            partial_rotary_factor=float(prf), max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), attention_bias=bias,
            qk_norm=(mt == "qwen3"), layer_types=tuple(layer_types), sliding_window=window, model_type=mt,
        )


# --- parameters ---------------------------------------------------------------------

def expected_shapes(cfg: Config) -> dict[str, tuple]:
    """HF state-dict names and shapes (torch layout, [out, in]) this config needs."""
    d, f, v, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    qd, kd = cfg.num_attention_heads * h, cfg.num_key_value_heads * h
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (qd, d), p + "self_attn.k_proj.weight": (kd, d),
                p + "self_attn.v_proj.weight": (kd, d), p + "self_attn.o_proj.weight": (d, qd),
                p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
        if cfg.attention_bias:
            out |= {p + "self_attn.q_proj.bias": (qd,), p + "self_attn.k_proj.bias": (kd,),
                    p + "self_attn.v_proj.bias": (kd,)}
        if cfg.qk_norm:
            out |= {p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (h,)}
    return out


def params_from_hf(state_dict: dict, cfg: Config, dtype=jnp.bfloat16) -> dict:
    """Build the parameter pytree from HF-named numpy arrays (torch layout, [out, in]).

    Missing or unexpected tensors are listed by name; a shape mismatch names the tensor
    and both shapes. A tied checkpoint needs no ``lm_head.weight`` (one that has it is
    accepted if it equals the embedding table's shape); an untied one without it fails.

    Traceable: given JAX arrays it only transposes and casts them, so ``jax.grad`` of a loss
    of ``params_from_hf(state, ...)`` with respect to ``state`` is the gradient in HF's
    names and layouts (a tied head's share lands on the embedding table), the form torch
    autograd gives ``model.named_parameters()``.
    """
    want = expected_shapes(cfg)
    have = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        have.pop("lm_head.weight", None)  # tied: the head is the embedding table
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:12]}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:12]}{' ...' if len(unexpected) > 12 else ''}")
    for k in sorted(set(want) & set(have)):
        if tuple(np.shape(have[k])) != want[k]:
            problems.append(f"{k}: expected shape {want[k]}, got {tuple(np.shape(have[k]))}")
    if problems:
        raise ValueError("params_from_hf: " + "; ".join(problems))

    def a(name, transpose=False):
        x = have[name]
        if not isinstance(x, jax.Array):  # a JAX array (a tracer under jax.grad) stays one: see the docstring
            x = np.asarray(x)
            x = x.astype(np.float32) if x.dtype.kind == "V" else x  # numpy's bf16 (ml_dtypes) through f32: exact
        x = x.T if transpose else x  # torch Linear stores [out, in]; the kernels take [in, out]
        return jnp.asarray(x).astype(dtype)

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm": a(p + "input_layernorm.weight"),
            "post_attention_layernorm": a(p + "post_attention_layernorm.weight"),
            "q_proj": a(p + "self_attn.q_proj.weight", True), "k_proj": a(p + "self_attn.k_proj.weight", True),
            "v_proj": a(p + "self_attn.v_proj.weight", True), "o_proj": a(p + "self_attn.o_proj.weight", True),
            "gate_proj": a(p + "mlp.gate_proj.weight", True), "up_proj": a(p + "mlp.up_proj.weight", True),
            "down_proj": a(p + "mlp.down_proj.weight", True),
        }
        if cfg.attention_bias:
            layer |= {"q_bias": a(p + "self_attn.q_proj.bias"), "k_bias": a(p + "self_attn.k_proj.bias"),
                      "v_bias": a(p + "self_attn.v_proj.bias")}
        if cfg.qk_norm:
            layer |= {"q_norm": a(p + "self_attn.q_norm.weight"), "k_norm": a(p + "self_attn.k_norm.weight")}
        layers.append(layer)
    params = {"embed": a("model.embed_tokens.weight"), "norm": a("model.norm.weight"), "layers": layers}
    if not cfg.tie_word_embeddings:
        # [V, D], HF's layout kept: lm_head(w_layout="VD") contracts it in place, and that GEMM
        # is the faster one on an H100 (kernels.projection.lm_head).
        params["lm_head"] = a("lm_head.weight")
    return params


def load_checkpoint(path: str | Path, *, dtype=jnp.bfloat16) -> tuple[Config, dict]:
    """Load a local HF checkpoint directory: config.json plus *.safetensors (sharded index too).

    Never unpickles: ``.bin`` / ``.pt`` checkpoints are refused.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"load_checkpoint: {path} has no config.json")
    cfg = Config.from_hf(json.loads(cfg_file.read_text()))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = f" (found {pickled}: pickle checkpoints are never loaded; convert them to safetensors)" if pickled else ""
        raise ValueError(f"load_checkpoint: {path} has no *.safetensors files{hint}")
    state = {}
    for f in files:
        state |= load_file(str(path / f))
    return cfg, params_from_hf(state, cfg, dtype)


# --- the forward ----------------------------------------------------------------------

@dataclass(frozen=True)
class Inject:
    """A planted bug: scale component ``component`` of layer ``layer`` by ``scale`` (JAX side)."""

    layer: int
    component: str
    scale: float


def rope_tables(cfg: Config, positions: jax.Array, dtype, *, seq_len: int | None = None):
    """cos, sin ``[B, T, rotary_dim]`` for ``positions[B, T]`` in the model dtype."""
    inv_freq, scaling = rope_frequencies(
        cfg.head_dim, theta=cfg.rope_theta, rope_type=cfg.rope_type,
        partial_rotary_factor=cfg.partial_rotary_factor, scaling=dict(cfg.rope_scaling) or None,
        max_position_embeddings=cfg.max_position_embeddings, seq_len=seq_len)
    return rope_cos_sin(positions, inv_freq, attention_scaling=scaling, dtype=dtype)


def _tap(taps, name, value, inject: tuple[Inject, ...], layer):
    for inj in inject:
        if inj.component == name and inj.layer == layer:
            value = (value.astype(jnp.float32) * inj.scale).astype(value.dtype)  # planted bug, rounded back
    if taps is not None:
        taps[name if layer is None else f"layers.{layer}.{name}"] = value
    return value


def mlp_act(g: jax.Array, u: jax.Array) -> jax.Array:
    """Qwen2MLP's activation product in the model dtype: ``round(round(silu(g)) * u)``.

    The same three steps as ``kernels.swiglu`` "hf" (silu in f32, rounded; the product of
    two model-dtype values is exact in f32, then rounded once).
    """
    a = silu_f32(g).astype(g.dtype)  # round silu once, as torch's bf16 silu does
    return (a.astype(jnp.float32) * u.astype(jnp.float32)).astype(g.dtype)  # [..., F]


def layer_steps(lp: dict, cos, sin, *, cfg: Config, layer: int, q_positions, kv_positions, kv_valid,
                kv_update=None, kv_out: dict | None = None) -> list:
    """One decoder layer as named steps ``(component, input names, fn)``, in order.

    The single description of a layer: ``decoder_layer`` runs it on its own outputs
    (accumulated), and the localizer runs each step on transformers' values for the step's
    inputs (isolated). ``layer_input`` is the hidden state entering the layer.
    """
    b_t = lambda x: x.shape[:2]  # noqa: E731  (B, T)
    n, kh, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    window = cfg.sliding_window if cfg.layer_types and cfg.layer_types[layer] == "sliding_attention" else None

    def rope(x, heads, norm_key):
        x = x.reshape(*b_t(x), heads, hd)  # [B, T, heads, H]
        if cfg.qk_norm:
            x = rms_norm(x, lp[norm_key], eps=eps)  # Qwen3: over the head dim, before RoPE
        return apply_rope(x, cos, sin)

    def attend(q, k, v):
        v = v.reshape(*b_t(v), kh, hd)  # [B, T, K, H]
        k_all, v_all = kv_update(k, v) if kv_update is not None else (k, v)  # [B, S, K, H]
        if kv_out is not None:
            kv_out["kv"] = (k_all, v_all)
        a = gqa_attention(q, k_all, v_all, causal=True, q_positions=q_positions, kv_positions=kv_positions,
                          kv_valid=kv_valid, sliding_window=window, recipe="hf")
        return a.reshape(*b_t(q), n * hd)  # [B, T, N*H]

    return [
        ("input_layernorm", ("layer_input",), lambda h: rms_norm(h, lp["input_layernorm"], eps=eps)),
        ("q_proj", ("input_layernorm",), lambda x: linear(x, lp["q_proj"], lp.get("q_bias"))),
        ("k_proj", ("input_layernorm",), lambda x: linear(x, lp["k_proj"], lp.get("k_bias"))),
        ("v_proj", ("input_layernorm",), lambda x: linear(x, lp["v_proj"], lp.get("v_bias"))),
        ("q_rope", ("q_proj",), lambda q: rope(q, n, "q_norm")),
        ("k_rope", ("k_proj",), lambda k: rope(k, kh, "k_norm")),
        ("attention", ("q_rope", "k_rope", "v_proj"), attend),
        ("o_proj", ("attention",), lambda a: linear(a, lp["o_proj"])),
        ("attn_residual", ("layer_input", "o_proj"), lambda h, o: h + o),  # rounds in the model dtype, as torch
        ("post_attention_layernorm", ("attn_residual",), lambda h: rms_norm(h, lp["post_attention_layernorm"], eps=eps)),
        ("gate_proj", ("post_attention_layernorm",), lambda x: linear(x, lp["gate_proj"])),
        ("up_proj", ("post_attention_layernorm",), lambda x: linear(x, lp["up_proj"])),
        ("act_product", ("gate_proj", "up_proj"), mlp_act),
        ("down_proj", ("act_product",), lambda m: linear(m, lp["down_proj"])),
        ("mlp_residual", ("attn_residual", "down_proj"), lambda h, d: h + d),
    ]


def decoder_layer(lp: dict, h: jax.Array, cos, sin, *, cfg: Config, layer: int, q_positions, kv_positions,
                  kv_valid, taps=None, inject: tuple[Inject, ...] = (), kv_update=None):
    """One decoder layer on its own outputs. Returns ``(h, (k, v))``: the keys and values attended over.

    ``kv_update(k, v) -> (k_all, v_all)`` (a KV cache) receives this step's rotated keys
    and values ``[B, T, K, H]`` and returns everything to attend over ``[B, S, K, H]``.
    """
    kv_out: dict = {}
    env = {"layer_input": h}
    for name, inputs, fn in layer_steps(lp, cos, sin, cfg=cfg, layer=layer, q_positions=q_positions,
                                        kv_positions=kv_positions, kv_valid=kv_valid, kv_update=kv_update,
                                        kv_out=kv_out):
        with jax.named_scope(f"layers.{layer}.{name}"):  # the component's name in HLO metadata and profiles
            env[name] = _tap(taps, name, fn(*(env[i] for i in inputs)), inject, layer)
    return env["mlp_residual"], kv_out["kv"]


def _head(params, cfg: Config, h, *, logits_dtype, taps, inject):
    with jax.named_scope("final_norm"):
        h = _tap(taps, "final_norm", rms_norm(h, params["norm"], eps=cfg.rms_norm_eps), inject, None)
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]  # [V, D] either way
    with jax.named_scope("logits"):
        logits = lm_head(h, w, w_layout="VD", logits_dtype=logits_dtype)  # reads [V, D] in place
    return _tap(taps, "logits", logits, inject, None)


def _check_ids(input_ids, cfg: Config):
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"forward: input_ids must be integer [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")


def forward_taps(params: dict, input_ids: jax.Array, *, cfg: Config, positions=None, kv_valid=None,
                 logits_dtype: str | None = None, inject: tuple[Inject, ...] = (), taps: dict | None = None):
    """The forward pass, recording every component into ``taps`` (if given). Returns logits."""
    _check_ids(input_ids, cfg)
    b, t = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    with jax.named_scope("embedding"):
        h = _tap(taps, "embedding", embed(input_ids, params["embed"]), inject, None)
    with jax.named_scope("rope_tables"):
        cos, sin = rope_tables(cfg, positions, h.dtype, seq_len=t)
    for i, lp in enumerate(params["layers"]):
        h, _ = decoder_layer(lp, h, cos, sin, cfg=cfg, layer=i, q_positions=positions, kv_positions=positions,
                             kv_valid=kv_valid, taps=taps, inject=inject)
    return _head(params, cfg, h, logits_dtype=logits_dtype, taps=taps, inject=inject)


def _forward(params, input_ids, positions, kv_valid, *, cfg, logits_dtype, inject):
    return forward_taps(params, input_ids, cfg=cfg, positions=positions, kv_valid=kv_valid,
                        logits_dtype=logits_dtype, inject=inject)


_forward_jit = jax.jit(_forward, static_argnames=("cfg", "logits_dtype", "inject"))


def forward(params: dict, input_ids: jax.Array, *, config: Config, positions=None, kv_valid=None,
            logits_dtype: str | None = None, inject: tuple[Inject, ...] = ()) -> jax.Array:
    """Logits ``[B, T, V]`` for ``input_ids[B, T]`` (jit-compiled once per config and shape).

    positions: int ``[B, T]`` (default ``0..T-1``); kv_valid: bool ``[B, T]`` (False = padding).
    logits_dtype: ``None`` = model dtype (HF's default), ``"float32"`` = f32-accumulated logits.
    """
    _check_ids(input_ids, config)
    return _forward_jit(params, input_ids, positions, kv_valid, cfg=config, logits_dtype=logits_dtype,
                        inject=tuple(inject))


def _taps_fn(params, input_ids, positions, kv_valid, *, cfg, logits_dtype, inject):
    taps: dict = {}
    forward_taps(params, input_ids, cfg=cfg, positions=positions, kv_valid=kv_valid, logits_dtype=logits_dtype,
                 inject=inject, taps=taps)
    return taps


_taps_jit = jax.jit(_taps_fn, static_argnames=("cfg", "logits_dtype", "inject"))


def capture(params, input_ids, *, config: Config, positions=None, kv_valid=None, logits_dtype=None,
            inject: tuple[Inject, ...] = ()) -> dict:
    """Every component's output, keyed ``embedding``, ``layers.{i}.{component}``, ``final_norm``, ``logits``."""
    _check_ids(input_ids, config)
    return _taps_jit(params, input_ids, positions, kv_valid, cfg=config, logits_dtype=logits_dtype,
                     inject=tuple(inject))


# --- KV cache -------------------------------------------------------------------------

def init_cache(cfg: Config, batch: int, max_len: int, dtype) -> dict:
    """An empty cache: per layer k, v ``[B, max_len, K, H]`` and the filled length."""
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": [jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)],
            "v": [jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)],
            "length": jnp.zeros((), jnp.int32)}


def _step(params, cache, input_ids, *, cfg: Config, logits_dtype):
    """Run ``input_ids[B, T]`` at positions ``length .. length+T-1`` against the cache."""
    b, t = input_ids.shape
    max_len = cache["k"][0].shape[1]
    start = cache["length"]
    positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    kv_positions = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (b, max_len))  # [B, S]
    kv_valid = kv_positions < start + t  # unfilled slots are masked, never attended
    with jax.named_scope("embedding"):
        h = embed(input_ids, params["embed"])
    with jax.named_scope("rope_tables"):
        cos, sin = rope_tables(cfg, positions, h.dtype, seq_len=None)
    new_k, new_v = [], []
    for i, lp in enumerate(params["layers"]):
        def write(k, v, i=i):  # this step's keys and values into slots start .. start+T-1
            return (jax.lax.dynamic_update_slice(cache["k"][i], k, (0, start, 0, 0)),  # [B, S, K, H]
                    jax.lax.dynamic_update_slice(cache["v"][i], v, (0, start, 0, 0)))  # [B, S, K, H]

        h, (kc, vc) = decoder_layer(lp, h, cos, sin, cfg=cfg, layer=i, q_positions=positions,
                                    kv_positions=kv_positions, kv_valid=kv_valid, kv_update=write)
        new_k.append(kc)
        new_v.append(vc)
    logits = _head(params, cfg, h, logits_dtype=logits_dtype, taps=None, inject=())
    return logits, {"k": new_k, "v": new_v, "length": start + t}


_step_jit = jax.jit(_step, static_argnames=("cfg", "logits_dtype"), donate_argnums=(1,))


def prefill(params, input_ids, *, config: Config, max_len: int, logits_dtype=None):
    """Run a prompt ``[B, T]`` into a fresh cache of ``max_len`` slots. Returns (logits, cache)."""
    _check_ids(input_ids, config)
    if input_ids.shape[1] > max_len:
        raise ValueError(f"prefill: prompt length {input_ids.shape[1]} exceeds max_len {max_len}")
    cache = init_cache(config, input_ids.shape[0], max_len, params["embed"].dtype)
    return _step_jit(params, cache, input_ids, cfg=config, logits_dtype=logits_dtype)


def decode_step(params, cache, input_ids, *, config: Config, logits_dtype=None):
    """One decode step: ``input_ids[B, 1]`` at position ``cache['length']``. Returns (logits, cache)."""
    _check_ids(input_ids, config)
    return _step_jit(params, cache, input_ids, cfg=config, logits_dtype=logits_dtype)


__all__ = ["Config", "Inject", "params_from_hf", "load_checkpoint", "forward", "capture", "prefill",
           "decode_step", "init_cache", "expected_shapes", "LAYER_COMPONENTS", "MODEL_COMPONENTS"]
