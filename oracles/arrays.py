"""Moving the same values between numpy, JAX and torch, exactly (bfloat16 included)."""

from __future__ import annotations

import numpy as np
import torch

from oracles.compare import dtype_name

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A numpy array (ml_dtypes bfloat16 included) as a torch tensor of the same dtype."""
    a = np.asarray(a)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        return torch.from_numpy(a.copy())
    name = dtype_name(a.dtype)
    # torch cannot read ml_dtypes' bfloat16: go through float32, which holds it exactly.
    return torch.from_numpy(a.astype(np.float32) if name == "bfloat16" else a.copy()).to(TORCH_DTYPES[name])


def torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy in the same dtype (bfloat16 through ml_dtypes)."""
    import ml_dtypes

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy().astype(ml_dtypes.bfloat16)  # exact: bf16 is a prefix of f32
    return t.numpy()


def jax_to_numpy(a) -> np.ndarray:
    return np.asarray(a)
