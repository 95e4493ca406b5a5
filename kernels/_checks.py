"""Argument checks shared by the kernels: every bad input is a ValueError that names
what was expected and what came in. No asserts (they vanish under ``python -O``)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def require_float(name: str, x, *, op: str) -> None:
    """Raise unless ``x`` has a floating dtype (f32, bf16, f16 or f64)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{op}: {name} must have a floating dtype (float32, bfloat16, float16), "
            f"got {dtype_name(x.dtype)} with shape {tuple(x.shape)}"
        )


def require_choice(name: str, value, choices: Sequence, *, op: str) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, got {value!r}")


def dtype_option(name: str, value, choices: Sequence, *, op: str):
    """A dtype option as its name (one of ``choices``, which may hold None): ``"float32"``,
    ``jnp.float32``, ``np.float32`` and ``np.dtype("float32")`` all mean the same."""
    if value is not None and not isinstance(value, str):
        try:
            value = np.dtype(value).name
        except TypeError:
            pass  # not a dtype: require_choice names it
    require_choice(name, value, choices, op=op)
    return value


def require_ndim(name: str, x, ndim: int, *, op: str, letters: str) -> None:
    if x.ndim != ndim:
        raise ValueError(
            f"{op}: {name} must have shape [{','.join(letters)}] ({ndim} dims), "
            f"got shape {tuple(x.shape)}"
        )


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``): Triton's block extents."""
    return 1 << max(0, (x - 1).bit_length())


def is_pow2(x) -> bool:
    """``x`` is an int (not a bool) and a power of two >= 1."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1 and x & (x - 1) == 0


def require_pow2(name: str, value, *, op: str, minimum: int = 1, why: str = "") -> None:
    """Raise unless ``value`` is a power-of-two int >= ``minimum`` (a Pallas launch parameter)."""
    if not is_pow2(value) or value < minimum:
        raise ValueError(f"{op}: {name} must be a power of two >= {minimum}{why}, got {value!r}")


def require_positive(name: str, value, *, op: str) -> None:
    if not (value > 0):
        raise ValueError(f"{op}: {name} must be > 0, got {value!r}")


def require_gpu(implementation: str, *, op: str, module: str) -> None:
    """Raise unless JAX's default backend is a GPU, for an explicit ``implementation=`` whose
    Triton kernels compile nowhere else (Pallas's own error off a GPU, "Only interpret mode
    is supported on CPU backend", names neither the op nor the way out). Only where the
    caller asked for it: ``implementation=None`` traces the GPU branch of
    ``lax.platform_dependent`` on every platform and must not raise."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"{op}: implementation={implementation!r} needs a CUDA GPU (JAX's default backend is "
                         f"{jax.default_backend()!r}); use implementation='xla' or None, or {module}'s "
                         f"interpret=True to run the kernel's code on the host")
