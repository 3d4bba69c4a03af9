// Standalone timing of the native CPU decode attention (`attention_decode` in
// nqkv_core/csrc/cpu_kernels.cpp) at SmolLM2-135M's shape: 3 KV heads x 3 query rows, head_dim 64,
// 4-bit codes in blocks of 64 with fp16 scales, a 36-token full-precision tail, with or without the
// RoPE-centred key bias (read from the table's tiles of sixteen positions, as a decode step does).
// No Python in the loop, so kernel changes can be timed and profiled on their own:
//
//   g++ -O3 -march=native -fopenmp -std=c++17 -fno-math-errno -I. \
//       -DKERNEL='"nqkv_core/csrc/cpu_kernels.cpp"' benchmarks/bench_kernel_cpu.cpp -o /tmp/bench_kernel
//   /tmp/bench_kernel [tokens=4096] [bias=1] [calls=2000]
//   perf record /tmp/bench_kernel 4096 1 2000 && perf report --no-children --sort symbol
//
// To time another revision, point KERNEL at its source (`git show REV:nqkv_core/csrc/cpu_kernels.cpp`).
// Prints the best of five runs of `calls` calls, in microseconds per call, on one thread.
#include KERNEL
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

int main(int argc, char** argv) {
  const int64_t B = 1, H = 3, G = 3, D = 64, TT = 36;
  const int64_t T = argc > 1 ? std::atol(argv[1]) : 4096;
  const int bias = argc > 2 ? std::atoi(argv[2]) : 1;
  const int calls = argc > 3 ? std::atoi(argv[3]) : 2000;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(0.5f, 4.f);
  std::vector<uint8_t> k_codes(H * T * D / 2), v_codes(H * T * D / 2);
  for (auto& c : k_codes) c = rng();
  for (auto& c : v_codes) c = rng();
  std::vector<uint16_t> k_absmax(H * T), v_absmax(H * T);  // fp16 bits
  for (auto& a : k_absmax) a = half_bits_exact(round_up_half(uniform(rng)));
  for (auto& a : v_absmax) a = half_bits_exact(round_up_half(uniform(rng)));
  float codebook[16];
  for (int i = 0; i < 16; ++i) codebook[i] = -1.f + 2.f * i / 15;
  // codes (B, H, T, 32 bytes), absmax (B, H, T, 1)
  Packed k{k_codes.data(), H * T * D / 2, T * D / 2, D / 2, k_absmax.data(), H * T, T, 1, 1, codebook, 4, 64};
  Packed v = k;
  v.codes = v_codes.data();
  v.absmax = v_absmax.data();
  std::vector<float> q(H * G * D), k_tail(H * TT * D), v_tail(H * TT * D), w(H * G * D), out(H * G * D);
  for (auto* x : {&q, &k_tail, &v_tail, &w})
    for (auto& e : *x) e = normal(rng);
  // RoPE [cos | sin] table and its tiles of sixteen positions (P / 16, D, 16); body at positions 4..
  const int64_t P = (T + TT + 16 + 15) / 16 * 16;
  std::vector<float> table(P * D), tiles(P * D);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t d = 0; d < D; ++d) {
      const float angle = p * std::pow(1e5f, -float(d % (D / 2)) / (D / 2));
      table[p * D + d] = d < D / 2 ? std::cos(angle) : std::sin(angle);
      tiles[(p / 16) * D * 16 + d * 16 + p % 16] = table[p * D + d];
    }
  std::vector<int64_t> pos(T + TT);
  for (int64_t j = 0; j < T; ++j) pos[j] = 4 + j;  // body, then sinks 0..3, then the window
  for (int64_t j = 0; j < TT; ++j) pos[T + j] = j < 4 ? j : T + j;
  double best = 1e30;
  for (int run = 0; run < 5; ++run) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int c = 0; c < calls; ++c)
      attention_decode(q.data(), k, v, T, k_tail.data(), v_tail.data(), TT, nullptr, 0, 0, 0,
                       bias ? w.data() : nullptr, bias ? table.data() : nullptr, bias ? pos.data() : nullptr, P, 0, B,
                       H, G, 1, D, D, out.data(), 1, bias ? tiles.data() : nullptr);
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / calls;
    best = us < best ? us : best;
  }
  double checksum = 0;
  for (float x : out) checksum += x;
  std::printf("tokens %ld, key bias %s: %.1f us per call (checksum %.6f)\n", (long)T, bias ? "on" : "off", best,
              checksum);
  return 0;
}
