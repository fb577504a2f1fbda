// The fast CPU kernels behind metalearn/kernels/ops.py: Paddle custom operators, float32 only,
// which metalearn/kernels/onednn.py compiles from every csrc/*.cc into one library. Each file
// describes and registers (PD_BUILD_OP, at its end) its own operators:
//   conv.cc          fastconv_*: convolutions through oneDNN (execution plans, tuning, recorded
//                    choices)
//   batch_norm.cc    fastbn_*, fastbnrelu_*: batch norm with the batch's own statistics, alone or
//                    followed by ReLU
//   body.cc          fastbody_forward: ConvNet's whole convolution body at inference
//   relu_network.cc  fastnet_*: the ReLU network of the sinusoid MLP (plain loops, no oneDNN)
// This header and onednn.cc hold what they share: the minimal oneDNN C API, the process-wide
// state (the library, its OpenMP runtime, the scratchpad, the lock), convolution shapes and
// execution steps, and the checks of Paddle tensors; batch_norm.h holds the channel loops and the
// forward pass of batch norm that the body reuses.
//
// The oneDNN library is the one the Paddle wheel already loaded (libdnnl.so.3). The wheel ships
// only the compatibility wrapper headers of oneDNN (the real `oneapi/dnnl/*.h` are missing), so
// this file declares the handful of oneDNN v3 C API functions and constants it uses itself and
// binds the functions with dlsym at first use. Those entry points and values belong to the stable
// oneDNN v3 C ABI; a library whose major version is not 3 is refused.
//
// Threads: the wheel's oneDNN uses the OpenMP runtime, and in a Paddle process its OpenMP calls
// bind to Intel's libiomp5, whose thread count Paddle sets to 1 (FLAGS_paddle_num_threads). Each
// plan records its own thread count; a call sets libiomp5's count to it for its duration and then
// restores Paddle's. PADDLE_MAML_FASTCONV_THREADS=N fixes the count; by default it is up to the
// number of CPUs this process may run on (see the tuning in conv.cc). The batch-norm loops fork
// their own teams in the same runtime (GOMP_parallel, which libiomp5 exports), never a second
// runtime.

#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "paddle/extension.h"

namespace fastconv {

// ---------------------------------------------------------------------------------------------
// Minimal oneDNN v3 C API (see the comment at the top of the file).

using dnnl_status = int;
using dnnl_dims = int64_t[12];  // DNNL_MAX_NDIMS
using handle = void*;           // every oneDNN object is an opaque pointer
using chandle = const void*;

struct dnnl_exec_arg {
  int arg;
  handle memory;
};

struct dnnl_version_info {
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime, gpu_runtime;
};

constexpr dnnl_status kSuccess = 0;
constexpr int kEngineCpu = 1;                 // dnnl_cpu
constexpr unsigned kStreamDefault = 1;        // dnnl_stream_default_flags (in order)
constexpr int kF32 = 3;                       // dnnl_f32
constexpr int kTagAny = 1;                    // dnnl_format_tag_any
constexpr int kTagAbcd = 5;                   // dnnl_abcd == dnnl_nchw == dnnl_oihw
constexpr int kTagAbcde = 6;                  // dnnl_abcde == dnnl_goihw
constexpr int kTagABcd8b = 102;               // dnnl_aBcd8b == dnnl_nChw8c (checked at run time)
constexpr int kTagABcd16b = 78;               // dnnl_aBcd16b == dnnl_nChw16c (checked too)
constexpr int kForwardTraining = 64;          // dnnl_forward_training
constexpr int kConvolutionDirect = 1;         // dnnl_convolution_direct
constexpr int kQueryImplInfoStr = 8;          // dnnl_query_impl_info_str
constexpr int kQuerySrcMd = 129;              // dnnl_query_src_md
constexpr int kQueryDiffSrcMd = 130;          // dnnl_query_diff_src_md
constexpr int kQueryWeightsMd = 131;          // dnnl_query_weights_md
constexpr int kQueryDiffWeightsMd = 132;      // dnnl_query_diff_weights_md
constexpr int kQueryDstMd = 133;              // dnnl_query_dst_md
constexpr int kQueryDiffDstMd = 134;          // dnnl_query_diff_dst_md
constexpr int kQueryScratchpadMd = 136;       // dnnl_query_scratchpad_md
constexpr int kScratchpadUser = 1;            // dnnl_scratchpad_mode_user
constexpr int kArgSrc = 1;                    // DNNL_ARG_SRC == DNNL_ARG_FROM
constexpr int kArgDst = 17;                   // DNNL_ARG_DST == DNNL_ARG_TO
constexpr int kArgWeights = 33;               // DNNL_ARG_WEIGHTS
constexpr int kArgDiffSrc = 129;              // DNNL_ARG_DIFF_SRC
constexpr int kArgDiffDst = 145;              // DNNL_ARG_DIFF_DST
constexpr int kArgDiffWeights = 161;          // DNNL_ARG_DIFF_WEIGHTS
constexpr int kArgScratchpad = 80;            // DNNL_ARG_SCRATCHPAD
static void* const kMemoryAllocate = reinterpret_cast<void*>(static_cast<size_t>(-1));

struct Api {
  const dnnl_version_info* (*version)();
  dnnl_status (*engine_create)(handle*, int, size_t);
  dnnl_status (*stream_create)(handle*, handle, unsigned);
  dnnl_status (*stream_wait)(handle);
  dnnl_status (*memory_desc_create_with_tag)(handle*, int, const dnnl_dims, int, int);
  dnnl_status (*memory_desc_destroy)(handle);
  size_t (*memory_desc_get_size)(chandle);
  dnnl_status (*primitive_attr_create)(handle*);
  dnnl_status (*primitive_attr_set_scratchpad_mode)(handle, int);
  int (*memory_desc_equal)(chandle, chandle);
  dnnl_status (*memory_create)(handle*, chandle, handle, void*);
  dnnl_status (*memory_set_data_handle)(handle, void*);
  dnnl_status (*memory_get_data_handle)(chandle, void**);
  dnnl_status (*memory_get_memory_desc)(chandle, chandle*);
  dnnl_status (*memory_destroy)(handle);
  chandle (*primitive_desc_query_md)(chandle, int, int);
  dnnl_status (*primitive_desc_query)(chandle, int, int, void*);
  dnnl_status (*primitive_desc_next_impl)(handle);
  dnnl_status (*primitive_desc_clone)(handle*, chandle);
  dnnl_status (*primitive_desc_destroy)(handle);
  dnnl_status (*primitive_create)(handle*, chandle);
  dnnl_status (*primitive_execute)(chandle, handle, int, const dnnl_exec_arg*);
  dnnl_status (*primitive_destroy)(handle);
  dnnl_status (*reorder_primitive_desc_create)(handle*, chandle, handle, chandle, handle, chandle);
  dnnl_status (*conv_fwd_pd_create)(handle*, handle, int, int, chandle, chandle, chandle, chandle,
                                    const dnnl_dims, const dnnl_dims, const dnnl_dims,
                                    const dnnl_dims, chandle);
  dnnl_status (*conv_bwd_data_pd_create)(handle*, handle, int, chandle, chandle, chandle,
                                         const dnnl_dims, const dnnl_dims, const dnnl_dims,
                                         const dnnl_dims, chandle, chandle);
  dnnl_status (*conv_bwd_weights_pd_create)(handle*, handle, int, chandle, chandle, chandle,
                                            chandle, const dnnl_dims, const dnnl_dims,
                                            const dnnl_dims, const dnnl_dims, chandle, chandle);
};

// OpenMP entry points of the runtime oneDNN's parallel regions bind to.
struct Omp {
  int (*get_max_threads)() = nullptr;
  void (*set_num_threads)(int) = nullptr;
  // GOMP_parallel(fn, data, threads, flags) and the team queries, for the batch-norm loops;
  // parallel is null if the runtime lacks them (the loops then run on one thread).
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*thread_num)() = nullptr;
  int (*num_threads)() = nullptr;
  const char* name = "none";
};

// Throws a Paddle error naming `what` unless oneDNN returned kSuccess.
void check(dnnl_status status, const char* what);

// PADDLE_MAML_FASTCONV_VERBOSE=1: print the choices to stderr.
bool verbose();

// ---------------------------------------------------------------------------------------------
// Process-wide state, defined once in onednn.cc.

struct Runtime {
  Api api{};
  Omp omp{};
  handle engine = nullptr;
  handle stream = nullptr;
  // Every primitive takes its scratchpad from us (user mode), not from oneDNN's library-owned
  // one, which is per thread and sized when a primitive is created: a primitive created on one
  // thread and run on another (the playground's worker after the main thread) wrote past it
  // (measured: SIGSEGV in im2col, or heap corruption). The operators' lock serialises every
  // execution, so one buffer, grown as needed, serves them all (see scratch()).
  handle attr = nullptr;
  int threads = 1;           // most threads a primitive may use
  bool threads_fixed = false;  // PADDLE_MAML_FASTCONV_THREADS given: use exactly that many
  bool try_plain = true, try_blocked = true, tune = true;
  std::string layout = "auto";
  std::string choices;  // folder of recorded choices; empty: none

  Runtime();  // binds the library and reads the environment (onednn.cc)
};

// The shared scratchpad, at least `bytes` long (see Runtime::attr); call with the lock held.
void* scratch(size_t bytes);

// The process's runtime, created at the first call.
Runtime& runtime();

// The operators' lock: every oneDNN execution holds it (the scratchpad and the caches of plans
// are shared).
std::mutex& lock();

// Sets oneDNN's OpenMP thread count for the lifetime of the object, then restores it. oneDNN
// fixes a primitive's thread count when its descriptor is created, so creation and execution of a
// plan both run inside a scope with the plan's count.
class ThreadScope {
 public:
  ThreadScope(const Runtime& rt, int threads) : omp_(rt.omp) {
    if (omp_.get_max_threads == nullptr) return;
    int current = omp_.get_max_threads();
    if (current != threads) {
      previous_ = current;
      omp_.set_num_threads(threads);
    }
  }
  ~ThreadScope() {
    if (previous_ > 0) omp_.set_num_threads(previous_);
  }

 private:
  const Omp& omp_;
  int previous_ = -1;
};

// ---------------------------------------------------------------------------------------------
// Convolution shapes and execution steps, shared by the plans (conv.cc) and the body (body.cc).

using Dims = std::vector<int64_t>;

// c and o count all channels; with g > 1 groups the weight is [g, o/g, c/g, k, k]. x_block and
// y_block: the layouts of the tensors the caller passes, x and dx in nChw{x_block}c, y and dy in
// nChw{y_block}c (1: plain NCHW).
struct Shape {
  int64_t n, c, h, w, o, k, oh, ow;
  int stride, pad;
  int64_t g = 1;
  int64_t x_block = 1, y_block = 1;
  Dims x() const { return {n, c, h, w}; }
  Dims wei() const { return g == 1 ? Dims{o, c, k, k} : Dims{g, o / g, c / g, k, k}; }
  Dims y() const { return {n, o, oh, ow}; }
};

inline int plain_tag(const Dims& dims) { return dims.size() == 4 ? kTagAbcd : kTagAbcde; }

struct Step {
  handle primitive;
  std::vector<dnnl_exec_arg> args;
  handle scratchpad = nullptr;  // memory over scratch(), if the primitive wants one
  size_t scratch_bytes = 0;
};

// The step running `primitive` (created from `pd`) on `args`, with a scratchpad argument if the
// primitive wants one; its memory object goes to `owned`.
Step make_step(Runtime& rt, chandle pd, handle primitive, std::vector<dnnl_exec_arg> args,
               std::vector<handle>* owned);

// Call with the operators' lock held (the scratchpad is shared).
void run_step(Runtime& rt, Step& step);

// The step reordering memory `from` (layout from_md) into `to` (layout to_md). Its primitive
// descriptor goes to `pds`, its scratchpad memory (if any) to `mems`; the caller owns the
// step's primitive.
Step reorder_step(Runtime& rt, handle from, chandle from_md, handle to, chandle to_md,
                  std::vector<handle>* pds, std::vector<handle>* mems);

struct Geometry {
  dnnl_dims strides = {}, dilates = {}, pad_l = {}, pad_r = {};
  explicit Geometry(const Shape& s) {
    strides[0] = strides[1] = s.stride;
    pad_l[0] = pad_l[1] = s.pad;
    // oneDNN wants the right padding for which (h + pad_l + pad_r - k) / stride + 1 == oh holds
    // exactly; Paddle's floor rule instead leaves trailing rows/columns unused.
    pad_r[0] = (s.oh - 1) * s.stride + s.k - s.h - s.pad;
    pad_r[1] = (s.ow - 1) * s.stride + s.k - s.w - s.pad;
  }
};

// oneDNN's name of the implementation a primitive descriptor runs ("?" if it gives none).
const char* impl_name(Runtime& rt, chandle pd);

// A memory descriptor over `dims` with format tag `tag`; null if oneDNN refuses it.
handle tagged_md(Runtime& rt, const Dims& dims, int tag);

// Whether format tag `tag` is the layout nChw{B}c in this oneDNN (the tag values are taken from
// a newer header): a reorder from plain NCHW must put channel c of pixel p at
// ((c / B)·pixels + p)·B + c % B.
bool is_channel_blocked(Runtime& rt, int tag, int64_t B);

// The channel block B of the activation layout nChw{B}c oneDNN's convolutions prefer on this CPU
// (16 with AVX-512, 8 with AVX2), or 1 where they prefer plain NCHW; call with the lock held. The
// training path keeps its activations in that layout between operators (conv.cc, batch_norm.cc).
int64_t activation_block(Runtime& rt);

// The format tag of nChw{B}c for B = 8 or 16, of plain NCHW for B = 1.
int activation_tag(int64_t block);

// ---------------------------------------------------------------------------------------------
// Paddle tensors.

// `t` as a contiguous 4-D float32 CPU tensor (a copy if it is not contiguous); `name` for errors.
paddle::Tensor dense(const paddle::Tensor& t, const char* name);

// A new float32 CPU tensor, not initialised.
paddle::Tensor empty(const std::vector<int64_t>& shape);

inline float* ptr(const paddle::Tensor& t) { return const_cast<float*>(t.data<float>()); }

}  // namespace fastconv
