"""JAX settings shared by the tests and the CLI: the persistent compilation cache.

Every distinct shape costs a compile (about 0.3 s on a 2-core machine); the cache
makes the second run of the suite pay almost none of them.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure_jax(cache_dir: str | os.PathLike | None = None) -> Path:
    import jax

    path = Path(cache_dir or os.environ.get("PARITY_JAX_CACHE") or Path.cwd() / ".jax_cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every compile: ours are small and many, each well under JAX's 1 s default.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
