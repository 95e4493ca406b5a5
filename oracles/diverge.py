"""``parity diverge``: find the first component where the JAX model departs from transformers.

Runs transformers' own model (eager attention) and ``kernels.models.qwen2`` on the same
weights and tokens, captures every component on both sides, and judges each one in the
library's measures against that component's budget:

- **isolated** mode (the seeds' isolated-layer test): every JAX component is fed
  transformers' values for its inputs, so an error cannot be inherited; the first
  component over budget is where a bug lives;
- **accumulated** mode: each side runs on its own outputs, as in deployment; shows how
  the error grows with depth and with position (the seeds' position correlation).

For the logits it also reports the per-token KL divergence and top-k agreement.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from oracles import compare, registry

# Which op budget judges each component (isolated mode). Residual adds and the
# embedding gather are exact: identical inputs must give identical bits.
COMPONENT_OP = {
    "embedding": None, "input_layernorm": "rms_norm", "q_proj": "projection", "k_proj": "projection",
    "v_proj": "projection", "q_rope": "rope", "k_rope": "rope", "attention": "attention", "o_proj": "projection",
    "attn_residual": None, "post_attention_layernorm": "rms_norm", "gate_proj": "projection",
    "up_proj": "projection", "act_product": "swiglu", "down_proj": "projection", "mlp_residual": None,
    "final_norm": "rms_norm", "logits": "projection",
}

# Published Qwen2.5 configs (config.json fields that matter); weights are random here.
# The tiny ones keep a real head_dim (64).
PRESETS = {
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=False),
    "tiny-tied": dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2.5-14b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen2.5-32b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen2.5-72b": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}
_COMMON = dict(model_type="qwen2", hidden_act="silu", max_position_embeddings=32768, rope_theta=1000000.0,
               rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768)


def preset(name: str, *, layers: int | None = None) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown --config {name!r}; known: {sorted(PRESETS)}")
    d = {**_COMMON, **PRESETS[name]}
    if layers:
        d["num_hidden_layers"] = layers
    return d


# --- transformers' side -----------------------------------------------------------------

def hf_model(config: dict, *, dtype: str, seed: int):
    """transformers' model for ``config`` with random, non-trivial weights (eager attention)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from oracles.arrays import TORCH_DTYPES

    cfg = AutoConfig.for_model(**config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norm weights away from 1 (real late layers reach ~6)
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5))
    # Cast the parameters only, as from_pretrained(dtype=...) leaves the model: a plain
    # model.to(bfloat16) would also round the RoPE inv_freq buffers to bf16 (measured: q/k
    # after RoPE then differ from the from_pretrained model on ~18% of elements, growing
    # with position: the seeds' symptom, produced by transformers itself).
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(TORCH_DTYPES[dtype])
    return model


@contextlib.contextmanager
def _patched_attention(model, store: dict):
    """Record each layer's q/k after RoPE (the eager attention function's inputs)."""
    mod = sys.modules[type(model.model.layers[0].self_attn).__module__]
    orig = mod.eager_attention_forward

    def recording(module, query, key, value, *a, **k):
        store[module.layer_idx] = (query, key)  # [B, N, T, H], [B, K, T, H]
        return orig(module, query, key, value, *a, **k)

    mod.eager_attention_forward = recording
    try:
        yield
    finally:
        mod.eager_attention_forward = orig


def hf_capture(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every component of transformers' forward, as numpy arrays in the model dtype."""
    import torch

    from oracles.arrays import torch_to_numpy

    caps: dict = {}
    qk: dict = {}
    hooks = []

    def out_hook(name):
        def f(_m, _i, o):
            caps[name] = (o[0] if isinstance(o, tuple) else o).detach()
        return f

    def in_hook(name):
        def f(_m, i):
            caps[name] = i[0].detach()
        return f

    m = model.model
    hooks.append(m.embed_tokens.register_forward_hook(out_hook("embedding")))
    for i, layer in enumerate(m.layers):
        p = f"layers.{i}."
        sa, mlp = layer.self_attn, layer.mlp
        for name, mod in (("input_layernorm", layer.input_layernorm), ("q_proj", sa.q_proj), ("k_proj", sa.k_proj),
                          ("v_proj", sa.v_proj), ("o_proj", sa.o_proj), ("post_attention_layernorm",
                          layer.post_attention_layernorm), ("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj),
                          ("down_proj", mlp.down_proj), ("mlp_residual", layer)):
            hooks.append(mod.register_forward_hook(out_hook(p + name)))
        hooks.append(sa.o_proj.register_forward_pre_hook(in_hook(p + "attention")))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(in_hook(p + "attn_residual")))
        hooks.append(mlp.down_proj.register_forward_pre_hook(in_hook(p + "act_product")))
    hooks.append(m.norm.register_forward_hook(out_hook("final_norm")))
    try:
        with torch.no_grad(), _patched_attention(model, qk):
            caps["logits"] = model(torch.from_numpy(np.asarray(ids))).logits.detach()
    finally:
        for h in hooks:
            h.remove()
    for i, (q, k) in qk.items():
        caps[f"layers.{i}.q_rope"] = q.transpose(1, 2)  # [B, T, N, H] like the JAX side
        caps[f"layers.{i}.k_rope"] = k.transpose(1, 2)  # [B, T, K, H]
    return {k: torch_to_numpy(v) for k, v in caps.items()}


# --- the JAX side -----------------------------------------------------------------------

def _same_kind_layer(cfg, i: int) -> int:
    """The first layer of layer i's attention kind: the only thing a step's code depends on."""
    if not cfg.layer_types:
        return 0
    return cfg.layer_types.index(cfg.layer_types[i])


@functools.lru_cache(maxsize=None)
def _isolated_step(cfg, name: str, layer: int):
    """One jitted step of ``layer_steps``, taking the layer's params as an argument: one
    compile serves every layer of the same kind (not one per component and layer)."""
    import jax

    from kernels.models import qwen2 as M

    def run(lp, cos, sin, positions, *args):
        steps = {n: fn for n, _, fn in M.layer_steps(lp, cos, sin, cfg=cfg, layer=layer, q_positions=positions,
                                                      kv_positions=positions, kv_valid=None)}
        return steps[name](*args)

    return jax.jit(run)


def jax_isolated(params, cfg, ids, hf: dict, inject) -> dict[str, np.ndarray]:
    """Each JAX component computed from transformers' values for its inputs."""
    import jax.numpy as jnp

    from kernels.embedding import embed
    from kernels.models import qwen2 as M

    out: dict = {}
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]
    dtype = params["embed"].dtype
    out["embedding"] = M._tap(None, "embedding", embed(jnp.asarray(ids), params["embed"]), inject, None)
    cos, sin = M.rope_tables(cfg, positions, dtype, seq_len=t)
    for i, lp in enumerate(params["layers"]):
        env = {"layer_input": jnp.asarray(hf["embedding"] if i == 0 else hf[f"layers.{i - 1}.mlp_residual"])}
        for name, inputs, _ in M.layer_steps(lp, cos, sin, cfg=cfg, layer=i, q_positions=positions,
                                             kv_positions=positions, kv_valid=None):
            args = [env[n] if n == "layer_input" else jnp.asarray(hf[f"layers.{i}.{n}"]) for n in inputs]
            step = _isolated_step(cfg, name, _same_kind_layer(cfg, i))
            out[f"layers.{i}.{name}"] = M._tap(None, name, step(lp, cos, sin, positions, *args), inject, i)
    last = jnp.asarray(hf[f"layers.{cfg.num_hidden_layers - 1}.mlp_residual"])
    out |= _head_isolated(params, cfg, last, jnp.asarray(hf["final_norm"]), inject)
    return {k: np.asarray(v) for k, v in out.items()}


def _head_isolated(params, cfg, h, hf_final_norm, inject):
    from kernels.models import qwen2 as M
    from kernels.projection import lm_head
    from kernels.rms_norm import rms_norm

    fn = M._tap(None, "final_norm", rms_norm(h, params["norm"], eps=cfg.rms_norm_eps), inject, None)
    w = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    logits = M._tap(None, "logits", lm_head(hf_final_norm, w, w_layout="VD"), inject, None)  # w [V, D]
    return {"final_norm": fn, "logits": logits}


# --- judging ----------------------------------------------------------------------------

@dataclass
class ComponentRow:
    name: str  # e.g. "layers.3.down_proj" or "logits"
    layer: int | None
    component: str
    max_abs_err: float
    rel_err: float  # max|diff| / max|hf|
    max_ulps: float
    mismatch_frac: float
    budget_key: str
    ok: bool
    position_corr: float  # Pearson correlation of the per-position max error with position


def _ordered_names(cfg) -> list[str]:
    from kernels.models.qwen2 import LAYER_COMPONENTS

    names = ["embedding"]
    for i in range(cfg.num_hidden_layers):
        names += [f"layers.{i}.{c}" for c in LAYER_COMPONENTS]
    return names + ["final_norm", "logits"]


# The projections' inputs and weights: parity's term scale (compare.term_scale) of each.
PROJECTION_INPUTS = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
                     "o_proj": "attention", "gate_proj": "post_attention_layernorm",
                     "up_proj": "post_attention_layernorm", "down_proj": "act_product"}


def projection_term_scales(hf: dict, params, cfg) -> dict[str, np.ndarray]:
    """Each projection component's largest term ``|x_k w_kj|``, from transformers' input to it,
    so the localizer measures ulps as the projection op's own tests do."""
    out = {}
    for i, lp in enumerate(params["layers"]):
        for comp, inp in PROJECTION_INPUTS.items():
            name, x = f"layers.{i}.{comp}", hf.get(f"layers.{i}.{inp}")
            if name in hf and x is not None:
                x = np.reshape(x, (*np.shape(hf[name])[:-1], -1))  # [..., in]: attention's heads flattened
                out[name] = compare.term_scale(x, lp[comp])  # [..., out]
    w = (params["embed"] if cfg.tie_word_embeddings else params["lm_head"]).T  # [D, V]: a view of the [V, D] head
    out["logits"] = compare.term_scale(hf["final_norm"], w)
    return out


def judge(hf: dict, jx: dict, cfg, *, dtype: str, tolerances, backend: str = "cpu",
          term_scales: dict | None = None) -> list[ComponentRow]:
    rows = []
    for name in _ordered_names(cfg):
        if name not in hf or name not in jx:
            continue
        comp = name.rsplit(".", 1)[-1] if name.startswith("layers.") else name
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        a, b = compare.to_f64(hf[name]), compare.to_f64(jx[name]).reshape(np.shape(hf[name]))
        op = COMPONENT_OP[comp]
        if op is None or op not in tolerances.known_ops:
            budget, key = compare.ParityBudget(0, 0.0, 0.001), "exact"
        else:
            bud = tolerances.lookup(op, dtype, backend)
            budget, key = bud.parity, bud.key_path
        j = compare.judge_parity(b, a, dtype=dtype, budget=budget, term_scale=(term_scales or {}).get(name))
        with np.errstate(invalid="ignore"):
            diff = np.abs(a - b)
        top = float(np.nanmax(np.abs(a))) if a.size else 0.0
        per_pos = np.nanmax(diff.reshape(diff.shape[0], diff.shape[1], -1), axis=(0, 2)) if a.ndim >= 2 else diff
        corr = _corr(np.arange(per_pos.size), per_pos)
        rows.append(ComponentRow(name, layer, comp, float(np.nanmax(diff)), float(np.nanmax(diff)) / top if top else 0.0,
                                 j.measured["max_ulps"], j.measured["mismatch_frac"], key, j.ok, corr))
    return rows


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2 or np.std(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def logit_stats(hf_logits: np.ndarray, jx_logits: np.ndarray, k: int = 5) -> dict:
    """Per-token KL(hf || jax) in float64, and top-1 / top-k agreement."""
    p = compare.to_f64(hf_logits).reshape(-1, hf_logits.shape[-1])
    q = compare.to_f64(jx_logits).reshape(-1, hf_logits.shape[-1])
    lp = p - p.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q - q.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top1 = float(np.mean(p.argmax(-1) == q.argmax(-1)))
    tk_p = np.argsort(-p, axis=-1)[:, :k]
    tk_q = np.argsort(-q, axis=-1)[:, :k]
    topk = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(tk_p, tk_q)]))
    return {"kl_max": float(kl.max()), "kl_mean": float(kl.mean()), "top1_agreement": top1,
            f"top{k}_overlap": topk, "kl_position_corr": _corr(np.arange(kl.size), kl)}


@dataclass
class Report:
    source: str
    dtype: str
    tokens: int
    mode: str
    rows: list[ComponentRow]
    logits: dict
    first_divergence: str | None
    depth_growth: list = field(default_factory=list)  # accumulated: per-layer residual error

    def to_json(self) -> dict:
        d = asdict(self)
        return d


def run(*, source: str, hf_config: dict | None, checkpoint: str | None, dtype: str, tokens: int, batch: int,
        seed: int, modes: tuple[str, ...], inject: tuple, tolerances, layers: int | None = None) -> list[Report]:
    import jax.numpy as jnp

    from kernels.models import qwen2 as M
    from oracles.arrays import TORCH_DTYPES

    if checkpoint:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=TORCH_DTYPES[dtype], attn_implementation="eager",
                                                     use_safetensors=True).eval()
        cfg_dict = model.config.to_dict()
        torch.manual_seed(seed)
    else:
        cfg_dict = hf_config
        model = hf_model(cfg_dict, dtype=dtype, seed=seed)
    cfg = M.Config.from_hf(cfg_dict if checkpoint else {**cfg_dict})
    from oracles.arrays import torch_to_numpy

    state = {k: torch_to_numpy(v) for k, v in model.state_dict().items()}
    params = M.params_from_hf(state, cfg, dtype=jnp.dtype(dtype))
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, tokens))
    hf = hf_capture(model, ids)
    terms = projection_term_scales(hf, params, cfg)
    reports = []
    for mode in modes:
        if mode == "isolated":
            jx = jax_isolated(params, cfg, ids, hf, inject)
        else:
            jx = {k: np.asarray(v) for k, v in M.capture(params, jnp.asarray(ids), config=cfg, inject=inject).items()}
        rows = judge(hf, jx, cfg, dtype=dtype, tolerances=tolerances, backend=registry.backend(),  # this backend's budgets
                     term_scales=terms)
        first = next((r.name for r in rows if not r.ok), None)
        growth = [r.max_abs_err for r in rows if r.component == "mlp_residual"]
        reports.append(Report(source, dtype, tokens, mode, rows, logit_stats(hf["logits"], jx["logits"]), first, growth))
    return reports


def parse_inject(specs: list[str]) -> tuple:
    """``layer=L component=C scale=s`` (one spec per --inject) -> Inject tuples."""
    from kernels.models.qwen2 import LAYER_COMPONENTS, MODEL_COMPONENTS, Inject

    out = []
    for spec in specs or []:
        kv = dict(p.split("=", 1) for p in spec.replace(",", " ").split())
        comp = kv.get("component")
        if comp not in LAYER_COMPONENTS + MODEL_COMPONENTS:
            raise ValueError(f"--inject component must be one of {list(LAYER_COMPONENTS + MODEL_COMPONENTS)}, got {comp!r}")
        layer = int(kv["layer"]) if "layer" in kv and comp in LAYER_COMPONENTS else None
        if comp in LAYER_COMPONENTS and layer is None:
            raise ValueError(f"--inject {spec!r}: a layer component needs layer=L")
        out.append(Inject(layer=layer, component=comp, scale=float(kv.get("scale", 0.25))))
    return tuple(out)


def plot(reports: list[Report], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from kernels.models.qwen2 import LAYER_COMPONENTS

    fig, axes = plt.subplots(1, len(reports), figsize=(7 * len(reports), 4.5), squeeze=False)
    for ax, rep in zip(axes[0], reports):
        for comp in LAYER_COMPONENTS:
            pts = [(r.layer, max(r.rel_err, 1e-12)) for r in rep.rows if r.component == comp]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=comp)
        ax.set_yscale("log")
        ax.set(title=f"{rep.mode}: {rep.source} {rep.dtype}, {rep.tokens} tokens"
               + (f"\nfirst over budget: {rep.first_divergence}" if rep.first_divergence else ""),
               xlabel="layer", ylabel="max|jax - hf| / max|hf|")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def print_reports(reports: list[Report], console) -> None:
    from rich.table import Table

    for rep in reports:
        t = Table(title=f"parity diverge ({rep.mode}): {rep.source}, {rep.dtype}, {rep.tokens} tokens")
        for c in ("component", "max |err|", "rel err", "ulps", "mismatch %", "pos corr", "budget", "verdict"):
            t.add_column(c)
        shown = [r for r in rep.rows if (not r.ok) or r.layer in (None, 0) or r.component == "mlp_residual"]
        for r in shown:
            t.add_row(r.name, f"{r.max_abs_err:.3g}", f"{r.rel_err:.2e}", f"{r.max_ulps:.3g}",
                      f"{100 * r.mismatch_frac:.3g}", f"{r.position_corr:+.2f}", r.budget_key,
                      "[green]ok[/]" if r.ok else "[red]OVER[/]")
        console.print(t)
        lg = rep.logits
        console.print(f"logits: KL max {lg['kl_max']:.3g} mean {lg['kl_mean']:.3g}, top-1 agreement "
                      f"{100 * lg['top1_agreement']:.1f}%, top-5 overlap {100 * lg['top5_overlap']:.1f}%, "
                      f"KL-position corr {lg['kl_position_corr']:+.2f}")
        label = "first component over budget" if rep.mode == "isolated" else \
            "first component over its op budget (accumulated: inherited drift counts too)"
        console.print(f"{label}: "
                      + (f"[red]{rep.first_divergence}[/]" if rep.first_divergence else "[green]none[/]"))
        if rep.depth_growth and len(rep.depth_growth) > 1:
            g = [b / a if a else math.inf for a, b in zip(rep.depth_growth, rep.depth_growth[1:])]
            console.print(f"residual error by layer: {', '.join(f'{e:.2g}' for e in rep.depth_growth)}; "
                          f"largest layer-to-layer growth x{max(g):.3g}")


def write_json(reports: list[Report], path: Path) -> None:
    path.write_text(json.dumps([r.to_json() for r in reports], indent=1, default=float))
