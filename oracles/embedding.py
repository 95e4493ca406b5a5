"""PyTorch oracle for the token embedding lookup.

Reproduces, for torch 2.13.0 and transformers 5.17.0, ``Qwen2Model.embed_tokens``
(``torch.nn.Embedding(vocab_size, hidden_size, padding_idx)``), whose forward is
``torch.nn.functional.embedding(ids, weight)``:
    1. gather the rows ``weight[ids]`` (no arithmetic, no rounding: the table's bits)
    2. any id outside ``[0, V)`` raises ``IndexError`` (the oracle lets it raise)
``padding_idx`` only affects gradients, not the forward values.

``exact=True`` returns the same rows as float64 (a gather has nothing to round, so the
truth is the oracle widened). ``tests/test_projection.py`` checks this against a
Qwen2ForCausalLM's own ``embed_tokens``; ``tests/test_embedding.py`` against
``nn.Embedding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embed(ids: torch.Tensor, table: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
    rows = F.embedding(ids, table)  # [..., D]
    return rows.to(torch.float64) if exact else rows  # widening is exact: the truth


# --- harness: how the registry, the tests and ``parity check`` drive this op ---------

# (V, D): the real vocabularies with a small D, and a small vocabulary with a real D.
TABLE_SHAPES = ((152064, 64), (151936, 128), (1000, 896), (32000, 64))
ID_SHAPES = ((1,), (2, 5), (4, 16))


def _cases():
    from hypothesis import strategies as st

    from oracles import strategies as S
    from oracles.registry import Case

    @st.composite
    def cases(draw, dtype=None):
        dt = dtype or draw(S.dtypes())
        v, d = draw(st.sampled_from(TABLE_SHAPES))
        return Case(op="embedding", dtype=dt, shapes={"ids": draw(st.sampled_from(ID_SHAPES)), "table": (v, d)},
                    kwargs={}, data={"seed": draw(S.seeds()), "edges": draw(st.booleans())})

    return cases


def _inputs(case):
    import numpy as np

    from oracles import strategies as S

    rng = np.random.default_rng(case.data["seed"])
    v, d = case.shapes["table"]
    ids = rng.integers(0, v, size=case.shapes["ids"]).astype(np.int32)
    if case.data["edges"]:  # the first and last rows: where a clamp or an off-by-one shows
        ids.flat[0], ids.flat[-1] = 0, v - 1
    table = rng.standard_normal((v, d), dtype=np.float32) * np.float32(0.02)
    return {"ids": ids, "table": S.round_to(table, case.dtype)}


def _evaluate(case, kernel):
    from oracles.arrays import to_torch
    from oracles.compare import dtype_name, to_f64
    from oracles.registry import Outcome, jitted

    inp = _inputs(case)
    k = jitted(kernel)(inp["ids"], inp["table"])
    ids, table = torch.from_numpy(inp["ids"]).to(torch.int64), to_torch(inp["table"])
    o = embed(ids, table)
    return Outcome(kernel=to_f64(k), oracle=to_f64(o), truth=to_f64(embed(ids, table, exact=True)),
                   out_dtype=dtype_name(o.dtype), inputs=inp, kernel_dtype=dtype_name(k.dtype),
                   kernel_shape=tuple(k.shape))


def _grad_call(kernel, a):
    return kernel(a["ids"], a["table"])


def _gradient(case, kernel):
    from oracles.gradients import GradProblem

    def oracle(t, exact):
        return embed(torch.from_numpy(t["ids"]).to(torch.int64), t["table"], exact=exact)

    return GradProblem(inputs=_inputs(case), diff=("table",), call=_grad_call, kernel=kernel, oracle=oracle)


def _make_harness():
    from kernels.embedding import embed as kernel
    from oracles.registry import Harness

    return Harness(cases=_cases(), evaluate=_evaluate, kernel=kernel, gradient=_gradient)


HARNESS = _make_harness()
