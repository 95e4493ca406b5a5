"""Embedding bug classes the suite must kill."""

from __future__ import annotations

import jax.numpy as jnp


def jax_indexing(ids, table, *, checked=True):
    """``table[ids]``: JAX clamps out-of-range ids silently (id V reads row V-1)."""
    return table[ids]


def negative_ids_wrap(ids, table, *, checked=True):
    """numpy-style wrapping: id -1 reads the last row instead of failing."""
    return jnp.take(table, ids, axis=0, mode="wrap")


def upcast_rows(ids, table, *, checked=True):
    """Rows returned in float32 whatever the table's dtype."""
    return jnp.take(table, ids, axis=0, mode="clip").astype(jnp.float32)


MUTANTS = {"jax_indexing": jax_indexing, "negative_ids_wrap": negative_ids_wrap, "upcast_rows": upcast_rows}
