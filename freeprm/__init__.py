"""freeprm: kernel-accelerated scoring and training of implicit process reward models.

An implicit PRM is a causal LM ``pi`` read against a reference ``pi_ref``:
``r_i = beta * (log pi(y_i | y_<i) - log pi_ref(y_i | y_<i))`` (arXiv 2412.01981).

Subpackages:
    freeprm.kernels  fused ops (Triton on CUDA) and their plain-torch references
    freeprm.engine   score(), Scorer: loading, tokenization, steps, batching
    freeprm.trainer  losses over log-probs and a small trainer
    freeprm.eval     best-of-N evaluation
"""

__version__ = "0.1.0"
