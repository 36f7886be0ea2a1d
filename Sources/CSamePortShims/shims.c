#include "CSamePortShims.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <linux/capability.h>
#include <netinet/in.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv6/ip6_tables.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <unistd.h>

int sameport_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    return accept4(fd, addr, len, flags);
}

int sameport_unsent_bytes(int fd) {
    int count = 0;
    return ioctl(fd, SIOCOUTQ, &count) == 0 ? count : -1;
}

int sameport_unread_bytes(int fd) {
    int count = 0;
    return ioctl(fd, SIOCINQ, &count) == 0 ? count : -1;
}

int sameport_pipe2(int fds[2], int flags) {
    return pipe2(fds, flags);
}

ssize_t sameport_splice(int fd_in, int fd_out, size_t len, unsigned int flags) {
    return splice(fd_in, NULL, fd_out, NULL, len, flags);
}

const unsigned int sameport_splice_move = SPLICE_F_MOVE;
const unsigned int sameport_splice_nonblock = SPLICE_F_NONBLOCK;
const unsigned int sameport_splice_more = SPLICE_F_MORE;

int sameport_set_pipe_size(int fd, int size) {
    return fcntl(fd, F_SETPIPE_SZ, size);
}

int sameport_pipe_size(int fd) {
    return fcntl(fd, F_GETPIPE_SZ);
}

int sameport_set_nonblocking_cloexec(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return -1;
    int fdflags = fcntl(fd, F_GETFD);
    if (fdflags < 0 || fcntl(fd, F_SETFD, fdflags | FD_CLOEXEC) < 0) return -1;
    return 0;
}

int sameport_capget(struct sameport_capabilities *caps) {
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[2] = {{0}};
    if (syscall(SYS_capget, &header, data) != 0) return -1;
    caps->effective = ((unsigned long long)data[1].effective << 32) | data[0].effective;
    caps->permitted = ((unsigned long long)data[1].permitted << 32) | data[0].permitted;
    caps->inheritable = ((unsigned long long)data[1].inheritable << 32) | data[0].inheritable;
    return 0;
}

int sameport_capset(const struct sameport_capabilities *caps) {
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[2] = {
        { .effective = (unsigned)caps->effective, .permitted = (unsigned)caps->permitted,
          .inheritable = (unsigned)caps->inheritable },
        { .effective = (unsigned)(caps->effective >> 32), .permitted = (unsigned)(caps->permitted >> 32),
          .inheritable = (unsigned)(caps->inheritable >> 32) },
    };
    return (int)syscall(SYS_capset, &header, data);
}

int sameport_capbset_read(int cap) { return prctl(PR_CAPBSET_READ, cap, 0, 0, 0); }
int sameport_capbset_drop(int cap) { return prctl(PR_CAPBSET_DROP, cap, 0, 0, 0); }
int sameport_set_timer_slack(unsigned long nanoseconds) { return prctl(PR_SET_TIMERSLACK, nanoseconds, 0, 0, 0); }
long sameport_timer_slack(void) { return prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0); }
int sameport_cap_ambient_is_set(int cap) { return prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, cap, 0, 0); }
int sameport_cap_ambient_lower(int cap) { return prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_LOWER, cap, 0, 0); }

static int sameport_signal_write_end = -1;

static void sameport_signal_to_pipe(int signo) {
    int saved = errno;
    unsigned char number = (unsigned char)signo;
    // A full pipe already holds this signal many times over: nothing is lost by dropping it.
    ssize_t written = write(sameport_signal_write_end, &number, 1);
    (void)written;
    errno = saved;
}

int sameport_signal_pipe(const int *signals, int count) {
    int ends[2];
    if (pipe2(ends, O_NONBLOCK | O_CLOEXEC) != 0) return -1;
    sameport_signal_write_end = ends[1];
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = sameport_signal_to_pipe;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < count; i++) {
        if (sigaction(signals[i], &action, NULL) != 0) {
            int saved = errno;
            close(ends[0]);
            close(ends[1]);
            errno = saved;
            return -1;
        }
    }
    return ends[0];
}

const int sameport_so_original_dst = SO_ORIGINAL_DST;
const int sameport_ip6t_so_original_dst = IP6T_SO_ORIGINAL_DST;

const int sameport_cap_chown = CAP_CHOWN;
const int sameport_cap_setpcap = CAP_SETPCAP;

int sameport_epoll_create(void) {
    return epoll_create1(EPOLL_CLOEXEC);
}

_Static_assert(sameport_epoll_ctl_add == EPOLL_CTL_ADD, "EPOLL_CTL_ADD");
_Static_assert(sameport_epoll_ctl_mod == EPOLL_CTL_MOD, "EPOLL_CTL_MOD");
_Static_assert(sameport_epoll_ctl_del == EPOLL_CTL_DEL, "EPOLL_CTL_DEL");

int sameport_epoll_ctl(int epfd, int op, int fd, unsigned int events, unsigned long long data) {
    struct epoll_event event;
    memset(&event, 0, sizeof event);
    event.events = events;
    event.data.u64 = data;
    return epoll_ctl(epfd, op, fd, &event);
}

int sameport_epoll_wait(int epfd, struct sameport_epoll_event *events, int max, long long timeout_ns) {
    struct epoll_event raw[256];
    if (max > 256) max = 256;
    int count;
    if (timeout_ns <= 0) {
        count = epoll_wait(epfd, raw, max, timeout_ns < 0 ? -1 : 0);
    } else {
        static int no_pwait2 = 0;
        count = -1;
        if (!__atomic_load_n(&no_pwait2, __ATOMIC_RELAXED)) {
            struct timespec timeout = { timeout_ns / 1000000000LL, timeout_ns % 1000000000LL };
            count = epoll_pwait2(epfd, raw, max, &timeout, NULL);
            if (count < 0 && errno == ENOSYS) __atomic_store_n(&no_pwait2, 1, __ATOMIC_RELAXED);
        }
        if (count < 0 && __atomic_load_n(&no_pwait2, __ATOMIC_RELAXED)) {
            count = epoll_wait(epfd, raw, max, (int)((timeout_ns + 999999LL) / 1000000LL));
        }
    }
    for (int i = 0; i < count; i++) {
        events[i].events = raw[i].events;
        events[i].data = raw[i].data.u64;
    }
    return count;
}

_Static_assert(sameport_epollin == EPOLLIN, "EPOLLIN");
_Static_assert(sameport_epollpri == EPOLLPRI, "EPOLLPRI");
_Static_assert(sameport_epollout == EPOLLOUT, "EPOLLOUT");
_Static_assert(sameport_epollrdhup == EPOLLRDHUP, "EPOLLRDHUP");
_Static_assert(sameport_epollerr == EPOLLERR, "EPOLLERR");
_Static_assert(sameport_epollhup == EPOLLHUP, "EPOLLHUP");
_Static_assert(sameport_epollet == (unsigned int)EPOLLET, "EPOLLET");
_Static_assert(sameport_epollexclusive == EPOLLEXCLUSIVE, "EPOLLEXCLUSIVE");

unsigned long long sameport_monotonic_ns(void) {
    struct timespec now;
    (void)clock_gettime(CLOCK_MONOTONIC, &now);  // cannot fail for this clock and a valid pointer
    return (unsigned long long)now.tv_sec * 1000000000ULL + (unsigned long long)now.tv_nsec;
}

static __thread void *scratch;
static __thread size_t scratch_size;
static pthread_key_t scratch_key;
static pthread_once_t scratch_key_once = PTHREAD_ONCE_INIT;

static void scratch_key_create(void) {
    (void)pthread_key_create(&scratch_key, free);  // the key's destructor frees a thread's buffer
}

void *sameport_scratch(size_t size) {
    if (scratch != NULL && scratch_size >= size) return scratch;
    (void)pthread_once(&scratch_key_once, scratch_key_create);
    void *grown = malloc(size);
    if (grown == NULL) return NULL;
    free(scratch);
    scratch = grown;
    scratch_size = size;
    (void)pthread_setspecific(scratch_key, grown);
    return grown;
}

int sameport_eventfd(void) {
    return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

int sameport_cpu_count(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
    int count = CPU_COUNT(&set);
    return count > 0 ? count : 1;
}
