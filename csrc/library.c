/* What attnlab.core.native asks a compiled library before it calls any kernel.
 *
 * attnlab_abi_version: the version of the kernels' calling convention (their names,
 * arguments and return codes). native.py refuses a library whose version differs from its
 * own ABI_VERSION (a stale build from an older checkout), so a kernel is never called with
 * arguments it does not take. Raise both together whenever a kernel's signature changes.
 *
 * attnlab_cpu_level: what the processor and the operating system run, asked through the
 * compiler's CPU model (__builtin_cpu_supports), for systems without /proc/cpuinfo. It is
 * compiled for plain x86-64 whatever the library's own flags, so that it runs (and tells)
 * on a processor that cannot run the rest of the library.
 */
#define ATTNLAB_ABI_VERSION 2

int attnlab_abi_version(void) { return ATTNLAB_ABI_VERSION; }

enum { CPU_OTHER = 0, CPU_X86_64_V3 = 3, CPU_X86_64_V4 = 4 };

/* CPU_X86_64_V3 where AVX2, FMA and BMI1/2 run (the avx2 variant; every such processor
 * has F16C, LZCNT and MOVBE, names that older compilers do not know here), CPU_X86_64_V4
 * where AVX-512 F, CD, DQ, BW and VL run too (the avx512 variant), else CPU_OTHER (also on
 * any other architecture). */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("arch=x86-64"))) int attnlab_cpu_level(void) {
    __builtin_cpu_init();
    const int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    if (!v3) return CPU_OTHER;
    const int v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl");
    return v4 ? CPU_X86_64_V4 : CPU_X86_64_V3;
}
#else
int attnlab_cpu_level(void) { return CPU_OTHER; }
#endif
