// Every schema of the library, in one place. Kernels register per backend
// (cpu/, cuda/), autograd in autograd/, fake kernels in Python (_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(retrieval_attention, m) {
  // SPEC §2: returns (o, a, stats); stats [3, ..., G] are the r_q, r_k, s the backward reads,
  // or an empty [0] with save_stats=False (inference: nothing is written for a backward).
  m.def(
      "gate(Tensor h, Tensor k, Tensor v, Tensor? w_q=None, Tensor? w_k=None, *, float? eps=None, "
      "float? scale=None, bool signed_sqrt=True, float sqrt_clamp=1e-06, bool residual=False, "
      "Tensor? mask=None, bool save_stats=True) -> (Tensor o, Tensor a, Tensor stats)");
  // The gradients of gate; grad_a is the gradient reaching a directly (None: zero).
  // A weight given as None gets an empty [0] gradient.
  m.def(
      "gate_backward(Tensor grad_o, Tensor? grad_a, Tensor h, Tensor k, Tensor v, Tensor? w_q, Tensor? w_k, "
      "Tensor? mask, Tensor a, Tensor stats, *, float? scale=None, bool signed_sqrt=True, float sqrt_clamp=1e-06, "
      "bool residual=False) -> (Tensor grad_h, Tensor grad_k, Tensor grad_v, Tensor grad_w_q, Tensor grad_w_k)");
  // SPEC §4: hashed n-gram ids [B, T, (max_n - 1) * H] of token ids [B, T]; integer, so no autograd.
  m.def("ngram_hash(Tensor ids, Tensor multipliers, Tensor primes, *, int pad_id) -> Tensor");
}
