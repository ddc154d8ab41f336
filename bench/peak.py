"""The machine's peak multiply-accumulate rate, measured with tight loops of independent instructions.

A small C program (compiled here with ``gcc -O3 -march=native``) runs, on 1 and on N threads at once:

- fp32: fused multiply-adds on the widest vector registers the CPU has (``vfmadd231ps`` on ymm, or zmm with
  AVX-512), 12 independent accumulators, enough to cover the FMA latency on every x86 core we know;
- int8: the integer dot sequence our int8 kernels use on this CPU: ``vpdpbusd`` with AVX-512 VNNI or
  AVX-VNNI, else ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd`` (u8 x s8 products summed into int32, 32 per ymm).

The loop bodies are inline assembly so that the compiler cannot hoist the loop-invariant multiplies out of
the loop. Each rate is the best of a few runs (a peak, not a typical rate). MACs count multiply-accumulates:
a fp32 FMA lane is one MAC, an int8 product summed into an accumulator is one MAC.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import cpu_model

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_vpopcntdq", "popcnt")

SOURCE = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__)
typedef __m512 vf;
typedef __m512i vi;
#define SET1_PS _mm512_set1_ps
#define SET1_I8 _mm512_set1_epi8
#define SET1_I16 _mm512_set1_epi16
#define WIDTH "zmm"
#define R "v"
#else
typedef __m256 vf;
typedef __m256i vi;
#define SET1_PS _mm256_set1_ps
#define SET1_I8 _mm256_set1_epi8
#define SET1_I16 _mm256_set1_epi16
#define WIDTH "ymm"
#define R "x"
#endif
#define LANES (sizeof(vf) / 4)
#define ACCUMULATORS 12
/* Accumulators and sources are asm operands: they stay in registers, and nothing is loop-invariant. */
#define ACC_OPERANDS(a) "+" R(a[0]), "+" R(a[1]), "+" R(a[2]), "+" R(a[3]), "+" R(a[4]), "+" R(a[5]), \
    "+" R(a[6]), "+" R(a[7]), "+" R(a[8]), "+" R(a[9]), "+" R(a[10]), "+" R(a[11])
#define EACH(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

static const char *FP32_KIND = "vfmadd231ps (" WIDTH ")";
static const long FP32_MACS = ACCUMULATORS * LANES;

static double fp32_loop(long iterations) {
    vf acc[ACCUMULATORS], a = SET1_PS(1e-3f), b = SET1_PS(1.0f);
    for (int i = 0; i < ACCUMULATORS; i++) acc[i] = SET1_PS(0.0f);
    for (long i = 0; i < iterations; i++) {
#define FMA(n) "vfmadd231ps %12, %13, %" #n "\n\t"
        __asm__ volatile(EACH(FMA) : ACC_OPERANDS(acc) : R(a), R(b));
    }
    float out[LANES];
    memcpy(out, &acc[0], sizeof(out));
    return out[0];
}

#if defined(__AVX512VNNI__)
static const char *INT8_KIND = "vpdpbusd (AVX-512 VNNI, zmm)";
#define DOT(n) "vpdpbusd %13, %14, %" #n "\n\t"
#elif defined(__AVXVNNI__)
static const char *INT8_KIND = "vpdpbusd (AVX-VNNI, ymm)";
#define DOT(n) "{vex} vpdpbusd %13, %14, %" #n "\n\t"
#else
static const char *INT8_KIND = "vpmaddubsw + vpmaddwd + vpaddd (" WIDTH ", no VNNI)";
/* u8 x s8 pairs summed to int16 in a temporary, widened to int32 pairs against int16 ones, accumulated. */
#define DOT(n) "vpmaddubsw %13, %14, %12\n\tvpmaddwd %15, %12, %12\n\tvpaddd %12, %" #n ", %" #n "\n\t"
#endif
static const long INT8_MACS = ACCUMULATORS * LANES * 4;

static double int8_loop(long iterations) {
    vi acc[ACCUMULATORS], a = SET1_I8(1), b = SET1_I8(1), ones = SET1_I16(1), scratch = SET1_I8(0);
    for (int i = 0; i < ACCUMULATORS; i++) acc[i] = SET1_I8(0);
    for (long i = 0; i < iterations; i++) {
        __asm__ volatile(EACH(DOT) : ACC_OPERANDS(acc), "+" R(scratch) : R(a), R(b), R(ones));
    }
    int out[LANES];
    memcpy(out, &acc[0], sizeof(out));
    return out[0];
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

typedef struct { int int8; long iterations; double sink; } Job;

static void *work(void *arg) {
    Job *job = (Job *)arg;
    job->sink = job->int8 ? int8_loop(job->iterations) : fp32_loop(job->iterations);
    return NULL;
}

/* usage: peak fp32|int8 THREADS ITERATIONS
   prints: instruction <TAB> MACs per iteration <TAB> MACs per second (all threads) */
int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int int8 = argv[1][0] == 'i', threads = atoi(argv[2]);
    long iterations = atol(argv[3]);
    Job *jobs = calloc(threads, sizeof(Job));
    pthread_t *ids = calloc(threads, sizeof(pthread_t));
    double start = now();
    for (int t = 0; t < threads; t++) {
        jobs[t].int8 = int8;
        jobs[t].iterations = iterations;
        pthread_create(&ids[t], NULL, work, &jobs[t]);
    }
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    double seconds = now() - start;
    long macs = int8 ? INT8_MACS : FP32_MACS;
    printf("%s\t%ld\t%.6e\t%g\n", int8 ? INT8_KIND : FP32_KIND, macs, (double)macs * iterations * threads / seconds,
           jobs[0].sink);
    return 0;
}
"""


def cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in FLAGS_OF_INTEREST if flag in present]
    return []


def compile_probe(folder: Path) -> Path:
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("measuring the machine's peak needs a C compiler: install it with `apt-get install gcc`")
    source, binary = folder / "peak.c", folder / "peak"
    source.write_text(SOURCE)
    subprocess.run([compiler, "-O3", "-march=native", "-pthread", str(source), "-o", str(binary)], check=True,
                   capture_output=True, text=True)
    return binary


def best_rate(binary: Path, kind: str, threads: int, seconds: float, runs: int) -> tuple[str, float]:
    """(instruction, best MAC/s over ``runs`` runs of about ``seconds`` each) on ``threads`` threads at once."""
    _, macs_per_iteration, rate = _run(binary, kind, threads, 10000)
    iterations = max(10000, int(rate / threads * seconds / macs_per_iteration))
    results = [_run(binary, kind, threads, iterations) for _ in range(runs)]
    return results[0][0], max(rate for _, _, rate in results)


def _run(binary: Path, kind: str, threads: int, iterations: int) -> tuple[str, int, float]:
    out = subprocess.run([str(binary), kind, str(threads), str(iterations)], check=True, capture_output=True,
                         text=True).stdout
    instruction, macs_per_iteration, rate, _ = out.strip().split("\t")
    return instruction, int(macs_per_iteration), float(rate)


def measure(threads: int, quick: bool) -> dict:
    """fp32 and int8 peaks on 1 thread and on ``threads`` threads, with the CPU it ran on."""
    seconds, runs = (0.05, 2) if quick else (0.3, 5)
    with tempfile.TemporaryDirectory(prefix="tvm-effconv-peak-") as folder:
        binary = compile_probe(Path(folder))
        result = {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "flags": cpu_flags(),
            "method": ("tight loops of 12 independent instructions per iteration (inline assembly, gcc -O3 "
                       "-march=native), best of %d runs of ~%g s each" % (runs, seconds)),
        }
        for kind in ("fp32", "int8"):
            counts = sorted({1, threads})
            rates = {}
            for count in counts:
                description, rate = best_rate(binary, kind, count, seconds, runs)
                rates[str(count)] = rate
            result[kind] = {"instruction": description, "macs_per_s": rates}
    return result
