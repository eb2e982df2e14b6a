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
                              int64_t pad_id) {
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
  return plan;
}

void check_primes_positive(const at::Tensor& primes) {
  const int64_t smallest = primes.min().item<int64_t>();
  TORCH_CHECK_VALUE(smallest > 0, kOp, ": expected every entry of `primes` > 0, but got ", smallest);
}

void check_no_negative_id(bool found, int64_t id) {
  TORCH_CHECK_VALUE(!found, kOp, ": expected every entry of `ids` >= 0, but got ", id);
}

}  // namespace retrieval_attention
