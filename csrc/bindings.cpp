// pybind11 entry points of fastmeta._C. No libtorch: Python validates every tensor and passes
// data pointers, element counts and dtype codes (fastmeta/ops/tensor_lists.py). Each call
// covers a whole param group: the tensors are cut into chunks, OpenMP shares the chunks out,
// and the ISA chosen at import runs each chunk. The GIL is released around all of it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace py = pybind11;
using Ptrs = std::vector<int64_t>;

namespace fastmeta {
namespace {

// Elements per chunk: 16K fp32 is 64 KiB per stream, so the 4–7 streams of one chunk stay
// within L2 while a thread works on it, and a 100k-element model still splits across threads.
constexpr int64_t kChunkElements = 16384;
// Below this many elements in a whole call, waking the OpenMP team costs more than it saves.
constexpr int64_t kMinParallelElements = 32768;

struct KernelTable {
  const char* name;
  decltype(&generic::sgd_chunk) sgd;
  decltype(&generic::adam_chunk) adam;
  decltype(&generic::adagrad_chunk) adagrad;
  decltype(&generic::rmsprop_chunk) rmsprop;
  decltype(&generic::stream_chunk) stream;
};

#define FASTMETA_TABLE(ISA) \
  KernelTable { #ISA, &ISA::sgd_chunk, &ISA::adam_chunk, &ISA::adagrad_chunk, &ISA::rmsprop_chunk, &ISA::stream_chunk }

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

// Runs body(tensor_index, begin, length) over every chunk of every tensor, in parallel.
template <typename Body>
void for_each_chunk(const std::vector<int64_t>& numels, Body body) {
  struct Chunk {
    int64_t tensor, begin, length;
  };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t t = 0; t < numels.size(); ++t) {
    total += numels[t];
    for (int64_t b = 0; b < numels[t]; b += kChunkElements)
      chunks.push_back({static_cast<int64_t>(t), b, std::min(kChunkElements, numels[t] - b)});
  }
  const int64_t count = static_cast<int64_t>(chunks.size());
  if (total < kMinParallelElements || max_threads() == 1) {
    for (int64_t c = 0; c < count; ++c) body(chunks[c].tensor, chunks[c].begin, chunks[c].length);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < count; ++c) body(chunks[c].tensor, chunks[c].begin, chunks[c].length);
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
    const SgdTensor tensor{ptr_at(params, t), ptr_at(grads, t), ptr_at(momentum_buffers, t)};
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

// The roofline probe: reads num_reads float32 arrays of n elements and writes the first
// num_writes of them back in place, with the same chunking and threads as the optimizers.
void stream(const Ptrs& arrays, int num_writes, int64_t n) {
  const int num_reads = static_cast<int>(arrays.size());
  if (num_reads < 1 || num_reads > 5 || num_writes < 1 || num_writes > 4 || num_writes > num_reads)
    throw std::invalid_argument("stream: needs 1 to 5 arrays and 1 to 4 writes, no more writes "
                                "than arrays");
  std::vector<float*> a(arrays.size());
  for (size_t i = 0; i < arrays.size(); ++i) a[i] = static_cast<float*>(ptr_at(arrays, i));
  const auto kernel = kernels().stream;
  py::gil_scoped_release no_gil;
  for_each_chunk({n}, [&](int64_t, int64_t begin, int64_t len) {
    kernel(a.data(), num_reads, num_writes, begin, len);
  });
}

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
  m.def("stream", &stream, py::arg("arrays"), py::arg("num_writes"), py::arg("n"),
        "Memory-roofline probe: reads every float32 array (n elements each) and writes the "
        "first num_writes of them back in place.");
}
