// The theory engine's two elementwise passes over Z = X W, fused (steps.py: pool_patches, patch_grad).
//
// Z [R, N, P, K] fp32 or bf16 (raw uint16 bits), any strides for R, N, P and stride 1 along K.
//   mrplab_pool: h_all[r, n, :] = sum_p act(Z[r, n, p, :]) and, with keep [R, N, P] (1 = visible),
//                h_vis[r, n, :] = the same sum over the visible patches; fp32 [R, N, K] contiguous.
//   mrplab_grad: dZ[r, n, p, :] = act'(Z[r, n, p, :]) * dh[r, n, :] on visible patches, 0 on the others,
//                in Z's dtype (bf16 rounded to nearest even, as torch does) at dZ's own strides; or, with rows
//                [R, N, P] (element offsets into dZ, -1 = masked), each visible patch's values at dZ + its
//                offset and nothing for the masked ones (a compacted dZ of the visible patches only).
//   mrplab_compact16: the columns of A[r] [d, M] (16-bit elements, rows M apart, runs sA apart; sA = 0: one A
//                for all runs) where keep[r, :] is 1, packed in order: out[i, starts[r] + j] = A[r][i, m_j] for
//                run r's j-th kept column m_j; out's rows ld apart, with one spare column after the last run's.
//   mrplab_sl:   the supervised step on Z in one pass per (r, n) row (steps.sl_patch_step): h = the row's pooled
//                act(Z), logits_i = sum of class i's m kernels (K = k m), softmax cross-entropy against the label,
//                dZ = act'(Z) * dh with dh_j = dloss/dlogit_(j / m) / N, at dZ's own strides; writes each row's
//                loss (-log softmax at the label) and whether its first largest logit is the label.
//                y [Ry, N] int64 labels, Ry = 1 (shared) or R; the row is read from memory once.
//   mrplab_diag_loss: the teacher-target loss of a diagonal decoder and its gradients (steps.diag_decoder_loss):
//                pred = h * D, diff = pred - t, scale_k = max(mean_n t^2, 1e-30)^-power (1 for power 0),
//                loss[r] = sum_k scale_k mean_n diff^2, dh = g * D and dD[r, k] = sum_n g * h with
//                g = 2 scale_k diff / N; h, t, dh [R, N, K], D, dD [R, K], fp32 contiguous. The sums over
//                samples run in sample order in double, one (run, block of kernels) per task.
//   mrplab_noise_max: the noise-memorisation probe's pass (probes.noise_max): row_max[r, n] = max over p and k of
//                Z[r, n, p, k] - sum_f coef[r, n, p, f] Cf[r, f, k] (the sum in feature order; NaN propagates);
//                coef fp32 [Rc, N, P, F] contiguous (Rc = 1: shared by the runs, or R), Cf fp32 [R, F, K] contiguous.
// act(z) = max(z - thr, 0) + (thr / q) u^q and act'(z) = u^(q - 1), u = clamp(z, 0, thr) / thr: net.py's
// smoothed ReLU. All arithmetic in fp32; the sum over patches runs in patch order. Work is split over
// the (r, n) rows (pool, grad and sl: over the samples n, all runs of one inside a task, where the runs lie
// inside the patches, as in shared data's [N, P, R, K]) with the OpenMP runtime torch itself uses (one thread
// in a build without OpenMP).
// Return 0, or 1 for a q the kernels lack (the caller then computes the same thing eagerly).
// Built once per machine by native.py.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) { uint32_t u = uint32_t(*p) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) {  // round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16)
  uint32_t u; std::memcpy(&u, &v, 4);
  *p = v != v ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <int Q> inline float ipow(float u) { float r = u; for (int i = 1; i < Q; ++i) r *= u; return r; }

// u = clamp(x, 0, thr) / thr and max(x - thr, 0), written so that they compile to one min / max instruction each
// (a NaN stays NaN in u, as in torch.clamp); nested selects compiled to mask arithmetic ~20 % slower.
inline float unit(float x, float thr, float inv) { const float m = thr < x ? thr : x; return (0.0f > m ? 0.0f : m) * inv; }
inline float ramp(float x, float thr) { const float l = x - thr; return l > 0.0f ? l : 0.0f; }

// A task is one (r, n) row, or with shared data's [N, P, R, K] layout (runs inside patches) one sample n with
// all its runs, walked patch by patch over the runs: Z's memory order, a contiguous P x R x K block per task
// (row by row, each task reads P pieces of K values R * K apart, which the hardware prefetch misses). Each
// (r, n, k) sum still runs over the patches in order, so the numbers are the same either way.
struct Tasks {
  int64_t count, runs;  // tasks, and runs per task (R or 1)
  Tasks(int64_t R, int64_t N, int64_t sR, int64_t sN) : count(sR < sN ? N : R * N), runs(sR < sN ? R : 1) {}
  int64_t first_run(int64_t i, int64_t N) const { return runs > 1 ? 0 : i / N; }
  int64_t sample(int64_t i, int64_t N) const { return runs > 1 ? i : i % N; }
  // f(r, p) for the task's runs from r0 and patches [0, P), patch by patch; one run: a loop of its own, which
  // the compiler keeps tight (the general loop with runs = 1 measured 10-20 % slower)
  template <typename F> void walk(int64_t P, int64_t r0, F&& f) const {
    if (runs == 1) {
      for (int64_t p = 0; p < P; ++p) f(r0, p);
    } else {
      for (int64_t p = 0; p < P; ++p)
        for (int64_t r = r0; r < r0 + runs; ++r) f(r, p);
    }
  }
};

template <typename T, int Q>
void pool_impl(const T* Z, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN, int64_t sP,
               const uint8_t* keep, int q, float thr, float* hv, float* ha, int nthreads) {
  const float inv = 1.0f / thr, c = thr / float(q);
  const Tasks tasks(R, N, sR, sN);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < tasks.count; ++i) {
    const int64_t r0 = tasks.first_run(i, N), n = tasks.sample(i, N);
    for (int64_t r = r0; r < r0 + tasks.runs; ++r) {
      const int64_t rn = r * N + n;
      for (int64_t k = 0; k < K; ++k) ha[rn * K + k] = 0.0f;
      if (keep) for (int64_t k = 0; k < K; ++k) hv[rn * K + k] = 0.0f;
    }
    auto patch = [&](int64_t r, int64_t p) {
      const int64_t rn = r * N + n;
      const T* z = Z + r * sR + n * sN + p * sP;
      float* a_all = ha + rn * K;
      if (keep && keep[rn * P + p]) {
        float* a_vis = hv + rn * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          const float x = load(z + k);
          const float a = ramp(x, thr) + c * ipow<Q>(unit(x, thr, inv));
          a_all[k] += a;
          a_vis[k] += a;
        }
      } else {
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          const float x = load(z + k);
          a_all[k] += ramp(x, thr) + c * ipow<Q>(unit(x, thr, inv));
        }
      }
    };
    tasks.walk(P, r0, patch);
  }
}

template <typename T, int Q>
void grad_impl(const T* Z, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN, int64_t sP,
               const uint8_t* keep, const float* dh, float thr, T* dZ, int64_t oR, int64_t oN, int64_t oP,
               const int64_t* rows, int nthreads) {
  const float inv = 1.0f / thr;
  const Tasks tasks(R, N, sR, sN);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < tasks.count; ++i) {
    const int64_t r0 = tasks.first_run(i, N), n = tasks.sample(i, N);
    auto patch = [&](int64_t r, int64_t p) {
      const int64_t rn = r * N + n;
      const T* z = Z + r * sR + n * sN + p * sP;
      T* out;
      if (rows) {
        if (rows[rn * P + p] < 0) return;
        out = dZ + rows[rn * P + p];
      } else {
        out = dZ + r * oR + n * oN + p * oP;
        if (keep && !keep[rn * P + p]) {
          std::memset(out, 0, K * sizeof(T));
          return;
        }
      }
      const float* g = dh + rn * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        store(out + k, ipow<Q - 1>(unit(load(z + k), thr, inv)) * g[k]);
      }
    };
    tasks.walk(P, r0, patch);
  }
}

template <typename T>
int pool_q(const T* Z, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN, int64_t sP,
           const uint8_t* keep, int q, float thr, float* hv, float* ha, int nt) {
  switch (q) {
    case 2: pool_impl<T, 2>(Z, R, N, P, K, sR, sN, sP, keep, q, thr, hv, ha, nt); return 0;
    case 3: pool_impl<T, 3>(Z, R, N, P, K, sR, sN, sP, keep, q, thr, hv, ha, nt); return 0;
    case 4: pool_impl<T, 4>(Z, R, N, P, K, sR, sN, sP, keep, q, thr, hv, ha, nt); return 0;
    case 5: pool_impl<T, 5>(Z, R, N, P, K, sR, sN, sP, keep, q, thr, hv, ha, nt); return 0;
    case 6: pool_impl<T, 6>(Z, R, N, P, K, sR, sN, sP, keep, q, thr, hv, ha, nt); return 0;
    default: return 1;
  }
}

template <typename T>
int grad_q(const T* Z, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN, int64_t sP,
           const uint8_t* keep, const float* dh, int q, float thr, T* dZ, int64_t oR, int64_t oN, int64_t oP,
           const int64_t* rows, int nt) {
  switch (q) {
    case 2: grad_impl<T, 2>(Z, R, N, P, K, sR, sN, sP, keep, dh, thr, dZ, oR, oN, oP, rows, nt); return 0;
    case 3: grad_impl<T, 3>(Z, R, N, P, K, sR, sN, sP, keep, dh, thr, dZ, oR, oN, oP, rows, nt); return 0;
    case 4: grad_impl<T, 4>(Z, R, N, P, K, sR, sN, sP, keep, dh, thr, dZ, oR, oN, oP, rows, nt); return 0;
    case 5: grad_impl<T, 5>(Z, R, N, P, K, sR, sN, sP, keep, dh, thr, dZ, oR, oN, oP, rows, nt); return 0;
    case 6: grad_impl<T, 6>(Z, R, N, P, K, sR, sN, sP, keep, dh, thr, dZ, oR, oN, oP, rows, nt); return 0;
    default: return 1;
  }
}

template <typename T, int Q>
void sl_impl(const T* Z, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN, int64_t sP,
             const int64_t* y, int64_t sy, int64_t k, float thr_, T* dZ, int64_t oR, int64_t oN, int64_t oP,
             float* row_loss, uint8_t* correct, int nthreads) {
  const Tasks tasks(R, N, sR, sN);
  const int64_t m = K / k;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<float> buf(tasks.runs * 2 * K + k);  // per run of a task: h [K] and dh [K]; one logit row
    float* logit = buf.data() + tasks.runs * 2 * K;
    const float thr = thr_, inv = 1.0f / thr, c = thr / float(Q);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tasks.count; ++i) {
      const int64_t r0 = tasks.first_run(i, N), n = tasks.sample(i, N);
      for (int64_t j = 0; j < tasks.runs * K; ++j) buf[j] = 0.0f;
      tasks.walk(P, r0, [&](int64_t r, int64_t p) {
        const T* zp = Z + r * sR + n * sN + p * sP;
        float* h = buf.data() + (r - r0) * K;
#pragma omp simd
        for (int64_t j = 0; j < K; ++j) {
          const float x = load(zp + j);
          h[j] += ramp(x, thr) + c * ipow<Q>(unit(x, thr, inv));
        }
      });
      for (int64_t r = r0; r < r0 + tasks.runs; ++r) {
        const int64_t rn = r * N + n;
        const float* h = buf.data() + (r - r0) * K;
        float* dh = buf.data() + tasks.runs * K + (r - r0) * K;
        int64_t first = 0;
        for (int64_t a = 0; a < k; ++a) {
          float v = 0.0f;
          for (int64_t j = a * m; j < (a + 1) * m; ++j) v += h[j];
          logit[a] = v;
          if (v > logit[first]) first = a;
        }
        const float top = logit[first];
        const int64_t label = y[r * sy + n];
        const float margin = logit[label] - top;
        float s = 0.0f;
        for (int64_t a = 0; a < k; ++a) s += (logit[a] = std::exp(logit[a] - top));  // logit now holds exp(l - top)
        row_loss[rn] = std::log(s) - margin;
        correct[rn] = first == label;
        for (int64_t a = 0; a < k; ++a) {
          const float d = (logit[a] / s - (a == label ? 1.0f : 0.0f)) / float(N);
          for (int64_t j = a * m; j < (a + 1) * m; ++j) dh[j] = d;
        }
      }
      tasks.walk(P, r0, [&](int64_t r, int64_t p) {
        const T* zp = Z + r * sR + n * sN + p * sP;
        T* op = dZ + r * oR + n * oN + p * oP;
        const float* dh = buf.data() + tasks.runs * K + (r - r0) * K;
#pragma omp simd
        for (int64_t j = 0; j < K; ++j) store(op + j, ipow<Q - 1>(unit(load(zp + j), thr, inv)) * dh[j]);
      });
    }
  }
}

template <typename T>
int sl_q(const T* Z, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN, int64_t sP,
         const int64_t* y, int64_t sy, int64_t k, int q, float thr, T* dZ, int64_t oR, int64_t oN, int64_t oP,
         float* row_loss, uint8_t* correct, int nt) {
  switch (q) {
    case 2: sl_impl<T, 2>(Z, R, N, P, K, sR, sN, sP, y, sy, k, thr, dZ, oR, oN, oP, row_loss, correct, nt); return 0;
    case 3: sl_impl<T, 3>(Z, R, N, P, K, sR, sN, sP, y, sy, k, thr, dZ, oR, oN, oP, row_loss, correct, nt); return 0;
    case 4: sl_impl<T, 4>(Z, R, N, P, K, sR, sN, sP, y, sy, k, thr, dZ, oR, oN, oP, row_loss, correct, nt); return 0;
    case 5: sl_impl<T, 5>(Z, R, N, P, K, sR, sN, sP, y, sy, k, thr, dZ, oR, oN, oP, row_loss, correct, nt); return 0;
    case 6: sl_impl<T, 6>(Z, R, N, P, K, sR, sN, sP, y, sy, k, thr, dZ, oR, oN, oP, row_loss, correct, nt); return 0;
    default: return 1;
  }
}

// The max of z - signal over patches [0, np) and kernels [0, nk) of one block of at most PB patches x 16 kernels:
// the signal's sums over features in feature order. A full block keeps its PB x 16 sums in registers (GNU vector
// extension, split by the compiler to the machine's vector width); the sums and their order are the same either way.
constexpr int64_t PB = 8;
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline v16 load16(const uint16_t* p) {
  v16h h;
  std::memcpy(&h, p, sizeof h);
  return (v16)(__builtin_convertvector(h, v16u) << 16);
}

template <typename T>
inline void noise_block(const T* z, int64_t sP, const float* c, const float* cf, int64_t F, int64_t K, int64_t np,
                        int64_t nk, float& m, int& bad) {
  if (np == PB && nk == 16) {
    v16 a[PB] = {};
    for (int64_t f = 0; f < F; ++f) {
      const v16 row = load16(cf + f * K);
      for (int64_t q = 0; q < PB; ++q) a[q] += c[q * F + f] * row;
    }
    v16 mv = v16{} - INFINITY;
    v16i nan = {};
    for (int64_t q = 0; q < PB; ++q) {
      const v16 v = load16(z + q * sP) - a[q];
      const v16i up = v > mv;  // lanes where v is larger (false for NaN, which sets nan instead)
      mv = (v16)(((v16i)v & up) | ((v16i)mv & ~up));
      nan |= v != v;
    }
    for (int j = 0; j < 16; ++j) {
      m = mv[j] > m ? mv[j] : m;
      bad |= nan[j] != 0;
    }
    return;
  }
  float acc[PB][16] = {};
  for (int64_t f = 0; f < F; ++f)
    for (int64_t q = 0; q < np; ++q)
      for (int64_t j = 0; j < nk; ++j) acc[q][j] += c[q * F + f] * cf[f * K + j];
  for (int64_t q = 0; q < np; ++q)
    for (int64_t j = 0; j < nk; ++j) {
      const float v = load(z + q * sP + j) - acc[q][j];
      m = v > m ? v : m;
      bad |= v != v;
    }
}

template <typename T>
void noise_max_impl(const T* Z, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN, int64_t sP,
                    const float* coef, int64_t Rc, int64_t F, const float* Cf, float* row_max, int nthreads) {
  const bool r_inner = sR < sN;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < R * N; ++i) {
    const int64_t r = r_inner ? i % R : i / N, n = r_inner ? i / R : i % N;
    const float* cf = Cf + r * F * K;
    const float* c = coef + ((Rc == 1 ? 0 : r) * N + n) * P * F;
    const T* z = Z + r * sR + n * sN;
    float m = -INFINITY;
    int bad = 0;
    for (int64_t p0 = 0; p0 < P; p0 += PB)
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int64_t np = P - p0 < PB ? P - p0 : PB, nk = K - k0 < 16 ? K - k0 : 16;
        noise_block(z + p0 * sP + k0, sP, c + p0 * F, cf + k0, F, K, np, nk, m, bad);
      }
    row_max[r * N + n] = bad ? NAN : m;
  }
}

constexpr int64_t KB = 16;  // kernels per task of mrplab_diag_loss

// One run's kernels [k0, k0 + NK) (NK = KB, or nk <= KB for the last block when NK is 0).
template <int64_t NK>
void diag_loss_block(const float* hr, const float* tr, const float* d_in, int64_t N, int64_t K, float power, bool fit,
                     float* col_loss, float* dD, float* dh, float* d, int64_t nk) {
  const int64_t m = NK > 0 ? NK : nk;
  double ms[KB] = {}, num[KB] = {}, den[KB] = {}, sq[KB] = {}, gh[KB] = {};
  for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const float tt = tr[n * K + j], hv = hr[n * K + j];
      ms[j] += double(tt) * tt;
      if (fit) {
        num[j] += double(hv) * tt;
        den[j] += double(hv) * hv;
      }
    }
  }
  float g2[KB], scale[KB];
  for (int64_t j = 0; j < m; ++j) {
    d[j] = !fit ? d_in[j] : den[j] > 0.0 ? float(num[j] / den[j]) : 0.0f;  // objectives.fit_decoder("diag")
    const float mean_sq = float(ms[j] / double(N));
    scale[j] = power == 0.0f ? 1.0f : std::pow(mean_sq > 1e-30f ? mean_sq : 1e-30f, -power);
    g2[j] = 2.0f * scale[j] / float(N);
  }
  for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const float hv = hr[n * K + j], diff = hv * d[j] - tr[n * K + j], g = diff * g2[j];
      sq[j] += double(diff) * diff;
      dh[n * K + j] = g * d[j];
      gh[j] += double(g) * hv;
    }
  }
  for (int64_t j = 0; j < m; ++j) {
    col_loss[j] = float(double(scale[j]) * sq[j] / double(N));
    dD[j] = float(gh[j]);
  }
}

void diag_loss_impl(const float* h, const float* t, const float* D, int64_t R, int64_t N, int64_t K, float power,
                    int fit, float* col_loss, float* dD, float* dh, float* D_used, int nthreads) {
  const int64_t blocks = (K + KB - 1) / KB;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t task = 0; task < R * blocks; ++task) {
    const int64_t r = task / blocks, k0 = (task % blocks) * KB, nk = K - k0 < KB ? K - k0 : KB;
    const int64_t at = r * N * K + k0, rk = r * K + k0;
    if (nk == KB)
      diag_loss_block<KB>(h + at, t + at, D + rk, N, K, power, fit, col_loss + rk, dD + rk, dh + at, D_used + rk, nk);
    else
      diag_loss_block<0>(h + at, t + at, D + rk, N, K, power, fit, col_loss + rk, dD + rk, dh + at, D_used + rk, nk);
  }
}


// One row of one run: x's kept columns packed from o on. The portable loop stores every element and advances by
// its keep byte (no branch on a random mask); the store after the last kept column lands on o + count, which the
// next run's row overwrites, or the spare column after the last run.
inline void pack_row(const uint16_t* x, const uint8_t* keep, int64_t M, uint16_t* o) {
  int64_t j = 0;
  for (int64_t m = 0; m < M; ++m) {
    o[j] = x[m];
    j += keep[m] != 0;
  }
}

#if defined(__AVX512F__)
// The same with AVX-512 VBMI2: 32 columns per compress (in registers, then a masked store of the kept ones;
// the compress with a memory destination is slow on some AMD CPUs).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2")))
void pack_row_vbmi2(const uint16_t* x, const uint8_t* keep, int64_t M, uint16_t* o) {
  int64_t j = 0, m = 0;
  for (; m + 32 <= M; m += 32) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keep + m));
    const __mmask32 sel = _mm256_test_epi8_mask(k, k);
    const __m512i v = _mm512_maskz_compress_epi16(sel, _mm512_loadu_si512(x + m));
    const int cnt = __builtin_popcount(static_cast<unsigned>(sel));
    _mm512_mask_storeu_epi16(o + j, cnt == 32 ? __mmask32(~0u) : __mmask32((1u << cnt) - 1u), v);
    j += cnt;
  }
  pack_row(x + m, keep + m, M - m, o + j);
}

bool has_vbmi2() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2");
  return yes;
}
#else  // built without AVX-512 (torch's capability below it, or another architecture)
bool has_vbmi2() { return false; }
void pack_row_vbmi2(const uint16_t* x, const uint8_t* keep, int64_t M, uint16_t* o) { pack_row(x, keep, M, o); }
#endif

// A task is one row i of all runs, the runs in order (so the portable loop's extra store is overwritten in time).
int compact16(const uint16_t* A, int64_t sA, int64_t c, int64_t d, int64_t M, const uint8_t* keep,
              const int64_t* starts, uint16_t* out, int64_t ld, bool simd, int nthreads) {
  const bool fast = simd && has_vbmi2();
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t r = 0; r < c; ++r) {
      const uint16_t* x = A + r * sA + i * M;
      uint16_t* o = out + i * ld + starts[r];
      if (fast)
        pack_row_vbmi2(x, keep + r * M, M, o);
      else
        pack_row(x, keep + r * M, M, o);
    }
  }
  return fast ? 1 : 0;
}

}  // namespace

extern "C" {

int mrplab_pool(const void* Z, int bf16, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN,
                int64_t sP, const uint8_t* keep, int q, float thr, float* hv, float* ha, int nthreads) {
  return bf16 ? pool_q(static_cast<const uint16_t*>(Z), R, N, P, K, sR, sN, sP, keep, q, thr, hv, ha, nthreads)
              : pool_q(static_cast<const float*>(Z), R, N, P, K, sR, sN, sP, keep, q, thr, hv, ha, nthreads);
}

int mrplab_grad(const void* Z, int bf16, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN,
                int64_t sP, const uint8_t* keep, const float* dh, int q, float thr, void* dZ, int64_t oR,
                int64_t oN, int64_t oP, const int64_t* rows, int nthreads) {
  return bf16 ? grad_q(static_cast<const uint16_t*>(Z), R, N, P, K, sR, sN, sP, keep, dh, q, thr,
                       static_cast<uint16_t*>(dZ), oR, oN, oP, rows, nthreads)
              : grad_q(static_cast<const float*>(Z), R, N, P, K, sR, sN, sP, keep, dh, q, thr,
                       static_cast<float*>(dZ), oR, oN, oP, rows, nthreads);
}

// simd = 0: the portable loop even where AVX-512 VBMI2 is there (tests compare the two). Returns 1 where the
// packing ran with VBMI2's compress, 0 with the portable loop (the same result).
int mrplab_compact16(const uint16_t* A, int64_t sA, int64_t c, int64_t d, int64_t M, const uint8_t* keep,
                     const int64_t* starts, uint16_t* out, int64_t ld, int simd, int nthreads) {
  return compact16(A, sA, c, d, M, keep, starts, out, ld, simd != 0, nthreads);
}

// col_loss [R, K]: each kernel's term of the loss (the caller sums them per run).
void mrplab_diag_loss(const float* h, const float* t, const float* D, int64_t R, int64_t N, int64_t K, float power,
                      int fit, float* col_loss, float* dD, float* dh, float* D_used, int nthreads) {
  diag_loss_impl(h, t, D, R, N, K, power, fit, col_loss, dD, dh, D_used, nthreads);
}

void mrplab_noise_max(const void* Z, int bf16, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN,
                      int64_t sP, const float* coef, int64_t Rc, int64_t F, const float* Cf, float* row_max, int nthreads) {
  if (bf16)
    noise_max_impl(static_cast<const uint16_t*>(Z), R, N, P, K, sR, sN, sP, coef, Rc, F, Cf, row_max, nthreads);
  else
    noise_max_impl(static_cast<const float*>(Z), R, N, P, K, sR, sN, sP, coef, Rc, F, Cf, row_max, nthreads);
}

int mrplab_sl(const void* Z, int bf16, int64_t R, int64_t N, int64_t P, int64_t K, int64_t sR, int64_t sN, int64_t sP,
              const int64_t* y, int64_t sy, int64_t k, int q, float thr, void* dZ, int64_t oR, int64_t oN, int64_t oP,
              float* row_loss, uint8_t* correct, int nthreads) {
  return bf16 ? sl_q(static_cast<const uint16_t*>(Z), R, N, P, K, sR, sN, sP, y, sy, k, q, thr,
                     static_cast<uint16_t*>(dZ), oR, oN, oP, row_loss, correct, nthreads)
              : sl_q(static_cast<const float*>(Z), R, N, P, K, sR, sN, sP, y, sy, k, q, thr,
                     static_cast<float*>(dZ), oR, oN, oP, row_loss, correct, nthreads);
}

}
