// Checks the kernels of timm_rsmamba/ops/csrc/mamba_cpu.cpp, built for whatever ISA the compiler is told,
// against a scalar double-precision reference written out here: the scan's forward and every gradient
// (the last state's too) and the conv's. tests/test_cpu_kernel_isas.py builds it for each ISA this machine
// runs, and for aarch64 under qemu. Prints one line per check; exits 1 if any fails.
#include "../../timm_rsmamba/ops/csrc/mamba_cpu.cpp"

#include <cstdio>
#include <random>

namespace {

using Array = std::vector<double>;

struct ScanCase {
  int64_t L, batch, dim, n, chunk;
  bool softplus, with_z, with_dlast;  // with_dlast: the last state's gradient given, and the out sums'
  int64_t rank = 0;  // > 0: the kernel projects delta from a low-rank dt itself (delta_proj)
};

double softplus_ref(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }
double sigmoid_ref(double x) { return 1 / (1 + std::exp(-x)); }

struct ScanData {
  // u, delta, z, dout (L, batch, dim) contiguous; B and C interleaved in one (L, batch, 2 n + 3) array, as
  // the slices of x_proj's output the mixer passes; A (dim, n); D, bias (dim); dlast (n, batch, dim). With a
  // rank, delta = dt W^T: dt (L, batch, rank) in rows of rank + 3, W (dim, rank); dsums (batch, dim), the
  // gradient of out summed over the positions
  Array u, delta, z, dout, BC, A, D, bias, dlast, dt, W, dsums;
  int64_t bc_row, dt_row;
  ScanData(const ScanCase& c, std::mt19937& g) : bc_row(2 * c.n + 3), dt_row(c.rank + 3) {
    std::normal_distribution<double> N(0, 1);
    std::uniform_real_distribution<double> U(0.1, 3);
    const int64_t rows = c.L * c.batch * c.dim;
    for (Array* a : {&u, &z, &dout}) {
      a->resize(rows);
      for (auto& x : *a) x = N(g);
    }
    delta.resize(rows);
    for (auto& x : delta) x = c.softplus ? N(g) * 0.7 - 0.5 : U(g) * 0.3;
    if (c.rank) {
      dt.resize(c.L * c.batch * dt_row);
      W.resize(c.dim * c.rank);
      for (auto& x : dt) x = c.softplus ? N(g) : U(g);
      for (auto& x : W) x = (c.softplus ? N(g) * 0.7 : U(g) * 0.3) / c.rank;
      for (int64_t tb = 0; tb < c.L * c.batch; ++tb) {
        for (int64_t d = 0; d < c.dim; ++d) {
          double sum = 0;
          for (int64_t q = 0; q < c.rank; ++q) sum += dt[tb * dt_row + q] * W[d * c.rank + q];
          delta[tb * c.dim + d] = sum;
        }
      }
    }
    BC.resize(c.L * c.batch * bc_row);
    for (auto& x : BC) x = N(g);
    A.resize(c.dim * c.n);
    for (auto& x : A) x = -U(g) * 2;
    D.resize(c.dim);
    bias.resize(c.dim);
    for (auto& x : D) x = N(g);
    for (auto& x : bias) x = N(g) * 0.3;
    dlast.resize(c.n * c.batch * c.dim);
    for (auto& x : dlast) x = N(g);
    dsums.resize(c.batch * c.dim);
    for (auto& x : dsums) x = N(g);
  }
  double B(const ScanCase& c, int64_t t, int64_t b, int64_t s) const { return BC[(t * c.batch + b) * bc_row + 1 + s]; }
  double C(const ScanCase& c, int64_t t, int64_t b, int64_t s) const {
    return BC[(t * c.batch + b) * bc_row + 2 + c.n + s];
  }
};

struct ScanResult {
  // with a rank, ddelta is d(dt) and dproj d(W)
  Array out, last, du, ddelta, dz, dA, dB, dC, dD, dbias, dproj, out_sums;
};

// The reference's d(delta) taken back through the projection delta = dt W^T: d(dt) and d(W).
void project_back(const ScanCase& c, const ScanData& x, ScanResult& r) {
  Array ddt(c.L * c.batch * c.rank, 0);
  r.dproj.assign(c.dim * c.rank, 0);
  for (int64_t tb = 0; tb < c.L * c.batch; ++tb) {
    for (int64_t d = 0; d < c.dim; ++d) {
      for (int64_t q = 0; q < c.rank; ++q) {
        ddt[tb * c.rank + q] += r.ddelta[tb * c.dim + d] * x.W[d * c.rank + q];
        r.dproj[d * c.rank + q] += r.ddelta[tb * c.dim + d] * x.dt[tb * x.dt_row + q];
      }
    }
  }
  r.ddelta = ddt;
}

// The recurrence position by position, every state kept, then reverse-mode by hand.
ScanResult scan_reference(const ScanCase& c, const ScanData& x) {
  const int64_t L = c.L, nb = c.batch, nd = c.dim, n = c.n;
  ScanResult r;
  r.out.assign(L * nb * nd, 0);
  r.last.assign(n * nb * nd, 0);
  r.out_sums.assign(nb * nd, 0);
  r.du = r.ddelta = r.dz = Array(L * nb * nd, 0);
  r.dA.assign(nd * n, 0);
  r.dB = r.dC = Array(L * nb * n, 0);
  r.dD = r.dbias = Array(nd, 0);
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t d = 0; d < nd; ++d) {
      auto at = [&](int64_t t) { return (t * nb + b) * nd + d; };
      Array dl(L), h((L + 1) * n, 0), y(L);
      for (int64_t t = 0; t < L; ++t) {
        const double pre = x.delta[at(t)] + x.bias[d];
        dl[t] = c.softplus ? softplus_ref(pre) : pre;
        y[t] = x.D[d] * x.u[at(t)];
        for (int64_t s = 0; s < n; ++s) {
          h[(t + 1) * n + s] = std::exp(dl[t] * x.A[d * n + s]) * h[t * n + s] + dl[t] * x.u[at(t)] * x.B(c, t, b, s);
          y[t] += h[(t + 1) * n + s] * x.C(c, t, b, s);
        }
        r.out[at(t)] = c.with_z ? y[t] * x.z[at(t)] * sigmoid_ref(x.z[at(t)]) : y[t];
        r.out_sums[b * nd + d] += r.out[at(t)];
      }
      Array g(n, 0);
      for (int64_t s = 0; s < n; ++s) {
        r.last[(s * nb + b) * nd + d] = h[L * n + s];
        if (c.with_dlast) g[s] = x.dlast[(s * nb + b) * nd + d];
      }
      for (int64_t t = L - 1; t >= 0; --t) {
        const double zt = x.z[at(t)], sz = sigmoid_ref(zt);
        const double dout = x.dout[at(t)] + (c.with_dlast ? x.dsums[b * nd + d] : 0);
        const double dy = c.with_z ? dout * zt * sz : dout;
        if (c.with_z) r.dz[at(t)] = dout * y[t] * sz * (1 + zt * (1 - sz));
        r.dD[d] += dy * x.u[at(t)];
        double ddl = 0, du = dy * x.D[d];
        for (int64_t s = 0; s < n; ++s) {
          const double a = x.A[d * n + s], e = std::exp(dl[t] * a), hp = h[t * n + s];
          g[s] += dy * x.C(c, t, b, s);
          r.dC[(t * nb + b) * n + s] += dy * h[(t + 1) * n + s];
          r.dB[(t * nb + b) * n + s] += g[s] * dl[t] * x.u[at(t)];
          ddl += g[s] * (hp * e * a + x.u[at(t)] * x.B(c, t, b, s));
          r.dA[d * n + s] += g[s] * hp * e * dl[t];
          du += g[s] * dl[t] * x.B(c, t, b, s);
          g[s] *= e;
        }
        if (c.softplus) ddl *= sigmoid_ref(x.delta[at(t)] + x.bias[d]);
        r.du[at(t)] = du;
        r.ddelta[at(t)] = ddl;
        r.dbias[d] += ddl;
      }
    }
  }
  return r;
}

template <typename T>
std::vector<T> as(const Array& a) {
  return std::vector<T>(a.begin(), a.end());
}

// The kernels in precision T on the same inputs (threads: std::threads, no OpenMP runtime here).
template <typename T>
ScanResult scan_kernel(const ScanCase& c, const ScanData& x) {
  const int64_t rows = c.L * c.batch * c.dim, chunks = (c.L + c.chunk - 1) / c.chunk;
  std::vector<T> u = as<T>(x.u), delta = as<T>(c.rank ? x.dt : x.delta), W = as<T>(x.W), z = as<T>(x.z),
                 dout = as<T>(x.dout), BC = as<T>(x.BC), A = as<T>(x.A), D = as<T>(x.D), bias = as<T>(x.bias),
                 dlast = as<T>(x.dlast), dsums = as<T>(x.dsums);
  std::vector<T> out(rows), last(c.n * c.batch * c.dim), starts(chunks * c.n * c.batch * c.dim), du(rows),
      ddelta(c.rank ? c.L * c.batch * c.rank : rows), dproj(c.dim * c.rank), dz(rows), dA(c.dim * c.n),
      dB(c.L * c.batch * c.n), dC(dB.size()), dD(c.dim), dbias(c.dim), out_sums(c.batch * c.dim);
  rsm_scan_args a{};
  a.u = u.data();
  a.delta = delta.data();
  a.A = A.data();
  a.B = BC.data() + 1;
  a.C = BC.data() + 2 + c.n;
  a.D = D.data();
  a.z = c.with_z ? z.data() : nullptr;
  a.delta_bias = bias.data();
  a.u_t = a.delta_t = a.z_t = a.dout_t = c.batch * c.dim;
  a.u_b = a.delta_b = a.z_b = a.dout_b = c.dim;
  if (c.rank) {
    a.delta_t = c.batch * x.dt_row;
    a.delta_b = x.dt_row;
    a.delta_proj = W.data();
    a.rank = c.rank;
    a.ddelta_proj = dproj.data();
  }
  a.B_t = a.C_t = c.batch * x.bc_row;
  a.B_b = a.C_b = x.bc_row;
  a.A_d = c.n;
  a.A_s = 1;
  a.length = c.L;
  a.batch = c.batch;
  a.dim = c.dim;
  a.n_state = c.n;
  a.chunk_len = c.chunk;
  a.softplus = c.softplus;
  a.threads = 2;
  a.out = out.data();
  a.starts = starts.data();
  a.last = last.data();
  a.dout = dout.data();
  a.dlast = c.with_dlast ? dlast.data() : nullptr;
  a.out_sums = out_sums.data();
  a.dout_sums = c.with_dlast ? dsums.data() : nullptr;
  a.du = du.data();
  a.ddelta = ddelta.data();
  a.dz = c.with_z ? dz.data() : nullptr;
  a.dA = dA.data();
  a.dB = dB.data();
  a.dC = dC.data();
  a.dD = dD.data();
  a.ddelta_bias = dbias.data();
  const bool f32 = std::is_same<T, float>::value;
  if ((f32 ? rsm_scan_forward_f32(&a) : rsm_scan_forward_f64(&a)) != 0) std::printf("forward failed\n");
  if ((f32 ? rsm_scan_backward_f32(&a) : rsm_scan_backward_f64(&a)) != 0) std::printf("backward failed\n");
  ScanResult r;
  auto back = [](const std::vector<T>& v) { return Array(v.begin(), v.end()); };
  r.out = back(out), r.last = back(last), r.du = back(du), r.ddelta = back(ddelta);
  r.dz = c.with_z ? back(dz) : Array(rows, 0);
  r.dA = back(dA), r.dB = back(dB), r.dC = back(dC), r.dD = back(dD), r.dbias = back(dbias);
  r.dproj = back(dproj), r.out_sums = back(out_sums);
  return r;
}

int failures = 0;

// max |got - want| relative to max |want|
void check(const char* what, const char* name, const Array& got, const Array& want, double tol) {
  double err = 0, scale = 1e-12;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(got[i] - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  const bool ok = err / scale <= tol && got.size() == want.size();
  if (!ok) ++failures;
  std::printf("%s %s %s: %.2e\n", ok ? "ok  " : "FAIL", what, name, err / scale);
}

// The float32 math lane by lane against libm in double: the largest |got / want - 1| / (rel + rel_x |a b|) over
// the argument pairs (as[i], bs[i]), got(a, b) the kernel's on vectors of them, want(a, b) the reference.
template <typename Got, typename Want>
void check_elementwise(const char* name, const Array& as, const Array& bs, Got got, Want want, double rel,
                       double rel_x) {
  constexpr int kL = kLanes<float>;
  double worst = 0;
  for (size_t i = 0; i + kL <= as.size(); i += kL) {
    vfloat a, b;
    for (int l = 0; l < kL; ++l) a[l] = static_cast<float>(as[i + l]), b[l] = static_cast<float>(bs[i + l]);
    const vfloat y = got(a, b);
    for (int l = 0; l < kL; ++l) {
      const double x = double(a[l]) * b[l], w = want(x);
      const double err = std::fabs(y[l] / w - 1) / (rel + rel_x * std::fabs(x));
      worst = std::isnan(err) ? HUGE_VAL : std::max(worst, err);
    }
  }
  const bool ok = worst <= 1;
  if (!ok) ++failures;
  std::printf("%s math %s: %.2f of its bound\n", ok ? "ok  " : "FAIL", name, worst);
}

// Whether every lane of got is want (NaN: is NaN).
bool all_lanes(vfloat got, float want) {
  for (int l = 0; l < kLanes<float>; ++l) {
    if (!(got[l] == want || (std::isnan(got[l]) && std::isnan(want)))) return false;
  }
  return true;
}

// 2^(a b), guarded and not, over its whole unguarded range [-125.5, 127.5] (b = 1) and as the decays use it
// (a = delta, b = A log2 e, a b not rounded first), the guarded form's ends, and the softplus and sigmoid built
// on it. Bounds: a few 1e-7 relative, the float32 math's own, and a further ~4e-8 |a b| where a b is rounded
// once (AVX-512) or the argument carries log2 e rounded to float (1.3e-8 off: softplus and sigmoid).
void check_math() {
  Array sweep, ones(1 << 20, 1.0), deltas, a_log2e;
  for (int i = 0; i < 1 << 20; ++i) sweep.push_back(-125.5 + 253.0 * i / ((1 << 20) - 1));
  const auto exp2_ref = [](double x) { return std::exp2(x); };
  check_elementwise("2^x", sweep, ones, [](vfloat a, vfloat b) { return pow2_of_product<false>(a, b); }, exp2_ref,
                    3e-7, 5e-8);
  check_elementwise("2^x guarded", sweep, ones, [](vfloat a, vfloat b) { return pow2_of_product<true>(a, b); },
                    exp2_ref, 3e-7, 5e-8);
  std::mt19937 g(11);
  std::uniform_real_distribution<double> delta(1e-3, 8.0), a2(-15.0, 0.0);
  for (int i = 0; i < 1 << 18; ++i) deltas.push_back(delta(g)), a_log2e.push_back(a2(g));
  check_elementwise("2^(delta A log2 e)", deltas, a_log2e,
                    [](vfloat a, vfloat b) { return pow2_of_product<false>(a, b); }, exp2_ref, 3e-7, 5e-8);
  const vfloat one = splat<vfloat>(1.0f);
  bool ends = all_lanes(pow2_of_product<true>(one, splat<vfloat>(NAN)), NAN);
  for (float x : {-126.5f, -200.0f, -1e30f}) ends &= all_lanes(pow2_of_product<true>(one, splat<vfloat>(x)), 0.0f);
  for (float x : {128.5f, 200.0f, 1e30f}) ends &= all_lanes(pow2_of_product<true>(one, splat<vfloat>(x)), HUGE_VALF);
  if (!ends) ++failures;
  std::printf("%s math 2^x guarded: 0 below -126.5, +inf above 128.5, NaN kept\n", ends ? "ok  " : "FAIL");
  Array zs;  // exp(-|x|) is held at exp(-87) beyond
  for (int i = 0; i < 1 << 18; ++i) zs.push_back(-87.0 + 174.0 * i / ((1 << 18) - 1));
  const Array z_ones(zs.size(), 1.0);
  check_elementwise("softplus", zs, z_ones, [](vfloat a, vfloat) { return vsoftplus(a); }, softplus_ref, 5e-7, 8e-8);
  check_elementwise("sigmoid", zs, z_ones, [](vfloat a, vfloat) { return vsigmoid(a); }, sigmoid_ref, 5e-7, 8e-8);
}

void check_scan(const char* what, const ScanCase& c, double tol32, double tol64) {
  std::mt19937 g(static_cast<unsigned>(c.L * 131 + c.dim * 7 + c.n));
  const ScanData x(c, g);
  ScanResult want = scan_reference(c, x);
  if (c.rank) project_back(c, x, want);
  const ScanResult got32 = scan_kernel<float>(c, x), got64 = scan_kernel<double>(c, x);
  const char* names[] = {"out", "out sums", "last", "du", c.rank ? "d(dt)" : "ddelta", "dz", "dA", "dB", "dC", "dD",
                         "dbias", "d(delta_proj)"};
  const Array ScanResult::*fields[] = {&ScanResult::out, &ScanResult::out_sums, &ScanResult::last, &ScanResult::du,
                                       &ScanResult::ddelta, &ScanResult::dz, &ScanResult::dA, &ScanResult::dB,
                                       &ScanResult::dC, &ScanResult::dD, &ScanResult::dbias, &ScanResult::dproj};
  for (int i = 0; i < (c.rank ? 12 : 11); ++i) {
    char label[96];
    std::snprintf(label, sizeof label, "scan %s f32", what);
    check(label, names[i], got32.*fields[i], want.*fields[i], tol32);
    std::snprintf(label, sizeof label, "scan %s f64", what);
    check(label, names[i], got64.*fields[i], want.*fields[i], tol64);
  }
}

template <typename T>
void check_conv_precision(int64_t L, int64_t nb, int64_t nd, int64_t K, bool silu, double tol) {
  std::mt19937 g(static_cast<unsigned>(L * 17 + nd));
  std::normal_distribution<double> N(0, 1);
  Array x(L * nb * 2 * nd), w(nd * K), bias(nd), dout(L * nb * nd);  // x: every other half row, as the mixer's
  for (Array* a : {&x, &w, &bias, &dout}) {
    for (auto& v : *a) v = N(g);
  }
  auto xi = [&](int64_t t, int64_t b, int64_t d) { return (t * nb + b) * 2 * nd + d; };
  Array out(L * nb * nd), dx(L * nb * 2 * nd, 0), dw(nd * K, 0), db(nd, 0);
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t d = 0; d < nd; ++d) {
        double pre = bias[d];
        for (int64_t k = 0; k < K; ++k) {
          if (t - (K - 1) + k >= 0) pre += w[d * K + k] * x[xi(t - (K - 1) + k, b, d)];
        }
        const double s = sigmoid_ref(pre), o = (t * nb + b) * nd + d;
        out[o] = silu ? pre * s : pre;
        const double dpre = silu ? dout[o] * s * (1 + pre * (1 - s)) : dout[o];
        db[d] += dpre;
        for (int64_t k = 0; k < K; ++k) {
          if (t - (K - 1) + k < 0) continue;
          dx[xi(t - (K - 1) + k, b, d)] += w[d * K + k] * dpre;
          dw[d * K + k] += dpre * x[xi(t - (K - 1) + k, b, d)];
        }
      }
    }
  }
  std::vector<T> xT = as<T>(x), wT = as<T>(w), bT = as<T>(bias), dT = as<T>(dout), oT(L * nb * nd),
                 dxT(L * nb * nd), dwT(nd * K), dbT(nd);
  rsm_conv_args a{};
  a.x = xT.data();
  a.weight = wT.data();
  a.bias = bT.data();
  a.dout = dT.data();
  a.x_t = nb * 2 * nd;
  a.x_b = 2 * nd;
  a.dout_t = nb * nd;
  a.dout_b = nd;
  a.w_d = K;
  a.w_k = 1;
  a.length = L;
  a.batch = nb;
  a.dim = nd;
  a.taps = K;
  a.silu = silu;
  a.threads = 2;
  a.out = oT.data();
  a.dx = dxT.data();
  a.dweight = dwT.data();
  a.dbias = dbT.data();
  const bool f32 = std::is_same<T, float>::value;
  if ((f32 ? rsm_conv_forward_f32(&a) : rsm_conv_forward_f64(&a)) != 0) std::printf("conv forward failed\n");
  if ((f32 ? rsm_conv_backward_f32(&a) : rsm_conv_backward_f64(&a)) != 0) std::printf("conv backward failed\n");
  Array dx_dense(L * nb * nd);
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t d = 0; d < nd; ++d) dx_dense[(t * nb + b) * nd + d] = dx[xi(t, b, d)];
    }
  }
  char label[64];
  std::snprintf(label, sizeof label, "conv L=%ld taps=%ld silu=%d %s", static_cast<long>(L), static_cast<long>(K), silu,
                f32 ? "f32" : "f64");
  check(label, "out", Array(oT.begin(), oT.end()), out, tol);
  check(label, "dx", Array(dxT.begin(), dxT.end()), dx_dense, tol);
  check(label, "dweight", Array(dwT.begin(), dwT.end()), dw, tol);
  check(label, "dbias", Array(dbT.begin(), dbT.end()), db, tol);
}

}  // namespace

int main() {
  std::printf("build: %s\n", rsm_build_info());
  // 20 and 37 channels: full and partial vector blocks; 19 states: a full register group and a tail
  // twice: with the outputs' stores through the caches, as on these small shapes, and around them (x86), as on
  // large ones (20- and 37-channel rows: blocks both aligned for those stores and not)
  for (const int64_t around : {around_cache_bytes, int64_t(0)}) {
    around_cache_bytes = around;
    std::printf("outputs around the caches from %ld bytes\n", static_cast<long>(around));
    check_scan("16 states", ScanCase{45, 3, 20, 16, 16, true, true, true}, 2e-5, 1e-11);
    check_scan("19 states, chunk 5", ScanCase{37, 2, 37, 19, 5, true, true, false}, 2e-5, 1e-11);
    check_scan("no softplus, no z", ScanCase{30, 2, 20, 4, 7, false, false, true}, 2e-5, 1e-11);
    check_scan("one sequence", ScanCase{50, 1, 70, 16, 16, true, true, true}, 2e-5, 1e-11);
    // delta projected in the kernel: 37 positions (tiles of 32, rows of 8 and a tail), 70 channels (one
    // sequence's blocks split into ranges, a partial block)
    check_scan("delta projected", ScanCase{37, 3, 20, 16, 16, true, true, true, 6}, 2e-5, 1e-11);
    check_scan("delta projected, one sequence", ScanCase{37, 1, 70, 16, 8, true, true, false, 5}, 2e-5, 1e-11);
    // rank 12, rsmamba_base's: the gradients' ranks in a group of 8 and one of 4
    check_scan("delta projected, rank 12", ScanCase{21, 2, 20, 16, 8, true, true, true, 12}, 2e-5, 1e-11);
  }
  check_math();
  for (bool silu : {true, false}) {
    check_conv_precision<float>(37, 3, 20, 4, silu, 2e-5);
    check_conv_precision<double>(37, 3, 20, 4, silu, 1e-12);
  }
  check_conv_precision<float>(2, 2, 6, 4, true, 2e-5);  // fewer positions than taps
  // counts other than Mamba's 4 run the conv's loops built for a count read at run time (`with_taps`)
  check_conv_precision<double>(37, 3, 20, 3, true, 1e-12);
  check_conv_precision<double>(37, 3, 20, 8, true, 1e-12);  // kMaxTaps
  std::printf("%s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
