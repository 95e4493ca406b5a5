"""The Qwen2-family decoder built from the kernels: against transformers' own model, the KV
cache, loading (state dicts and checkpoint directories), and the first-divergence localizer."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.models import qwen2 as M
from oracles import diverge
from oracles.arrays import torch_to_numpy
from oracles.qwen2 import FAMILY_CONFIGS, hf_model_in, tiny_config
from oracles.registry import active_kernel, check_case, check_gradient, harness
from tests.strategies import DTYPES

H = harness("qwen2")
forward = active_kernel("qwen2")
# A whole-model example costs seconds, not milliseconds: a quarter of the profile's examples.
FEW = settings(max_examples=max(2, settings().max_examples // 4))


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(data=st.data())
def test_logits_within_budget(tolerances, dtype, data):
    """Logits against transformers (parity, KL, max|diff|/max|logit|) and against its float64 run."""
    case = data.draw(H.cases(dtype=dtype), label="case")
    check_case(case, tolerances, kernel=forward)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=max(1, settings().max_examples // 12))
@given(data=st.data())
def test_gradient_within_budget(tolerances, family, dtype, data):
    """jax.vjp of the whole model, every parameter (in HF's names: params_from_hf is
    traceable), against autograd through transformers' model and its float64 truth: within
    ``grad_ratio`` of torch's error (oracles.gradients). Each family, so that a tied head, whose
    gradient is the embedding table's too, is always among them."""
    case = data.draw(H.cases(dtype=dtype, family=family), label="case")
    check_gradient(case, tolerances, kernel=forward)


def _params(family: str, dtype: str, seed: int = 0):
    cfg = M.Config.from_hf(tiny_config(family))
    model = hf_model_in(family, seed, dtype)
    return cfg, model, M.params_from_hf({k: torch_to_numpy(v) for k, v in model.state_dict().items()}, cfg,
                                        jnp.dtype(dtype))


@pytest.mark.parametrize("family, dtype", [("qwen2", "bfloat16"), ("qwen2-sliding", "float32"), ("qwen3", "bfloat16")])
def test_prefill_then_decode_equals_forward(tolerances, family, dtype):
    cfg, _, params = _params(family, dtype)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 72)))
    full = np.asarray(forward(params, ids, config=cfg).astype(jnp.float32))
    logits, cache = M.prefill(params, ids[:, :64], config=cfg, max_len=80)
    steps = [np.asarray(logits.astype(jnp.float32))]
    for t in range(64, 72):
        logits, cache = M.decode_step(params, cache, ids[:, t:t + 1], config=cfg)
        steps.append(np.asarray(logits.astype(jnp.float32)))
    inc = np.concatenate(steps, axis=1)  # [B, T, V]
    rel = np.abs(inc - full).max() / np.abs(full).max()
    lim = tolerances.lookup("qwen2", dtype, "cpu").properties["decode_rel_err"]
    assert rel <= lim, f"prefill+decode vs forward: max|diff|/max|logit| = {rel:.3g} > {lim:g} ({family}, {dtype})"
    assert int(cache["length"]) == 72


def test_config_from_hf_families():
    q2 = M.Config.from_hf(tiny_config("qwen2"))
    assert q2.attention_bias and not q2.qk_norm and q2.layer_types == ("full_attention",) * 3
    sl = M.Config.from_hf(tiny_config("qwen2-sliding"))
    assert sl.sliding_window == 48 and sl.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    ll = M.Config.from_hf(tiny_config("llama"))
    assert not ll.attention_bias and ll.model_type == "llama"
    q3 = M.Config.from_hf(tiny_config("qwen3"))
    assert q3.qk_norm and q3.head_dim == 128 and not q3.attention_bias
    new_style = M.Config.from_hf({**tiny_config("qwen2"), "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "original_max_position_embeddings": 1024}})
    assert new_style.rope_type == "yarn" and new_style.rope_theta == 5e5
    assert dict(new_style.rope_scaling) == {"factor": 4.0, "original_max_position_embeddings": 1024}
    with pytest.raises(ValueError, match=r"model_type must be one of .*got 'gpt2'"):
        M.Config.from_hf({**tiny_config("qwen2"), "model_type": "gpt2"})


def test_params_from_hf_names_missing_unexpected_and_misshapen_tensors():
    cfg, model, _ = _params("qwen2", "float32")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    bad = dict(sd)
    del bad["model.layers.1.self_attn.k_proj.bias"]
    bad["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    bad["model.layers.2.mlp.up_proj.weight"] = np.zeros((5, 7), np.float32)
    with pytest.raises(ValueError) as e:
        M.params_from_hf(bad, cfg)
    msg = str(e.value)
    assert "missing tensors (1): ['model.layers.1.self_attn.k_proj.bias']" in msg
    assert "unexpected tensors (1): ['model.layers.0.extra.weight']" in msg
    assert "model.layers.2.mlp.up_proj.weight: expected shape (704, 256), got (5, 7)" in msg
    untied = dict(sd)
    del untied["lm_head.weight"]
    with pytest.raises(ValueError, match=r"missing tensors \(1\): \['lm_head.weight'\]"):
        M.params_from_hf(untied, cfg)


def test_tied_checkpoint_loads_without_lm_head_and_reads_the_table():
    cfg, model, params = _params("qwen2-tied", "float32")
    assert "lm_head" not in params
    sd = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    p2 = M.params_from_hf(sd, cfg, jnp.float32)
    ids = jnp.asarray(np.arange(16)[None])
    np.testing.assert_array_equal(np.asarray(forward(p2, ids, config=cfg)), np.asarray(forward(params, ids, config=cfg)))


@pytest.mark.parametrize("shard", [False, True])
def test_load_checkpoint_directory_safetensors(tmp_path, shard):
    cfg, model, params = _params("qwen2", "float32")
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB" if shard else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    cfg2, p2 = M.load_checkpoint(tmp_path, dtype=jnp.float32)
    assert cfg2 == cfg
    ids = jnp.asarray(np.arange(20)[None])
    np.testing.assert_array_equal(np.asarray(forward(p2, ids, config=cfg2)), np.asarray(forward(params, ids, config=cfg)))


def test_load_checkpoint_refuses_pickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("qwen2")))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"no \*\.safetensors files \(found \['pytorch_model.bin'\]: pickle"):
        M.load_checkpoint(tmp_path)


def test_forward_rejects_float_ids():
    cfg, _, params = _params("qwen2", "float32")
    with pytest.raises(ValueError, match=r"input_ids must be integer \[B, T\], got float32 \(1, 4\)"):
        forward(params, jnp.zeros((1, 4), jnp.float32), config=cfg)


def test_decode_step_names_every_component_in_its_hlo():
    """Each component runs under ``jax.named_scope``, so the compiled step's ops name it (what a
    profile shows and benchmarks/probe_step_census.py reads): every layer component of every
    layer, the embedding and the head."""
    cfg, _, params = _params("qwen2", "float32")
    cache = M.init_cache(cfg, 1, 16, jnp.float32)
    hlo = jax.jit(M._step, static_argnames=("cfg", "logits_dtype")).lower(
        params, cache, jnp.zeros((1, 1), jnp.int32), cfg=cfg, logits_dtype=None).as_text(debug_info=True)
    want = [f"layers.{i}.{c}" for i in range(cfg.num_hidden_layers) for c in M.LAYER_COMPONENTS]
    missing = [n for n in want + ["embedding", "final_norm", "logits"] if f"{n}/" not in hlo]
    assert not missing, f"components not named in the step's HLO: {missing}"


@pytest.mark.parametrize("layer, component, scale", [(2, "down_proj", 0.25), (1, "q_proj", 1.5),
                                                     (0, "post_attention_layernorm", 0.5)])
def test_localizer_names_a_planted_bug_in_isolated_mode(tolerances, layer, component, scale):
    """The seeds' late-layer MLP under-amplifying 4x, and two more: the localizer must name them."""
    inject = diverge.parse_inject([f"layer={layer} component={component} scale={scale}"])
    (rep,) = diverge.run(source="tiny", hf_config=diverge.preset("tiny"), checkpoint=None, dtype="float32",
                         tokens=32, batch=1, seed=0, modes=("isolated",), inject=inject, tolerances=tolerances)
    assert rep.first_divergence == f"layers.{layer}.{component}", rep.first_divergence
    over = [r.name for r in rep.rows if not r.ok]
    assert over == [f"layers.{layer}.{component}"], over  # isolated: nothing downstream inherits it


def test_localizer_finds_nothing_without_a_bug(tolerances):
    (rep,) = diverge.run(source="tiny", hf_config=diverge.preset("tiny"), checkpoint=None, dtype="float32",
                         tokens=32, batch=1, seed=0, modes=("isolated",), inject=(), tolerances=tolerances)
    assert rep.first_divergence is None, [(r.name, r.max_ulps) for r in rep.rows if not r.ok]
    assert rep.logits["top1_agreement"] == 1.0


def test_hf_model_weights_are_not_trivial():
    """Golden tests on ones hide bugs: biases and norm weights must be far from 0 and 1."""
    _, model, _ = _params("qwen2", "float32")
    sd = model.state_dict()
    assert sd["model.layers.0.input_layernorm.weight"].std() > 0.1
    assert sd["model.layers.0.self_attn.q_proj.bias"].abs().mean() > 0.1
    assert torch.isfinite(sd["lm_head.weight"]).all()
