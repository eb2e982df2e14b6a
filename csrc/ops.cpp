// Every schema of the library, in one place. Kernels register per backend (cpu/, cuda/),
// autograd in autograd/, autocast in autocast/, fake kernels in Python (_ops.py).
#include <torch/library.h>

#include <string>

namespace {

// The gate's inputs and options, shared by both directions; the options in the order of
// option_fields (csrc/gate.h), from which csrc/gate_op.h derives the C++ signatures.
const std::string kGateArguments =
    "Tensor h, Tensor k, Tensor v, Tensor? w_q=None, Tensor? w_k=None, *, Tensor? mask=None, float? eps=None, "
    "float? scale=None, bool signed_sqrt=True, float sqrt_clamp=1e-06, bool residual=False, bool save_stats=True";

}  // namespace

TORCH_LIBRARY(retrieval_attention, m) {
  // docs/gate.md. stats [3, ..., G] are the r_q, r_k, s the backward reads, or an empty [0]
  // with save_stats=False (inference: nothing is written for a backward).
  m.def(("gate(" + kGateArguments + ") -> (Tensor o, Tensor a, Tensor stats)").c_str());
  // The gradients of gate, given those reaching o and a (grad_a None: zero) and the forward's a
  // and stats; it takes the forward's options (eps and save_stats have no effect). A weight given
  // as None gets an empty [0] gradient.
  m.def(("gate_backward(Tensor grad_o, Tensor? grad_a, Tensor a, Tensor stats, " + kGateArguments +
         ") -> (Tensor grad_h, Tensor grad_k, Tensor grad_v, Tensor grad_w_q, Tensor grad_w_k)")
            .c_str());
  // docs/block.md: y = x + SiLU(CausalDilatedDepthwiseConv(RMSNorm_g(x))) (residual=False: without x), x
  // [B, T, G, D], weight [G * D, 1, K], norm_weight [G, D]; the backward recomputes what it needs from x.
  m.def(
      "short_conv(Tensor x, Tensor weight, Tensor norm_weight, *, int dilation=3, float eps=1e-05, "
      "bool residual=True) -> Tensor");
  m.def(
      "short_conv_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor norm_weight, *, int dilation=3, "
      "float eps=1e-05, bool residual=True) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_norm_weight)");
  // docs/block.md: the projection y = x @ weight^T + bias (csrc/linear.h; the CPU's float32 product in oneDNN).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def(
      "linear_backward(Tensor grad_y, Tensor x, Tensor weight, bool[3] output_mask) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_bias)");
  // docs/ngram.md: the table's rows at int64 indices [...] -> [..., dim]; the backward writes the dense
  // table gradient [num_rows, dim] in one pass, each row summed in index order (csrc/lookup.h).
  m.def("lookup(Tensor weight, Tensor indices) -> Tensor");
  m.def("lookup_backward(Tensor grad, Tensor indices, int num_rows) -> Tensor");
  // docs/ngram.md: hashed n-gram ids [B, T, (max_n - 1) * H] of token ids [B, T]; integer, so no autograd.
  m.def("ngram_hash(Tensor ids, Tensor multipliers, Tensor primes, *, int pad_id, Tensor? cu_seqlens=None) -> Tensor");
  // docs/ngram.md#fp8-tables: rows [R, dim] float8_e4m3fn with UE8M0 scales [R, ceil(dim / block)] (uint8
  // or float8_e8m0fnu) looked up at indices [...] and dequantized to dtype: [..., dim]. Inference only:
  // no autograd.
  m.def("fp8_lookup(Tensor rows, Tensor scales, Tensor indices, *, int block, ScalarType dtype) -> Tensor");
  // docs/block.md, decoding: one token per sequence through the gate and the short convolution in one kernel,
  // y = o + SiLU(conv(RMSNorm_g([conv_state; o]))) with (o, a) the gate's (residual off); conv_state
  // [B, (K - 1) * dilation, G, D] (the last inputs o) is updated in place. Inference only: no autograd.
  m.def(
      "decode_step(Tensor h, Tensor k, Tensor v, Tensor? w_q, Tensor? w_k, Tensor conv_weight, "
      "Tensor conv_norm_weight, Tensor(a!) conv_state, *, int dilation=3, float? eps=None, float? scale=None, "
      "bool signed_sqrt=True, float sqrt_clamp=1e-06, float conv_eps=1e-05) -> (Tensor y, Tensor a)");
}
