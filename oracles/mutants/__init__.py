"""Mutants: deliberately broken JAX kernels, one per real bug class.

``parity mutants`` swaps each one into the registry in place of the real kernel
(``$PARITY_MUTANT=op:name``) and runs that op's tests; every mutant must be killed.
They live on the oracle side so that ``kernels/`` only ever holds code users import.
"""
