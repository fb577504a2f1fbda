// The oneDNN library binding and the process-wide state every operator shares (see onednn.h).

#include "onednn.h"

#include <dlfcn.h>
#include <sched.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace fastconv {

template <typename F>
static void bind(void* lib, const char* name, F* fn) {
  void* sym = dlsym(lib, name);
  if (sym == nullptr) PD_THROW("fastconv: oneDNN symbol ", name, " not found");
  *fn = reinterpret_cast<F>(sym);
}

void check(dnnl_status status, const char* what) {
  if (status != kSuccess) PD_THROW("fastconv: ", what, " failed with oneDNN status ", status);
}

static int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  return std::atoi(value);
}

bool verbose() {
  static const bool on = env_int("PADDLE_MAML_FASTCONV_VERBOSE", 0) != 0;
  return on;
}

// ---------------------------------------------------------------------------------------------
// Process-wide state.

Runtime::Runtime() {
  void* lib = dlopen("libdnnl.so.3", RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) lib = dlopen("libdnnl.so.3", RTLD_LAZY);
  if (lib == nullptr) PD_THROW("fastconv: libdnnl.so.3 is not loaded in this process");
  bind(lib, "dnnl_version", &api.version);
  const dnnl_version_info* v = api.version();
  if (v == nullptr || v->major != 3)
    PD_THROW("fastconv: needs oneDNN 3.x, found ", v ? v->major : -1);
  bind(lib, "dnnl_engine_create", &api.engine_create);
  bind(lib, "dnnl_stream_create", &api.stream_create);
  bind(lib, "dnnl_stream_wait", &api.stream_wait);
  bind(lib, "dnnl_memory_desc_create_with_tag", &api.memory_desc_create_with_tag);
  bind(lib, "dnnl_memory_desc_destroy", &api.memory_desc_destroy);
  bind(lib, "dnnl_memory_desc_get_size", &api.memory_desc_get_size);
  bind(lib, "dnnl_primitive_attr_create", &api.primitive_attr_create);
  bind(lib, "dnnl_primitive_attr_set_scratchpad_mode", &api.primitive_attr_set_scratchpad_mode);
  bind(lib, "dnnl_memory_desc_equal", &api.memory_desc_equal);
  bind(lib, "dnnl_memory_create", &api.memory_create);
  bind(lib, "dnnl_memory_set_data_handle", &api.memory_set_data_handle);
  bind(lib, "dnnl_memory_get_data_handle", &api.memory_get_data_handle);
  bind(lib, "dnnl_memory_get_memory_desc", &api.memory_get_memory_desc);
  bind(lib, "dnnl_memory_destroy", &api.memory_destroy);
  bind(lib, "dnnl_primitive_desc_query_md", &api.primitive_desc_query_md);
  bind(lib, "dnnl_primitive_desc_query", &api.primitive_desc_query);
  bind(lib, "dnnl_primitive_desc_next_impl", &api.primitive_desc_next_impl);
  bind(lib, "dnnl_primitive_desc_clone", &api.primitive_desc_clone);
  bind(lib, "dnnl_primitive_desc_destroy", &api.primitive_desc_destroy);
  bind(lib, "dnnl_primitive_create", &api.primitive_create);
  bind(lib, "dnnl_primitive_execute", &api.primitive_execute);
  bind(lib, "dnnl_primitive_destroy", &api.primitive_destroy);
  bind(lib, "dnnl_reorder_primitive_desc_create", &api.reorder_primitive_desc_create);
  bind(lib, "dnnl_convolution_forward_primitive_desc_create", &api.conv_fwd_pd_create);
  bind(lib, "dnnl_convolution_backward_data_primitive_desc_create",
       &api.conv_bwd_data_pd_create);
  bind(lib, "dnnl_convolution_backward_weights_primitive_desc_create",
       &api.conv_bwd_weights_pd_create);

  // Paddle links Intel's OpenMP (libiomp5) ahead of libgomp, so oneDNN's GOMP_* / omp_* calls
  // resolve to libiomp5 when it is loaded; otherwise they go to libgomp.
  for (const char* name : {"libiomp5.so", "libgomp.so.1"}) {
    void* h = dlopen(name, RTLD_LAZY | RTLD_NOLOAD);
    if (h == nullptr) continue;
    void* get = dlsym(h, "omp_get_max_threads");
    void* set = dlsym(h, "omp_set_num_threads");
    if (get != nullptr && set != nullptr) {
      omp.get_max_threads = reinterpret_cast<int (*)()>(get);
      omp.set_num_threads = reinterpret_cast<void (*)(int)>(set);
      omp.name = name;
      void* parallel = dlsym(h, "GOMP_parallel");
      void* thread_num = dlsym(h, "omp_get_thread_num");
      void* num_threads = dlsym(h, "omp_get_num_threads");
      if (parallel != nullptr && thread_num != nullptr && num_threads != nullptr) {
        omp.parallel = reinterpret_cast<void (*)(void (*)(void*), void*, unsigned, unsigned)>(
            parallel);
        omp.thread_num = reinterpret_cast<int (*)()>(thread_num);
        omp.num_threads = reinterpret_cast<int (*)()>(num_threads);
      }
      break;
    }
  }
  cpu_set_t cpus;
  int available = 1;
  if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) available = std::max(1, CPU_COUNT(&cpus));
  threads = std::max(1, env_int("PADDLE_MAML_FASTCONV_THREADS", available));
  threads_fixed = env_int("PADDLE_MAML_FASTCONV_THREADS", 0) > 0;
  const char* layout_env = std::getenv("PADDLE_MAML_FASTCONV_LAYOUT");
  if (layout_env != nullptr && *layout_env != '\0') layout = layout_env;
  try_plain = layout != "blocked";
  try_blocked = layout != "plain";
  tune = env_int("PADDLE_MAML_FASTCONV_TUNE", 1) != 0;
  const char* choices_env = std::getenv("PADDLE_MAML_FASTCONV_CHOICES");
  if (choices_env != nullptr && std::strcmp(choices_env, "0") != 0) choices = choices_env;
  while (choices.size() > 1 && choices.back() == '/') choices.pop_back();
  if (!choices.empty()) ::mkdir(choices.c_str(), 0777);  // usually exists already

  check(api.engine_create(&engine, kEngineCpu, 0), "dnnl_engine_create");
  check(api.stream_create(&stream, engine, kStreamDefault), "dnnl_stream_create");
  check(api.primitive_attr_create(&attr), "dnnl_primitive_attr_create");
  check(api.primitive_attr_set_scratchpad_mode(attr, kScratchpadUser),
        "dnnl_primitive_attr_set_scratchpad_mode");
  if (verbose())
    std::fprintf(stderr,
                 "fastconv: oneDNN %d.%d.%d cpu_runtime=%u omp=%s threads=%d layout=%s tune=%d "
                 "choices=%s\n",
                 v->major, v->minor, v->patch, v->cpu_runtime, omp.name, threads,
                 layout.c_str(), int(tune), choices.empty() ? "-" : choices.c_str());
}

void* scratch(size_t bytes) {
  static void* buffer = nullptr;
  static size_t size = 0;
  if (bytes > size) {
    std::free(buffer);
    const size_t rounded = (bytes + 4095) / 4096 * 4096;
    buffer = std::aligned_alloc(64, rounded);
    size = buffer != nullptr ? rounded : 0;
    if (buffer == nullptr) PD_THROW("fastconv: out of memory for a scratchpad");
  }
  return buffer;
}

Runtime& runtime() {
  static Runtime* rt = new Runtime();  // never destroyed: avoids teardown-order problems at exit
  return *rt;
}

std::mutex& lock() {
  static std::mutex m;
  return m;
}

// ---------------------------------------------------------------------------------------------
// Execution steps.

Step make_step(Runtime& rt, chandle pd, handle primitive, std::vector<dnnl_exec_arg> args,
               std::vector<handle>* owned) {
  Step step{primitive, std::move(args)};
  chandle md = rt.api.primitive_desc_query_md(pd, kQueryScratchpadMd, 0);
  step.scratch_bytes = md != nullptr ? rt.api.memory_desc_get_size(md) : 0;
  if (step.scratch_bytes > 0) {
    check(rt.api.memory_create(&step.scratchpad, md, rt.engine, nullptr), "memory_create");
    owned->push_back(step.scratchpad);
    step.args.push_back({kArgScratchpad, step.scratchpad});
  }
  return step;
}

void run_step(Runtime& rt, Step& step) {
  if (step.scratchpad != nullptr)
    check(rt.api.memory_set_data_handle(step.scratchpad, scratch(step.scratch_bytes)),
          "memory_set_data_handle");
  check(rt.api.primitive_execute(step.primitive, rt.stream, static_cast<int>(step.args.size()),
                                 step.args.data()),
        "primitive_execute");
}

Step reorder_step(Runtime& rt, handle from, chandle from_md, handle to, chandle to_md,
                  std::vector<handle>* pds, std::vector<handle>* mems) {
  handle pd = nullptr;
  check(rt.api.reorder_primitive_desc_create(&pd, from_md, rt.engine, to_md, rt.engine, rt.attr),
        "reorder_primitive_desc_create");
  pds->push_back(pd);
  handle primitive = nullptr;
  check(rt.api.primitive_create(&primitive, pd), "reorder primitive_create");
  return make_step(rt, pd, primitive, {{kArgSrc, from}, {kArgDst, to}}, mems);
}

const char* impl_name(Runtime& rt, chandle pd) {
  const char* impl = nullptr;
  if (rt.api.primitive_desc_query(pd, kQueryImplInfoStr, 0, &impl) != kSuccess || !impl)
    return "?";
  return impl;
}

handle tagged_md(Runtime& rt, const Dims& dims, int tag) {
  dnnl_dims d = {};
  std::copy(dims.begin(), dims.end(), d);
  handle md = nullptr;
  if (rt.api.memory_desc_create_with_tag(&md, int(dims.size()), d, kF32, tag) != kSuccess)
    return nullptr;
  return md;
}

// Checked by reordering 2·B channels of 2 pixels.
bool is_channel_blocked(Runtime& rt, int tag, int64_t B) {
  auto& api = rt.api;
  const int64_t pixels = 2, channels = 2 * B;
  handle plain = tagged_md(rt, {1, channels, 1, pixels}, kTagAbcd);
  handle blocked = tagged_md(rt, {1, channels, 1, pixels}, tag);
  bool ok = plain != nullptr && blocked != nullptr;
  std::vector<float> from(channels * pixels), to(channels * pixels, -1.0f);
  for (size_t i = 0; i < from.size(); ++i) from[i] = float(i);
  handle src = nullptr, dst = nullptr, pd = nullptr, reorder = nullptr;
  ok = ok && api.memory_create(&src, plain, rt.engine, from.data()) == kSuccess;
  ok = ok && api.memory_create(&dst, blocked, rt.engine, to.data()) == kSuccess;
  ok = ok && api.reorder_primitive_desc_create(&pd, plain, rt.engine, blocked, rt.engine,
                                               rt.attr) == kSuccess;
  ok = ok && api.primitive_create(&reorder, pd) == kSuccess;
  std::vector<handle> scratchpads;
  if (ok) {
    Step step = make_step(rt, pd, reorder, {{kArgSrc, src}, {kArgDst, dst}}, &scratchpads);
    run_step(rt, step);
    ok = api.stream_wait(rt.stream) == kSuccess;
  }
  for (handle m : scratchpads) api.memory_destroy(m);
  for (int64_t c = 0; ok && c < channels; ++c)
    for (int64_t p = 0; p < pixels; ++p)
      ok = ok && to[((c / B) * pixels + p) * B + c % B] == from[c * pixels + p];
  if (reorder) api.primitive_destroy(reorder);
  if (pd) api.primitive_desc_destroy(pd);
  if (src) api.memory_destroy(src);
  if (dst) api.memory_destroy(dst);
  if (plain) api.memory_desc_destroy(plain);
  if (blocked) api.memory_desc_destroy(blocked);
  return ok;
}

// The block of oneDNN's preferred activation layout for a typical 64-channel 3×3 convolution.
int64_t activation_block(Runtime& rt) {
  static int64_t block = 0;
  if (block != 0) return block;
  block = 1;
  if (!rt.try_blocked) return block;  // PADDLE_MAML_FASTCONV_LAYOUT=plain: NCHW everywhere
  const Shape s{8, 64, 8, 8, 64, 3, 8, 8, 1, 1};
  const Geometry g(s);
  for (int64_t B : {int64_t{16}, int64_t{8}}) {
    const int tag = B == 16 ? kTagABcd16b : kTagABcd8b;
    if (!is_channel_blocked(rt, tag, B)) continue;
    handle x = tagged_md(rt, s.x(), kTagAny), w = tagged_md(rt, s.wei(), kTagAny),
           y = tagged_md(rt, s.y(), kTagAny), want = tagged_md(rt, s.y(), tag);
    handle pd = nullptr;
    const bool made = x && w && y && want &&
                      rt.api.conv_fwd_pd_create(&pd, rt.engine, kForwardTraining,
                                                kConvolutionDirect, x, w, nullptr, y, g.strides,
                                                g.dilates, g.pad_l, g.pad_r, rt.attr) == kSuccess;
    const bool preferred =
        made && rt.api.memory_desc_equal(rt.api.primitive_desc_query_md(pd, kQueryDstMd, 0), want);
    if (pd) rt.api.primitive_desc_destroy(pd);
    for (handle md : {x, w, y, want})
      if (md) rt.api.memory_desc_destroy(md);
    if (preferred) return block = B;
  }
  return block;
}

int activation_tag(int64_t block) {
  return block == 16 ? kTagABcd16b : block == 8 ? kTagABcd8b : kTagAbcd;
}

// ---------------------------------------------------------------------------------------------
// Paddle tensors.

paddle::Tensor dense(const paddle::Tensor& t, const char* name) {
  PD_CHECK(t.is_cpu(), "fastconv: ", name, " must be a CPU tensor");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, "fastconv: ", name, " must be float32");
  PD_CHECK(t.shape().size() == 4, "fastconv: ", name, " must be 4-D");
  return t.is_contiguous() ? t : t.contiguous();
}

paddle::Tensor empty(const std::vector<int64_t>& shape) {
  return paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
}

}  // namespace fastconv
