"""Dense projections: ``linear`` (q/k/v with bias, o_proj, any dense layer) and ``lm_head``.

Weights are stored ``[in, out]`` (torch's ``nn.Linear.weight`` is ``[out, in]``:
transpose when converting a checkpoint), except that ``lm_head`` also reads a weight
stored ``[V, D]`` as it is (``w_layout="VD"``): HF's ``lm_head.weight`` and the tied
embedding table, and the faster GEMM on an H100 (see :func:`lm_head`).

The rounding recipe of torch's ``nn.Linear`` on every dtype (checked bit for bit in
``tests/test_projection.py``, 2-D and 3-D inputs alike):

    1. ``acc = f32acc(x @ w)``       products and sums in float32 (bf16/f16 too)
    2. ``acc = acc + float32(b)``    the bias is added in float32, BEFORE the rounding
                                     (oneDNN's fused bias; rounding first and adding in
                                     bf16 differs on ~25% of elements)
    3. ``y = round(acc)``            one rounding, to the input dtype

A float32 matmul here is full float32: ``precision="highest"`` by default, because XLA's
default precision on GPUs is TF32 (measured on an H100: 2.9e-4 relative error against
torch's 5.7e-7). Reduction order differs between XLA and oneDNN/MKL, so float32 results
agree with torch to a few ulps, bf16/f16 to the bit on nearly every element.

Two implementations of ``linear`` (``implementation=``), one recipe: ``"xla"`` (XLA's GEMM
writing float32, then the bias and the rounding as separate ops) and ``"mosaic"``
(``kernels.linear_mosaic``: one Hopper GEMM doing all three steps, its epilogue adding the
bias and rounding; bf16/f16, the shapes it tiles). The default is ``"mosaic"`` where JAX's
device is a Hopper GPU and the call fits it: no float32 round trip through memory.
``lm_head`` has the same two (the mosaic GEMM reads its ``[V, D]`` weight in place too); its
default takes the mosaic GEMM for model-dtype logits only (see :func:`lm_head`).

A third, ``"pallas"`` (``kernels.linear_pallas``), is a GEMV for at most 8 rows (a decode
step), the same recipe with another float32 summation order. It is ``linear``'s default on a
CUDA GPU for bf16/f16 weights whose K is 2048-4096 long and N at most 8192 wide (:func:`pallas_preferred`), where
XLA's one-pass column reduction leaves most SMs idle: the 7B q/o projection of a decode step
in 12.6 us against 23.2 (benchmarks/results/probe_gemv_h100.json).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels._checks import dtype_name, dtype_option, require_choice, require_float, require_gpu
from kernels._dot import dot_f32

PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH, "default": jax.lax.Precision.DEFAULT}
LOGITS_DTYPES = (None, "float32")
IMPLEMENTATIONS = ("xla", "mosaic", "pallas")  # linear's and lm_head's; see linear(), lm_head()
W_LAYOUTS = ("DV", "VD")  # lm_head's weight: [D, V] (the kernels' [in, out]) or [V, D] (nn.Linear's, a tied table)


# linear's default takes the Pallas GEMV for at most PALLAS_ROWS rows where PALLAS_MIN_K <= K <=
# PALLAS_MAX_K and N <= PALLAS_MAX_N (pallas_preferred).
PALLAS_ROWS, PALLAS_MIN_K, PALLAS_MAX_K, PALLAS_MAX_N = 8, 2048, 4096, 8192


def pallas_preferred(x_shape, w_shape, dtype) -> bool:
    """Whether ``linear``'s default takes the Pallas GEMV on a GPU: bf16/f16, at most
    ``PALLAS_ROWS`` rows, ``PALLAS_MIN_K`` <= K <= ``PALLAS_MAX_K`` and N <= ``PALLAS_MAX_N``.

    Why there (H100, one row, bf16, results/probe_gemv_h100.json, in turns): XLA compiles a
    few-row dot to a column reduction over K, in one pass where K <= 4096, each program
    owning a slice of N; with N narrow, few programs read a long K each. The GEMV splits K to
    fill the GPU: 7B q/o (K = N = 3584) 12.6 us against 23.2, k/v (N = 512) 5.6 against 10.8.
    Where N is wide XLA is as fast or faster (7B gate, N = 18944: 49.0 against 50.6 us, and in
    a model XLA fuses gate and up into one kernel); past K = 4096 XLA splits K itself (7B down,
    K = 18944: 51.8 against 57.4; 0.5B down, K = 4864: 6.8 against 7.6). At K = 896 (0.5B) both
    take 4.5-9 us, launch-bound, within 20% either way, so XLA stays. The whole 7B decode step
    with its q/k/v/o on the GEMV: 6536 us against 7470 (1.14x); a first rule without the
    bound on K also took the down projections, and the 0.5B step ran 1711 us against 1648.
    """
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or len(w_shape) != 2:
        return False
    k, n = w_shape
    return math.prod(x_shape[:-1]) <= PALLAS_ROWS and PALLAS_MIN_K <= k <= PALLAS_MAX_K and n <= PALLAS_MAX_N


def _gemv(*args, w_layout, out_dtype, op, reference):
    """The Pallas GEMV (kernels.linear_pallas) on ``args = (x, w[, b])``, differentiated as
    ``reference`` (the XLA path, same arguments): a pallas_call has no transpose rule (kernels._grad)."""
    from kernels._grad import with_derivative_of
    from kernels.linear_pallas import pallas_linear

    def fast(x, w, *b):
        return pallas_linear(x, w, *b, w_layout=w_layout, out_dtype=out_dtype, op=op)

    return with_derivative_of(fast, reference)(*args)


def _same_dtype(op: str, name: str, a, x) -> None:
    if a.dtype != x.dtype:
        raise ValueError(f"{op}: {name} must have the dtype of x ({dtype_name(x.dtype)}), got {dtype_name(a.dtype)}")


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, precision: str = "highest",
           implementation: str | None = None) -> jax.Array:
    """``x[..., I] @ w[I, O] + b[O]``, rounded as torch's ``nn.Linear`` rounds.

    Recipe: float32 accumulation; the bias added in float32 before the single rounding
    to ``x.dtype`` (see the module docstring).

    Args:
      x: ``[..., I]``, float32 / bfloat16 / float16.
      w: ``[I, O]`` of ``x.dtype``.
      b: optional bias ``[O]`` of ``x.dtype`` (Qwen2's q/k/v projections have one).
      precision: ``"highest"`` (default: full float32, never TF32), ``"high"`` or
        ``"default"`` (XLA's platform default: TF32 for float32 on GPUs; opt-in only).
        It applies to the ``"xla"`` path.
      implementation: ``"xla"`` (any backend: XLA's GEMM writing float32, then the bias
        and the rounding as separate ops), ``"mosaic"`` (``kernels.linear_mosaic``: one
        Hopper GEMM that adds the bias and rounds in its epilogue, the same recipe; bf16/f16,
        shapes it tiles; ValueError naming what is missing elsewhere) or ``None``:
        ``"mosaic"`` where JAX's default device is a Hopper GPU and the call fits it (with
        ``precision="highest"``), else ``"xla"``. On an H100 the 7B gate/up projection
        takes 0.68 ms either as cuBLAS or ``"mosaic"``, 0.86 ms as ``"xla"``
        (benchmarks/results/probe_mosaic_gemm_h100.json). ``"pallas"``
        (``kernels.linear_pallas``: a GEMV for at most 8 rows, a decode step's; the same
        recipe in another float32 summation order; CUDA GPU, ValueError elsewhere) is also
        the default on a CUDA GPU where :func:`pallas_preferred` says so (bf16/f16, at most 8
        rows, 2048 <= K <= 4096, N <= 8192: the 7B q/k/v/o projections of a decode step,
        1.8-1.9x XLA's).

    Returns:
      ``[..., O]`` in ``x.dtype``.
    """
    require_float("x", x, op="linear")
    require_choice("precision", precision, tuple(PRECISIONS), op="linear")
    _same_dtype("linear", "w", w, x)
    if x.ndim < 1 or w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"linear: w must have shape [I, O] with I = {x.shape[-1] if x.ndim else '?'} (last dim of x "
            f"{tuple(x.shape)}), got {tuple(w.shape)}"
        )
    if b is not None:
        _same_dtype("linear", "b", b, x)
        if b.shape != (w.shape[1],):
            raise ValueError(f"linear: b must have shape [O] = ({w.shape[1]},), got {tuple(b.shape)}")
    require_choice("implementation", implementation, (None, *IMPLEMENTATIONS), op="linear")
    if implementation in ("mosaic", "pallas") and precision != "highest":
        raise ValueError(f"linear: precision={precision!r} applies to implementation='xla' (the {implementation} "
                         f"kernel always sums in float32)")
    args = (x, w) if b is None else (x, w, b)

    def xla(*a):
        return linear(*a, implementation="xla")

    def gemv(*a):
        return _gemv(*a, w_layout="KN", out_dtype=None, op="linear", reference=xla)

    if implementation == "pallas":
        require_gpu("pallas", op="linear", module="kernels.linear_pallas.pallas_linear")
        return gemv(*args)
    if implementation != "xla":
        from kernels.linear_mosaic import mosaic_linear, why_not

        if implementation == "mosaic":
            return mosaic_linear(x, w, b)
        if precision == "highest" and not why_not(x.shape, w.shape, x.dtype):  # it fits
            return mosaic_linear(x, w, b)
        if precision == "highest" and pallas_preferred(x.shape, w.shape, x.dtype):  # a few-row GEMV on a GPU
            return jax.lax.platform_dependent(*args, cuda=gemv, default=xla)
    if precision == "highest":
        acc = dot_f32(x, w)  # f32 [..., O], the accurate float32 accumulation (kernels._dot)
    else:  # an explicit opt-in to a lower precision: XLA's plain matmul at that precision
        acc = jnp.matmul(x, w, precision=PRECISIONS[precision], preferred_element_type=jnp.float32)  # f32 [..., O]
    if b is not None:
        acc = acc + b.astype(jnp.float32)  # torch adds the bias in f32, before rounding
    return acc.astype(x.dtype)  # the single rounding, to the model dtype


def lm_head(h: jax.Array, w: jax.Array, *, logits_dtype: str | None = None, w_layout: str = "DV",
            implementation: str | None = None) -> jax.Array:
    """Logits ``h[..., D] @ w[D, V]``, or ``h @ w[V, D]^T`` with ``w_layout="VD"``.

    Recipe:
      ``logits_dtype=None`` (HF's ``lm_head`` in the model dtype): float32 accumulation,
        one rounding to ``h.dtype``, exactly ``linear(h, w)``.
      ``logits_dtype="float32"``: float32 accumulation, returned unrounded in float32
        (``lm_head(h.float())`` with a float32 weight: the products of bf16/f16 values are
        exact in float32, so no copy of the weight is needed).
    The layout changes only which axis of ``w`` is contracted; the logits are the same.

    Args:
      h: final hidden states ``[..., D]``, float32 / bfloat16 / float16.
      w: ``[D, V]`` (``w_layout="DV"``) or ``[V, D]`` (``"VD"``), of ``h.dtype``. V up to 152064.
      logits_dtype: ``None`` (model dtype) or ``"float32"`` (also as ``jnp.float32`` or any dtype-like).
      w_layout: ``"DV"`` (the kernels' ``[in, out]``, as :func:`linear`) or ``"VD"``: HF's
        ``lm_head.weight`` and a tied embedding table, contracted over its D axis in place
        (no transposed copy). On an H100 the 7B head (h[4096, 3584], V = 152064, float32
        logits) runs 4.5% faster as ``"VD"``: 5.57 against 5.82 ms, XLA picking another
        cuBLAS kernel (benchmarks/results/probe_layout_h100.json), so the Qwen2 model stores
        its head ``[V, D]``.
      implementation: ``"xla"`` (any backend: XLA's GEMM, writing float32; then the rounding
        for model-dtype logits), ``"mosaic"`` (``kernels.linear_mosaic``, the Hopper GEMM of
        :func:`linear`, both layouts read in place: its epilogue writes the float32 sum as
        it is, or rounds it once; bf16/f16, the shapes it tiles; ValueError naming what is
        missing elsewhere) or ``None``: for model-dtype logits ``"mosaic"`` where JAX's
        default device is a Hopper GPU and the call fits it, else ``"xla"``; for float32
        logits ``"xla"``. The same recipe and, on an H100, the same bits either way. Why the
        split (benchmarks/probe_mosaic_gemm.py --head, three runs, in turns; x torch's bf16
        cuBLAS GEMM): model-dtype logits run at 1.01 on the mosaic GEMM against 0.84 on XLA's
        (a float32 GEMM, then a convert) at 7B, 0.99-1.00 against 0.55 at 0.5B; float32
        logits at 0.97 against 1.02-1.03 (7B) and 0.83 against 0.97 (0.5B): the float32
        tile's stores hold up the next block's K loop, which cuBLAS's epilogue does not.
        ``"pallas"`` (``kernels.linear_pallas``, the GEMV of :func:`linear` for at most 8
        rows, the weight read in place; CUDA GPU) is opt-in only: XLA reads a one-row head
        as fast or faster (H100, Qwen2.5 heads: 87.0 against 91.2 us at 0.5B, 341.0 against
        360.3 at 7B, results/probe_gemv_h100.json).

    Returns:
      ``[..., V]`` logits in ``h.dtype`` or float32.
    """
    require_float("h", h, op="lm_head")
    logits_dtype = dtype_option("logits_dtype", logits_dtype, LOGITS_DTYPES, op="lm_head")
    require_choice("w_layout", w_layout, W_LAYOUTS, op="lm_head")
    _same_dtype("lm_head", "w", w, h)
    d_axis = W_LAYOUTS.index(w_layout)  # the axis of w that is D: 0 for [D, V], 1 for [V, D]
    if h.ndim < 1 or w.ndim != 2 or w.shape[d_axis] != h.shape[-1]:
        raise ValueError(
            f"lm_head: w must have shape [{w_layout[0]}, {w_layout[1]}] (w_layout={w_layout!r}) with "
            f"D = {h.shape[-1] if h.ndim else '?'} (last dim of h {tuple(h.shape)}), got {tuple(w.shape)}"
        )
    require_choice("implementation", implementation, (None, *IMPLEMENTATIONS), op="lm_head")
    if implementation == "pallas":
        require_gpu("pallas", op="lm_head", module="kernels.linear_pallas.pallas_linear")
        return _gemv(h, w, w_layout="KN" if w_layout == "DV" else "NK", out_dtype=logits_dtype, op="lm_head",
                     reference=lambda h, w: lm_head(h, w, logits_dtype=logits_dtype, w_layout=w_layout,
                                                    implementation="xla"))
    if implementation != "xla":
        from kernels.linear_mosaic import mosaic_linear, why_not

        mw = "KN" if w_layout == "DV" else "NK"  # the GEMM's names for the two layouts
        if implementation == "mosaic" or (logits_dtype is None and not why_not(h.shape, w.shape, h.dtype, w_layout=mw)):
            return mosaic_linear(h, w, w_layout=mw, out_dtype=logits_dtype, op="lm_head")
    acc = dot_f32(h, w, w_contract=d_axis, f32_result=logits_dtype == "float32")  # f32 [..., V], no transpose
    if logits_dtype == "float32":
        return acc  # f32 logits asked for: no rounding at all
    return acc.astype(h.dtype)  # HF's lm_head rounds once to the model dtype
