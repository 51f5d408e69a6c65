// What the kernel sources share across their files: the instruction set chosen at run time (cpu_kernels.cpp owns
// the choice) and the attention ops' common input checks.
#pragma once

#include <torch/extension.h>

namespace gptoss {

// The instruction set the kernels use now: "amx", "avx512", "avx2" or "scalar" (cpu_kernels.cpp).
const char* active_isa();

// The attention ops' inputs: q [B, T, Hq, D] and contiguous caches [B, S, Hkv, D], all float32 on the CPU, k_pos
// [B, n <= S], q_pos [B, T], sinks [Hq]. Refuses anything else with the problem named.
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& sinks, const at::Tensor& k_pos, const at::Tensor& q_pos);

// Attention of chunks of several tokens (prefill) over the cache, with sinks and windows: attention.cpp.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& sinks, const at::Tensor& k_pos, const at::Tensor& q_pos,
                             int64_t window, double scale);

// The small per-layer ops of a step (step_ops.cpp): RMSNorm, the residual add with RMSNorm, RoPE, the KV cache write.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void cache_write(at::Tensor cache, const at::Tensor& start, const at::Tensor& values);

// fp32 multiply-adds one core completes per ns at each vector width this CPU runs, ("avx2" | "avx512", rate):
// probe.cpp. A machine fact for benchmark reports, not used to choose kernels.
std::vector<std::pair<std::string, double>> fma_rates();

}  // namespace gptoss
