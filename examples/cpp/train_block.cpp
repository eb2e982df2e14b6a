// Trains the retrieval block (docs/block.md) from C++ alone: LibTorch for the projection and the short
// convolution, the library's gate operator through the dispatcher (its Autograd kernel gives the
// gradients). A student block learns to reproduce a teacher block of the same shape, so the loss
// can fall well; the program exits non-zero if it does not fall, which makes it a test.
//
//   train_block           on the CPU
//   train_block --cuda    on the GPU, where torch sees one
#include <torch/torch.h>

#include "gate_op.h"  // retrieval_attention::call_gate, through the dispatcher

#include <cstdio>
#include <cstring>
#include <optional>
#include <tuple>

namespace {

using at::Tensor;

// Small sizes: the whole run takes well under a second on one CPU core.
constexpr int64_t kBatch = 4, kTime = 32, kBranches = 2, kHidden = 64, kEmbed = 48;
// The short convolution of Engram: kernel 4, dilation 3 (its largest n-gram order).
constexpr int64_t kConvKernel = 4, kConvDilation = 3;
constexpr double kNormEps = 1e-5;
constexpr double kConvInitStd = 0.1;  // small but not zero, so the conv path gets gradients too
constexpr int kSteps = 40;
constexpr double kLearningRate = 4.0;  // large, because the mean over B*T*G*D elements keeps each gradient small
constexpr uint64_t kSeed = 0;

// The block with the short convolution: h [B, T, G, D] and e [B, T, D_e] in, y [B, T, G, D] out.
struct RetrievalBlockImpl : torch::nn::Module {
  torch::nn::Linear kv{nullptr};  // fused W_kv: rows 0..D-1 give v, then one block of D per branch's key
  Tensor w_q, w_k;                // the gate's RMSNorm weights [G, D]
  Tensor norm_w;                  // the short convolution's RMSNorm weight, one row per branch [G, D]
  Tensor conv_w;                  // depthwise kernel [G*D, 1, K]

  RetrievalBlockImpl() {
    kv = register_module("kv", torch::nn::Linear(kEmbed, (kBranches + 1) * kHidden));
    w_q = register_parameter("w_q", torch::ones({kBranches, kHidden}));
    w_k = register_parameter("w_k", torch::ones({kBranches, kHidden}));
    norm_w = register_parameter("norm_w", torch::ones({kBranches, kHidden}));
    conv_w = register_parameter("conv_w", torch::randn({kBranches * kHidden, 1, kConvKernel}) * kConvInitStd);
  }

  Tensor forward(const Tensor& h, const Tensor& e) {
    const auto B = e.size(0), T = e.size(1);
    // One matrix product for value and all keys; v and k are views into it (no copy): the gate
    // takes strided inputs.
    const auto kvs = kv->forward(e);                                                               // [B, T, (G+1)*D]
    const auto v = kvs.narrow(-1, 0, kHidden);                                                     // [B, T, D]
    const auto k = kvs.narrow(-1, kHidden, kBranches * kHidden).view({B, T, kBranches, kHidden});  // [B, T, G, D]
    // Default options: eps of the dtype, scale 1/sqrt(D), signed square root; no mask.
    auto [o, a, stats] = retrieval_attention::call_gate({h, k, v, w_q, w_k, std::nullopt}, {});
    // Short convolution: RMSNorm per branch, then causal depthwise conv over T on G*D channels.
    const auto normed = o * torch::rsqrt(o.pow(2).mean(-1, /*keepdim=*/true) + kNormEps) * norm_w;
    const auto x = normed.reshape({B, T, kBranches * kHidden}).transpose(1, 2);  // [B, C, T]
    // Pad on the left only, so output t sees inputs t, t-3, t-6, t-9 and never the future.
    const auto padded = torch::constant_pad_nd(x, {(kConvKernel - 1) * kConvDilation, 0});
    namespace F = torch::nn::functional;
    const auto conv =
        F::conv1d(padded, conv_w, F::Conv1dFuncOptions().dilation(kConvDilation).groups(kBranches * kHidden));
    return o + torch::silu(conv).transpose(1, 2).reshape({B, T, kBranches, kHidden});
  }
};
TORCH_MODULE(RetrievalBlock);

}  // namespace

int main(int argc, char** argv) {
  torch::Device device(torch::kCPU);
  if (argc > 1 && std::strcmp(argv[1], "--cuda") == 0) {
    if (torch::cuda::is_available()) {
      device = torch::Device(torch::kCUDA);
    } else {
      std::fprintf(stderr, "--cuda: torch sees no GPU, running on the CPU\n");
    }
  }
  torch::manual_seed(kSeed);

  // Everything is drawn on the CPU, then moved: the same numbers on either device.
  RetrievalBlock teacher, student;
  const auto h = torch::randn({kBatch, kTime, kBranches, kHidden}).to(device);
  const auto e = torch::randn({kBatch, kTime, kEmbed}).to(device);
  teacher->to(device);
  student->to(device);
  // The target is reachable: the student has the teacher's shape and starts elsewhere.
  Tensor target;
  {
    torch::NoGradGuard no_grad;
    target = teacher->forward(h, e);
  }

  torch::optim::SGD optimizer(student->parameters(), torch::optim::SGDOptions(kLearningRate));
  double first = 0, last = 0;
  for (int step = 0; step < kSteps; ++step) {
    optimizer.zero_grad();
    const auto loss = torch::mse_loss(student->forward(h, e), target);
    loss.backward();
    optimizer.step();
    last = loss.item<double>();
    if (step == 0) {
      first = last;
    }
    std::printf("step %2d  loss %.6f\n", step, last);
  }
  if (!(last < first)) {  // also catches NaN
    std::printf("loss did not fall: %.6f -> %.6f\n", first, last);
    return 1;
  }
  std::printf("loss fell from %.6f to %.6f on %s\n", first, last, device.str().c_str());
  return 0;
}
