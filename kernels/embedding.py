"""Token embedding lookup, ``table[ids]``, that never hides an out-of-range id.

JAX clamps out-of-range gather indices silently (id 200000 in a 151936-row table reads
row 151935), where torch's ``nn.Embedding`` raises. This kernel:

- validates concrete ids (numpy arrays, or jax arrays outside ``jit``): any id outside
  ``[0, V)`` raises ``ValueError`` naming it;
- for traced ids (inside ``jit``/``vmap``) it cannot raise; with ``checked=True``
  (the default) every out-of-range id gives a row of NaN, so the error shows in the
  logits instead of passing as a plausible token; ``checked=False`` is JAX's plain
  clamping gather (the fast path, for callers who validated the ids upstream).

No arithmetic happens: the output is the table's rows bit for bit, in the table's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels._checks import dtype_name, require_float


def _concrete(ids) -> np.ndarray | None:
    """The ids' values if they are known now (numpy, or jax outside jit); None when traced."""
    try:
        return np.asarray(ids)
    except jax.errors.TracerArrayConversionError:  # traced inside jit/vmap: values unknown until run
        return None


def embed(ids: jax.Array, table: jax.Array, *, checked: bool = True) -> jax.Array:
    """Rows of ``table[V, D]`` for integer ``ids[...]``: returns ``[..., D]`` of ``table.dtype``.

    Recipe: a gather, no rounding. Out-of-range ids: ``ValueError`` when the ids are
    concrete; NaN rows when traced and ``checked``; clamped when traced and not ``checked``.
    """
    require_float("table", table, op="embed")
    if table.ndim != 2:
        raise ValueError(f"embed: table must have shape [V, D], got shape {tuple(table.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"embed: ids must have an integer dtype, got {dtype_name(ids.dtype)} with shape {tuple(ids.shape)}")
    v = table.shape[0]
    concrete = _concrete(ids)
    if concrete is not None:
        bad = (concrete < 0) | (concrete >= v)
        if bad.any():
            i = tuple(int(k) for k in np.argwhere(bad)[0])
            raise ValueError(
                f"embed: ids must be in [0, {v}) for a table of {v} rows; got {int(concrete[i])} at index {i} "
                f"({int(bad.sum())} out of range)"
            )
    rows = jnp.take(table, ids, axis=0, mode="clip")  # [..., D]
    if not checked:
        return rows
    valid = (ids >= 0) & (ids < v)  # [...]
    return jnp.where(valid[..., None], rows, jnp.asarray(jnp.nan, table.dtype))  # [..., D]
