#include "common/ngram_hash_host.h"

#include <ATen/Functions.h>
#include <c10/util/Exception.h>

namespace retrieval_attention {
namespace {

constexpr const char* kOp = "retrieval_attention.ngram_hash";
constexpr int64_t kMinOrder = 2;  // bigrams are the lowest order hashed

void check_int64(const char* name, const at::Tensor& t, const char* shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, kOp, ": expected `", name, "` ", shape, " of dtype int64, but got ",
                   t.scalar_type());
}

void check_device(const char* name, const at::Tensor& t, const at::Tensor& ids) {
  TORCH_CHECK(t.device() == ids.device(), kOp, ": expected `", name, "` on the device of `ids` (", ids.device(),
              "), but got ", t.device());
}

}  // namespace

NgramHashPlan plan_ngram_hash(const at::Tensor& ids, const at::Tensor& multipliers, const at::Tensor& primes,
                              int64_t pad_id, const std::optional<at::Tensor>& cu_seqlens) {
  check_int64("ids", ids, "[B, T]");
  TORCH_CHECK_VALUE(ids.dim() == 2, kOp, ": expected `ids` of shape [B, T], but got ", ids.sizes());
  check_int64("multipliers", multipliers, "[max_n]");
  check_device("multipliers", multipliers, ids);
  TORCH_CHECK_VALUE(multipliers.dim() == 1 && multipliers.size(0) >= kMinOrder, kOp,
                    ": expected `multipliers` of shape [max_n] with max_n >= ", kMinOrder, ", but got ",
                    multipliers.sizes());
  const int64_t max_n = multipliers.size(0);
  check_int64("primes", primes, "[max_n - 1, H]");
  check_device("primes", primes, ids);
  TORCH_CHECK_VALUE(primes.dim() == 2 && primes.size(0) == max_n - 1 && primes.size(1) >= 1, kOp,
                    ": expected `primes` of shape [max_n - 1, H] = [", max_n - 1, ", H] with H >= 1, but got ",
                    primes.sizes());
  TORCH_CHECK_VALUE(pad_id >= 0, kOp, ": expected `pad_id` >= 0, but got ", pad_id);
  if (cu_seqlens.has_value()) {
    const auto& cu = *cu_seqlens;
    TORCH_CHECK_TYPE(cu.scalar_type() == at::kLong || cu.scalar_type() == at::kInt, kOp,
                     ": expected `cu_seqlens` [S + 1] of dtype int32 or int64, but got ", cu.scalar_type());
    TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, kOp, ": expected `cu_seqlens` of shape [S + 1], but got ",
                      cu.sizes());
    check_device("cu_seqlens", cu, ids);
    TORCH_CHECK_VALUE(ids.size(0) == 1, kOp, ": expected `ids` of shape [1, T] (the sequences packed in one row) ",
                      "with `cu_seqlens`, but got ", ids.sizes());
  }

  NgramHashPlan plan;
  plan.multipliers = multipliers.contiguous();
  plan.primes = primes.contiguous();
  auto& p = plan.params;
  p.B = ids.size(0);
  p.T = ids.size(1);
  p.max_n = max_n;
  p.H = primes.size(1);
  plan.out = at::empty({p.B, p.T, p.heads()}, ids.options().memory_format(at::MemoryFormat::Contiguous));
  p.ids = ids.data_ptr<int64_t>();
  p.ids_stride_b = ids.stride(0);
  p.ids_stride_t = ids.stride(1);
  p.multipliers = plan.multipliers.data_ptr<int64_t>();
  p.primes = plan.primes.data_ptr<int64_t>();
  p.out = plan.out.data_ptr<int64_t>();
  p.pad_id = pad_id;
  p.cu_seqlens = nullptr;
  p.num_offsets = 0;
  if (cu_seqlens.has_value()) {
    plan.cu_seqlens = cu_seqlens->to(at::kLong).contiguous();
    p.cu_seqlens = plan.cu_seqlens.data_ptr<int64_t>();
    p.num_offsets = plan.cu_seqlens.size(0);
  }
  return plan;
}

void check_cu_seqlens_values(const at::Tensor& cu_seqlens, int64_t T) {
  const int64_t first = cu_seqlens[0].item<int64_t>();
  const int64_t last = cu_seqlens[-1].item<int64_t>();
  TORCH_CHECK_VALUE(first == 0 && last == T, kOp, ": expected `cu_seqlens` to start at 0 and end at T = ", T,
                    ", but got ", first, " ... ", last);
  const bool decreasing = cu_seqlens.size(0) > 1 && cu_seqlens.diff().lt(0).any().item<bool>();
  TORCH_CHECK_VALUE(!decreasing, kOp, ": expected `cu_seqlens` never to decrease, but got ", cu_seqlens);
}

void check_primes_positive(const at::Tensor& primes) {
  const int64_t smallest = primes.min().item<int64_t>();
  TORCH_CHECK_VALUE(smallest > 0, kOp, ": expected every entry of `primes` > 0, but got ", smallest);
}

void check_no_negative_id(bool found, int64_t id) {
  TORCH_CHECK_VALUE(!found, kOp, ": expected every entry of `ids` >= 0, but got ", id);
}

}  // namespace retrieval_attention
