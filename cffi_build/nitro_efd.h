/*
 * nitro_efd.h: eventfds the frontend shares, without hanging on them
 * (internal, not ABI).
 *
 * The kick and call eventfds come from the frontend over SCM_RIGHTS, so the
 * frontend holds the same open file description. nitro sets O_NONBLOCK when
 * it takes them, but the frontend can clear it again (F_SETFL acts on the
 * shared description) and then park the counter where nitro's next access
 * sleeps: a write of 1 sleeps while the counter is 0xfffffffffffffffe, a
 * read sleeps while it is 0. Checking first (poll, F_GETFL) only narrows
 * the race, and on Linux 6.1 eventfd takes neither RWF_NOWAIT nor io_uring's
 * non-blocking path.
 *
 * So each such read or write is announced in a per-thread slot (two plain
 * stores around the system call, no clock read), and one watchdog thread
 * per process looks at the slots every NITRO_EFD_TICK_MS. A slot showing the
 * same access at two ticks in a row is stuck: the watchdog marks it and
 * sends the thread NITRO_EFD_SIGNAL, whose handler does nothing and is
 * installed without SA_RESTART, so the sleeping read or write returns EINTR.
 * The access then reports -1 and its caller breaks the frontend's queue
 * (NITRO_FAULT_EVENTFD). A thread is held up at most two ticks per stuck
 * fd, once: a broken queue's fds are not touched again.
 *
 * A stray signal (the access finished between the check and the kill) ends
 * some other system call with EINTR; the engine's and Python's calls retry.
 */
#ifndef NITRO_EFD_H
#define NITRO_EFD_H

#include <stdbool.h>

#include "nitro_vring.h"

#define NITRO_EFD_TICK_MS 10

/* Start the watchdog (once per process; later calls do nothing). Before
 * any thread may touch a frontend's eventfd. NITRO_OK or NITRO_ERR_SYS. */
NITRO_INTERNAL int nitro_efd_watch_start(void);
/* Add 1 to a frontend's eventfd. 1: done; 0: not done but nothing is
 * lost (the counter is saturated, so the fd is readable anyway, or the fd
 * is bad); -1: the write was stuck and cut short. */
NITRO_INTERNAL int nitro_efd_signal(int fd);
/* Consume a frontend's eventfd counter. 1, 0 (it was empty) or -1 as
 * nitro_efd_signal. */
NITRO_INTERNAL int nitro_efd_drain(int fd);
/* The watchdog's signal: threads that block signals must let this one in. */
NITRO_INTERNAL int nitro_efd_signo(void);

#endif
