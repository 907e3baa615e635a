/*
 * nitro_seccomp.c: the engine workers' seccomp filter (least privilege for
 * the threads that touch guest memory, as Firecracker confines each of its
 * threads). Internal; the engine applies it with NITRO_ENGINE_SECCOMP.
 *
 * A worker parses what guests and frontends put in shared memory; should a
 * bug in that code ever let a guest run code on the worker, the filter
 * leaves it the system calls below and nothing else: no open, no socket,
 * no exec, no ptrace, no mprotect to PROT_EXEC... The list is what a
 * worker does (nitro_engine.c, nitro_io.c, nitro_blk.c, nitro_nbd.c,
 * nitro_net_queue.c, nitro_switch.c, nitro_underlay.c, nitro_xts.c through
 * OpenSSL, glibc's malloc and thread exit); tests/unit/test_seccomp.py
 * serves blk (io_uring and sync), net and encrypted rings under the filter.
 *
 * A call outside the list traps (SECCOMP_RET_TRAP): the SIGSYS handler
 * writes one line naming the system call to stderr and aborts the whole
 * process. Killing only the thread (KILL_THREAD, or EPERM) would leave its
 * rings attached and never served again, silently; aborting lets systemd
 * restart nitro (Restart=on-failure), and inflight I/O tracking resubmits
 * the blk requests that were in flight.
 *
 * The filter is per thread (no TSYNC): the trio thread, which opens
 * images, sockets and TAPs, is not confined by it; systemd's
 * SystemCallFilter (systemd/nitro.service) confines the whole process.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <seccomp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "nitro_ring.h"

/* Every system call an engine worker makes. */
static const int worker_syscalls[] = {
    /* eventfds (kick, call, command, io_uring), the uplink TAP, the log
     * line of the SIGSYS handler */
    SCMP_SYS(read), SCMP_SYS(write), SCMP_SYS(readv), SCMP_SYS(writev),
    /* sockets: the underlay's (nitro_underlay.c: frames to and from
     * other hosts), and an NBD volume's (nitro_nbd.c: libnbd and GnuTLS
     * on the connected socket) */
    SCMP_SYS(sendmmsg), SCMP_SYS(recvmmsg), SCMP_SYS(sendmsg), SCMP_SYS(recvmsg),
    SCMP_SYS(sendto), SCMP_SYS(recvfrom),
    /* sleeping and commands */
    SCMP_SYS(epoll_wait), SCMP_SYS(epoll_pwait), SCMP_SYS(epoll_pwait2),
    SCMP_SYS(epoll_ctl),
    SCMP_SYS(futex), SCMP_SYS(clock_gettime), SCMP_SYS(clock_nanosleep),
    SCMP_SYS(nanosleep), SCMP_SYS(sched_yield),
    /* the adaptive poll window: was the worker preempted? (nitro_engine.c) */
    SCMP_SYS(getrusage),
    /* blk: io_uring, and the synchronous path (nitro_blk.c) */
    SCMP_SYS(io_uring_enter), SCMP_SYS(preadv), SCMP_SYS(pwritev),
    SCMP_SYS(preadv2), SCMP_SYS(pwritev2), SCMP_SYS(pread64),
    SCMP_SYS(pwrite64), SCMP_SYS(fdatasync), SCMP_SYS(fsync),
    SCMP_SYS(fallocate),
    /* an encrypted read from the image's mapping: is it all in memory? */
    SCMP_SYS(mincore),
    /* blk on an NBD export (nitro_nbd.c; its socket calls are above):
     * shutdown hangs up on a server that stopped answering; libnbd closes
     * its socket when the connection dies (the epoll set watches a
     * duplicate the control plane closes). A detach waits for answers in
     * the worker's own loop (draining, nitro_engine.c), not in poll(2). */
    SCMP_SYS(shutdown), SCMP_SYS(close),
    /* malloc/free (arenas grow with mmap/mprotect, shrink with madvise) */
    SCMP_SYS(mmap), SCMP_SYS(munmap), SCMP_SYS(mremap), SCMP_SYS(madvise),
    SCMP_SYS(mprotect), SCMP_SYS(brk), SCMP_SYS(getrandom),
    /* signals: return from a handler; abort() (SIGSYS handler) */
    SCMP_SYS(rt_sigreturn), SCMP_SYS(rt_sigprocmask), SCMP_SYS(rt_sigaction),
    SCMP_SYS(getpid), SCMP_SYS(gettid), SCMP_SYS(tgkill),
    /* thread exit; AddressSanitizer's thread teardown also disables its
     * alternate signal stack (tools/build-sanitized.sh: without it a
     * sanitized daemon aborted at every stop) */
    SCMP_SYS(exit), SCMP_SYS(exit_group), SCMP_SYS(sigaltstack),
};

/* si_code of a SIGSYS from a seccomp trap (linux/signal.h's SYS_SECCOMP,
 * which glibc's headers do not define). */
#define TRAP_SECCOMP 1

static pthread_once_t sigsys_once = PTHREAD_ONCE_INIT;

static size_t fmt_uint(char *out, unsigned long v)
{
    char tmp[24];
    size_t n = 0;
    do
        tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

/* Async-signal-safe: no stdio, no malloc; write(2) and abort() are in the
 * filter. */
static void on_sigsys(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (si->si_code == TRAP_SECCOMP) {
        static const char head[] =
            "nitro: FATAL: an engine worker made system call ";
        static const char tail[] =
            ", which its seccomp filter does not allow; aborting\n";
        char line[sizeof(head) + sizeof(tail) + 24];
        size_t n = sizeof(head) - 1;
        memcpy(line, head, n);
        n += fmt_uint(line + n, (unsigned long)si->si_syscall);
        memcpy(line + n, tail, sizeof(tail) - 1);
        n += sizeof(tail) - 1;
        ssize_t w = write(STDERR_FILENO, line, n);
        (void)w;
    }
    abort();
}

static void install_sigsys(void)
{
    struct sigaction sa = {.sa_sigaction = on_sigsys, .sa_flags = SA_SIGINFO};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSYS, &sa, NULL);
}

int nitro_seccomp_worker(void)
{
    pthread_once(&sigsys_once, install_sigsys);
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_TRAP);
    if (ctx == NULL) {
        errno = ENOMEM;
        return NITRO_ERR_SYS;
    }
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < sizeof(worker_syscalls) / sizeof(int); i++)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, worker_syscalls[i], 0);
    /* One socket option: TCP_CORK, which an NBD ring sets around a batch
     * of commands (nitro_nbd.c: ring_cork). */
    if (rc == 0)
        rc = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, SCMP_SYS(setsockopt), 2,
                              SCMP_A1(SCMP_CMP_EQ, IPPROTO_TCP),
                              SCMP_A2(SCMP_CMP_EQ, TCP_CORK));
    /* No TSYNC: this thread only. libseccomp sets NO_NEW_PRIVS first,
     * which is per thread too. */
    if (rc == 0)
        rc = seccomp_load(ctx);
    seccomp_release(ctx);
    if (rc < 0) {
        errno = -rc;
        return NITRO_ERR_SYS;
    }
    return NITRO_OK;
}
