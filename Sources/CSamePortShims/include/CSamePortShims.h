// C shims for the Linux calls that Swift's Glibc module does not import.
//
// Every symbol is prefixed `sameport_`; each says why it exists. The target is compiled with
// _GNU_SOURCE (see Package.swift), which is what makes these declarations visible to C at all.
#ifndef SAMEPORT_SHIMS_H
#define SAMEPORT_SHIMS_H

#include <sys/socket.h>
#include <sys/types.h>

/// accept4(2): not visible from `import Glibc` (it is a GNU extension). Lets the relay accept a
/// client already non-blocking and close-on-exec in one call instead of three.
int sameport_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);

/// ioctl(SIOCOUTQ): the bytes a socket still holds unsent or unacknowledged, or -1. ioctl is
/// variadic, so Swift cannot call it. The idle timeout uses it to see a slow reader consuming
/// what the relay already handed to the kernel.
int sameport_unsent_bytes(int fd);

/// ioctl(SIOCINQ): the bytes a socket holds unread, or -1. The splice path uses it to tell the
/// end of a stream from a splice that stopped at urgent data.
int sameport_unread_bytes(int fd);

/// pipe2(2): not visible from `import Glibc`. The splice path's pipe, created non-blocking and
/// close-on-exec in one call (flags O_NONBLOCK|O_CLOEXEC).
int sameport_pipe2(int fds[2], int flags);

/// splice(2) with no offsets (both ends are a socket or a pipe): moves up to `len` bytes from
/// `fd_in` to `fd_out` without copying them through user space.
ssize_t sameport_splice(int fd_in, int fd_out, size_t len, unsigned int flags);

/// SPLICE_F_MOVE and SPLICE_F_NONBLOCK (GNU-only names from <fcntl.h>).
extern const unsigned int sameport_splice_move;
extern const unsigned int sameport_splice_nonblock;
extern const unsigned int sameport_splice_more;

/// fcntl(F_SETPIPE_SZ): asks for a pipe of at least `size` bytes; the size granted, or -1.
/// fcntl is variadic, so Swift cannot call it with an argument.
int sameport_set_pipe_size(int fd, int size);

/// fcntl(F_GETPIPE_SZ): the pipe's size in bytes, or -1.
int sameport_pipe_size(int fd);

/// fcntl(F_SETFL/F_GETFL): makes an inherited socket non-blocking (systemd passes blocking ones
/// unless NonBlocking=yes) and close-on-exec. 0, or -1 with errno.
int sameport_set_nonblocking_cloexec(int fd);

/// The capability sets (capget(2)/capset(2) through the raw syscalls, from <linux/capability.h>,
/// so that libcap is not needed). Bit `cap` of each 64-bit set.
struct sameport_capabilities {
    unsigned long long effective;
    unsigned long long permitted;
    unsigned long long inheritable;
};

/// The calling thread's capability sets; 0, or -1 with errno.
int sameport_capget(struct sameport_capabilities *caps);

/// Sets the calling thread's capability sets (capset is per thread: call it before other threads
/// exist, or accept that only this thread changes); 0, or -1 with errno.
int sameport_capset(const struct sameport_capabilities *caps);

/// prctl(PR_CAPBSET_READ/PR_CAPBSET_DROP/PR_CAP_AMBIENT_*): prctl is variadic, so Swift cannot
/// call it. Each returns what prctl returns (-1 with errno on failure).
int sameport_capbset_read(int cap);
int sameport_capbset_drop(int cap);
int sameport_cap_ambient_is_set(int cap);
int sameport_cap_ambient_lower(int cap);

/// Routes `count` signals to a pipe: their handler writes each signal's number, one byte, to
/// the pipe (write(2) is async-signal-safe), and the caller reads the returned end from a
/// Dispatch source. libdispatch's own signal sources are not enough on Linux: it installs their
/// handler only once its manager thread registers them, while dispatch_main() already waits in
/// sigsuspend() with every signal unblocked, so a signal in between meets SIG_IGN and is lost.
/// Bytes in a pipe wait for their reader. Returns the read end (non-blocking, close-on-exec), or
/// -1 with errno.
int sameport_signal_pipe(const int *signals, int count);

/// One epoll event, unpacked. glibc declares `struct epoll_event` packed on x86_64, which Swift
/// cannot lay out; the shard's loop reads events through these instead.
struct sameport_epoll_event {
    unsigned int events;
    unsigned long long data;
};

/// epoll_create1(2) with EPOLL_CLOEXEC.
int sameport_epoll_create(void);

/// EPOLL_CTL_ADD, EPOLL_CTL_MOD and EPOLL_CTL_DEL. Macros with the values of <sys/epoll.h>
/// (shims.c checks them against it when it compiles), so Swift folds them into its code instead
/// of loading a C constant at every use.
#define sameport_epoll_ctl_add 1
#define sameport_epoll_ctl_del 2
#define sameport_epoll_ctl_mod 3

/// epoll_ctl(2) with the registration id as the event's data (`op` is EPOLL_CTL_ADD/MOD/DEL).
int sameport_epoll_ctl(int epfd, int op, int fd, unsigned int events, unsigned long long data);

/// epoll_wait(2) into unpacked events. `timeout_ns` < 0 waits for ever, 0 does not wait; a positive
/// timeout is kept to the nanosecond with epoll_pwait2(2) (Linux 5.11), rounded up to a
/// millisecond by epoll_wait(2) where that is missing. The count, or -1 with errno.
int sameport_epoll_wait(int epfd, struct sameport_epoll_event *events, int max, long long timeout_ns);
/// Sets the calling thread's timer slack (prctl PR_SET_TIMERSLACK), in nanoseconds; 0 restores the
/// thread's default. Returns -1 with errno on failure.
int sameport_set_timer_slack(unsigned long nanoseconds);

/// The calling thread's timer slack in nanoseconds (prctl PR_GET_TIMERSLACK).
long sameport_timer_slack(void);

/// The epoll flags Glibc does not show to Swift (EPOLLRDHUP, EPOLLEXCLUSIVE, EPOLLET), and the
/// ones it shows as enum cases of another type. Macros with the values of <sys/epoll.h>, checked
/// against it in shims.c, for the same reason as the operations above.
#define sameport_epollin 0x001u
#define sameport_epollpri 0x002u
#define sameport_epollout 0x004u
#define sameport_epollerr 0x008u
#define sameport_epollhup 0x010u
#define sameport_epollrdhup 0x2000u
#define sameport_epollexclusive 0x10000000u
#define sameport_epollet 0x80000000u

/// CLOCK_MONOTONIC in nanoseconds: the clock of Dispatch's uptime (DispatchTime.now()
/// .uptimeNanoseconds on Linux) read without Dispatch's layers, for the deadlines and activity
/// stamps the shards take several times per connection.
unsigned long long sameport_monotonic_ns(void);

/// The calling thread's scratch buffer, at least `size` bytes (ScratchBuffer in Swift), or NULL
/// when memory ran out. Kept in a C thread-local so that finding it is a load, not a lazy Swift
/// global and a pthread key lookup per pump; the buffer is freed when the thread ends.
void *sameport_scratch(size_t size);

/// eventfd(2), non-blocking and close-on-exec: how another thread wakes a shard's loop.
int sameport_eventfd(void);

/// The CPUs this process may run on (sched_getaffinity(2) and CPU_COUNT, a macro), or 1.
int sameport_cpu_count(void);

/// SO_ORIGINAL_DST (<linux/netfilter_ipv4.h>, level SOL_IP) and IP6T_SO_ORIGINAL_DST
/// (<linux/netfilter_ipv6/ip6_tables.h>, level SOL_IPV6): the destination a client dialled before
/// a REDIRECT or DNAT rule sent it to the relay. Glibc's Swift module shows neither.
extern const int sameport_so_original_dst;
extern const int sameport_ip6t_so_original_dst;

/// CAP_CHOWN and CAP_SETPCAP, from <linux/capability.h>.
extern const int sameport_cap_chown;
extern const int sameport_cap_setpcap;

#endif
