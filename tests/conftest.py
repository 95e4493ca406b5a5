"""Hypothesis profiles and shared fixtures.

Profiles (``pytest --hypothesis-profile NAME``; ``ci`` is the default):
  ci        derandomized, few examples per test: the whole suite in a few minutes.
  dev       randomized, more examples, failures remembered in .hypothesis/.
  thorough  thousands of examples per op, for measuring budgets.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from oracles.jaxsetup import configure_jax

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", derandomize=True, max_examples=12, database=None, **_common)
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

configure_jax()


@pytest.fixture(scope="session")
def tolerances():
    from oracles import budgets

    return budgets.load()
