// The Mamba mixer's two sequence kernels for CPUs: the selective scan (S6) forward, the math of
// selective_scan_reference in ../scan.py, and the causal depthwise conv (+ SiLU) forward of ../conv.py.
//
// The scan makes one pass over the whole sequence per (sequence, block of channels): the block's states stay
// in vector registers from the first position to the last, and exp, log1p and the sigmoid are inlined
// polynomials. (The torch.compile'd chunk kernel stores and re-loads every state at each chunk edge and
// calls an out-of-line vector exp, around which the compiler spills the states.) The conv is the same walk
// with a few taps; its SiLU, an out-of-line exp in the compiled conv too, was most of that kernel's time.
//
// Scan layouts: u, delta, z (L, batch, dim) and B, C (L, batch, state), each with a unit last stride;
// A_t (state, dim), D and delta_bias (dim,) contiguous. Outputs: out (L, batch, dim); the state at the
// start of every chunk of chunk_len positions, (chunks, state, batch, dim), which the autograd backward
// re-computes its chunks from; the last state (state, batch, dim).
//
// Vectors are GCC/Clang vector extensions, RSM_VEC_BYTES wide (set by the loader from the CPU's ISA), so
// the same source builds for AVX-512, AVX2, NEON or plain SSE2.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifndef RSM_VEC_BYTES
#define RSM_VEC_BYTES 16
#endif

namespace {

constexpr int kLanes = RSM_VEC_BYTES / sizeof(float);
constexpr int kMaxState = 16;  // the forward holds one register per state
typedef float vfloat __attribute__((vector_size(RSM_VEC_BYTES)));
typedef int32_t vint __attribute__((vector_size(RSM_VEC_BYTES)));

inline vfloat splat(float x) { return vfloat{} + x; }

// Full blocks move kLanes channels; the block at the end of an odd dim moves only `lanes`, zero-filled.
template <bool kFull>
inline vfloat load(const float* p, int lanes) {
  vfloat v = {};
  std::memcpy(&v, p, (kFull ? kLanes : lanes) * sizeof(float));
  return v;
}

template <bool kFull>
inline void store(float* p, vfloat v, int lanes) {
  std::memcpy(p, &v, (kFull ? kLanes : lanes) * sizeof(float));
}

// 2^x = 2^k 2^f, x = k + f with k an integer and |f| <= 1/2. Adding 1.5 * 2^23 + 127 rounds x to k and
// leaves k + 127 in the low mantissa bits, so shifting them into the exponent field builds 2^k with no
// float-to-int conversion; 2^f is a degree-5 polynomial fitted for relative error (Lawson iterations on
// [-1/2, 1/2]): within 2.5e-7 of 2^f after float rounding. Results below 2^-125 flush to 0 (no denormals).
constexpr float kShift = 12582912.0f + 127.0f;

inline vfloat pow2_times(vfloat t, vfloat f) {
  vfloat p = f * 0.001327644451521337f + 0.00967553723603487f;
  p = p * f + 0.05550713464617729f;
  p = p * f + 0.24022120237350464f;
  p = p * f + 0.6931469440460205f;
  p = p * f + 1.0000001192092896f;
  const vfloat r = p * (vfloat)((vint)t << 23);
  return t < kShift - 125.5f ? vfloat{} : r;
}

// 2^(a b). Without kMayOverflow the caller guarantees a b <= 127 (the decays: a b <= 0 when A <= 0 and
// delta >= 0); with it, larger a b give +inf. With -ffp-contract=fast both uses of a b fuse into FMAs, so
// the fraction is exact.
template <bool kMayOverflow>
inline vfloat pow2_of_product(vfloat a, vfloat b) {
  const vfloat t = a * b + kShift;
  const vfloat f = a * b - (t - kShift);
  const vfloat r = pow2_times(t, f);
  if constexpr (kMayOverflow) {
    return t > kShift + 127.5f ? splat(__builtin_inff()) : r;
  } else {
    return r;
  }
}

inline vfloat vexp(vfloat x) { return pow2_of_product<true>(x, splat(1.44269504088896341f)); }

// log(1 + w) for w in [0, 1]: 2 atanh(s) with s = w / (2 + w) <= 1/3, its odd series to s^13 (error < 1e-8).
inline vfloat vlog1p_unit(vfloat w) {
  const vfloat s = w / (w + 2.0f);
  const vfloat s2 = s * s;
  vfloat q = s2 * (1.0f / 13) + (1.0f / 11);
  q = q * s2 + (1.0f / 9);
  q = q * s2 + (1.0f / 7);
  q = q * s2 + (1.0f / 5);
  q = q * s2 + (1.0f / 3);
  const vfloat two_s = s + s;
  return two_s + two_s * (q * s2);
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)); a NaN stays NaN.
inline vfloat vsoftplus(vfloat x) {
  const vfloat zero = {};
  const vfloat neg_abs = x < zero ? x : -x;
  return (x <= zero ? zero : x) + vlog1p_unit(pow2_of_product<false>(neg_abs, splat(1.44269504088896341f)));
}

inline vfloat vsilu(vfloat z) { return z / (1.0f + vexp(-z)); }

struct ScanArgs {
  const float *u, *delta, *z, *B, *C, *A2, *D, *delta_bias;  // A2 = A log2(e), state-major (state, dim)
  int64_t u_t, u_b, delta_t, delta_b, z_t, z_b, B_t, B_b, C_t, C_b;  // strides (elements)
  int64_t length, batch, dim, n_state;
  bool softplus;
  int64_t chunk_len;
  float *out, *starts, *last;  // starts may be null: nothing to save for a backward
};

// One sequence b, channels d0 .. d0 + lanes, all positions. N: the state size, or 0 to read it at run time
// (sizes other than 16, the one every RSMamba variant uses: slower, the loops index the states at run time).
template <int N, bool kFull, bool kMayOverflow>
void scan_block(const ScanArgs& a, int64_t b, int64_t d0, int lanes) {
  const int n = N ? N : static_cast<int>(a.n_state);
  const int64_t plane = a.batch * a.dim;  // one state of every (batch, channel)
  vfloat h[N ? N : kMaxState];
  for (int s = 0; s < n; ++s) h[s] = vfloat{};
  const vfloat D = a.D ? load<kFull>(a.D + d0, lanes) : vfloat{};
  const vfloat bias = a.delta_bias ? load<kFull>(a.delta_bias + d0, lanes) : vfloat{};
  const float* A2 = a.A2 + d0;
  for (int64_t t = 0; t < a.length; ++t) {
    if (a.starts && t % a.chunk_len == 0) {
      float* dst = a.starts + (t / a.chunk_len) * n * plane + b * a.dim + d0;
      for (int s = 0; s < n; ++s) store<kFull>(dst + s * plane, h[s], lanes);
    }
    vfloat delta = load<kFull>(a.delta + t * a.delta_t + b * a.delta_b + d0, lanes) + bias;
    if (a.softplus) delta = vsoftplus(delta);
    const vfloat u = load<kFull>(a.u + t * a.u_t + b * a.u_b + d0, lanes);
    const vfloat drive = delta * u;
    const float* Bt = a.B + t * a.B_t + b * a.B_b;
    const float* Ct = a.C + t * a.C_t + b * a.C_b;
    vfloat y_even = D * u, y_odd = {};  // two sums: half the readout's dependency chain
#pragma GCC unroll 16
    for (int s = 0; s < n; ++s) {
      const vfloat decay = pow2_of_product<kMayOverflow>(delta, load<kFull>(A2 + s * a.dim, lanes));
      h[s] = decay * h[s] + drive * Bt[s];
      if (s % 2) {
        y_odd = y_odd + h[s] * Ct[s];
      } else {
        y_even = y_even + h[s] * Ct[s];
      }
    }
    vfloat y = y_even + y_odd;
    if (a.z) y = y * vsilu(load<kFull>(a.z + t * a.z_t + b * a.z_b + d0, lanes));
    store<kFull>(a.out + (t * a.batch + b) * a.dim + d0, y, lanes);
  }
  for (int s = 0; s < n; ++s) store<kFull>(a.last + s * plane + b * a.dim + d0, h[s], lanes);
}

// Runs block(b, d0, lanes) over every (sequence, block of kLanes channels) on the intra-op threads.
template <typename Block>
void for_each_channel_block(int64_t batch, int64_t dim, const Block& block) {
  const int64_t blocks = (dim + kLanes - 1) / kLanes;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / blocks, d0 = (i % blocks) * kLanes;
      block(b, d0, static_cast<int>(std::min<int64_t>(kLanes, dim - d0)));
    }
  });
}

template <int N, bool kMayOverflow>
void scan_all(const ScanArgs& a) {
  for_each_channel_block(a.batch, a.dim, [&](int64_t b, int64_t d0, int lanes) {
    if (lanes == kLanes) {
      scan_block<N, true, kMayOverflow>(a, b, d0, lanes);
    } else {
      scan_block<N, false, kMayOverflow>(a, b, d0, lanes);
    }
  });
}

// out[t] = bias + sum_k weight[:, k] x[t - (K-1) + k], then SiLU if asked, for the channels d0 .. d0 + lanes
// of one (position, sequence). x (L, batch, dim) with a unit last stride; weight_t (K, dim) contiguous.
template <bool kFull>
inline vfloat conv_at(const float* x, int64_t x_t, const float* weight_t, int64_t taps, int64_t dim,
                      vfloat acc, bool silu, int64_t t, int64_t d0, int lanes) {
  for (int64_t k = std::max<int64_t>(0, taps - 1 - t); k < taps; ++k) {
    acc = acc + load<kFull>(weight_t + k * dim + d0, lanes) * load<kFull>(x + (t - (taps - 1) + k) * x_t + d0, lanes);
  }
  return silu ? vsilu(acc) : acc;
}

template <bool kMayOverflow>
void scan_any_state(const ScanArgs& a) {
  if (a.n_state == kMaxState) {
    scan_all<kMaxState, kMayOverflow>(a);
  } else {
    scan_all<0, kMayOverflow>(a);
  }
}

const float* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "mamba_cpu: ", name,
              " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1, "mamba_cpu: ", name,
              " must be (length, batch, channels) with unit channel stride");
}

}  // namespace

std::vector<at::Tensor> scan_forward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A_t,
                                     const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                     const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& delta_bias,
                                     bool softplus, int64_t chunk_len, bool save_starts) {
  for (auto [t, name] : {std::pair{&u, "u"}, {&delta, "delta"}, {&B, "B"}, {&C, "C"}}) check_input(*t, name);
  if (z.has_value()) check_input(*z, "z");
  const int64_t length = u.size(0), batch = u.size(1), dim = u.size(2), n = A_t.size(0);
  TORCH_CHECK(A_t.is_contiguous() && A_t.size(1) == dim, "mamba_cpu: A_t must be contiguous (state, dim)");
  TORCH_CHECK(n >= 1 && n <= kMaxState, "mamba_cpu: state size must be 1..", kMaxState, ", got ", n);
  TORCH_CHECK(chunk_len >= 1, "mamba_cpu: chunk_len must be positive");
  auto opts = u.options();
  at::Tensor out = at::empty({length, batch, dim}, opts);
  at::Tensor last = at::empty({n, batch, dim}, opts);
  at::Tensor starts = save_starts ? at::empty({(length + chunk_len - 1) / chunk_len, n, batch, dim}, opts)
                                  : at::empty({0}, opts);
  const at::Tensor A2 = A_t * 1.44269504088896341;
  // softplus makes delta >= 0, so with A <= 0 (as Mamba's A = -exp(A_log) is) no decay can overflow
  const bool may_overflow = !softplus || A_t.max().item<float>() > 0;
  const at::Tensor& zz = z.has_value() ? *z : u;  // strides only; the pointer says whether z is there
  ScanArgs a{u.data_ptr<float>(), delta.data_ptr<float>(), data_or_null(z), B.data_ptr<float>(),
             C.data_ptr<float>(), A2.data_ptr<float>(), data_or_null(D), data_or_null(delta_bias),
             u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
             B.stride(0), B.stride(1), C.stride(0), C.stride(1),
             length, batch, dim, n, softplus, chunk_len,
             out.data_ptr<float>(), save_starts ? starts.data_ptr<float>() : nullptr, last.data_ptr<float>()};
  {
    pybind11::gil_scoped_release no_gil;
    if (may_overflow) {
      scan_any_state<true>(a);
    } else {
      scan_any_state<false>(a);
    }
  }
  return {out, starts, last};
}

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& weight_t, const c10::optional<at::Tensor>& bias,
                        bool silu) {
  check_input(x, "x");
  const int64_t length = x.size(0), batch = x.size(1), dim = x.size(2), taps = weight_t.size(0);
  TORCH_CHECK(weight_t.is_contiguous() && weight_t.size(1) == dim,
              "mamba_cpu: weight_t must be contiguous (taps, dim)");
  at::Tensor out = at::empty({length, batch, dim}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight_t.data_ptr<float>(), *bp = data_or_null(bias);
  float* op = out.data_ptr<float>();
  const int64_t x_t = x.stride(0), x_b = x.stride(1), full = dim / kLanes * kLanes;
  pybind11::gil_scoped_release no_gil;
  // no recurrence here: threads take ranges of positions and stream through memory in order
  at::parallel_for(0, length, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t b = 0; b < batch; ++b) {
        const float* xb = xp + b * x_b;
        float* ob = op + (t * batch + b) * dim;
        for (int64_t d0 = 0; d0 < full; d0 += kLanes) {
          const vfloat acc = bp ? load<true>(bp + d0, kLanes) : vfloat{};
          store<true>(ob + d0, conv_at<true>(xb, x_t, wp, taps, dim, acc, silu, t, d0, kLanes), kLanes);
        }
        if (full < dim) {
          const int lanes = static_cast<int>(dim - full);
          const vfloat acc = bp ? load<false>(bp + full, lanes) : vfloat{};
          store<false>(ob + full, conv_at<false>(xb, x_t, wp, taps, dim, acc, silu, t, full, lanes), lanes);
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_forward", &scan_forward, "Selective scan forward, time-major, fp32 (see the file's header)");
  m.def("conv_forward", &conv_forward, "Causal depthwise conv1d (+ SiLU) forward, time-major, fp32");
}
