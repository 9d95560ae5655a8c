// The Mamba mixer's two sequence kernels for CPUs, forward and backward: the selective scan (S6), the math of
// selective_scan_reference in ../scan.py, and the causal depthwise conv (+ SiLU) of ../conv.py.
//
// Plain C++17 with no dependency, not even torch's headers: it builds in seconds with any g++ or clang++,
// cross-compiles, and ../cpu_kernel.py loads it with ctypes through the extern "C" functions at the end
// (raw pointers, sizes and strides; float32 and float64). Threads are std::threads started per call.
//
// The scan walks the whole sequence once per (sequence, block of channels), a tile of positions at a time:
// a prologue computes each position's delta (projected from Mamba's low-rank dt first, if the caller passes
// dt_proj's weight as delta_proj) and delta u for the tile, then each group of RSM_STATE_GROUP
// states runs over the tile with its states in vector registers, and an epilogue gates the output. exp,
// log1p and the sigmoid are inlined polynomials (float32; float64 calls libm, for gradcheck). The group size
// is the register blocking, chosen per ISA by the loader: a group's states plus about eight temporaries must
// fit the register file (AVX-512 and NEON have 32 vector registers, AVX2 16).
//
// The backward walks each sequence's chunks of chunk_len positions last to first. Per chunk and block of
// channels it re-computes the chunk's states and decays from the state the forward saved at the chunk's
// start into an L1-sized buffer, then runs the adjoint recurrence g_t = dy_t C_t + decay_{t+1} g_{t+1}
// back over the chunk, carrying g from chunk to chunk. dB and dC sum over channels: a work item owns a
// sequence (and a group of channel blocks), sums its blocks into vectors, and reduces them across lanes once
// per chunk. dA, dD and d(delta_bias) sum over sequences: per-item partials, added at the end. With a projection
// it takes d(delta) on to d(dt) and d(delta_proj) chunk by chunk (`project_gradients`).
//
// Scan layouts (element strides; the channel/state stride is 1): u, delta, z, dout (L, batch, dim) and B, C
// (L, batch, state) with strides t and b; A (dim, state) with strides A_d, A_s; D, delta_bias (dim,); with
// delta_proj (dim, rank), delta is dt (L, batch, rank) with strides t and b.
// Outputs are contiguous: out, du, ddelta, dz (L, batch, dim); dB, dC (L, batch, state); dA (dim, state);
// the state at the start of every chunk, (chunks, batch, dim * state) with each block of channels' states side by
// side (`Scan::chunk_start`); the last state (state, batch, dim); out summed over the positions (batch, dim).
// z, and the conv's x, may instead be read through a table of row offsets (z_rows, x_rows: (L, batch) element
// offsets): the model's token orders, read straight from the un-reordered tensor with no gathered copy of it.
// Likewise out may be written (and dout read) through out_rows: each sequence's outputs put back in token order
// as they are stored, with no gathered copy after the scan either. And the backward may write dz and the conv's
// dx through dz_rows, dx_rows: each token order's gradient put back in the source's order as it is stored, so
// that summing the orders' gradients is a plain sum of planes (no gather of each before it).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#ifndef RSM_VEC_BYTES
#define RSM_VEC_BYTES 16
#endif
#ifndef RSM_STATE_GROUP
#define RSM_STATE_GROUP 16
#endif
#ifndef RSM_ADJOINT_GROUP
#define RSM_ADJOINT_GROUP RSM_STATE_GROUP
#endif
#define RSM_STR2(x) #x
#define RSM_STR(x) RSM_STR2(x)
// RSM_PART 1: the float32 entry points and the shared ones; 2: the float64 ones; unset: all. The loader
// compiles the two parts at once and links them, which nearly halves the build's wall time on two cores
// (each part instantiates only its own type's templates).
#ifndef RSM_PART
#define RSM_PART 0
#endif

extern "C" {

struct rsm_scan_args {
  const void *u, *delta, *A, *B, *C, *D, *z, *delta_bias;  // D, z, delta_bias may be null
  int64_t u_t, u_b, delta_t, delta_b, z_t, z_b, B_t, B_b, C_t, C_b, A_d, A_s;
  int64_t length, batch, dim, n_state, chunk_len, softplus, threads;
  void *out, *starts, *last;  // forward outputs (starts null: nothing to save); the backward reads starts
  const void *dout, *dlast;   // backward inputs; dlast (state, batch, dim) may be null
  int64_t dout_t, dout_b;
  void *du, *ddelta, *dz, *dA, *dB, *dC, *dD, *ddelta_bias;  // backward outputs; dz, dD, ddelta_bias may be null
  const int64_t* z_rows;  // (L, batch): z's row of each position and sequence, as an element offset; null: strides
  const int64_t* out_rows;  // (L, batch): the same for out (forward) and dout (backward); null: contiguous, strides
  const int64_t* dz_rows;   // (L, batch): where the backward writes dz of each position and sequence; null: contiguous
  // delta_proj (dim, rank), contiguous, may be null. If not, delta is the low-rank dt (L, batch, rank) and the scan
  // projects it itself, delta = dt delta_proj^T (Mamba's dt_proj, before its bias); the backward then writes
  // d(dt) (L, batch, rank) to ddelta and d(delta_proj) (dim, rank) to ddelta_proj, and no d(delta)
  const void* delta_proj;
  int64_t rank;
  void* ddelta_proj;
  // out_sums (batch, dim), may be null: the forward's out summed over the positions, per sequence and channel (what
  // the multi-path block's gate takes the mean of, summed here from registers: read back from memory, a 27 MB out
  // written around the caches took 5% of rsmamba_base's eval). dout_sums, the backward's input, may be null: its
  // gradient, added to every position's dout
  void* out_sums;
  const void* dout_sums;
};

struct rsm_conv_args {
  const void *x, *weight, *bias, *dout;  // x, dout (L, batch, dim); weight (dim, taps); bias (dim,) may be null
  int64_t x_t, x_b, dout_t, dout_b, w_d, w_k;
  int64_t length, batch, dim, taps, silu, threads;
  void *out, *dx, *dweight, *dbias;  // out, dx (L, batch, dim) contiguous (dx unless dx_rows); dweight (dim, taps)
  const int64_t* x_rows;  // (L, batch): x's row of each position and sequence, as an element offset; null: strides
  const int64_t* dx_rows;  // (L, batch): where the backward writes dx of each position and sequence; null: contiguous
};

}  // extern "C"

// libgomp's entry point for a parallel region (GCC's OpenMP ABI, also exported by LLVM's and Intel's
// runtimes). The loader hands over the one torch runs its own threads with, if the process has one: its
// workers spin for a while after each of torch's ops, and threads of our own would share the cores with
// them (a scan right after a matmul took 30% longer). One variable for both parts, defined in the first.
typedef void (*GompParallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
extern std::atomic<GompParallel> rsm_gomp_parallel;
#if RSM_PART != 2
std::atomic<GompParallel> rsm_gomp_parallel{nullptr};
#endif

namespace {

typedef float vfloat __attribute__((vector_size(RSM_VEC_BYTES)));
typedef double vdouble __attribute__((vector_size(RSM_VEC_BYTES)));
typedef int32_t vint __attribute__((vector_size(RSM_VEC_BYTES)));

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef vfloat type;
};
template <>
struct VecOf<double> {
  typedef vdouble type;
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = RSM_VEC_BYTES / sizeof(T);

constexpr int kGroup = RSM_STATE_GROUP;
constexpr int kAdjointGroup = RSM_ADJOINT_GROUP;
// x86 without AVX-512 has 16 vector registers: a group of 16 states and the loop's temporaries don't fit, and
// the compiler spilled the readout's two sums, chaining them through memory. There the states' loop keeps the
// states in the caller's array instead: a load and a store per state and position, off the dependency chains
// (the AVX2 build's forward and backward 3-4% faster on two threads of a Xeon).
#if defined(__x86_64__) && !defined(__AVX512F__)
#define RSM_STATES_IN_MEMORY 1
#else
#define RSM_STATES_IN_MEMORY 0
#endif
constexpr int kTile = 32;  // scan forward positions per tile: its rows for all blocks of an item stay in L2
constexpr int kConvTile = 32;
constexpr int kMaxTaps = 8;  // conv backward positions per work item: it re-computes 3 more (the taps - 1)

template <typename V, typename T>
inline V splat(T x) {
  return V{} + x;
}

// Full blocks move kLanes channels; the block at the end of an odd dim moves only `lanes`, zero-filled.
template <bool kFull, typename T>
inline Vec<T> load(const T* p, int lanes) {
  Vec<T> v = {};
  std::memcpy(&v, p, (kFull ? kLanes<T> : lanes) * sizeof(T));
  return v;
}

template <bool kFull, typename T>
inline void store(T* p, Vec<T> v, int lanes) {
  std::memcpy(p, &v, (kFull ? kLanes<T> : lanes) * sizeof(T));
}

// Outputs of at least this many bytes are written around the caches (x86's non-temporal stores): they would
// not stay in the caches for their reader anyway, and a normal store first reads each line in from memory
// (the backward's du, d(delta) and dz took a fifth of its time). Smaller ones stay in the caches for the
// next op. (tests/csrc sets it to 0, to check those stores on small shapes.)
int64_t around_cache_bytes = int64_t(8) << 20;

// A store of an output block, around the caches if `around` (and the block full and aligned; and not on
// aarch64, which has no such vector store). Those are weakly ordered: a thread ends with `stream_fence`.
template <bool kFull, typename T>
inline void store_output(bool around, T* p, Vec<T> v, int lanes) {
#if defined(__x86_64__)
  if (kFull && around && reinterpret_cast<uintptr_t>(p) % RSM_VEC_BYTES == 0) {
#if RSM_VEC_BYTES == 64 && defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), (__m512i)v);
#elif RSM_VEC_BYTES == 32 && defined(__AVX__)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)v);
#else
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)v);
#endif
    return;
  }
#endif
  store<kFull>(p, v, lanes);
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

template <bool kFull, typename T>
inline void add_to(T* p, Vec<T> v, int lanes) {
  store<kFull>(p, load<kFull>(p, lanes) + v, lanes);
}

// ---- float32 math: inlined polynomials -------------------------------------------------------------------

constexpr float kLog2e = 1.44269504088896341f;

// 2^(a b). kGuarded: any a b; below -125.5 the result is 0 (no denormals, which slow the states' loop down
// manyfold), above 127.5 +inf, NaN stays NaN. Unguarded, the caller guarantees -125.5 <= a b <= 127.5, two to
// three instructions fewer: the decays of a tile whose deltas keep delta A in range (`decays_in_range`),
// nearly all of them. Every form splits 2^x into 2^(an integer) times a polynomial's 2^(the rest), the
// polynomials fitted for relative error (Lawson iterations). tests/csrc/test_mamba_cpu.cpp checks each build's
// 2^x against exp2 over the whole range.

// r = 2^x where -125.5 <= x <= 127.5, else 0, +inf or NaN as above (x = a b, rounded: the guarded path only).
// NaN is tested for: its payload bits, shifted into the exponent, could make r finite.
inline vfloat pow2_range_ends(vfloat r, vfloat x) {
  const vfloat r_low = x < -125.5f ? vfloat{} : (x == x ? r : x);
  return x > 127.5f ? splat<vfloat>(__builtin_inff()) : r_low;
}

#if RSM_VEC_BYTES == 64 && defined(__AVX512F__)
// AVX-512: f = x - floor(x) in [0, 1) in one instruction (vreduceps), and vscalefps multiplies by 2^floor(x):
// 8 operations for the FMA ports where the form below takes 9, and the scan's forward 0.93x on a Xeon, whose
// AVX-512 states' loop waits on those two ports. The polynomial is within 1.5e-7 of 2^f after float rounding;
// x = a b rounded once (as exp2f(delta A log2 e) rounds it in the CUDA kernels) puts 2^x off by 4e-8 |x| relatively.
template <bool kGuarded>
inline vfloat pow2_of_product(vfloat a, vfloat b) {
  const vfloat x = a * b;
  const vfloat f = (vfloat)_mm512_reduce_ps((__m512)x, _MM_FROUND_TO_NEG_INF);
  vfloat p = f * 0.0018775769276544452f + 0.008989340625703335f;
  p = p * f + 0.05582631751894951f;
  p = p * f + 0.24015361070632935f;
  p = p * f + 0.6931530833244324f;
  p = p * f + 0.9999999403953552f;
  const vfloat r = (vfloat)_mm512_scalef_ps((__m512)p, (__m512)x);
  if constexpr (kGuarded) return pow2_range_ends(r, x);
  return r;
}
#else
// |f| <= 1/2: adding 1.5 * 2^23 rounds x to k and leaves k in the low mantissa bits (two's complement). x = a b:
// with -ffp-contract=fast both uses of a b fuse into FMAs, so the fraction is exact (x = a b rounded first, to
// take an FMA off, was 2-5% slower on a Zen 4 and no faster on a Xeon, AVX2 builds). The polynomial is within
// 2.5e-7 of 2^f after float rounding.
constexpr float kShift = 12582912.0f;

template <bool kGuarded>
inline vfloat pow2_of_product(vfloat a, vfloat b) {
  const vfloat t = a * b + kShift;
  const vfloat k = t - kShift;
  const vfloat f = a * b - k;
  vfloat p = f * 0.001327644451521337f + 0.00967553723603487f;
  p = p * f + 0.05550713464617729f;
  p = p * f + 0.24022120237350464f;
  p = p * f + 0.6931469440460205f;
  p = p * f + 1.0000001192092896f;
  // 2^k p: k shifted into the exponent field and added to p's, two integer ops in place of a multiply (the
  // FMA units are what the states' loop waits on: the AVX2 build's scan forward 3% faster on a Zen 4)
  const vfloat r = (vfloat)((vint)p + ((vint)t << 23));
  if constexpr (kGuarded) return pow2_range_ends(r, a * b);  // on a b, not k: 2^-125.5 itself is k = -126's
  return r;
}
#endif

// log(1 + w) for w in [0, 1]: w q(w), q a degree-8 polynomial fitted for relative error (Lawson iterations):
// within 3e-8 of log1p, 2.5e-7 after float rounding. No division, unlike the atanh series.
inline vfloat vlog1p_unit(vfloat w) {
  vfloat q = w * 0.005232599098235369f - 0.029504867270588875f;
  q = q * w + 0.07822536677122116f;
  q = q * w - 0.13663198053836823f;
  q = q * w + 0.19105985760688782f;
  q = q * w - 0.2484297752380371f;
  q = q * w + 0.3331909477710724f;
  q = q * w - 0.4999949336051941f;
  q = q * w + 0.9999999403953552f;
  return w * q;
}

// bound > x ? bound : x (kMax) or bound < x ? bound : x, so x where either is NaN: x86's max and min, one
// instruction each, where g++ 12 makes the same ?: with a constant bound a compare and a variable blend. Other
// targets keep the ?:.
template <bool kMax>
inline vfloat bounded(vfloat bound, vfloat x) {
#if RSM_VEC_BYTES == 64 && defined(__AVX512F__)
  return (vfloat)(kMax ? _mm512_max_ps((__m512)bound, (__m512)x) : _mm512_min_ps((__m512)bound, (__m512)x));
#elif RSM_VEC_BYTES == 32 && defined(__AVX__)
  return (vfloat)(kMax ? _mm256_max_ps((__m256)bound, (__m256)x) : _mm256_min_ps((__m256)bound, (__m256)x));
#elif RSM_VEC_BYTES == 16 && defined(__SSE__)
  return (vfloat)(kMax ? _mm_max_ps((__m128)bound, (__m128)x) : _mm_min_ps((__m128)bound, (__m128)x));
#else
  return (kMax ? bound > x : bound < x) ? bound : x;
#endif
}

inline vfloat at_least(vfloat bound, vfloat x) { return bounded<true>(bound, x); }
inline vfloat at_most(vfloat bound, vfloat x) { return bounded<false>(bound, x); }

// exp(-|x|), in (0, 1]. Below -87 (-125.5 in log2) it stays at exp(-87) ~ 2e-38 instead of going to 0:
// the same to softplus and sigmoid within float precision, and the unguarded 2^x needs no test. -|x| is x
// with its sign bit set; NaN stays NaN.
inline vfloat vexp_neg_abs(vfloat x) {
  const vfloat neg_abs = (vfloat)((vint)x | splat<vint>(INT32_MIN));
  return pow2_of_product<false>(at_least(splat<vfloat>(-87.0f), neg_abs), splat<vfloat>(kLog2e));
}

// sigmoid(x) from e = exp(-|x|): 1 / (1 + e) for x >= 0, else e / (1 + e); nothing overflows.
inline vfloat vsigmoid_from(vfloat x, vfloat e) {
  const vfloat r = 1.0f / (1.0f + e);
  return x < vfloat{} ? e * r : r;
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)) and, from the same exp, its derivative sigmoid(x). NaN stays NaN.
inline vfloat vsoftplus(vfloat x, vfloat* sigmoid = nullptr) {
  const vfloat e = vexp_neg_abs(x);
  if (sigmoid) *sigmoid = vsigmoid_from(x, e);
  return at_least(vfloat{}, x) + vlog1p_unit(e);
}

// 1 + exp(-x) with -x held to [-87, 87], where exp(-x) is finite and normal: sigmoid(x) = 1 / that is exact to
// float precision at both ends, with no compares or blends, unlike from exp(-|x|) (which needs the sign). The
// scan's gate and the conv's SiLU: the AVX2 build's conv forward 12% faster, its scan forward 2-4%.
inline vfloat one_plus_exp_neg(vfloat x) {
  const vfloat neg = at_most(splat<vfloat>(87.0f), at_least(splat<vfloat>(-87.0f), -x));  // NaN stays NaN
  return 1.0f + pow2_of_product<false>(neg, splat<vfloat>(kLog2e));
}

inline vfloat vsigmoid(vfloat x) { return 1.0f / one_plus_exp_neg(x); }

// The scan's gate y silu(z) as y z / (1 + exp(-z)): one division, where y (z sigmoid(z)) takes a multiply more.
inline vfloat vgate(vfloat y, vfloat z) { return y * z / one_plus_exp_neg(z); }

// ---- float64 math: libm, lane by lane (gradcheck runs the kernels' own loops in float64) --------------------

template <typename F>
inline vdouble lanewise(vdouble x, F f) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = f(x[i]);
  return x;
}

template <bool kGuarded>
inline vdouble pow2_of_product(vdouble a, vdouble b) {
  return lanewise(a * b, [](double v) { return std::exp2(v); });
}

inline vdouble vsigmoid(vdouble x) {
  return lanewise(x, [](double v) { return 1.0 / (1.0 + std::exp(-v)); });
}

inline vdouble vsoftplus(vdouble x, vdouble* sigmoid = nullptr) {
  if (sigmoid) *sigmoid = vsigmoid(x);
  return lanewise(x, [](double v) { return std::max(v, 0.0) + std::log1p(std::exp(-std::fabs(v))); });
}

template <typename V>
inline V vsilu(V z) {
  return z * vsigmoid(z);
}

inline vdouble vgate(vdouble y, vdouble z) { return y * vsilu(z); }

// d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z))), from s = sigmoid(z)
template <typename V>
inline V vsilu_grad_from(V z, V s) {
  return s * (1 + z * (1 - s));
}

template <typename V>
inline V vsilu_grad(V z) {
  return vsilu_grad_from(z, vsigmoid(z));
}

// ---- threads ---------------------------------------------------------------------------------------------

template <typename F>
struct ParallelLoop {
  const F& fn;
  int64_t items;
  std::atomic<int64_t> next{0};
  std::atomic<int> threads{0};
  void work(int thread) {
    for (int64_t i = next++; i < items; i = next++) fn(i, thread);
  }
  static void region(void* self) {
    auto* loop = static_cast<ParallelLoop*>(self);
    loop->work(loop->threads++);
  }
};

// Runs fn(item, thread) for every item on up to `threads` threads (this one included), items handed out in
// order as threads become free; fn must not throw.
template <typename F>
void parallel_for(int64_t items, int64_t threads, const F& fn) {
  const int n = static_cast<int>(std::max<int64_t>(1, std::min(threads, items)));
  ParallelLoop<F> loop{fn, items};
  if (n == 1) {
    loop.work(0);
  } else if (GompParallel region = rsm_gomp_parallel.load()) {
    region(&ParallelLoop<F>::region, &loop, static_cast<unsigned>(n), 0);
  } else {
    std::vector<std::thread> pool;
    pool.reserve(n - 1);
    for (int t = 1; t < n; ++t) pool.emplace_back([&loop, t] { loop.work(t); });
    loop.work(0);
    for (auto& t : pool) t.join();
  }
}

// Per-work-item partial sums of a parameter gradient, added into `out` in item order at the end: the same
// sum whichever thread ran which item, so a run repeats bit for bit (exact resume depends on it).
template <typename T>
struct Partials {
  std::vector<std::vector<T>> parts;
  Partials(int64_t items, int64_t size) : parts(std::max<int64_t>(1, items), std::vector<T>(size)) {}
  T* of(int64_t item) { return parts[item].data(); }
  void sum_into(T* out) const {
    const size_t size = parts[0].size();
    std::fill(out, out + size, T{});
    for (const auto& p : parts) {
      for (size_t i = 0; i < size; ++i) out[i] += p[i];
    }
  }
};

// ---- scan ------------------------------------------------------------------------------------------------

template <typename T>
struct Scan {
  const T *u, *delta, *z, *B, *C, *D, *bias, *dout, *dlast, *dout_sums;
  const int64_t *z_rows, *out_rows, *dz_rows;
  std::vector<T> A, A2;  // state-major (state, dim) copies: A, and A log2(e) for the decays' 2^(delta A2)
  std::vector<Vec<T>> proj;  // delta_proj by block of channels, (blocks, rank) vectors, zero-filled past dim
  std::vector<Vec<T>> proj_start;  // with delta_proj: delta_bias by block (or zeros), where its sums start
  int64_t u_t, u_b, delta_t, delta_b, z_t, z_b, B_t, B_b, C_t, C_b, dout_t, dout_b;
  int64_t length, batch, dim, n, chunk_len, threads, blocks, plane, rank;
  bool softplus, decays_at_most_one, around_cache;

  explicit Scan(const rsm_scan_args& a)
      : u(static_cast<const T*>(a.u)), delta(static_cast<const T*>(a.delta)), z(static_cast<const T*>(a.z)),
        B(static_cast<const T*>(a.B)), C(static_cast<const T*>(a.C)), D(static_cast<const T*>(a.D)),
        bias(static_cast<const T*>(a.delta_bias)), dout(static_cast<const T*>(a.dout)),
        dlast(static_cast<const T*>(a.dlast)), dout_sums(static_cast<const T*>(a.dout_sums)), z_rows(a.z_rows),
        out_rows(a.out_rows), dz_rows(a.dz_rows),
        A(a.n_state * a.dim), A2(a.n_state * a.dim),
        u_t(a.u_t), u_b(a.u_b), delta_t(a.delta_t), delta_b(a.delta_b), z_t(a.z_t), z_b(a.z_b), B_t(a.B_t),
        B_b(a.B_b), C_t(a.C_t), C_b(a.C_b), dout_t(a.dout_t), dout_b(a.dout_b), length(a.length),
        batch(a.batch), dim(a.dim), n(a.n_state), chunk_len(a.chunk_len), threads(std::max<int64_t>(1, a.threads)),
        blocks((a.dim + kLanes<T> - 1) / kLanes<T>), plane(a.batch * a.dim), rank(a.delta_proj ? a.rank : 0),
        softplus(a.softplus != 0),
        around_cache(a.length * plane * static_cast<int64_t>(sizeof(T)) >= around_cache_bytes) {
    const T* A_in = static_cast<const T*>(a.A);
    T a_max = -INFINITY;
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t d = 0; d < dim; ++d) {
        const T v = A_in[d * a.A_d + s * a.A_s];
        A[s * dim + d] = v;
        A2[s * dim + d] = v * static_cast<T>(1.44269504088896340736);
        a_max = std::max(a_max, v);
      }
    }
    // softplus makes delta >= 0, so with A <= 0 (as Mamba's A = -exp(A_log) is) delta A <= 0
    decays_at_most_one = softplus && a_max <= 0;
    const T* W = static_cast<const T*>(a.delta_proj);
    proj.assign(blocks * rank, Vec<T>{});
    proj_start.assign(rank ? blocks : 0, Vec<T>{});
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t q = 0; q < rank; ++q) proj[d / kLanes<T> * rank + q][d % kLanes<T>] = W[d * rank + q];
      if (rank && bias) proj_start[d / kLanes<T>][d % kLanes<T>] = bias[d];
    }
  }

  // z's row for position t of sequence b: through z_rows where the caller reads z in another token order
  const T* z_row(int64_t t, int64_t b) const { return z + (z_rows ? z_rows[t * batch + b] : t * z_t + b * z_b); }
  // where the output of position t of sequence b goes, and where the backward reads its gradient
  int64_t out_row(int64_t t, int64_t b) const { return out_rows ? out_rows[t * batch + b] : (t * batch + b) * dim; }
  const T* dout_row(int64_t t, int64_t b) const {
    return dout + (out_rows ? out_rows[t * batch + b] : t * dout_t + b * dout_b);
  }
  // The states at the start of chunk c of sequence b for the block of channels from d0: its n states side by side,
  // so that the forward stores and the backward loads whole cache lines. (In (chunks, state, batch, dim) a block
  // of 8 floats is half a line, whose other half the next block stored a tile later: the AVX2 build's
  // non-temporal stores of half lines made its training forward 1.24x slower, on a Xeon.)
  template <typename P>
  P* chunk_start(P* starts, int64_t c, int64_t b, int64_t d0) const {
    return starts + ((c * batch + b) * dim + d0) * n;
  }
  // where the backward writes dz of position t of sequence b
  int64_t dz_row(int64_t t, int64_t b) const { return dz_rows ? dz_rows[t * batch + b] : (t * batch + b) * dim; }
};

// The work of one call cut into items of one sequence and a range of its channel blocks: whole sequences when
// there are enough for the threads, else each in a few ranges.
struct WorkItems {
  int64_t groups, per_group, blocks;
  WorkItems(int64_t batch, int64_t blocks_, int64_t threads)
      : groups(std::min(blocks_, std::max<int64_t>(1, (2 * threads + batch - 1) / batch))),
        per_group((blocks_ + groups - 1) / groups), blocks(blocks_) {}
  int64_t count(int64_t batch) const { return batch * groups; }
  int64_t first(int64_t item) const { return item % groups * per_group; }
  int64_t end(int64_t item) const { return std::min(blocks, first(item) + per_group); }
};

// Calls block(std::true_type if the block is full else std::false_type, index within the range, first
// channel, lanes) for blocks k0 .. k1: the full ones in a plain loop, then the tail of an odd dim. (A test per
// block made the conv forward 15% slower and the scan forward about 5%: the AVX2 build on a Zen 4.)
template <typename T, typename F>
void for_each_block(int64_t dim, int64_t k0, int64_t k1, const F& block) {
  const int64_t full = std::max(k0, std::min(k1, dim / kLanes<T>));  // (an item's range may be empty)
  for (int64_t k = k0; k < full; ++k) block(std::true_type{}, k - k0, k * kLanes<T>, kLanes<T>);
  if (full < k1) block(std::false_type{}, full - k0, full * kLanes<T>, static_cast<int>(dim - full * kLanes<T>));
}

// Calls group(count as a compile-time constant, or 0 for the tail, s0, count) for the groups of states.
template <int kGroupSize, typename F>
void for_each_group(int n, const F& group) {
  const int full = n / kGroupSize * kGroupSize;
  for (int s0 = 0; s0 < full; s0 += kGroupSize) group(std::integral_constant<int, kGroupSize>{}, s0, kGroupSize);
  if (full < n) group(std::integral_constant<int, 0>{}, full, n - full);
}

// Calls f(std::integral_constant<int, m>{}) for 1 <= m <= kMax: loops of m steps unrolled, with m sums in
// registers where a count known only at run time kept them on the stack.
template <int kMax, typename F>
void with_count(int m, const F& f) {
  if constexpr (kMax > 1) {
    if (m < kMax) return with_count<kMax - 1>(m, f);
  }
  f(std::integral_constant<int, kMax>{});
}

// Per position of a tile (or chunk) and block of the item, what the states' loops read and write: the
// prologue and the epilogue walk them position by position through all blocks, so u, delta, z and the
// outputs stream through memory row by row; the states' loops then walk one block through the tile.
// (Walking a block's own column of 64 bytes per position through the whole sequence missed the caches on
// every position: the scan ran at half its speed.)
template <typename T>
struct Rows {
  int64_t blocks;
  std::vector<Vec<T>> deltas, drives, ys, sigs, dys, dz_dys, ddeltas, gbs;
  Rows(int64_t positions, int64_t blocks_, bool backward)
      : blocks(blocks_), deltas(positions * blocks), drives(deltas.size()), ys(deltas.size()),
        sigs(backward ? deltas.size() : 0), dys(sigs.size()), dz_dys(sigs.size()), ddeltas(sigs.size()),
        gbs(sigs.size()) {}
  int64_t at(int i, int64_t k) const { return i * blocks + k; }
};

// delta_raw + delta_bias = dt delta_proj^T + delta_bias at positions t0 .. t0 + tl for blocks k0 .. k1, into
// r.deltas: a small matrix product per block, its sums started from the bias, kRows positions at a time, each
// of the block's weight vectors loaded once for them. The low-rank dt is a few cache lines a position, read by
// every block from L1, where the projected delta would be a line a position and block streamed from memory
// (and written there first, by a matrix product of its own).
template <typename T, bool kBackward>
void project_deltas(const Scan<T>& p, int64_t b, int64_t k0, int64_t k1, int64_t t0, int tl, Rows<T>& r) {
  typedef Vec<T> V;
  constexpr int kRows = 8;
  const int64_t rank = p.rank;
  const T* dt0 = p.delta + t0 * p.delta_t + b * p.delta_b;
  for (int i = 0; i < tl; ++i) {  // the rows of the tile to come (see the prologue)
    const int64_t ahead = kBackward ? t0 + i - p.chunk_len : t0 + i + tl;
    if (ahead < 0 || ahead >= p.length) continue;
    const char* row = reinterpret_cast<const char*>(p.delta + ahead * p.delta_t + b * p.delta_b);
    for (int64_t byte = 0; byte < rank * int64_t(sizeof(T)); byte += 64) __builtin_prefetch(row + byte);
  }
  for (int64_t k = k0; k < k1; ++k) {
    const V* w = p.proj.data() + k * rank;
    const V start = p.proj_start[k];
    int i = 0;
    for (; i + kRows <= tl; i += kRows) {
      V acc[kRows];
      for (int j = 0; j < kRows; ++j) acc[j] = start;
      for (int64_t q = 0; q < rank; ++q) {
        const V wq = w[q];
#pragma GCC unroll 8
        for (int j = 0; j < kRows; ++j) acc[j] = acc[j] + wq * dt0[(i + j) * p.delta_t + q];
      }
      for (int j = 0; j < kRows; ++j) r.deltas[r.at(i + j, k - k0)] = acc[j];
    }
    for (; i < tl; ++i) {
      V acc = start;
      for (int64_t q = 0; q < rank; ++q) acc = acc + w[q] * dt0[i * p.delta_t + q];
      r.deltas[r.at(i, k - k0)] = acc;
    }
  }
}

// delta = softplus(delta_raw + delta_bias) (or without softplus), delta u and D u at positions t0 .. t0 + tl
// for blocks k0 .. k1; with kBackward also sigmoid(delta_raw + delta_bias) and dL/dy = dout silu(z). delta_raw
// is read from delta, or projected from the low-rank dt first, bias and all (`project_deltas`).
template <typename T, bool kBackward>
void prologue(const Scan<T>& p, int64_t b, int64_t k0, int64_t k1, int64_t t0, int tl, Rows<T>& r) {
  typedef Vec<T> V;
  if (p.rank) project_deltas<T, kBackward>(p, b, k0, k1, t0, tl, r);
  for (int i = 0; i < tl; ++i) {
    const int64_t t = t0 + i;
    for_each_block<T>(p.dim, k0, k1, [&](auto full, int64_t k, int64_t d0, int lanes) {
      constexpr bool kFull = decltype(full)::value;
      // the rows of the tile to come, a prefetch per cache line: the next tile's in the forward, the previous
      // chunk's in the backward (which walks the chunks last to first)
      const int64_t ahead = kBackward ? t - p.chunk_len : t + tl;
      if (ahead >= 0 && ahead < p.length && d0 * sizeof(T) % 64 == 0) {
        if (!p.rank) __builtin_prefetch(p.delta + ahead * p.delta_t + b * p.delta_b + d0);
        __builtin_prefetch(p.u + ahead * p.u_t + b * p.u_b + d0);
        if (p.z) __builtin_prefetch(p.z_row(ahead, b) + d0);
        if constexpr (kBackward) __builtin_prefetch(p.dout_row(ahead, b) + d0);
      }
      const int64_t at = r.at(i, k);
      V pre = p.rank ? r.deltas[at] : load<kFull>(p.delta + t * p.delta_t + b * p.delta_b + d0, lanes);
      if (p.bias && !p.rank) pre = pre + load<kFull>(p.bias + d0, lanes);  // (the projection starts from it)
      V sig = {};
      const V dl = p.softplus ? vsoftplus(pre, kBackward ? &sig : nullptr) : pre;
      const V u = load<kFull>(p.u + t * p.u_t + b * p.u_b + d0, lanes);
      r.deltas[at] = dl;
      r.drives[at] = dl * u;
      r.ys[at] = p.D ? load<kFull>(p.D + d0, lanes) * u : V{};
      if constexpr (kBackward) {
        V dy = load<kFull>(p.dout_row(t, b) + d0, lanes);
        if (p.dout_sums) dy = dy + load<kFull>(p.dout_sums + b * p.dim + d0, lanes);
        if (p.z) {  // dy = dout silu(z), and dz = dout silu'(z) y from the same sigmoid
          const V zt = load<kFull>(p.z_row(t, b) + d0, lanes), sz = vsigmoid(zt);
          r.dz_dys[at] = dy * vsilu_grad_from(zt, sz);
          dy = dy * (zt * sz);
        }
        r.sigs[at] = sig;
        r.dys[at] = dy;
        r.ddeltas[at] = V{};
        r.gbs[at] = V{};
      }
    });
  }
}

// Whether every decay of block k over the tile's tl positions is in pow2_of_product's unguarded range:
// delta A <= 0 everywhere, and the tile's largest delta times the block's most negative A log2(e) >= -125.
template <typename T>
bool decays_in_range(const Scan<T>& p, const Rows<T>& r, int64_t k, int tl, Vec<T> a2_min) {
  typedef Vec<T> V;
  if (!p.decays_at_most_one) return false;
  V most = r.deltas[r.at(0, k)];
  for (int i = 1; i < tl; ++i) {
    const V dl = r.deltas[r.at(i, k)];
    most = dl > most ? dl : most;
  }
  const V x = most * a2_min;
  for (int l = 0; l < kLanes<T>; ++l) {
    if (!(x[l] >= -125)) return false;
  }
  return true;
}

// What the backward keeps per position and state of its chunk, side by side: the state before the position,
// its decay, and the sums of dB and dC over the item's blocks. (Four arrays of a chunk's size each put one
// position's vectors 4 KB apart, and the CPU took loads from one for stores to another: 4K aliasing.)
template <typename T>
struct Kept {
  Vec<T> h, decay, dB, dC;
};

// One group of states [s0, s0 + count) of block k over positions t0 .. t0 + tl: h = decay h + drive B and
// y += <h, C>, with the group's states in registers. kCount: the count at compile time (the states unrolled),
// or 0 for a tail group. Saves the states at chunk starts (forward: `starts` not null), or with kKeep
// (re-computation in the backward) runs one chunk from its start in kept[0 .. n) and keeps every state and
// decay for the adjoint pass, and sums dC_t += dy_t h_t. Without registers to spare (RSM_STATES_IN_MEMORY)
// the states stay in `state`, or with kKeep in `kept`, row by row.
template <typename T, int kCount, bool kFull, bool kGuarded, bool kKeep>
void states_forward(const Scan<T>& p, int64_t b, int64_t d0, int lanes, int64_t k, int64_t t0, int tl, int s0,
                    int count, Vec<T>* state, const Vec<T>* a2, Rows<T>& r, T* starts, Kept<T>* kept) {
  typedef Vec<T> V;
  const int m = kCount ? kCount : count;
  const int64_t n = p.n;
#if RSM_STATES_IN_MEMORY
  V* const h = kKeep ? nullptr : state + s0;
#else
  V h[kCount ? kCount : kGroup];
  for (int s = 0; s < m; ++s) h[s] = kKeep ? kept[s0 + s].h : state[s0 + s];
#endif
  for (int i = 0; i < tl; ++i) {
    const int64_t t = t0 + i;
    if (starts && t % p.chunk_len == 0) {
      T* dst = p.chunk_start(starts, t / p.chunk_len, b, d0) + s0 * lanes;
      for (int s = 0; s < m; ++s) store_output<kFull>(p.around_cache, dst + s * lanes, h[s], lanes);
    }
    const T* Bt = p.B + t * p.B_t + b * p.B_b + s0;
    const T* Ct = p.C + t * p.C_t + b * p.C_b + s0;
    const int64_t at = r.at(i, k);
    const V dl = r.deltas[at], drive = r.drives[at];
    V y_even = {}, y_odd = {};  // two sums: half the readout's dependency chain
    Kept<T>* const row = kKeep ? kept + i * n + s0 : nullptr;
#pragma GCC unroll 16
    for (int s = 0; s < m; ++s) {
      const V decay = pow2_of_product<kGuarded>(dl, a2[s0 + s]);
#if RSM_STATES_IN_MEMORY
      V& before = kKeep ? row[s].h : h[s];
      V& after = kKeep ? row[s + n].h : h[s];
      const V next = decay * before + drive * Bt[s];
      after = next;
#else
      const V next = h[s] = decay * h[s] + drive * Bt[s];
      if constexpr (kKeep) row[s + n].h = next;
#endif
      if constexpr (kKeep) {
        row[s].decay = decay;
        row[s].dC = row[s].dC + r.dys[at] * next;
      }
      if (s % 2) {
        y_odd = y_odd + next * Ct[s];
      } else {
        y_even = y_even + next * Ct[s];
      }
    }
    r.ys[at] = r.ys[at] + (y_even + y_odd);
  }
#if !RSM_STATES_IN_MEMORY
  if constexpr (!kKeep) {
    for (int s = 0; s < m; ++s) state[s0 + s] = h[s];
  }
#endif
}

// All states of block k over the tile, group by group; the unguarded decays where they are in range (float32;
// float64's libm needs no guard).
template <typename T, bool kFull, bool kKeep>
void block_states_forward(const Scan<T>& p, int64_t b, int64_t d0, int lanes, int64_t k, int64_t t0, int tl,
                          Vec<T>* state, const Vec<T>* a2, Vec<T> a2_min, Rows<T>& r, T* starts, Kept<T>* kept) {
  const bool in_range = std::is_same<T, float>::value && decays_in_range(p, r, k, tl, a2_min);
  for_each_group<kGroup>(static_cast<int>(p.n), [&](auto count, int s0, int m) {
    constexpr int kCount = decltype(count)::value;
    if (kCount && in_range) {
      states_forward<T, kCount, kFull, false, kKeep>(p, b, d0, lanes, k, t0, tl, s0, m, state, a2, r, starts, kept);
    } else {
      states_forward<T, kCount, kFull, true, kKeep>(p, b, d0, lanes, k, t0, tl, s0, m, state, a2, r, starts, kept);
    }
  });
}

// The smallest A log2(e) over the states of each lane of a block.
template <typename T>
Vec<T> smallest(const Vec<T>* a2, int64_t n) {
  Vec<T> m = a2[0];
  for (int64_t s = 1; s < n; ++s) m = a2[s] < m ? a2[s] : m;
  return m;
}

// The scratch of one forward work item: per block of the item its A2, the smallest of those, its states
// between tiles and the sum of its outputs so far.
template <typename T>
struct ForwardScratch {
  std::vector<Vec<T>> a2, a2_min, state, out_sum;
  Rows<T> rows;
  ForwardScratch(int64_t n, int64_t blocks)
      : a2(blocks * n), a2_min(blocks), state(blocks * n), out_sum(blocks), rows(kTile, blocks, false) {}
};

template <typename T>
void scan_forward(const Scan<T>& p, T* out, T* starts, T* last, T* out_sums) {
  typedef Vec<T> V;
  const int64_t n = p.n;
  const WorkItems items(p.batch, p.blocks, p.threads);
  std::vector<ForwardScratch<T>> scratch(p.threads, ForwardScratch<T>(n, items.per_group));
  parallel_for(items.count(p.batch), p.threads, [&](int64_t item, int thread) {
    const int64_t b = item / items.groups, k0 = items.first(item), k1 = items.end(item);
    ForwardScratch<T>& w = scratch[thread];
    for_each_block<T>(p.dim, k0, k1, [&](auto full, int64_t k, int64_t d0, int lanes) {
      for (int64_t s = 0; s < n; ++s) {
        w.a2[k * n + s] = load<decltype(full)::value>(p.A2.data() + s * p.dim + d0, lanes);
        w.state[k * n + s] = V{};
      }
      w.a2_min[k] = smallest<T>(w.a2.data() + k * n, n);
      w.out_sum[k] = V{};
    });
    for (int64_t t0 = 0; t0 < p.length; t0 += kTile) {
      const int tl = static_cast<int>(std::min<int64_t>(kTile, p.length - t0));
      prologue<T, false>(p, b, k0, k1, t0, tl, w.rows);
      for_each_block<T>(p.dim, k0, k1, [&](auto full, int64_t k, int64_t d0, int lanes) {
        block_states_forward<T, decltype(full)::value, false>(p, b, d0, lanes, k, t0, tl, w.state.data() + k * n,
                                                              w.a2.data() + k * n, w.a2_min[k], w.rows, starts,
                                                              nullptr);
      });
      for (int i = 0; i < tl; ++i) {  // epilogue: out = y silu(z)
        const int64_t t = t0 + i;
        for_each_block<T>(p.dim, k0, k1, [&](auto full, int64_t k, int64_t d0, int lanes) {
          constexpr bool kFull = decltype(full)::value;
          V y = w.rows.ys[w.rows.at(i, k)];
          if (p.z) y = vgate(y, load<kFull>(p.z_row(t, b) + d0, lanes));
          store_output<kFull>(p.around_cache, out + p.out_row(t, b) + d0, y, lanes);
          w.out_sum[k] = w.out_sum[k] + y;
        });
      }
    }
    for_each_block<T>(p.dim, k0, k1, [&](auto full, int64_t k, int64_t d0, int lanes) {
      for (int64_t s = 0; s < n; ++s) {
        store<decltype(full)::value>(last + s * p.plane + b * p.dim + d0, w.state[k * n + s], lanes);
      }
      if (out_sums) store<decltype(full)::value>(out_sums + b * p.dim + d0, w.out_sum[k], lanes);
    });
    stream_fence();
  });
}

// The adjoint pass of one group of states of block k back over the chunk: per position t (last first) and
// state, g = dy_t C_t + carry is dL/dh_t; dB_t += g delta_t u_t; with gd = g h_{t-1} decay_t = dL/d(delta_t A):
// dA += gd delta_t, d(delta_t) += gd A + g B_t u_t; and the carry to t-1 is decay_t g.
template <typename T, int kCount, bool kFull>
void states_adjoint(const Scan<T>& p, int64_t b, int64_t d0, int lanes, int64_t k, int64_t t0, int cl, int s0,
                    int count, Vec<T>* carry, const Vec<T>* a, Kept<T>* kept, Rows<T>& r, T* dA) {
  typedef Vec<T> V;
  const int m = kCount ? kCount : count;
  const int64_t n = p.n;
  V g[kCount ? kCount : kAdjointGroup], dA_sum[kCount ? kCount : kAdjointGroup];
  for (int s = 0; s < m; ++s) {
    g[s] = carry[s0 + s];
    dA_sum[s] = V{};
  }
  for (int i = cl - 1; i >= 0; --i) {
    const int64_t t = t0 + i;
    const T* Bt = p.B + t * p.B_t + b * p.B_b + s0;
    const T* Ct = p.C + t * p.C_t + b * p.C_b + s0;
    const int64_t at = r.at(i, k);
    const V dl = r.deltas[at], drive = r.drives[at], dy = r.dys[at];
    Kept<T>* const row = kept + i * n + s0;
    V ddelta = {}, gb = {};
#pragma GCC unroll 16
    for (int s = 0; s < m; ++s) {
      const V gs = g[s] + dy * Ct[s];
      row[s].dB = row[s].dB + gs * drive;
      g[s] = gs * row[s].decay;
      const V gd = g[s] * row[s].h;
      dA_sum[s] = dA_sum[s] + gd * dl;
      ddelta = ddelta + gd * a[s0 + s];
      gb = gb + gs * Bt[s];
    }
    r.ddeltas[at] = r.ddeltas[at] + ddelta;
    r.gbs[at] = r.gbs[at] + gb;
  }
  for (int s = 0; s < m; ++s) {
    carry[s0 + s] = g[s];
    add_to<kFull>(dA + (s0 + s) * p.dim + d0, dA_sum[s], lanes);
  }
}

// The scratch of one backward work item, for one chunk of up to chunk_len positions: what it keeps per
// position and state (and the state after the last position: chunk_len + 1 rows), and per block of the item
// its A, A2 and the state gradient carried to the chunk before.
template <typename T>
struct BackwardScratch {
  std::vector<Kept<T>> kept;
  std::vector<Vec<T>> a, a2, a2_min, carry;
  Rows<T> rows;
  BackwardScratch(int64_t n, int64_t chunk_len, int64_t blocks)
      : kept((chunk_len + 1) * n), a(blocks * n), a2(blocks * n), a2_min(blocks), carry(blocks * n),
        rows(chunk_len, blocks, true) {}
};

// Block k (of the item's `blocks`) over one chunk: re-compute its states from the chunk's start, then run the
// adjoint pass. Not inlined: inlined into backward_chunk's loop over the blocks, the backward took 7% longer
// (a Zen 4, both builds).
template <typename T, bool kFull>
__attribute__((noinline)) void block_backward(const Scan<T>& p, int64_t b, int64_t k, int64_t blocks, int64_t d0,
                                              int lanes, int64_t t0, int cl, BackwardScratch<T>& w, const T* starts,
                                              T* dA) {
  const int64_t n = p.n;
  const T* start = p.chunk_start(starts, t0 / p.chunk_len, b, d0);
  if (k + 1 < blocks) {  // the next block's start states, right after this block's
    for (int64_t i = 0; i < n * kLanes<T>; i += 64 / sizeof(T)) __builtin_prefetch(start + n * kLanes<T> + i);
  }
  for (int64_t s = 0; s < n; ++s) w.kept[s].h = load<kFull>(start + s * lanes, lanes);
  block_states_forward<T, kFull, true>(p, b, d0, lanes, k, t0, cl, nullptr, w.a2.data() + k * n, w.a2_min[k], w.rows,
                                       nullptr, w.kept.data());
  for_each_group<kAdjointGroup>(static_cast<int>(n), [&](auto count, int s0, int m) {
    states_adjoint<T, decltype(count)::value, kFull>(p, b, d0, lanes, k, t0, cl, s0, m, w.carry.data() + k * n,
                                                     w.a.data() + k * n, w.kept.data(), w.rows, dA);
  });
}

// With a projection, the gradients of dt and delta_proj from the chunk's d(delta_raw) (in r.ddeltas), none of it
// through memory: d(dt)_t = d(delta)_t W, a sum over the item's channels (across lanes once per position and
// rank), and d(W) += d(delta)_t^T dt_t into the item's partial, (blocks, rank) vectors; kRanks ranks at a time
// in registers. (Written out, d(delta) was 29 MB per rsmamba_base block at batch 8, read twice by two matrix
// products.)
template <typename T>
void project_gradients(const Scan<T>& p, int64_t b, int64_t k0, int64_t k1, int64_t t0, int cl, const Rows<T>& r,
                       T* ddt, Vec<T>* dproj) {
  typedef Vec<T> V;
  constexpr int kRanks = 8;
  const int64_t rank = p.rank;
  const T* dt0 = p.delta + t0 * p.delta_t + b * p.delta_b;
  for (int64_t q0 = 0; q0 < rank; q0 += kRanks) {
    with_count<kRanks>(static_cast<int>(std::min<int64_t>(kRanks, rank - q0)), [&](auto count) {
      constexpr int m = decltype(count)::value;
      for (int i = 0; i < cl; ++i) {
        V acc[m] = {};
        for (int64_t k = k0; k < k1; ++k) {
          const V dd = r.ddeltas[r.at(i, k - k0)];
          const V* w = p.proj.data() + k * rank + q0;
          for (int j = 0; j < m; ++j) acc[j] = acc[j] + dd * w[j];
        }
        T* out = ddt + ((t0 + i) * p.batch + b) * rank + q0;
        for (int j = 0; j < m; ++j) {
          T sum = 0;
          for (int l = 0; l < kLanes<T>; ++l) sum += acc[j][l];
          out[j] = sum;
        }
      }
      for (int64_t k = k0; k < k1; ++k) {
        V acc[m] = {};
        for (int i = 0; i < cl; ++i) {
          const V dd = r.ddeltas[r.at(i, k - k0)];
          const T* dt = dt0 + i * p.delta_t + q0;
          for (int j = 0; j < m; ++j) acc[j] = acc[j] + dd * dt[j];
        }
        for (int j = 0; j < m; ++j) dproj[k * rank + q0 + j] = dproj[k * rank + q0 + j] + acc[j];
      }
    });
  }
}

// One chunk of an item: per block re-compute the states from the chunk's start and run the adjoint pass;
// then, position by position, du, d(delta), dz and the sums for dD and d(delta_bias).
template <typename T>
void backward_chunk(const Scan<T>& p, int64_t b, int64_t k0, int64_t k1, int64_t t0, int cl, BackwardScratch<T>& w,
                    const T* starts, T* du, T* ddelta, T* dz, T* dA, T* dD, T* dbias, Vec<T>* dproj) {
  typedef Vec<T> V;
  Rows<T>& r = w.rows;
  prologue<T, true>(p, b, k0, k1, t0, cl, r);
  for_each_block<T>(p.dim, k0, k1, [&](auto full, int64_t k, int64_t d0, int lanes) {
    block_backward<T, decltype(full)::value>(p, b, k, k1 - k0, d0, lanes, t0, cl, w, starts, dA);
  });
  for (int i = 0; i < cl; ++i) {  // epilogue
    const int64_t t = t0 + i;
    for_each_block<T>(p.dim, k0, k1, [&](auto full, int64_t k, int64_t d0, int lanes) {
      constexpr bool kFull = decltype(full)::value;
      const int64_t at = r.at(i, k), row = (t * p.batch + b) * p.dim + d0;
      const V u = load<kFull>(p.u + t * p.u_t + b * p.u_b + d0, lanes);
      const V gb = r.gbs[at], dy = r.dys[at];
      V dd = r.ddeltas[at] + gb * u;
      if (p.softplus) dd = dd * r.sigs[at];
      const V D = p.D ? load<kFull>(p.D + d0, lanes) : V{};
      store_output<kFull>(p.around_cache, du + row, gb * r.deltas[at] + dy * D, lanes);
      if (p.rank) {
        r.ddeltas[at] = dd;  // for project_gradients
      } else {
        store_output<kFull>(p.around_cache, ddelta + row, dd, lanes);
      }
      if (p.z) {
        store_output<kFull>(p.around_cache, dz + p.dz_row(t, b) + d0, r.dz_dys[at] * r.ys[at], lanes);
      }
      add_to<kFull>(dD + d0, dy * u, lanes);
      add_to<kFull>(dbias + d0, dd, lanes);
    });
  }
  if (p.rank) project_gradients<T>(p, b, k0, k1, t0, cl, r, ddelta, dproj);
}

template <typename T>
void scan_backward(const Scan<T>& p, const T* starts, T* du, T* ddelta, T* dz, T* dA_out, T* dB_out, T* dC_out,
                   T* dD_out, T* dbias_out, T* dproj_out) {
  typedef Vec<T> V;
  const int64_t n = p.n, chunks = (p.length + p.chunk_len - 1) / p.chunk_len, rows = p.length * p.batch * n;
  const WorkItems items(p.batch, p.blocks, p.threads);
  // dB, dC (and d(dt)): written directly by a sequence's only item, else per-range partials summed at the end
  const int64_t dt_rows = p.length * p.batch * p.rank;
  std::vector<T> dB_parts(items.groups > 1 ? items.groups * rows : 0), dC_parts(dB_parts.size()),
      ddt_parts(items.groups > 1 ? items.groups * dt_rows : 0);
  const int64_t count = items.count(p.batch);
  Partials<T> dA(count, n * p.dim), dD(count, p.dim), dbias(count, p.dim);
  Partials<V> dproj(count, p.blocks * p.rank);
  std::vector<BackwardScratch<T>> scratch(p.threads, BackwardScratch<T>(n, p.chunk_len, items.per_group));
  parallel_for(items.count(p.batch), p.threads, [&](int64_t item, int thread) {
    const int64_t b = item / items.groups, group = item % items.groups;
    const int64_t k0 = items.first(item), k1 = items.end(item);
    BackwardScratch<T>& w = scratch[thread];
    for_each_block<T>(p.dim, k0, k1, [&](auto full, int64_t k, int64_t d0, int lanes) {
      constexpr bool kFull = decltype(full)::value;
      for (int64_t s = 0; s < n; ++s) {
        w.a[k * n + s] = load<kFull>(p.A.data() + s * p.dim + d0, lanes);
        w.a2[k * n + s] = load<kFull>(p.A2.data() + s * p.dim + d0, lanes);
        // the last state's gradient is the carry into the last position
        w.carry[k * n + s] = p.dlast ? load<kFull>(p.dlast + s * p.plane + b * p.dim + d0, lanes) : V{};
      }
      w.a2_min[k] = smallest<T>(w.a2.data() + k * n, n);
    });
    T* dB = items.groups > 1 ? dB_parts.data() + group * rows : dB_out;
    T* dC = items.groups > 1 ? dC_parts.data() + group * rows : dC_out;
    T* ddt = p.rank && items.groups > 1 ? ddt_parts.data() + group * dt_rows : ddelta;
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t t0 = c * p.chunk_len;
      const int cl = static_cast<int>(std::min(p.chunk_len, p.length - t0));
      for (int64_t j = 0; j < cl * n; ++j) w.kept[j].dB = w.kept[j].dC = V{};
      backward_chunk<T>(p, b, k0, k1, t0, cl, w, starts, du, ddt, dz, dA.of(item), dD.of(item), dbias.of(item),
                        dproj.of(item));
      for (int i = 0; i < cl; ++i) {  // the blocks' sums, across lanes (a tail block's unused lanes are 0)
        for (int64_t s = 0; s < n; ++s) {
          T sum_b = 0, sum_c = 0;
          for (int l = 0; l < kLanes<T>; ++l) {
            sum_b += w.kept[i * n + s].dB[l];
            sum_c += w.kept[i * n + s].dC[l];
          }
          const int64_t at = ((t0 + i) * p.batch + b) * n + s;
          dB[at] = sum_b;
          dC[at] = sum_c;
        }
      }
    }
    stream_fence();
  });
  if (items.groups > 1) {
    for (int64_t i = 0; i < rows; ++i) {
      T sum_b = 0, sum_c = 0;
      for (int64_t g = 0; g < items.groups; ++g) {
        sum_b += dB_parts[g * rows + i];
        sum_c += dC_parts[g * rows + i];
      }
      dB_out[i] = sum_b;
      dC_out[i] = sum_c;
    }
    for (int64_t i = 0; i < dt_rows; ++i) {
      T sum = 0;
      for (int64_t g = 0; g < items.groups; ++g) sum += ddt_parts[g * dt_rows + i];
      ddelta[i] = sum;
    }
  }
  if (p.rank) {  // the items' partials of d(delta_proj), in item order, into (dim, rank)
    std::vector<V> total(p.blocks * p.rank);
    dproj.sum_into(total.data());
    for (int64_t d = 0; d < p.dim; ++d) {
      for (int64_t q = 0; q < p.rank; ++q) {
        dproj_out[d * p.rank + q] = total[d / kLanes<T> * p.rank + q][d % kLanes<T>];
      }
    }
  }
  std::vector<T> dA_t(n * p.dim);
  dA.sum_into(dA_t.data());
  for (int64_t d = 0; d < p.dim; ++d) {
    for (int64_t s = 0; s < n; ++s) dA_out[d * n + s] = dA_t[s * p.dim + d];
  }
  if (dD_out) dD.sum_into(dD_out);
  if (dbias_out) dbias.sum_into(dbias_out);
}

// ---- conv ------------------------------------------------------------------------------------------------

template <typename T>
struct Conv {
  const T *x, *bias, *dout;
  const int64_t *x_rows, *dx_rows;
  std::vector<T> weight_t;  // (taps, dim)
  int64_t x_t, x_b, dout_t, dout_b, length, batch, dim, taps, threads;
  bool silu;

  explicit Conv(const rsm_conv_args& a)
      : x(static_cast<const T*>(a.x)), bias(static_cast<const T*>(a.bias)), dout(static_cast<const T*>(a.dout)),
        x_rows(a.x_rows), dx_rows(a.dx_rows), weight_t(a.taps * a.dim), x_t(a.x_t), x_b(a.x_b), dout_t(a.dout_t),
        dout_b(a.dout_b), length(a.length), batch(a.batch), dim(a.dim), taps(a.taps), threads(a.threads),
        silu(a.silu != 0) {
    const T* w = static_cast<const T*>(a.weight);
    for (int64_t k = 0; k < taps; ++k) {
      for (int64_t d = 0; d < dim; ++d) weight_t[k * dim + d] = w[d * a.w_d + k * a.w_k];
    }
  }

  // x's row for position t of sequence b: through x_rows where the caller reads x in another token order
  const T* x_row(int64_t t, int64_t b) const { return x + (x_rows ? x_rows[t * batch + b] : t * x_t + b * x_b); }
  // where the backward writes dx of position t of sequence b
  int64_t dx_row(int64_t t, int64_t b) const { return dx_rows ? dx_rows[t * batch + b] : (t * batch + b) * dim; }
};

// x's rows of one sequence at positions first .. last - 1 (none before the sequence starts), looked up once for
// all the blocks of a row: looked up per block and tap, they made the conv forward 9% slower and its backward
// 20% (the AVX2 build on a Zen 4).
template <typename T>
struct ConvRows {
  const T* at[kConvTile + 2 * kMaxTaps];
  int64_t first;
  ConvRows(const Conv<T>& p, int64_t b, int64_t first_, int64_t last) : first(first_) {
    for (int64_t t = std::max<int64_t>(0, first); t < last; ++t) at[t - first] = p.x_row(t, b);
  }
  // the rows the taps of position t read: x[t - (K-1) + k] at [k], from k = max(0, K-1 - t)
  const T* const* taps_of(const Conv<T>& p, int64_t t) const { return at + (t - (p.taps - 1) - first); }
};

// The conv's loops are built for Mamba's 4 taps, unrolled with their sums in registers, and once more for any
// other count, read at run time: kTaps is 4 or 0 (`with_taps`). One build per count up to kMaxTaps made the
// library's build 2.2 s longer.
constexpr int kMambaTaps = 4;

template <typename F>
void with_taps(int64_t taps, const F& f) {
  if (taps == kMambaTaps) return f(std::integral_constant<int, kMambaTaps>{});
  f(std::integral_constant<int, 0>{});
}

template <int kTaps, typename T>
int tap_count(const Conv<T>& p) {
  return kTaps ? kTaps : static_cast<int>(p.taps);
}

// bias + sum_k weight[:, k] x[t - (K-1) + k] (before the SiLU) for one (position, block), from the taps' rows
template <bool kFull, int kTaps, typename T>
Vec<T> pre_activation(const Conv<T>& p, const T* const* rows, int64_t k0, int64_t d0, int lanes) {
  const T* const weight = p.weight_t.data();
  Vec<T> acc = p.bias ? load<kFull>(p.bias + d0, lanes) : Vec<T>{};
  for (int k = 0; k < tap_count<kTaps>(p); ++k) {
    if (k >= k0) acc = acc + load<kFull>(weight + k * p.dim + d0, lanes) * load<kFull>(rows[k] + d0, lanes);
  }
  return acc;
}

// the first tap of position t that reads a position of the sequence (the causal conv's zero padding before it)
template <typename T>
int64_t first_tap(const Conv<T>& p, int64_t t) {
  return std::max<int64_t>(0, p.taps - 1 - t);
}

// Calls row(std::true_type if the block is full else std::false_type, first channel, lanes) for every block
// of a row of dim channels.
template <typename T, typename F>
void for_each_row_block(int64_t dim, const F& row) {
  for_each_block<T>(dim, 0, (dim + kLanes<T> - 1) / kLanes<T>, [&](auto full, int64_t, int64_t d0, int lanes) {
    row(full, d0, lanes);
  });
}

template <typename T>
void conv_forward(const Conv<T>& p, T* out) {
  with_taps(p.taps, [&](auto taps) {
    // no recurrence: threads take positions and stream through memory in order
    parallel_for(p.length, p.threads, [&](int64_t t, int) {
      const int64_t k0 = first_tap(p, t);
      for (int64_t b = 0; b < p.batch; ++b) {
        const ConvRows<T> window(p, b, t - (p.taps - 1), t + 1);
        const T* const* rows = window.taps_of(p, t);
        T* row_out = out + (t * p.batch + b) * p.dim;
        for_each_row_block<T>(p.dim, [&](auto full, int64_t d0, int lanes) {
          constexpr bool kFull = decltype(full)::value;
          const Vec<T> pre = pre_activation<kFull, decltype(taps)::value>(p, rows, k0, d0, lanes);
          store<kFull>(row_out + d0, p.silu ? vsilu(pre) : pre, lanes);
        });
      }
    });
  });
}

// One tile of positions t0 .. t0 + kConvTile: dL/d(pre-activation) of the tile and the taps - 1 positions
// after it (re-computed from x, row by row), then dx_t = sum_k weight_k dpre_{t + (K-1) - k},
// dweight_k += dpre_t x_{t - (K-1) + k} and dbias += dpre_t over the tile, also row by row.
template <int kTaps, typename T>
void conv_backward_tile(const Conv<T>& p, int64_t t0, Vec<T>* grads, T* dx, T* dweight, T* dbias) {
  typedef Vec<T> V;
  const int64_t blocks = (p.dim + kLanes<T> - 1) / kLanes<T>;
  const int64_t t1 = std::min(p.length, t0 + kConvTile), window = std::min(p.length, t1 + p.taps - 1);
  for (int64_t b = 0; b < p.batch; ++b) {
    const ConvRows<T> rows(p, b, t0 - (p.taps - 1), window);
    T* dx_at[kConvTile];
    for (int64_t t = t0; t < t1; ++t) dx_at[t - t0] = dx + p.dx_row(t, b);
    for (int64_t t = t0; t < window; ++t) {
      const T* const* taps = rows.taps_of(p, t);
      const int64_t k0 = first_tap(p, t);
      for_each_row_block<T>(p.dim, [&](auto full, int64_t d0, int lanes) {
        constexpr bool kFull = decltype(full)::value;
        V g = load<kFull>(p.dout + t * p.dout_t + b * p.dout_b + d0, lanes);
        if (p.silu) g = g * vsilu_grad(pre_activation<kFull, kTaps>(p, taps, k0, d0, lanes));
        grads[(t - t0) * blocks + d0 / kLanes<T>] = g;
      });
    }
    for_each_row_block<T>(p.dim, [&](auto full, int64_t d0, int lanes) {
      constexpr bool kFull = decltype(full)::value;
      const V* g = grads + d0 / kLanes<T>;
      const int K = tap_count<kTaps>(p);
      V dw[kTaps ? kTaps : kMaxTaps] = {}, db = {};
      for (int64_t t = t0; t < t1; ++t) {
        const V gt = g[(t - t0) * blocks];
        V acc = {};
        for (int k = 0; k < K; ++k) {
          const int64_t src = t + (K - 1 - k), back = t - (K - 1 - k);
          const V wk = load<kFull>(p.weight_t.data() + k * p.dim + d0, lanes);
          if (src < p.length) acc = acc + wk * g[(src - t0) * blocks];
          if (back >= 0) dw[k] = dw[k] + gt * load<kFull>(rows.at[back - rows.first] + d0, lanes);
        }
        store<kFull>(dx_at[t - t0] + d0, acc, lanes);
        db = db + gt;
      }
      for (int k = 0; k < K; ++k) add_to<kFull>(dweight + k * p.dim + d0, dw[k], lanes);
      add_to<kFull>(dbias + d0, db, lanes);
    });
  }
}

template <typename T>
void conv_backward(const Conv<T>& p, T* dx, T* dweight_out, T* dbias_out) {
  const int64_t blocks = (p.dim + kLanes<T> - 1) / kLanes<T>, tiles = (p.length + kConvTile - 1) / kConvTile;
  const int64_t threads = std::max<int64_t>(1, std::min(p.threads, tiles));
  Partials<T> dweight(tiles, p.taps * p.dim), dbias(tiles, p.dim);
  std::vector<std::vector<Vec<T>>> grads(threads, std::vector<Vec<T>>((kConvTile + p.taps - 1) * blocks));
  with_taps(p.taps, [&](auto taps) {
    parallel_for(tiles, threads, [&](int64_t tile, int thread) {
      conv_backward_tile<decltype(taps)::value>(p, tile * kConvTile, grads[thread].data(), dx, dweight.of(tile),
                                                dbias.of(tile));
    });
  });
  std::vector<T> dweight_t(p.taps * p.dim);
  dweight.sum_into(dweight_t.data());
  for (int64_t d = 0; d < p.dim; ++d) {
    for (int64_t k = 0; k < p.taps; ++k) dweight_out[d * p.taps + k] = dweight_t[k * p.dim + d];
  }
  if (dbias_out) dbias.sum_into(dbias_out);
}

// ---- entry points ----------------------------------------------------------------------------------------

// Runs f, turning a C++ exception (out of memory, no thread) into a non-zero return for ctypes' caller.
template <typename F>
int guarded(const F& f) {
  try {
    f();
    return 0;
  } catch (...) {
    return 1;
  }
}

template <typename T>
int scan_forward_entry(const rsm_scan_args* a) {
  return guarded([&] {
    scan_forward(Scan<T>(*a), static_cast<T*>(a->out), static_cast<T*>(a->starts), static_cast<T*>(a->last),
                 static_cast<T*>(a->out_sums));
  });
}

template <typename T>
int scan_backward_entry(const rsm_scan_args* a) {
  return guarded([&] {
    scan_backward(Scan<T>(*a), static_cast<const T*>(a->starts), static_cast<T*>(a->du), static_cast<T*>(a->ddelta),
                  static_cast<T*>(a->dz), static_cast<T*>(a->dA), static_cast<T*>(a->dB), static_cast<T*>(a->dC),
                  static_cast<T*>(a->dD), static_cast<T*>(a->ddelta_bias), static_cast<T*>(a->ddelta_proj));
  });
}

template <typename T>
int conv_forward_entry(const rsm_conv_args* a) {
  return guarded([&] { conv_forward(Conv<T>(*a), static_cast<T*>(a->out)); });
}

template <typename T>
int conv_backward_entry(const rsm_conv_args* a) {
  return guarded([&] {
    conv_backward(Conv<T>(*a), static_cast<T*>(a->dx), static_cast<T*>(a->dweight), static_cast<T*>(a->dbias));
  });
}

}  // namespace

extern "C" {

#if RSM_PART != 2
// Run parallel loops on this OpenMP runtime's threads (GOMP_parallel's address; null: std::threads).
void rsm_use_openmp(void* gomp_parallel_fn) { rsm_gomp_parallel = reinterpret_cast<GompParallel>(gomp_parallel_fn); }

// What this build is: vector width and register blocking, for the loader's checks and the benchmarks.
const char* rsm_build_info() {
  return "vec_bytes=" RSM_STR(RSM_VEC_BYTES) " state_group=" RSM_STR(RSM_STATE_GROUP) " adjoint_group=" RSM_STR(
      RSM_ADJOINT_GROUP);
}

// The element offsets that the kernels read and write a token order's rows through (z_rows, out_rows, x_rows,
// dz_rows, dx_rows): out[l, p * batch + b] = order[l, p] t_stride + p p_stride + b b_stride, for order (length,
// paths) contiguous. Returns 0; 1 if an index is outside [0, length); 2 if `permutation` and a column is not a
// permutation of 0 .. length - 1; 3 out of memory. (It was half a dozen small torch ops per table, each of them
// slowed by the OpenMP workers still spinning after the op before: about 0.7 ms per scan call.)
int rsm_row_offsets(const int64_t* order, int64_t length, int64_t paths, int64_t batch, int64_t t_stride,
                    int64_t p_stride, int64_t b_stride, int64_t permutation, int64_t* out) {
  try {
    std::vector<char> seen(permutation ? length * paths : 0);
    for (int64_t l = 0; l < length; ++l) {
      for (int64_t p = 0; p < paths; ++p) {
        const int64_t position = order[l * paths + p];
        if (position < 0 || position >= length) return 1;
        if (permutation && seen[p * length + position]++) return 2;  // a repeat: some position is missing
        const int64_t row = position * t_stride + p * p_stride;
        for (int64_t b = 0; b < batch; ++b) out[(l * paths + p) * batch + b] = row + b * b_stride;
      }
    }
    return 0;
  } catch (...) {
    return 3;
  }
}

int rsm_scan_forward_f32(const rsm_scan_args* a) { return scan_forward_entry<float>(a); }
int rsm_scan_backward_f32(const rsm_scan_args* a) { return scan_backward_entry<float>(a); }
int rsm_conv_forward_f32(const rsm_conv_args* a) { return conv_forward_entry<float>(a); }
int rsm_conv_backward_f32(const rsm_conv_args* a) { return conv_backward_entry<float>(a); }
#endif
#if RSM_PART != 1
int rsm_scan_forward_f64(const rsm_scan_args* a) { return scan_forward_entry<double>(a); }
int rsm_scan_backward_f64(const rsm_scan_args* a) { return scan_backward_entry<double>(a); }
int rsm_conv_forward_f64(const rsm_conv_args* a) { return conv_forward_entry<double>(a); }
int rsm_conv_backward_f64(const rsm_conv_args* a) { return conv_backward_entry<double>(a); }
#endif

}  // extern "C"
