/*
 * nitro_efd.c: the frontend-eventfd watchdog (nitro_efd.h).
 */
#define _GNU_SOURCE
#include "nitro_efd.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

/* Threads that touch frontend eventfds: the engine's workers, the uplink
 * readers, the trio thread (inject). Far fewer than this. */
#define SLOTS 256
#define NITRO_EFD_SIGNAL (SIGRTMIN + 4)

struct slot {
    _Atomic bool used;
    pthread_t thread;
    _Atomic uint64_t busy;   /* the access under way (its sequence), 0: none */
    _Atomic uint64_t cut;    /* the access the watchdog interrupted */
    uint64_t seq;            /* the owner's access counter */
    uint64_t seen;           /* watchdog: busy at its previous tick */
};

static struct slot slots[SLOTS];
static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_key_t key;
static int start_status = NITRO_OK;
static _Atomic bool started;
static _Thread_local struct slot *self;

static void on_signal(int sig)
{
    (void)sig;  /* its only job is the EINTR */
}

static void release(void *p)
{
    struct slot *s = p;
    atomic_store(&s->busy, 0);
    atomic_store(&s->used, false);
}

/* This thread's slot, claimed on first use and freed when it exits;
 * NULL when all are taken (the access then runs unwatched). */
static struct slot *slot_self(void)
{
    if (self != NULL || !atomic_load(&started))
        return self;
    for (int i = 0; i < SLOTS; i++) {
        bool free = false;
        if (atomic_compare_exchange_strong(&slots[i].used, &free, true)) {
            slots[i].thread = pthread_self();
            slots[i].seq = 0;
            atomic_store(&slots[i].cut, 0);
            self = &slots[i];
            pthread_setspecific(key, self);
            break;
        }
    }
    return self;
}

static void watch_tick(void)
{
    for (int i = 0; i < SLOTS; i++) {
        struct slot *s = &slots[i];
        uint64_t busy = atomic_load(&s->busy);
        if (!atomic_load(&s->used) || busy == 0 || busy != s->seen) {
            s->seen = busy;
            continue;
        }
        /* Again every tick while it stays stuck: the first signal may
         * have landed before the thread entered the system call. */
        atomic_store(&s->cut, busy);
        pthread_kill(s->thread, NITRO_EFD_SIGNAL);
    }
}

static void *watch_main(void *arg)
{
    (void)arg;
    struct timespec tick = {.tv_nsec = NITRO_EFD_TICK_MS * 1000000L};
    for (;;) {
        nanosleep(&tick, NULL);
        watch_tick();
    }
    return NULL;
}

static void start_once(void)
{
    struct sigaction sa = {.sa_handler = on_signal};  /* no SA_RESTART */
    sigemptyset(&sa.sa_mask);
    pthread_t t;
    sigset_t all, old;
    sigfillset(&all);
    /* The watchdog takes no asynchronous signals: Python's stay Python's. */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    if (pthread_key_create(&key, release) != 0 ||
        sigaction(NITRO_EFD_SIGNAL, &sa, NULL) != 0 ||
        pthread_create(&t, NULL, watch_main, NULL) != 0)
        start_status = NITRO_ERR_SYS;
    else {
        pthread_detach(t);
        atomic_store(&started, true);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

int nitro_efd_watch_start(void)
{
    pthread_once(&once, start_once);
    return start_status;
}

/* One read or write of 8 bytes on fd, watched. */
static int efd_access(int fd, bool write_it)
{
    struct slot *s = slot_self();
    uint64_t v = 1;
    for (;;) {
        uint64_t seq = 0;
        if (s != NULL) {
            seq = ++s->seq;
            atomic_store_explicit(&s->busy, seq, memory_order_relaxed);
        }
        ssize_t n = write_it ? write(fd, &v, sizeof(v)) : read(fd, &v, sizeof(v));
        int err = errno;
        if (s != NULL)
            atomic_store_explicit(&s->busy, 0, memory_order_relaxed);
        if (n == (ssize_t)sizeof(v))
            return 1;
        if (n >= 0 || err != EINTR)
            return 0;  /* EAGAIN: saturated (write) or empty (read): fine */
        if (s != NULL && atomic_load(&s->cut) == seq)
            return -1;
    }
}

int nitro_efd_signal(int fd)
{
    return efd_access(fd, true);
}

int nitro_efd_drain(int fd)
{
    return efd_access(fd, false);
}

int nitro_efd_signo(void)
{
    return NITRO_EFD_SIGNAL;
}
