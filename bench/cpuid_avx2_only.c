/* LD_PRELOAD shim: make this process see an x86 CPU with AVX2 but no AVX-512, VNNI or AMX, so that
 * ONNX Runtime's MLAS picks the kernels such a CPU runs (u8 x s8 through VPMADDUBSW).
 *
 * Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, CPU flag `cpuid_fault`) turns every CPUID
 * instruction into SIGSEGV; the handler runs the real CPUID, clears the feature bits of AVX-512,
 * AVX-VNNI and AMX, and steps over the instruction. XGETBV is not trapped: the OS still enables the
 * AVX-512 registers, but libraries ask CPUID first. Build: gcc -O2 -shared -fPIC -o X.so this.c */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}

static void on_segv(int sig, siginfo_t *info, void *ctx_) {
    ucontext_t *ctx = ctx_;
    greg_t *g = ctx->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)g[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) {  /* a real crash: die as one would have */
        signal(SIGSEGV, SIG_DFL);
        raise(SIGSEGV);
        return;
    }
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX], r[4];
    real_cpuid(leaf, sub, r);
    if (leaf == 7 && sub == 0) {
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));  /* VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));  /* 4VNNIW.. AMX */
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 23));  /* AVX-VNNI, AVX512_BF16, AVX-IFMA */
        r[3] &= ~((1u << 4) | (1u << 5) | (1u << 10));  /* AVX-VNNI-INT8, AVX-NE-CONVERT, AVX-VNNI-INT16 */
    }
    g[REG_RAX] = r[0]; g[REG_RBX] = r[1]; g[REG_RCX] = r[2]; g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
}

__attribute__((constructor)) static void mask_cpuid(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        perror("cpuid_avx2_only: ARCH_SET_CPUID (needs the cpuid_fault CPU flag)");
        exit(3);
    }
}
