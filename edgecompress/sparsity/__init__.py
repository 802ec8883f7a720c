"""Sparsity: static N:M patterns (:mod:`.nm`) and, later, input-dependent (dynamic) computation."""
