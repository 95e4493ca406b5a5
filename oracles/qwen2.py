"""The whole-model oracle: transformers' own decoder, run on the JAX model's weights.

For the model the oracle is transformers itself (``Qwen2ForCausalLM`` /
``LlamaForCausalLM`` / ``Qwen3ForCausalLM``, transformers 5.17.0 on torch 2.13.0, eager
attention) in the model dtype, and the truth is the same module in float64
(``model.double()``: every intermediate unrounded). The harness draws small configs of
each family (tied and untied heads, non-trivial biases and norm weights, Qwen3's q/k
norms, sliding-window layers) and a few hundred tokens, so RoPE's long-position
behaviour matters.

Beyond the three judgments, the properties are the seeds' measures: the largest logit
difference relative to the logit scale, and the per-token KL divergence.

Gradients (``Harness.gradient``): every parameter's, in HF's names, from
``jax.vjp`` through ``params_from_hf`` and the model, against autograd through
``torch.func.functional_call`` of the same transformers model in the case's dtype and in float64.
"""

from __future__ import annotations

import functools

import numpy as np

FAMILY_CONFIGS = {
    "qwen2": dict(model_type="qwen2"),
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen2-sliding": dict(model_type="qwen2", use_sliding_window=True, sliding_window=48, max_window_layers=1),
    "llama": dict(model_type="llama", attention_bias=False),
    "qwen3": dict(model_type="qwen3", attention_bias=False, head_dim=128),
}
# head_dim 64, as the smallest real Qwen2.5 (0.5B): torch computes the RoPE frequencies of
# a head_dim whose half is not a multiple of 32 partly with libm's powf (see kernels/rope.py).
_TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
             tie_word_embeddings=False, hidden_act="silu")


def tiny_config(family: str) -> dict:
    return {**_TINY, **FAMILY_CONFIGS[family]}


@functools.lru_cache(maxsize=16)
def _hf_model_f32(family: str, seed: int):
    from oracles.diverge import hf_model

    return hf_model(tiny_config(family), dtype="float32", seed=seed)


def hf_model_in(family: str, seed: int, dtype: str):
    """transformers' model with this case's random weights, in ``dtype`` (float64 for the truth)."""
    import copy

    import torch

    m = copy.deepcopy(_hf_model_f32(family, seed))
    if dtype == "float64":
        return m.to(torch.float64)  # the truth: every tensor, buffers included, in float64
    with torch.no_grad():  # parameters only: RoPE buffers stay float32, as from_pretrained(dtype=) leaves them
        for p in m.parameters():
            p.data = p.data.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    return m


def _cases():
    from hypothesis import strategies as st

    from oracles import strategies as S
    from oracles.registry import Case

    @st.composite
    def cases(draw, dtype=None, family=None):
        dt = dtype or draw(S.dtypes())
        fam = family or draw(st.sampled_from(sorted(FAMILY_CONFIGS)))
        t = draw(st.sampled_from([64, 300]))
        return Case(op="qwen2", dtype=dt, shapes={"input_ids": (1, t)}, kwargs={},
                    data={"family": fam, "weights_seed": draw(st.integers(0, 3)), "seed": draw(S.seeds())})

    return cases


def _config_and_ids(case):
    """The case's model config (``kernels.models.qwen2.Config``) and its token ids ``[1, T]``."""
    from kernels.models import qwen2 as M

    cfg = M.Config.from_hf(tiny_config(case.data["family"]))
    return cfg, np.random.default_rng(case.data["seed"]).integers(0, cfg.vocab_size, case.shapes["input_ids"])


def _evaluate(case, kernel):
    import jax.numpy as jnp
    import torch

    from kernels.models import qwen2 as M
    from oracles.arrays import torch_to_numpy
    from oracles.compare import dtype_name, to_f64
    from oracles.registry import Outcome

    fam, seed = case.data["family"], case.data["weights_seed"]
    cfg, ids = _config_and_ids(case)
    model = hf_model_in(fam, seed, case.dtype)
    state = {k: torch_to_numpy(v) for k, v in model.state_dict().items()}
    params = M.params_from_hf(state, cfg, dtype=jnp.dtype(case.dtype))
    k = kernel(params, jnp.asarray(ids), config=cfg)
    with torch.no_grad():
        o = model(torch.from_numpy(ids)).logits
        t = hf_model_in(fam, seed, "float64")(torch.from_numpy(ids)).logits
    return Outcome(kernel=to_f64(np.asarray(k)), oracle=to_f64(o), truth=to_f64(t), out_dtype=dtype_name(o.dtype),
                   inputs={"input_ids": ids}, kernel_dtype=dtype_name(k.dtype), kernel_shape=tuple(k.shape))


def _properties(case, outcome, budget):
    """The seeds' measures: max|logit diff| / max|logit|, and the per-token KL divergence."""
    from oracles.compare import Judgment
    from oracles.diverge import logit_stats

    k, o = outcome.kernel, outcome.oracle
    rel = float(np.max(np.abs(k - o)) / np.max(np.abs(o)))
    lim = budget.properties["logits_rel_err"]
    stats = logit_stats(o, k)
    kl_lim = budget.properties["kl_max"]
    return [
        Judgment("logits_rel", rel <= lim, {"logits_rel_err": rel}, {"logits_rel_err": lim},
                 f"max|logit diff| / max|logit| = {rel:.3g} [budget {lim:g}]"),
        Judgment("kl", stats["kl_max"] <= kl_lim, {"kl_max": stats["kl_max"]}, {"kl_max": kl_lim},
                 f"per-token KL(hf || jax): max {stats['kl_max']:.3g}, mean {stats['kl_mean']:.3g}; "
                 f"top-1 agreement {100 * stats['top1_agreement']:.1f}% [budget: KL max {kl_lim:g}]"),
    ]


def _grad_call(kernel, a, *, config):
    """The kernel's logits from HF-named arrays: ``params_from_hf`` only transposes and casts
    (traceable; to their own dtype), so the vjp's gradients come back in HF's names and layouts."""
    from kernels.models.qwen2 import params_from_hf

    state = {n: v for n, v in a.items() if n != "input_ids"}
    return kernel(params_from_hf(state, config, dtype=state["model.norm.weight"].dtype), a["input_ids"], config=config)


def _gradient(case, kernel):
    """Every parameter's gradient (the loss: a seeded cotangent on the logits), against
    autograd through transformers' model in the case's dtype and in float64 (the truth). A tied head
    is one parameter, the embedding table, that both of its uses add into."""
    import torch

    from kernels.models.qwen2 import expected_shapes
    from oracles.arrays import torch_to_numpy
    from oracles.gradients import GradProblem

    fam, seed = case.data["family"], case.data["weights_seed"]
    cfg, ids = _config_and_ids(case)
    names = tuple(expected_shapes(cfg))  # HF's parameter names, a tied head's absent
    state = hf_model_in(fam, seed, case.dtype).state_dict()

    def oracle(t, exact):
        model = hf_model_in(fam, seed, "float64" if exact else case.dtype)
        # functional_call ties: the embedding table's leaf is the head's too (tie_weights=True)
        return torch.func.functional_call(model, {n: t[n] for n in names},
                                          (torch.from_numpy(t["input_ids"]),)).logits

    return GradProblem(inputs={"input_ids": ids, **{n: torch_to_numpy(state[n]) for n in names}}, diff=names,
                       call=_grad_call, kernel=kernel, oracle=oracle, static={"config": cfg})


def _make_harness():
    from kernels.models.qwen2 import forward
    from oracles.registry import Harness, strata_product

    # A sweep's cells: each model family, so every ``parity check`` builds each one.
    return Harness(cases=_cases(), evaluate=_evaluate, kernel=forward, properties=_properties, examples_scale=0.25,
                   strata=lambda o: strata_product(o, scalars={"family": sorted(FAMILY_CONFIGS)}), gradient=_gradient)


HARNESS = _make_harness()
