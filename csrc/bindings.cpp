// pybind11 entry points of fastmeta._C. No libtorch: Python validates every tensor and passes
// data pointers, element counts and dtype codes (fastmeta/ops/tensor_lists.py). The one outside
// function called, the BLAS gemm of the MLP unroll, comes the same way: as an address that
// Python found in torch's already-loaded library (fastmeta/backends.py: torch_blas_gemm). Each call
// covers a whole param group: the tensors are cut into chunks, OpenMP shares the chunks out,
// and the ISA chosen at import runs each chunk. The GIL is released around all of it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "mlp.h"

namespace py = pybind11;
using Ptrs = std::vector<int64_t>;

namespace fastmeta {
namespace {

// Elements per chunk: 16K fp32 is 64 KiB per stream, so the 4–7 streams of one chunk stay
// within L2 while a thread works on it, and a 100k-element model still splits across threads.
constexpr int64_t kChunkElements = 16384;
// Below this many elements in a whole call, waking the OpenMP team costs more than it saves.
constexpr int64_t kMinParallelElements = 32768;
// The same for SGD-HD, which wakes the team twice per step (the dot product, then the update)
// for little work per element. On the conv-4 network's 113k elements (2-core AVX-512 VM) a step
// took 41–43 µs on one thread in 19 of 20 fresh processes (once 57 µs), and 37–104 µs on two
// depending on the process (37, 43–45, ~50, once 104 µs): the bench's 3x held only in some.
// (Adam-HD does several times the arithmetic per element and keeps kMinParallelElements.)
constexpr int64_t kMinParallelSgdHdElements = 262144;

struct KernelTable {
  const char* name;
  decltype(&generic::sgd_chunk) sgd;
  decltype(&generic::adam_chunk) adam;
  decltype(&generic::adagrad_chunk) adagrad;
  decltype(&generic::rmsprop_chunk) rmsprop;
  decltype(&generic::stream_chunk) stream;
  decltype(&generic::sgd_forward_chunk) sgd_forward, adam_forward, adagrad_forward,
      rmsprop_forward;
  decltype(&generic::sgd_backward_chunk) sgd_backward, adam_backward, adagrad_backward,
      rmsprop_backward;
  decltype(&generic::lstm_rule_forward_chunk) lstm_rule_forward;
  decltype(&generic::lstm_rule_backward_chunk) lstm_rule_backward;
  decltype(&generic::hd_dot_chunk) hd_dot;
  decltype(&generic::adam_hd_chunk) adam_hd;
  decltype(&generic::max_pool_forward_planes) max_pool_forward;
  decltype(&generic::max_pool_scatter_planes) max_pool_scatter;
  decltype(&generic::max_pool_gather_planes) max_pool_gather;
};

#define FASTMETA_TABLE(ISA)                                                                     \
  KernelTable {                                                                                 \
    #ISA, &ISA::sgd_chunk, &ISA::adam_chunk, &ISA::adagrad_chunk, &ISA::rmsprop_chunk,          \
        &ISA::stream_chunk, &ISA::sgd_forward_chunk, &ISA::adam_forward_chunk,                  \
        &ISA::adagrad_forward_chunk, &ISA::rmsprop_forward_chunk, &ISA::sgd_backward_chunk,     \
        &ISA::adam_backward_chunk, &ISA::adagrad_backward_chunk, &ISA::rmsprop_backward_chunk, \
        &ISA::lstm_rule_forward_chunk, &ISA::lstm_rule_backward_chunk, &ISA::hd_dot_chunk,      \
        &ISA::adam_hd_chunk, &ISA::max_pool_forward_planes, &ISA::max_pool_scatter_planes,      \
        &ISA::max_pool_gather_planes                                                            \
  }

bool cpu_supports(const std::string& isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == "generic";
}

// Picks the best ISA this CPU runs. FASTMETA_CPU_ISA=generic|avx2|avx512 forces one (for tests
// and comparisons); forcing an ISA the CPU lacks is refused rather than crashing later.
KernelTable select_kernels() {
  std::vector<KernelTable> tables;
#ifdef FASTMETA_HAS_AVX512
  tables.push_back(FASTMETA_TABLE(avx512));
#endif
#ifdef FASTMETA_HAS_AVX2
  tables.push_back(FASTMETA_TABLE(avx2));
#endif
  tables.push_back(FASTMETA_TABLE(generic));
  const char* forced = std::getenv("FASTMETA_CPU_ISA");
  for (const auto& t : tables) {
    if (forced != nullptr && *forced != '\0') {
      if (std::string(forced) != t.name) continue;
      if (!cpu_supports(t.name))
        throw std::runtime_error(std::string("FASTMETA_CPU_ISA=") + forced +
                                 " but this CPU does not support it");
      return t;
    }
    if (cpu_supports(t.name)) return t;
  }
  throw std::runtime_error(std::string("FASTMETA_CPU_ISA=") + (forced ? forced : "") +
                           " is not one of the ISAs this build has (avx512, avx2, generic)");
}

const KernelTable& kernels() {
  static const KernelTable table = select_kernels();
  return table;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void check_list(const Ptrs& list, size_t n, const char* name, bool optional) {
  if (optional && list.empty()) return;
  if (list.size() != n)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(n) +
                                " pointers, got " + std::to_string(list.size()));
}

void* ptr_at(const Ptrs& list, size_t i) {
  return list.empty() ? nullptr : reinterpret_cast<void*>(static_cast<intptr_t>(list[i]));
}

// Runs body(tensor_index, begin, length) over every element of every tensor, in parallel.
// Each thread takes one contiguous, equal share of the concatenated elements and walks it in
// pieces of at most kChunkElements. Sharing out by elements rather than by chunks keeps a
// list of uneven tensors balanced: the 18 tensors of the conv-4 network, cut into chunks and
// dealt out statically, left one thread with twice the other's work and 2 threads no faster
// than 1.
template <typename Body>
void for_each_chunk(const std::vector<int64_t>& numels, Body body,
                    int64_t min_parallel = kMinParallelElements) {
  int64_t total = 0;
  for (const int64_t n : numels) total += n;
  auto run_range = [&](int64_t lo, int64_t hi) {
    int64_t start = 0;
    for (size_t t = 0; t < numels.size() && start < hi; ++t) {
      const int64_t end = start + numels[t];
      for (int64_t b = std::max(lo, start); b < std::min(hi, end); b += kChunkElements)
        body(static_cast<int64_t>(t), b - start, std::min(kChunkElements, std::min(hi, end) - b));
      start = end;
    }
  };
  if (total < min_parallel || max_threads() == 1) {
    run_range(0, total);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    // Cuts on 16-element (64-byte) multiples, so threads rarely share a cache line.
    const int64_t lo = (total * id / threads) & ~int64_t{15};
    const int64_t hi = id + 1 == threads ? total : (total * (id + 1) / threads) & ~int64_t{15};
    run_range(lo, hi);
  }
#else
  run_range(0, total);
#endif
}

// Adds 1 to every per-tensor step counter (scalar tensors, as torch.optim stores them) and
// returns the new values.
std::vector<double> increment_steps(const Ptrs& steps, int step_dtype) {
  std::vector<double> values(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    if (step_dtype == kFloat64) {
      double* s = static_cast<double*>(ptr_at(steps, i));
      values[i] = (*s += 1.0);
    } else if (step_dtype == kFloat32) {
      float* s = static_cast<float*>(ptr_at(steps, i));
      values[i] = (*s += 1.0f);
    } else {
      throw std::invalid_argument("steps: step counters must be float32 or float64");
    }
  }
  return values;
}

void sgd_step(const Ptrs& params, const Ptrs& grads, const Ptrs& momentum_buffers,
              const std::vector<int64_t>& numels, const std::vector<int32_t>& dtypes, double lr,
              double weight_decay, double momentum, double dampening, bool nesterov,
              bool maximize, bool first_step) {
  const size_t n = params.size();
  check_list(grads, n, "grads", false);
  check_list(momentum_buffers, n, "momentum_buffers", true);
  check_list(numels, n, "numels", false);
  const SgdArgs args{lr, weight_decay, momentum, dampening, nesterov, maximize, first_step};
  const auto kernel = kernels().sgd;
  py::gil_scoped_release no_gil;
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t len) {
    const SgdTensor tensor{ptr_at(params, t), ptr_at(grads, t), ptr_at(momentum_buffers, t),
                           nullptr};
    kernel(tensor, static_cast<DType>(dtypes[t]), begin, len, args);
  });
}

void adam_step(const Ptrs& params, const Ptrs& grads, const Ptrs& exp_avgs,
               const Ptrs& exp_avg_sqs, const Ptrs& max_exp_avg_sqs, const Ptrs& steps,
               int step_dtype, const std::vector<int64_t>& numels,
               const std::vector<int32_t>& dtypes, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool amsgrad, bool maximize,
               bool decoupled_weight_decay) {
  const size_t n = params.size();
  for (auto [list, name] : {std::pair{&grads, "grads"}, {&exp_avgs, "exp_avgs"},
                            {&exp_avg_sqs, "exp_avg_sqs"}, {&steps, "steps"},
                            {&numels, "numels"}})
    check_list(*list, n, name, false);
  check_list(max_exp_avg_sqs, n, "max_exp_avg_sqs", !amsgrad);
  const AdamArgs args{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                      decoupled_weight_decay};
  const auto kernel = kernels().adam;
  py::gil_scoped_release no_gil;
  const std::vector<double> step_values = increment_steps(steps, step_dtype);
  std::vector<double> step_size(n), bc2_sqrt(n);
  for (size_t i = 0; i < n; ++i) {
    step_size[i] = lr / (1.0 - std::pow(beta1, step_values[i]));
    bc2_sqrt[i] = std::sqrt(1.0 - std::pow(beta2, step_values[i]));
  }
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t len) {
    const AdamTensor tensor{ptr_at(params, t),    ptr_at(grads, t),
                            ptr_at(exp_avgs, t),  ptr_at(exp_avg_sqs, t),
                            ptr_at(max_exp_avg_sqs, t), step_size[t], bc2_sqrt[t]};
    kernel(tensor, static_cast<DType>(dtypes[t]), begin, len, args);
  });
}

void adagrad_step(const Ptrs& params, const Ptrs& grads, const Ptrs& state_sums,
                  const Ptrs& steps, int step_dtype, const std::vector<int64_t>& numels,
                  const std::vector<int32_t>& dtypes, double lr, double lr_decay,
                  double weight_decay, double eps, bool maximize) {
  const size_t n = params.size();
  for (auto [list, name] : {std::pair{&grads, "grads"}, {&state_sums, "state_sums"},
                            {&steps, "steps"}, {&numels, "numels"}})
    check_list(*list, n, name, false);
  const AdagradArgs args{weight_decay, eps, maximize};
  const auto kernel = kernels().adagrad;
  py::gil_scoped_release no_gil;
  const std::vector<double> step_values = increment_steps(steps, step_dtype);
  std::vector<double> clr(n);
  for (size_t i = 0; i < n; ++i) clr[i] = lr / (1.0 + (step_values[i] - 1.0) * lr_decay);
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t len) {
    const AdagradTensor tensor{ptr_at(params, t), ptr_at(grads, t), ptr_at(state_sums, t),
                               clr[t]};
    kernel(tensor, static_cast<DType>(dtypes[t]), begin, len, args);
  });
}

void rmsprop_step(const Ptrs& params, const Ptrs& grads, const Ptrs& square_avgs,
                  const Ptrs& momentum_buffers, const Ptrs& grad_avgs, const Ptrs& steps,
                  int step_dtype, const std::vector<int64_t>& numels,
                  const std::vector<int32_t>& dtypes, double lr, double alpha, double eps,
                  double weight_decay, double momentum, bool centered, bool maximize) {
  const size_t n = params.size();
  for (auto [list, name] : {std::pair{&grads, "grads"}, {&square_avgs, "square_avgs"},
                            {&steps, "steps"}, {&numels, "numels"}})
    check_list(*list, n, name, false);
  check_list(momentum_buffers, n, "momentum_buffers", momentum == 0.0);
  check_list(grad_avgs, n, "grad_avgs", !centered);
  const RmspropArgs args{lr, alpha, eps, weight_decay, momentum, centered, maximize};
  const auto kernel = kernels().rmsprop;
  py::gil_scoped_release no_gil;
  increment_steps(steps, step_dtype);
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t len) {
    const RmspropTensor tensor{ptr_at(params, t), ptr_at(grads, t), ptr_at(square_avgs, t),
                               ptr_at(momentum_buffers, t), ptr_at(grad_avgs, t)};
    kernel(tensor, static_cast<DType>(dtypes[t]), begin, len, args);
  });
}

// ---- Hypergradient descent (csrc/hypergrad.cpp, fastmeta/ops/hypergrad.py) ---------------------
// Phase 1 sums d·u_{t−1} per chunk (every tensor cut at kChunkElements, in order) and adds the
// chunk sums in that order, so h does not depend on the thread count; phase 2 updates with the
// new lr. Returns (h, new_lr) with h = −Σ d·u_{t−1} and new_lr = lr − β·h.
struct Chunk {
  int64_t tensor, begin, len;
};

std::vector<Chunk> fixed_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t)
    for (int64_t b = 0; b < numels[t]; b += kChunkElements)
      chunks.push_back({static_cast<int64_t>(t), b, std::min(kChunkElements, numels[t] - b)});
  return chunks;
}

template <typename Dot>
double ordered_dot(const std::vector<int64_t>& numels, Dot dot,
                   int64_t min_parallel = kMinParallelElements) {
  const std::vector<Chunk> chunks = fixed_chunks(numels);
  std::vector<double> partial(chunks.size(), 0.0);
  const int64_t count = static_cast<int64_t>(chunks.size());
  int64_t total = 0;
  for (const int64_t n : numels) total += n;
  if (total < min_parallel || max_threads() == 1) {
    for (int64_t c = 0; c < count; ++c) partial[c] = dot(chunks[c]);
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < count; ++c) partial[c] = dot(chunks[c]);
  }
  double sum = 0.0;
  for (const double x : partial) sum += x;
  return sum;
}

void check_hd_lr(double lr) {
  if (!std::isfinite(lr))
    throw std::invalid_argument("lr is not finite: hypergradient descent diverged (lower "
                                "hypergrad_lr)");
}

std::pair<double, double> sgd_hd_step(const Ptrs& params, const Ptrs& grads,
                                      const Ptrs& momentum_buffers, const Ptrs& directions,
                                      const std::vector<int64_t>& numels,
                                      const std::vector<int32_t>& dtypes, double lr,
                                      double hypergrad_lr, double weight_decay, double momentum,
                                      double dampening, bool nesterov, bool maximize,
                                      bool first_step) {
  const size_t n = params.size();
  for (auto [list, name] : {std::pair{&grads, "grads"}, {&directions, "directions"},
                            {&numels, "numels"}})
    check_list(*list, n, name, false);
  check_list(momentum_buffers, n, "momentum_buffers", momentum == 0.0);
  check_hd_lr(lr);
  SgdArgs args{lr, weight_decay, momentum, dampening, nesterov, maximize, first_step};
  const auto& k = kernels();
  py::gil_scoped_release no_gil;
  const double dot = ordered_dot(numels, [&](const Chunk& c) {
    return k.hd_dot(ptr_at(params, c.tensor), ptr_at(grads, c.tensor),
                    ptr_at(directions, c.tensor), static_cast<DType>(dtypes[c.tensor]), c.begin,
                    c.len, weight_decay, maximize);
  }, kMinParallelSgdHdElements);
  args.lr = lr + hypergrad_lr * dot;
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t len) {
    const SgdTensor tensor{ptr_at(params, t), ptr_at(grads, t), ptr_at(momentum_buffers, t),
                           ptr_at(directions, t)};
    k.sgd(tensor, static_cast<DType>(dtypes[t]), begin, len, args);
  }, kMinParallelSgdHdElements);
  return {-dot, args.lr};
}

std::pair<double, double> adam_hd_step(const Ptrs& params, const Ptrs& grads,
                                       const Ptrs& exp_avgs, const Ptrs& exp_avg_sqs,
                                       const Ptrs& directions, const Ptrs& steps, int step_dtype,
                                       const std::vector<int64_t>& numels,
                                       const std::vector<int32_t>& dtypes, double lr,
                                       double hypergrad_lr, double beta1, double beta2,
                                       double eps, double weight_decay, bool maximize) {
  const size_t n = params.size();
  for (auto [list, name] : {std::pair{&grads, "grads"}, {&exp_avgs, "exp_avgs"},
                            {&exp_avg_sqs, "exp_avg_sqs"}, {&directions, "directions"},
                            {&steps, "steps"}, {&numels, "numels"}})
    check_list(*list, n, name, false);
  check_hd_lr(lr);
  HdAdamArgs args{lr, beta1, beta2, eps, weight_decay, maximize};
  const auto& k = kernels();
  py::gil_scoped_release no_gil;
  const std::vector<double> step_values = increment_steps(steps, step_dtype);
  std::vector<HdAdamTensor> tensors(n);
  for (size_t i = 0; i < n; ++i)
    tensors[i] = HdAdamTensor{ptr_at(params, i), ptr_at(grads, i), ptr_at(exp_avgs, i),
                              ptr_at(exp_avg_sqs, i), ptr_at(directions, i),
                              1.0 - std::pow(beta1, step_values[i]),
                              std::sqrt(1.0 - std::pow(beta2, step_values[i]))};
  const double dot = ordered_dot(numels, [&](const Chunk& c) {
    return k.hd_dot(ptr_at(params, c.tensor), ptr_at(grads, c.tensor),
                    ptr_at(directions, c.tensor), static_cast<DType>(dtypes[c.tensor]), c.begin,
                    c.len, weight_decay, maximize);
  });
  args.lr = lr + hypergrad_lr * dot;
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t len) {
    k.adam_hd(tensors[t], static_cast<DType>(dtypes[t]), begin, len, args);
  });
  return {-dot, args.lr};
}

// ---- Out-of-place, task-batched, differentiable steps -----------------------------------------
// Python (fastmeta/ops/tensor_lists.py: step_forward/_kernel_vjp) has checked every tensor:
// [T, N] contiguous, one dtype, one CPU device; hyper is a float64 [H, T] table.

// Fewest columns per chunk, so a chunk's rows stay long enough to vectorize when T is large.
constexpr int64_t kMinChunkColumns = 256;

// Columns per chunk: about kChunkElements elements over all the task rows.
int64_t chunk_columns(int64_t tasks) {
  return std::max(kMinChunkColumns, kChunkElements / std::max<int64_t>(tasks, 1));
}

// A read-only block of at least `doubles` zeros, alive until the process ends: what an absent
// input (BatchedStep::zeros) reads. It grows by doubling and never shrinks or moves: a kernel
// on another thread may still read an older, smaller block, so every block is kept. Made fresh
// per call it was a 128 KiB allocation and fill (chunk_columns(1) doubles) in every
// differentiable step: in fastmeta.hpo's unroll of the 7,510-parameter digits MLP the native
// call took 12.6 µs (forward) and 24.6 µs (backward) with it, 6.0 and 18.5 µs without.
const void* zero_block(int64_t doubles) {
  static std::mutex mutex;
  // Never destroyed (not even at exit, when a daemon thread may still be in a step).
  static auto* blocks = new std::vector<std::unique_ptr<double[]>>();
  static int64_t largest = 0;
  const std::lock_guard<std::mutex> lock(mutex);
  if (doubles > largest) {
    largest = std::max(doubles, 2 * largest);
    blocks->emplace_back(new double[static_cast<size_t>(largest)]());  // value-initialised: 0.0
  }
  return blocks->back().get();
}

using ForwardKernel = decltype(&generic::sgd_forward_chunk);
using BackwardKernel = decltype(&generic::sgd_backward_chunk);

void* as_ptr(int64_t address) { return reinterpret_cast<void*>(static_cast<intptr_t>(address)); }

BatchedStep make_step(int64_t param, int64_t grad, const Ptrs& states, int64_t tasks,
                      int64_t numel, int dtype, int64_t hyper, int64_t lr,
                      int64_t lr_task_stride, double step, int flags) {
  if (states.size() > static_cast<size_t>(kMaxStates))
    throw std::invalid_argument("states: at most " + std::to_string(kMaxStates) + " pointers");
  if (grad == 0 || hyper == 0) throw std::invalid_argument("grad and hyper must not be null");
  if (tasks < 0 || numel < 0) throw std::invalid_argument("tasks and numel must be >= 0");
  if (dtype != kFloat32 && dtype != kFloat64)
    throw std::invalid_argument("dtype: the differentiable steps run on float32 or float64");
  BatchedStep s{};
  s.tasks = tasks;
  s.numel = numel;
  s.param = as_ptr(param);
  s.grad = as_ptr(grad);
  for (size_t i = 0; i < states.size(); ++i) s.state[i] = as_ptr(states[i]);
  s.hyper = static_cast<const double*>(as_ptr(hyper));
  s.lr = as_ptr(lr);
  s.lr_task_stride = lr_task_stride;
  s.step = step;
  s.flags = flags;
  s.zeros = zero_block(std::min(chunk_columns(tasks), std::max<int64_t>(numel, 1)));
  return s;
}

// Runs body(chunk_index, begin, columns) over column chunks of a [T, N] layout, in parallel.
template <typename Body>
int64_t for_each_column_chunk(int64_t tasks, int64_t numel, Body body) {
  const int64_t columns = chunk_columns(tasks);
  const int64_t count = (numel + columns - 1) / columns;
  auto run = [&](int64_t c) { body(c, c * columns, std::min(columns, numel - c * columns)); };
  if (tasks * numel < kMinParallelElements || max_threads() == 1) {
    for (int64_t c = 0; c < count; ++c) run(c);
    return count;
  }
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < count; ++c) run(c);
  return count;
}

// One differentiable step over a [T, N] layout, chunked and shared out (GIL released).
void run_forward(ForwardKernel kernel, const BatchedStep& s, int dtype) {
  for_each_column_chunk(s.tasks, s.numel, [&](int64_t, int64_t begin, int64_t n) {
    kernel(s, static_cast<DType>(dtype), begin, n);
  });
}

// Its VJP. Hyperparameter gradients: each chunk sums into its own [kMaxHypers][T] slice, and
// the slices are added in chunk order afterwards into out ([num_hypers][T], overwritten), so
// the result does not depend on the thread count.
void run_backward(BackwardKernel kernel, int num_hypers, const BatchedStep& s,
                  const BatchedGrad& base, double* out, int dtype) {
  const int64_t slice = static_cast<int64_t>(kMaxHypers) * s.tasks;
  const int64_t columns = chunk_columns(s.tasks);
  std::vector<double> partial(static_cast<size_t>(((s.numel + columns - 1) / columns) * slice),
                              0.0);
  const int64_t count = for_each_column_chunk(s.tasks, s.numel,
                                              [&](int64_t c, int64_t begin, int64_t n) {
    BatchedGrad g = base;
    g.hyper_grad = partial.data() + c * slice;
    kernel(s, g, static_cast<DType>(dtype), begin, n);
  });
  for (int64_t i = 0; i < num_hypers * s.tasks; ++i) {
    double total = 0.0;
    for (int64_t c = 0; c < count; ++c) total += partial[c * slice + i];
    out[i] = total;
  }
}

void batched_forward(ForwardKernel kernel, int64_t param, int64_t grad, const Ptrs& states,
                     int64_t param_out, const Ptrs& states_out, int64_t tasks, int64_t numel,
                     int dtype, int64_t hyper, int64_t lr, int64_t lr_task_stride, double step,
                     int flags) {
  BatchedStep s = make_step(param, grad, states, tasks, numel, dtype, hyper, lr, lr_task_stride,
                            step, flags);
  check_list(states_out, states.size(), "states_out", false);
  if (param_out == 0) throw std::invalid_argument("param_out must not be null");
  s.param_out = as_ptr(param_out);
  for (size_t i = 0; i < states_out.size(); ++i) s.state_out[i] = as_ptr(states_out[i]);
  py::gil_scoped_release no_gil;
  run_forward(kernel, s, dtype);
}

void batched_backward(BackwardKernel kernel, int num_hypers, int64_t param, int64_t grad,
                      const Ptrs& states, int64_t grad_param_out, const Ptrs& grad_states_out,
                      int64_t grad_param, int64_t grad_grad, const Ptrs& grad_states,
                      int64_t grad_lr, int64_t hyper_grad, int64_t tasks, int64_t numel,
                      int dtype, int64_t hyper, int64_t lr, int64_t lr_task_stride, double step,
                      int flags) {
  BatchedStep s = make_step(param, grad, states, tasks, numel, dtype, hyper, lr, lr_task_stride,
                            step, flags);
  check_list(grad_states_out, states.size(), "grad_states_out", false);
  check_list(grad_states, states.size(), "grad_states", false);
  // grad_param and grad_grad may be null: that gradient is not wanted and is not written.
  if (hyper_grad == 0) throw std::invalid_argument("hyper_grad must not be null");
  if ((lr == 0) != (grad_lr == 0)) throw std::invalid_argument("lr and grad_lr go together");
  BatchedGrad base{};
  base.grad_param_out = as_ptr(grad_param_out);
  for (size_t i = 0; i < grad_states_out.size(); ++i) {
    base.grad_state_out[i] = as_ptr(grad_states_out[i]);
    base.grad_state[i] = as_ptr(grad_states[i]);
  }
  base.grad_param = as_ptr(grad_param);
  base.grad_grad = as_ptr(grad_grad);
  base.grad_lr = as_ptr(grad_lr);
  py::gil_scoped_release no_gil;
  run_backward(kernel, num_hypers, s, base, static_cast<double*>(as_ptr(hyper_grad)), dtype);
}

// ---- K momentum-SGD steps of a ReLU MLP (fastmeta/ops/mlp_unroll.py, csrc/mlp.h) ------------
// Python has checked everything: one CPU device and dtype, contiguous tensors, equal batches,
// labels in range, the layers' offsets inside θ. The trajectory lives in Python's tensors:
// thetas/buffers/grads [K, N] (θ_1..θ_K, b_1..b_K, g_0..g_{K-1}), hs[l] [K, B, d_l] for the
// hidden layers, deltas[l] [K, B, d_l] for every layer, q [K, B, C].

struct Unroll {
  int64_t gemm;  // the BLAS ?gemm_ of the dtype
  std::vector<mlp::Layer> layers;
  int64_t theta0, buffer0, x, y, steps, batch, thetas, buffers, grads, q, numel;
  Ptrs hs, deltas;
  int dtype;
  int64_t hyper, lr, lr_stride;
  double step;
  int flags_first, flags_later;

  // Addresses of θ_k and b_k (b_0 may be 0: no starting buffer); row k - 1 of thetas/buffers.
  int64_t theta_address(int64_t k) const { return k == 0 ? theta0 : row(thetas, k - 1); }
  int64_t buffer_address(int64_t k) const { return k == 0 ? buffer0 : row(buffers, k - 1); }
  int64_t row(int64_t base, int64_t i) const {
    return base + i * numel * (dtype == kFloat64 ? 8 : 4);
  }
  template <typename T>
  const T* theta(int64_t k) const { return static_cast<const T*>(as_ptr(theta_address(k))); }
  template <typename T>
  mlp::Tape<T> tape(int64_t k) const {
    mlp::Tape<T> t;
    t.loss = mlp::Loss::kCrossEntropy;
    const int64_t L = static_cast<int64_t>(layers.size());
    t.h.resize(static_cast<size_t>(L));
    t.delta.resize(static_cast<size_t>(L + 1));
    t.x = static_cast<const T*>(as_ptr(x)) + k * batch * layers[0].d_in;
    for (int64_t l = 1; l < L; ++l)
      t.h[l] = static_cast<T*>(as_ptr(hs[l - 1])) + k * batch * layers[l - 1].d_out;
    for (int64_t l = 1; l <= L; ++l)
      t.delta[l] = static_cast<T*>(as_ptr(deltas[l - 1])) + k * batch * layers[l - 1].d_out;
    t.q = static_cast<T*>(as_ptr(q)) + k * batch * layers.back().d_out;
    return t;
  }
  BatchedStep step_at(int64_t k, const void* grad) const {
    return make_step(theta_address(k), reinterpret_cast<intptr_t>(grad), Ptrs{buffer_address(k)},
                     1, numel, dtype, hyper, lr, lr_stride, step,
                     k == 0 ? flags_first : flags_later);
  }
};

// Calls f(T{}) with T the C++ type of a float32 or float64 dtype code: the native MLP ops,
// whose constructors (mlp_layers) refuse every other dtype.
template <typename F>
void with_float_type(int dtype, F&& f) {
  if (dtype == kFloat64)
    f(double{});
  else
    f(float{});
}

// What both native MLP ops check of their shared arguments (Python has checked them too): the
// byte order, the BLAS address, the dtype and the layer table, (weight offset, bias offset or
// -1, d_in, d_out) per layer, which it returns as Layers. what names the op in the messages.
std::vector<mlp::Layer> mlp_layers(const char* what, int64_t gemm,
                                   const std::vector<int64_t>& layers, int dtype) {
  const std::string op(what);
  if (!mlp::kLittleEndian)
    throw std::runtime_error(op + " runs on little-endian CPUs only (see GemmFn)");
  if (gemm == 0) throw std::invalid_argument("gemm: the BLAS ?gemm_ address is null");
  if (dtype != kFloat32 && dtype != kFloat64)
    throw std::invalid_argument("dtype: " + op + " runs on float32 or float64");
  if (layers.empty() || layers.size() % 4 != 0)
    throw std::invalid_argument("layers: (weight, bias, d_in, d_out) per layer");
  std::vector<mlp::Layer> out;
  for (size_t i = 0; i < layers.size(); i += 4) {
    if (layers[i + 2] < 1 || layers[i + 3] < 1)
      throw std::invalid_argument("layers: every width must be >= 1");
    out.push_back({layers[i], layers[i + 1], layers[i + 2], layers[i + 3]});
  }
  return out;
}

Unroll make_unroll(int64_t gemm, const std::vector<int64_t>& layers, int64_t theta0,
                   int64_t buffer0,
                   int64_t x, int64_t y, int64_t steps, int64_t batch, int64_t thetas,
                   int64_t buffers, int64_t grads, const Ptrs& hs, const Ptrs& deltas,
                   int64_t q, int64_t numel, int dtype, int64_t hyper, int64_t lr,
                   int64_t lr_stride, double step, int flags_first, int flags_later) {
  Unroll u;
  u.gemm = gemm;
  u.layers = mlp_layers("the MLP unroll", gemm, layers, dtype);
  const size_t L = u.layers.size();
  if (hs.size() != L - 1 || deltas.size() != L)
    throw std::invalid_argument("hs: one per hidden layer, deltas: one per layer");
  if (steps < 1 || batch < 1) throw std::invalid_argument("steps and batch must be >= 1");
  u.theta0 = theta0; u.buffer0 = buffer0; u.x = x; u.y = y; u.steps = steps; u.batch = batch;
  u.thetas = thetas; u.buffers = buffers; u.grads = grads; u.q = q; u.numel = numel;
  u.hs = hs; u.deltas = deltas; u.dtype = dtype; u.hyper = hyper; u.lr = lr;
  u.lr_stride = lr_stride; u.step = step; u.flags_first = flags_first;
  u.flags_later = flags_later;
  return u;
}

template <typename T>
void mlp_unroll_forward_typed(const Unroll& u, mlp::GemmFn<T> gemm) {
  const mlp::Blas<T> blas{gemm};
  std::vector<T> logits(static_cast<size_t>(u.batch * u.layers.back().d_out));
  const auto kernel = kernels().sgd_forward;
  for (int64_t k = 0; k < u.steps; ++k) {
    T* grad = static_cast<T*>(as_ptr(u.grads)) + k * u.numel;
    const mlp::Targets<T> labels{mlp::Loss::kCrossEntropy,
                                 static_cast<const int64_t*>(as_ptr(u.y)) + k * u.batch, nullptr};
    mlp::loss_grad<T>(blas, u.layers, u.theta<T>(k), labels, u.batch, u.tape<T>(k),
                      logits.data(), grad);
    BatchedStep s = u.step_at(k, grad);
    s.param_out = static_cast<T*>(as_ptr(u.thetas)) + k * u.numel;
    s.state_out[0] = static_cast<T*>(as_ptr(u.buffers)) + k * u.numel;
    run_forward(kernel, s, u.dtype);
  }
}

// From (θ̄_K, b̄_K) (0: zero) back to (θ̄_0, b̄_0), written where asked (0: not wanted). The
// per-element lr's gradient is added to d_lr; each step's hyperparameter gradients go to its
// row of d_tables ([K][num_hypers][1] float64, overwritten). needs_param: the step reads θ
// (weight decay); without it θ̄ passes through the step unchanged.
template <typename T>
void mlp_unroll_backward_typed(const Unroll& u, mlp::GemmFn<T> gemm, bool needs_param,
                               int64_t theta_bar, int64_t buffer_bar, int64_t d_lr,
                               int64_t d_tables, int num_hypers, int64_t theta_bar0,
                               int64_t buffer_bar0) {
  const mlp::Blas<T> blas{gemm};
  const auto kernel = kernels().sgd_backward;
  const size_t n = static_cast<size_t>(u.numel);
  std::vector<T> tb[2] = {std::vector<T>(n), std::vector<T>(n)};
  std::vector<T> bb[2] = {std::vector<T>(n), std::vector<T>(n)};
  std::vector<T> d_param(n), d_grad(n);
  mlp::HvpScratch<T> scratch(u.layers, u.batch);
  const T* tbar = static_cast<const T*>(as_ptr(theta_bar));
  const T* bbar = static_cast<const T*>(as_ptr(buffer_bar));
  int next = 0;
  for (int64_t k = u.steps - 1; k >= 0; --k) {
    const bool want_theta = k > 0 || theta_bar0 != 0;
    const bool has_buffer = u.buffer_address(k) != 0;
    const bool want_buffer = has_buffer && (k > 0 || buffer_bar0 != 0);
    const T* grad = static_cast<const T*>(as_ptr(u.grads)) + k * u.numel;
    BatchedStep s = u.step_at(k, grad);
    BatchedGrad g{};
    g.grad_param_out = tbar;
    g.grad_state_out[0] = bbar;
    g.grad_param = want_theta && needs_param ? d_param.data() : nullptr;
    g.grad_grad = want_theta ? d_grad.data() : nullptr;
    g.grad_state[0] = has_buffer ? bb[next].data() : nullptr;  // the kernel writes it
    g.grad_lr = as_ptr(d_lr);
    run_backward(kernel, num_hypers, s, g,
                 static_cast<double*>(as_ptr(d_tables)) + k * num_hypers, u.dtype);
    if (want_theta) {
      T* out = tb[next].data();
      mlp::hvp<T>(blas, u.layers, u.theta<T>(k), u.batch, u.tape<T>(k), d_grad.data(), scratch,
                  out);
      const T* add = needs_param ? d_param.data() : tbar;  // tbar: θ̄ through the identity
      if (add != nullptr)
        for (size_t i = 0; i < n; ++i) out[i] += add[i];
      tbar = out;
    } else {
      tbar = nullptr;
    }
    bbar = want_buffer ? bb[next].data() : nullptr;
    next ^= 1;
  }
  if (theta_bar0 != 0) {
    T* out = static_cast<T*>(as_ptr(theta_bar0));
    for (size_t i = 0; i < n; ++i) out[i] = tbar != nullptr ? tbar[i] : T(0);
  }
  if (buffer_bar0 != 0) {
    T* out = static_cast<T*>(as_ptr(buffer_bar0));
    for (size_t i = 0; i < n; ++i) out[i] = bbar != nullptr ? bbar[i] : T(0);
  }
}

// ---- Every task's MLP loss gradient, and its reverse pass (fastmeta/ops/mlp_task_grads.py) ----
// T tasks, each with its own parameters (row t of theta [T, N]) and batch (x [T, B, d_0];
// labels [T, B] or values [T, B, C]), in csrc/mlp.h's maths. forward writes every task's
// gradient (grads [T, N]), loss (losses [T]) and output (outputs [T, B, C]), and keeps the tape
// (the hidden activations, every layer's δ and, for the cross-entropy, Q) in memory of its own.
// backward computes theta_bar[t] = H_t grad_bar[t] + losses_bar[t] grads[t] (either term may be
// absent), what MAML's second-order meta-gradient needs from an inner step or a query. Python
// has checked everything: one CPU device and dtype, contiguous tensors that stay alive until
// backward, the shapes, labels in range, the layers' offsets inside θ.

struct TaskGrads {
  int64_t gemm;
  std::vector<mlp::Layer> layers;
  mlp::Loss loss;
  int64_t tasks, batch, numel, theta, x, y, grads, losses, outputs;
  int dtype;
  // The tape of every task, task-major: hs (l = 1..L-1), deltas (l = 1..L), then q.
  std::unique_ptr<unsigned char[]> tape_memory;
  int64_t tape_elements;  // per task

  int64_t classes() const { return layers.back().d_out; }
  // Multiply-adds of one task's forward: the unit of the parallel threshold.
  int64_t forward_work() const {
    int64_t work = 0;
    for (const mlp::Layer& ly : layers) work += batch * ly.d_in * ly.d_out;
    return work;
  }
  template <typename T>
  T* at(int64_t base, int64_t task, int64_t row_elements) const {
    return static_cast<T*>(as_ptr(base)) + task * row_elements;
  }
  template <typename T>
  mlp::Tape<T> tape(int64_t t) const {
    mlp::Tape<T> tp;
    const int64_t L = static_cast<int64_t>(layers.size());
    T* next = reinterpret_cast<T*>(tape_memory.get()) + t * tape_elements;
    tp.loss = loss;
    tp.x = at<T>(x, t, batch * layers[0].d_in);
    tp.h.resize(static_cast<size_t>(L));
    tp.delta.resize(static_cast<size_t>(L + 1));
    for (int64_t l = 1; l < L; ++l) {  // h_l and δ_l are [B, d_l], d_l = layers[l - 1].d_out
      tp.h[l] = next;
      next += batch * layers[l - 1].d_out;
    }
    for (int64_t l = 1; l <= L; ++l) {
      tp.delta[l] = next;
      next += batch * layers[l - 1].d_out;
    }
    tp.q = loss == mlp::Loss::kCrossEntropy ? next : nullptr;
    return tp;
  }
  template <typename T>
  mlp::Targets<T> targets(int64_t t) const {
    if (loss == mlp::Loss::kMse) return {loss, nullptr, at<T>(y, t, batch * classes())};
    return {loss, at<int64_t>(y, t, batch), nullptr};
  }
};

// Below this many multiply-adds in all (forward, all tasks), the tasks run on the calling
// thread: waking the OpenMP team costs a few µs, the work of ~20,000 multiply-adds here.
constexpr int64_t kMinParallelTaskWork = 20000;

// Runs body(t, thread) for every task, in parallel where the work is worth it; thread (in
// [0, max_threads())) indexes per-thread scratch. body may throw (a label out of range, a failed
// allocation): the first exception is rethrown here, after every thread has finished.
template <typename Body>
void for_each_task(const TaskGrads& g, Body body) {
  std::exception_ptr failure;
  std::atomic<bool> failed{false};
  auto run = [&](int64_t t, int thread) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      body(t, thread);
    } catch (...) {
      if (!failed.exchange(true)) failure = std::current_exception();
    }
  };
  if (g.tasks < 2 || max_threads() == 1 || g.tasks * g.forward_work() < kMinParallelTaskWork) {
    for (int64_t t = 0; t < g.tasks; ++t) run(t, 0);
  } else {
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < g.tasks; ++t) run(t, omp_get_thread_num());
#else
    for (int64_t t = 0; t < g.tasks; ++t) run(t, 0);
#endif
  }
  if (failure) std::rethrow_exception(failure);
}

TaskGrads make_task_grads(int64_t gemm, const std::vector<int64_t>& layers, int loss,
                          int64_t tasks, int64_t batch, int64_t numel, int64_t theta, int64_t x,
                          int64_t y, int64_t grads, int64_t losses, int64_t outputs, int dtype) {
  std::vector<mlp::Layer> parsed = mlp_layers("the MLP task gradients", gemm, layers, dtype);
  if (loss != static_cast<int>(mlp::Loss::kCrossEntropy) &&
      loss != static_cast<int>(mlp::Loss::kMse))
    throw std::invalid_argument("loss: 0 (cross-entropy) or 1 (mean squared error)");
  if (tasks < 1 || batch < 1 || numel < 1)
    throw std::invalid_argument("tasks, batch and numel must be >= 1");
  if (theta == 0 || x == 0 || y == 0 || grads == 0 || losses == 0 || outputs == 0)
    throw std::invalid_argument("theta, x, y, grads, losses and outputs must not be null");
  TaskGrads g;
  g.gemm = gemm;
  g.layers = std::move(parsed);
  g.loss = static_cast<mlp::Loss>(loss);
  g.tasks = tasks; g.batch = batch; g.numel = numel; g.theta = theta; g.x = x; g.y = y;
  g.grads = grads; g.losses = losses; g.outputs = outputs; g.dtype = dtype;
  int64_t widths = 0;  // hidden layers (h) + every layer (δ) + the output again (q)
  for (size_t l = 0; l < g.layers.size(); ++l)
    widths += g.layers[l].d_out * (l + 1 < g.layers.size() ? 2 : 1);
  if (g.loss == mlp::Loss::kCrossEntropy) widths += g.classes();
  g.tape_elements = batch * widths;
  const size_t bytes = static_cast<size_t>(tasks * g.tape_elements) * (dtype == kFloat64 ? 8 : 4);
  g.tape_memory.reset(new unsigned char[bytes]);  // not zeroed: forward writes all of it
  return g;
}

template <typename T>
void task_grads_forward(const TaskGrads& g) {
  const mlp::Blas<T> blas{reinterpret_cast<mlp::GemmFn<T>>(g.gemm)};
  for_each_task(g, [&](int64_t t, int) {
    mlp::loss_grad<T>(blas, g.layers, g.at<T>(g.theta, t, g.numel), g.targets<T>(t), g.batch,
                      g.tape<T>(t), g.at<T>(g.outputs, t, g.batch * g.classes()),
                      g.at<T>(g.grads, t, g.numel), g.at<T>(g.losses, t, 1));
  });
}

// theta_bar[t] = H_t grad_bar[t] + losses_bar[t] grads[t]; grad_bar or losses_bar may be 0
// (absent), not both. grads is forward's output, passed again by Python (which holds it).
template <typename T>
void task_grads_backward(const TaskGrads& g, int64_t grad_bar, int64_t losses_bar,
                         int64_t grads, int64_t theta_bar) {
  const mlp::Blas<T> blas{reinterpret_cast<mlp::GemmFn<T>>(g.gemm)};
  // One scratch per thread, made by the first task it runs (not one per task).
  std::vector<std::unique_ptr<mlp::HvpScratch<T>>> scratch(static_cast<size_t>(max_threads()));
  for_each_task(g, [&](int64_t t, int thread) {
    T* out = g.at<T>(theta_bar, t, g.numel);
    if (grad_bar != 0) {
      std::unique_ptr<mlp::HvpScratch<T>>& mine = scratch[static_cast<size_t>(thread)];
      if (!mine) mine = std::make_unique<mlp::HvpScratch<T>>(g.layers, g.batch);
      mlp::hvp<T>(blas, g.layers, g.at<T>(g.theta, t, g.numel), g.batch, g.tape<T>(t),
                  g.at<T>(grad_bar, t, g.numel), *mine, out);
    }
    if (losses_bar != 0) {
      const T weight = *g.at<T>(losses_bar, t, 1);
      const T* grad = g.at<T>(grads, t, g.numel);
      if (grad_bar != 0)
        for (int64_t i = 0; i < g.numel; ++i) out[i] += weight * grad[i];
      else
        for (int64_t i = 0; i < g.numel; ++i) out[i] = weight * grad[i];
    }
  });
}

// The roofline probe: streams[s][t] is tensor t of stream s (numels[t] float32 elements, the
// same in every stream); reads every stream and writes the first num_writes back in place,
// with the same chunking and threads as the optimizers. Fresh tensors of a workload's sizes
// measure the machine on that workload's shape; an optimizer's own tensor lists measure what
// those very bytes, wherever they were allocated, can cost.
void stream(const std::vector<Ptrs>& streams, int num_writes, const std::vector<int64_t>& numels) {
  const int num_reads = static_cast<int>(streams.size());
  if (num_reads < 1 || num_reads > 5 || num_writes < 1 || num_writes > 4 || num_writes > num_reads)
    throw std::invalid_argument("stream: needs 1 to 5 streams and 1 to 4 writes, no more writes "
                                "than streams");
  for (const Ptrs& list : streams) check_list(list, numels.size(), "streams[i]", false);
  const auto kernel = kernels().stream;
  py::gil_scoped_release no_gil;
  for_each_chunk(numels, [&](int64_t t, int64_t begin, int64_t len) {
    float* a[5];
    for (int i = 0; i < num_reads; ++i) a[i] = static_cast<float*>(ptr_at(streams[i], t));
    kernel(a, num_reads, num_writes, begin, len);
  });
}


// ---- Max-pooling over non-overlapping windows (csrc/max_pool.cpp, fastmeta/ops/max_pool.py) ---
// Python has checked the tensors: contiguous [planes, height, width] input, outputs of the
// right sizes, one CPU device and dtype, argmax uint8. Planes are shared out evenly between
// threads; below kMinParallelElements input elements in all, one thread does the call.

MaxPool make_max_pool(int64_t height, int64_t width, int64_t kernel_h, int64_t kernel_w) {
  if (height < 0 || width < 0 || kernel_h < 1 || kernel_w < 1 || kernel_h > 255 ||
      kernel_w > 255 || kernel_h * kernel_w > 255)
    throw std::invalid_argument("max_pool: needs height, width >= 0 and 1 <= kernel_h * kernel_w "
                                "<= 255");
  return MaxPool{height, width, kernel_h, kernel_w, height / kernel_h, width / kernel_w};
}

template <typename Body>
void for_each_plane_range(int64_t planes, int64_t plane_elements, Body body) {
  if (planes * plane_elements < kMinParallelElements || max_threads() == 1 || planes < 2) {
    body(int64_t{0}, planes);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t lo = planes * id / threads, hi = planes * (id + 1) / threads;
    if (hi > lo) body(lo, hi - lo);
  }
#else
  body(int64_t{0}, planes);
#endif
}

// Which of the three passes max_pool runs (fastmeta/ops/max_pool.py: _PASS).
enum MaxPoolPass : int { kMaxPoolForward = 0, kMaxPoolScatter = 1, kMaxPoolGather = 2 };

// One pass over [planes, height, width] planes. source: the input (forward), the output
// gradient (scatter) or the input-shaped gradient (gather); target: the output, the input
// gradient or the output-shaped result; argmax is written by the forward, read by the others.
void max_pool(int pass, int64_t source, int64_t target, int64_t argmax, int dtype,
              int64_t planes, int64_t height, int64_t width, int64_t kernel_h, int64_t kernel_w) {
  const MaxPool a = make_max_pool(height, width, kernel_h, kernel_w);
  if (pass != kMaxPoolForward && pass != kMaxPoolScatter && pass != kMaxPoolGather)
    throw std::invalid_argument("max_pool: pass must be 0 (forward), 1 (scatter) or 2 (gather)");
  const KernelTable& k = kernels();
  const DType type = static_cast<DType>(dtype);
  py::gil_scoped_release no_gil;
  for_each_plane_range(planes, height * width, [&](int64_t begin, int64_t n) {
    uint8_t* arg = static_cast<uint8_t*>(as_ptr(argmax));
    if (pass == kMaxPoolForward)
      k.max_pool_forward(a, type, as_ptr(source), as_ptr(target), arg, begin, n);
    else if (pass == kMaxPoolScatter)
      k.max_pool_scatter(a, type, as_ptr(source), arg, as_ptr(target), begin, n);
    else
      k.max_pool_gather(a, type, as_ptr(source), arg, as_ptr(target), begin, n);
  });
}

// ---- The learned LSTM rule (csrc/lstm_rule.cpp) ------------------------------------------------
// Python (fastmeta/ops/lstm_rule.py) has checked every tensor: contiguous, one dtype (float32
// or float64), one CPU device, the shapes of LstmRule.

// Coordinates per chunk: n / kLstmMinChunk (at least 1, at most kLstmMaxChunks) asked-for
// chunks' equal share, rounded up to a multiple of 64 (every ISA's block, at most 32
// coordinates, fits); the last chunk takes the rest, so the rounding may leave fewer chunks
// (n = 33,000: 58 of 576 and one of 168). n < 1,024 runs as one chunk, on one thread. A chunk has fixed costs, packing the weights and, in the backward,
// zeroing and lane-reducing the weight-gradient accumulators: ~20 µs at H = 20 with AVX-512,
// under a tenth of 512 coordinates' backward on one thread (at 128 per chunk, the reduction
// alone took 17% of a profile of backward calls on 1,280 coordinates). kLstmMaxChunks bounds
// the backward's per-chunk weight-gradient partial sums (~40 KiB each at H = 20). The chunking
// depends on n only, never on the thread count: the weight gradients are summed in chunk order
// and come out the same for any OMP_NUM_THREADS.
constexpr int64_t kLstmMinChunk = 512;
constexpr int64_t kLstmMaxChunks = 256;

int64_t lstm_chunk(int64_t n) {
  const int64_t count = std::min(kLstmMaxChunks, std::max<int64_t>(1, n / kLstmMinChunk));
  return std::max<int64_t>(64, ((n + count - 1) / count + 63) / 64 * 64);
}

// Runs body(chunk, begin, length) over the chunks of n coordinates, in parallel; false if any
// call returned false (a failed scratch allocation).
template <typename Body>
bool for_each_lstm_chunk(int64_t n, Body body) {
  const int64_t size = lstm_chunk(n);
  const int64_t count = (n + size - 1) / size;
  std::atomic<bool> ok{true};
  auto run = [&](int64_t c) {
    if (!body(c, c * size, std::min(size, n - c * size))) ok.store(false);
  };
  if (count < 2 || max_threads() == 1) {
    for (int64_t c = 0; c < count; ++c) run(c);
  } else {
    // Dynamic: a chunk is >= ~50 µs of work, so handing them out one by one costs nothing, and
    // a thread that the OS has descheduled (torch's OpenMP pool spinning on the same cores)
    // does not hold up the chunks a static schedule would have given it.
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < count; ++c) run(c);
  }
  return ok.load();
}

// The element count of each weight, in LstmWeight order (kernels.h), and of all of them.
void lstm_weight_sizes(int64_t H, int64_t (&sizes)[kLstmWeights]) {
  const int64_t gates = 4 * H;
  const int64_t in_order[kLstmWeights] = {gates * 2, gates * H, gates, gates * H,
                                          gates * H, gates,     H,     1};
  for (int k = 0; k < kLstmWeights; ++k) sizes[k] = in_order[k];
}

int64_t lstm_weight_numel(int64_t H) {
  int64_t sizes[kLstmWeights];
  lstm_weight_sizes(H, sizes);
  int64_t total = 0;
  for (const int64_t s : sizes) total += s;
  return total;
}

LstmRule make_lstm_rule(int64_t grad, const Ptrs& state, const Ptrs& weights, int64_t n,
                        int64_t hidden, int dtype, double p, double output_scale) {
  if (grad == 0) throw std::invalid_argument("grad must not be null");
  if (n < 0 || hidden < 1) throw std::invalid_argument("need n >= 0 and hidden >= 1");
  if (dtype != kFloat32 && dtype != kFloat64)
    throw std::invalid_argument("dtype: the LSTM rule runs on float32 or float64");
  check_list(state, 4, "state", true);
  check_list(weights, kLstmWeights, "weights", false);
  LstmRule a{};
  a.hidden = hidden;
  a.grad = as_ptr(grad);
  for (int s = 0; s < 4; ++s) a.state[s] = ptr_at(state, s);
  for (int w = 0; w < kLstmWeights; ++w) {
    if (weights[w] == 0) throw std::invalid_argument("weights must not be null");
    a.weight[w] = as_ptr(weights[w]);
  }
  a.p = p;
  a.output_scale = output_scale;
  return a;
}

void lstm_rule_forward(int64_t grad, const Ptrs& state, const Ptrs& weights, int64_t update,
                       const Ptrs& state_out, int64_t skipped, int64_t n, int64_t hidden,
                       int dtype, double p, double output_scale) {
  LstmRule a = make_lstm_rule(grad, state, weights, n, hidden, dtype, p, output_scale);
  if (update == 0) throw std::invalid_argument("update must not be null");
  check_list(state_out, 4, "state_out", true);
  a.update = as_ptr(update);
  for (int s = 0; s < 4; ++s) a.state_out[s] = ptr_at(state_out, s);
  a.skipped = static_cast<uint8_t*>(as_ptr(skipped));
  const auto kernel = kernels().lstm_rule_forward;
  bool ok;
  {
    py::gil_scoped_release no_gil;
    ok = for_each_lstm_chunk(n, [&](int64_t, int64_t begin, int64_t len) {
      return kernel(a, static_cast<DType>(dtype), begin, len);
    });
  }
  if (!ok) throw std::bad_alloc();
}

// The chunks' float64 partial sums, added in chunk order, stored in the weights' dtype into
// out[k] (the gradient of weight k; skipped where null).
template <typename C>
void store_weight_grads(const std::vector<double>& partial, int64_t count, int64_t hidden,
                        const Ptrs& out) {
  const int64_t numel = lstm_weight_numel(hidden);
  int64_t sizes[kLstmWeights];
  lstm_weight_sizes(hidden, sizes);
  int64_t offset = 0;
  for (int k = 0; k < kLstmWeights; ++k) {
    C* dst = static_cast<C*>(ptr_at(out, k));
    for (int64_t i = 0; dst != nullptr && i < sizes[k]; ++i) {
      double total = 0.0;
      for (int64_t c = 0; c < count; ++c) total += partial[c * numel + offset + i];
      dst[i] = static_cast<C>(total);
    }
    offset += sizes[k];
  }
}

void lstm_rule_backward(int64_t grad, const Ptrs& state, const Ptrs& weights,
                        int64_t grad_update, const Ptrs& grad_state_out, int64_t grad_grad,
                        const Ptrs& grad_state, const Ptrs& weight_grads, int64_t n,
                        int64_t hidden, int dtype, double p, double output_scale) {
  const LstmRule a = make_lstm_rule(grad, state, weights, n, hidden, dtype, p, output_scale);
  check_list(grad_state_out, 4, "grad_state_out", true);
  check_list(grad_state, 4, "grad_state", true);
  check_list(weight_grads, kLstmWeights, "weight_grads", true);
  LstmRuleGrad base{};
  base.grad_update = as_ptr(grad_update);
  for (int s = 0; s < 4; ++s) {
    base.grad_state_out[s] = ptr_at(grad_state_out, s);
    base.grad_state[s] = ptr_at(grad_state, s);
  }
  base.grad_grad = as_ptr(grad_grad);
  bool want_weights = false;
  for (size_t k = 0; k < weight_grads.size(); ++k) want_weights |= weight_grads[k] != 0;
  const int64_t numel = lstm_weight_numel(hidden);
  const int64_t size = lstm_chunk(n);
  const int64_t count = (n + size - 1) / size;
  std::vector<double> partial(want_weights ? static_cast<size_t>(count * numel) : 0, 0.0);
  const auto kernel = kernels().lstm_rule_backward;
  bool ok;
  {
    py::gil_scoped_release no_gil;
    ok = for_each_lstm_chunk(n, [&](int64_t c, int64_t begin, int64_t len) {
      LstmRuleGrad g = base;
      g.weight_grad = want_weights ? partial.data() + c * numel : nullptr;
      return kernel(a, g, static_cast<DType>(dtype), begin, len);
    });
    if (want_weights) {
      if (dtype == kFloat32) store_weight_grads<float>(partial, count, hidden, weight_grads);
      else store_weight_grads<double>(partial, count, hidden, weight_grads);
    }
  }
  if (!ok) throw std::bad_alloc();
}

// ---- The drop-in optimizers' per-step fast path ------------------------------------------------
// A param group prepared once in Python (fastmeta/optim/optimizer.py: FusedOptimizer): the
// params' and state tensors' addresses, element counts and dtypes. Each step then only has to
// read every param's .grad, which in a Python loop (the .grad, layout, is_contiguous and
// data_ptr lookups of 18 tensors) cost as much as the fused kernel on the conv-4 network.
// Here the same lookups run as C calls, and the step runs with no list conversions.
//
// Whenever anything is not as prepared (the group's list changed, a param moved or lost its
// .grad, a grad is sparse or strided) a step method does nothing and returns false; the
// caller then takes the Python path, which handles every case and raises torch's errors.
class PreparedGroup {
 public:
  PreparedGroup(std::string op, py::list params, Ptrs param_ptrs, std::vector<Ptrs> states,
                Ptrs steps, int step_dtype, std::vector<int64_t> numels,
                std::vector<int32_t> dtypes)
      : op_(std::move(op)), params_(std::move(params)), param_ptrs_(std::move(param_ptrs)),
        states_(std::move(states)), steps_(std::move(steps)), step_dtype_(step_dtype),
        numels_(std::move(numels)), dtypes_(std::move(dtypes)) {
    const size_t n = params_.size();
    check_list(param_ptrs_, n, "param_ptrs", false);
    check_list(numels_, n, "numels", false);
    check_list(steps_, n, "steps", true);
    for (const Ptrs& s : states_) check_list(s, n, "states", true);
    grads_.resize(n);
    py::module_ torch = py::module_::import("torch");
    strided_ = torch.attr("strided");
  }

  bool sgd(py::handle params, double lr, double weight_decay, double momentum,
           double dampening, bool nesterov, bool maximize) {
    if (op_ != "sgd_step_" || states_.size() != 1 || !gather(params)) return false;
    sgd_step(param_ptrs_, grads_, states_[0], numels_, dtypes_, lr, weight_decay, momentum,
             dampening, nesterov, maximize, false);
    return true;
  }

  bool adam(py::handle params, double lr, double beta1, double beta2, double eps,
            double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay) {
    if (op_ != "adam_step_" || states_.size() != 3 || !gather(params)) return false;
    adam_step(param_ptrs_, grads_, states_[0], states_[1], states_[2], steps_, step_dtype_,
              numels_, dtypes_, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
              decoupled_weight_decay);
    return true;
  }

  bool adagrad(py::handle params, double lr, double lr_decay, double weight_decay, double eps,
               bool maximize) {
    if (op_ != "adagrad_step_" || states_.size() != 1 || !gather(params)) return false;
    adagrad_step(param_ptrs_, grads_, states_[0], steps_, step_dtype_, numels_, dtypes_, lr,
                 lr_decay, weight_decay, eps, maximize);
    return true;
  }

  bool rmsprop(py::handle params, double lr, double alpha, double eps, double weight_decay,
               double momentum, bool centered, bool maximize) {
    if (op_ != "rmsprop_step_" || states_.size() != 3 || !gather(params)) return false;
    rmsprop_step(param_ptrs_, grads_, states_[0], states_[1], states_[2], steps_, step_dtype_,
                 numels_, dtypes_, lr, alpha, eps, weight_decay, momentum, centered, maximize);
    return true;
  }

  py::object sgd_hd(py::handle params, double lr, double hypergrad_lr, double weight_decay,
                    double momentum, double dampening, bool nesterov, bool maximize) {
    if (op_ != "sgd_hd_step_" || states_.size() != 2 || !gather(params)) return py::none();
    const auto [h, new_lr] =
        sgd_hd_step(param_ptrs_, grads_, states_[0], states_[1], numels_, dtypes_, lr,
                    hypergrad_lr, weight_decay, momentum, dampening, nesterov, maximize, false);
    return py::make_tuple(h, new_lr);
  }

  py::object adam_hd(py::handle params, double lr, double hypergrad_lr, double beta1,
                     double beta2, double eps, double weight_decay, bool maximize) {
    if (op_ != "adam_hd_step_" || states_.size() != 3 || !gather(params)) return py::none();
    const auto [h, new_lr] =
        adam_hd_step(param_ptrs_, grads_, states_[0], states_[1], states_[2], steps_,
                     step_dtype_, numels_, dtypes_, lr, hypergrad_lr, beta1, beta2, eps,
                     weight_decay, maximize);
    return py::make_tuple(h, new_lr);
  }

 private:
  // Fills grads_ from params[i].grad; false when the fast path does not apply (see above).
  bool gather(py::handle params) {
    PyObject* list = params.ptr();
    const Py_ssize_t n = static_cast<Py_ssize_t>(param_ptrs_.size());
    if (!PyList_Check(list) || PyList_GET_SIZE(list) != n) return false;
    static PyObject* const grad_name = PyUnicode_InternFromString("grad");
    static PyObject* const layout_name = PyUnicode_InternFromString("layout");
    static PyObject* const data_ptr_name = PyUnicode_InternFromString("data_ptr");
    static PyObject* const contiguous_name = PyUnicode_InternFromString("is_contiguous");
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* param = PyList_GET_ITEM(list, i);
      if (param != PyList_GET_ITEM(params_.ptr(), i)) return false;
      const py::object grad = py::reinterpret_steal<py::object>(PyObject_GetAttr(param, grad_name));
      if (!grad) throw py::error_already_set();
      if (grad.is_none()) return false;
      const py::object layout =
          py::reinterpret_steal<py::object>(PyObject_GetAttr(grad.ptr(), layout_name));
      if (!layout) throw py::error_already_set();
      if (!layout.is(strided_)) return false;
      const py::object contiguous = py::reinterpret_steal<py::object>(
          PyObject_CallMethodNoArgs(grad.ptr(), contiguous_name));
      if (!contiguous) throw py::error_already_set();
      if (contiguous.ptr() != Py_True) return false;
      const int64_t param_ptr = address(param, data_ptr_name);
      if (param_ptr != param_ptrs_[i]) return false;  // moved: `p.data = ...`
      grads_[i] = address(grad.ptr(), data_ptr_name);
    }
    return true;
  }

  static int64_t address(PyObject* tensor, PyObject* data_ptr_name) {
    const py::object ptr =
        py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(tensor, data_ptr_name));
    if (!ptr) throw py::error_already_set();
    const int64_t value = PyLong_AsLongLong(ptr.ptr());
    if (value == -1 && PyErr_Occurred()) throw py::error_already_set();
    return value;
  }

  std::string op_;  // the op this group was prepared for (PreparedStep.op)
  py::list params_;
  Ptrs param_ptrs_;
  std::vector<Ptrs> states_;
  Ptrs steps_;
  int step_dtype_;
  std::vector<int64_t> numels_;
  std::vector<int32_t> dtypes_;
  Ptrs grads_;
  py::object strided_;
};

}  // namespace
}  // namespace fastmeta

PYBIND11_MODULE(_C, m) {
  using namespace fastmeta;
  m.doc() = "fastmeta's native CPU kernels (see fastmeta/_C.pyi for the signatures)";
  kernels();  // choose the ISA now, so a bad FASTMETA_CPU_ISA fails the import, not a step
  m.def("isa", [] { return std::string(kernels().name); },
        "The instruction set the kernels were dispatched to on this CPU.");
  m.def("num_threads", &max_threads, "Threads the native kernels use (OpenMP max threads).");
  m.def("has_openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  m.attr("CHUNK_ELEMENTS") = kChunkElements;
  m.def("sgd_step", &sgd_step, py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"),
        py::arg("numels"), py::arg("dtypes"), py::kw_only(), py::arg("lr"),
        py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"),
        py::arg("maximize"), py::arg("first_step"));
  m.def("adam_step", &adam_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("steps"),
        py::arg("step_dtype"), py::arg("numels"), py::arg("dtypes"), py::kw_only(),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("decoupled_weight_decay"));
  m.def("adagrad_step", &adagrad_step, py::arg("params"), py::arg("grads"),
        py::arg("state_sums"), py::arg("steps"), py::arg("step_dtype"), py::arg("numels"),
        py::arg("dtypes"), py::kw_only(), py::arg("lr"), py::arg("lr_decay"),
        py::arg("weight_decay"), py::arg("eps"), py::arg("maximize"));
  m.def("rmsprop_step", &rmsprop_step, py::arg("params"), py::arg("grads"),
        py::arg("square_avgs"), py::arg("momentum_buffers"), py::arg("grad_avgs"),
        py::arg("steps"), py::arg("step_dtype"), py::arg("numels"), py::arg("dtypes"),
        py::kw_only(), py::arg("lr"), py::arg("alpha"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("momentum"), py::arg("centered"),
        py::arg("maximize"));
#define FASTMETA_BIND_BATCHED(OP, HYPERS)                                                       \
  m.def(#OP "_forward",                                                                         \
        [](int64_t param, int64_t grad, const Ptrs& states, int64_t param_out,                  \
           const Ptrs& states_out, int64_t tasks, int64_t numel, int dtype, int64_t hyper,      \
           int64_t lr, int64_t lr_task_stride, double step, int flags) {                        \
          batched_forward(kernels().OP##_forward, param, grad, states, param_out, states_out,   \
                          tasks, numel, dtype, hyper, lr, lr_task_stride, step, flags);         \
        },                                                                                      \
        "Out-of-place " #OP " step on [T, N] buffers (fastmeta/ops/" #OP ".py).");              \
  m.def(#OP "_backward",                                                                        \
        [](int64_t param, int64_t grad, const Ptrs& states, int64_t grad_param_out,             \
           const Ptrs& grad_states_out, int64_t grad_param, int64_t grad_grad,                  \
           const Ptrs& grad_states, int64_t grad_lr, int64_t hyper_grad, int64_t tasks,         \
           int64_t numel, int dtype, int64_t hyper, int64_t lr, int64_t lr_task_stride,         \
           double step, int flags) {                                                            \
          batched_backward(kernels().OP##_backward, HYPERS, param, grad, states,                \
                           grad_param_out, grad_states_out, grad_param, grad_grad, grad_states, \
                           grad_lr, hyper_grad, tasks, numel, dtype, hyper, lr, lr_task_stride, \
                           step, flags);                                                        \
        },                                                                                      \
        "VJP of " #OP "_forward; writes per-task hyperparameter gradients to hyper_grad.");
  FASTMETA_BIND_BATCHED(sgd, kSgdHypers)
  FASTMETA_BIND_BATCHED(adam, kAdamHypers)
  FASTMETA_BIND_BATCHED(adagrad, kAdagradHypers)
  FASTMETA_BIND_BATCHED(rmsprop, kRmspropHypers)
  py::class_<PreparedGroup>(m, "PreparedGroup",
                            "A param group prepared for the optimizers' per-step fast path.")
      .def(py::init<std::string, py::list, Ptrs, std::vector<Ptrs>, Ptrs, int,
                    std::vector<int64_t>, std::vector<int32_t>>(),
           py::arg("op"), py::arg("params"), py::arg("param_ptrs"), py::arg("states"),
           py::arg("steps"), py::arg("step_dtype"), py::arg("numels"), py::arg("dtypes"))
      .def("sgd", &PreparedGroup::sgd)
      .def("adam", &PreparedGroup::adam)
      .def("adagrad", &PreparedGroup::adagrad)
      .def("rmsprop", &PreparedGroup::rmsprop)
      .def("sgd_hd", &PreparedGroup::sgd_hd)
      .def("adam_hd", &PreparedGroup::adam_hd);
  m.def("sgd_hd_step", &sgd_hd_step, py::arg("params"), py::arg("grads"),
        py::arg("momentum_buffers"), py::arg("directions"), py::arg("numels"), py::arg("dtypes"),
        py::kw_only(), py::arg("lr"), py::arg("hypergrad_lr"), py::arg("weight_decay"),
        py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"), py::arg("maximize"),
        py::arg("first_step"),
        "SGD-HD over a param group: the hypergradient reduction, then the update; returns "
        "(h, new_lr).");
  m.def("adam_hd_step", &adam_hd_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("directions"), py::arg("steps"), py::arg("step_dtype"),
        py::arg("numels"), py::arg("dtypes"), py::kw_only(), py::arg("lr"),
        py::arg("hypergrad_lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("maximize"),
        "Adam-HD over a param group: the hypergradient reduction, then the update; returns "
        "(h, new_lr).");
  m.def("lstm_rule_forward", &lstm_rule_forward, py::arg("grad"), py::arg("state"),
        py::arg("weights"), py::arg("update"), py::arg("state_out"), py::arg("skipped"),
        py::arg("n"), py::arg("hidden"), py::arg("dtype"), py::arg("p"), py::arg("output_scale"),
        "The fused LSTM rule's step (csrc/lstm_rule.cpp) on n coordinates.");
  m.def("lstm_rule_backward", &lstm_rule_backward, py::arg("grad"), py::arg("state"),
        py::arg("weights"), py::arg("grad_update"), py::arg("grad_state_out"),
        py::arg("grad_grad"), py::arg("grad_state"), py::arg("weight_grads"), py::arg("n"),
        py::arg("hidden"), py::arg("dtype"), py::arg("p"), py::arg("output_scale"),
        "VJP of lstm_rule_forward; weight_grads[k] receives the gradient of weight k (in the "
        "weights' dtype; 0 or an empty list: not wanted), summed in float64 in a fixed order.");
  py::class_<Unroll>(m, "MlpUnroll",
                     "K momentum-SGD steps of a ReLU MLP on cross-entropy and their reverse pass "
                     "over tensors that Python allocated (fastmeta/ops/mlp_unroll.py; "
                     "csrc/mlp.h). Holds their addresses, not the tensors.")
      .def(py::init(&make_unroll), py::arg("gemm"), py::arg("layers"), py::arg("theta0"),
           py::arg("buffer0"), py::arg("x"), py::arg("y"), py::arg("steps"), py::arg("batch"),
           py::arg("thetas"), py::arg("buffers"), py::arg("grads"), py::arg("hs"),
           py::arg("deltas"), py::arg("q"), py::arg("numel"), py::arg("dtype"),
           py::arg("hyper"), py::arg("lr"), py::arg("lr_stride"), py::arg("step"),
           py::arg("flags_first"), py::arg("flags_later"))
      .def("forward",
           [](const Unroll& u) {
             py::gil_scoped_release no_gil;
             with_float_type(u.dtype, [&](auto zero) {
               using T = decltype(zero);
               mlp_unroll_forward_typed<T>(u, reinterpret_cast<mlp::GemmFn<T>>(u.gemm));
             });
           },
           "Runs the K steps, writing the trajectory.")
      .def("backward",
           [](const Unroll& u, bool needs_param, int64_t theta_bar, int64_t buffer_bar,
              int64_t d_lr, int64_t d_tables, int num_hypers, int64_t theta_bar0,
              int64_t buffer_bar0) {
             if (d_tables == 0) throw std::invalid_argument("d_tables must not be null");
             if (num_hypers < 1 || num_hypers > kMaxHypers)
               throw std::invalid_argument("num_hypers must be in [1, kMaxHypers]");
             if ((u.lr == 0) != (d_lr == 0))
               throw std::invalid_argument("lr and d_lr go together");
             py::gil_scoped_release no_gil;
             with_float_type(u.dtype, [&](auto zero) {
               using T = decltype(zero);
               mlp_unroll_backward_typed<T>(u, reinterpret_cast<mlp::GemmFn<T>>(u.gemm),
                                            needs_param, theta_bar, buffer_bar, d_lr, d_tables,
                                            num_hypers, theta_bar0, buffer_bar0);
             });
           },
           py::arg("needs_param"), py::arg("theta_bar"), py::arg("buffer_bar"), py::arg("d_lr"),
           py::arg("d_tables"), py::arg("num_hypers"), py::arg("theta_bar0"),
           py::arg("buffer_bar0"),
           "The reverse pass of forward: step VJPs and Hessian-vector products.");
  py::class_<TaskGrads>(m, "MlpTaskGrads",
                        "Every task's loss gradient of a ReLU MLP (one row of theta [T, N] and "
                        "one batch per task) and its reverse pass (fastmeta/ops/mlp_task_grads.py; "
                        "csrc/mlp.h). Holds the addresses of Python's tensors, not the tensors, "
                        "and the tape in memory of its own.")
      .def(py::init(&make_task_grads), py::arg("gemm"), py::arg("layers"), py::arg("loss"),
           py::arg("tasks"), py::arg("batch"), py::arg("numel"), py::arg("theta"), py::arg("x"),
           py::arg("y"), py::arg("grads"), py::arg("losses"), py::arg("outputs"),
           py::arg("dtype"))
      .def("forward",
           [](const TaskGrads& g) {
             py::gil_scoped_release no_gil;
             with_float_type(g.dtype, [&](auto zero) { task_grads_forward<decltype(zero)>(g); });
           },
           "Writes every task's gradient, loss and output, and keeps the tape.")
      .def("backward",
           [](const TaskGrads& g, int64_t grad_bar, int64_t losses_bar, int64_t grads,
              int64_t theta_bar) {
             if (theta_bar == 0) throw std::invalid_argument("theta_bar must not be null");
             if (grad_bar == 0 && losses_bar == 0)
               throw std::invalid_argument("grad_bar and losses_bar are both absent");
             if (losses_bar != 0 && grads == 0)
               throw std::invalid_argument("grads must not be null with losses_bar");
             py::gil_scoped_release no_gil;
             with_float_type(g.dtype, [&](auto zero) {
               task_grads_backward<decltype(zero)>(g, grad_bar, losses_bar, grads, theta_bar);
             });
           },
           py::arg("grad_bar"), py::arg("losses_bar"), py::arg("grads"), py::arg("theta_bar"),
           "theta_bar[t] = H_t grad_bar[t] + losses_bar[t] grads[t] (0: a term absent), after "
           "forward.");
  m.def("stream", &stream, py::arg("streams"), py::arg("num_writes"), py::arg("numels"),
        "Memory-roofline probe: streams[s] lists the addresses of stream s's float32 tensors "
        "(numels[t] elements for tensor t); reads every stream and writes the first num_writes "
        "back in place.");
  m.def("max_pool", &max_pool, py::arg("pass_"), py::arg("source"), py::arg("target"),
        py::arg("argmax"), py::arg("dtype"), py::arg("planes"), py::arg("height"),
        py::arg("width"), py::arg("kernel_h"), py::arg("kernel_w"),
        "Max-pooling of contiguous [planes, height, width] planes over non-overlapping "
        "kernel_h x kernel_w windows (floor mode). pass_ 0, forward: source = input, target = "
        "output [planes, height // kernel_h, width // kernel_w], argmax (uint8, the winner's "
        "row-major position in its window) written. 1, scatter (the backward): source = the "
        "output gradient, every element of target [planes, height, width] written (the "
        "gradient at each winner, 0 elsewhere). 2, gather (the scatter's adjoint): source = an "
        "input-shaped tensor, target[o] = source at window o's winner.");
}
