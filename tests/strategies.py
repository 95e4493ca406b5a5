"""The tests' strategies are the oracle side's (one source for the tests and ``parity check``)."""

from oracles.strategies import *  # noqa: F401,F403
from oracles.strategies import activation_params, dtypes, make_activations, make_weight, round_to  # noqa: F401
