"""ResPrune: training-free visual token pruning by residual-energy subspace expansion."""

from resprune.select import Selection, select_tokens

__all__ = ["Selection", "select_tokens"]
