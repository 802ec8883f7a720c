"""Sparsity: static N:M patterns (:mod:`.nm`) and input-dependent (dynamic) computation: Adaptive
Computation Modules (:mod:`.acm`) and SeerAttention's learned block-sparse attention (:mod:`.seer`)."""
