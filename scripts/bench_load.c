/* Load generator and upstream server for scripts/bench.py. Loopback IPv4 only.
 *
 * bench.py compiles this with `gcc -O2 -pthread` into a temporary directory; Python alone is too
 * slow to time 64-byte round trips or to open tens of thousands of connections a second.
 *
 *   bench_load server THREADS PORT[-PORT] ...
 *       Listens on 127.0.0.1 on every port given and prints "ready". What each connection does
 *       is chosen by its first byte:
 *         'S'  followed by an 8-byte little-endian count: read that many more bytes, answer
 *              "!" and close (client -> upstream bulk; no half-close needed, which
 *              systemd-socket-proxyd does not pass on)
 *         'G'  followed by an 8-byte little-endian count: send that many bytes, shut down the
 *              writing side, close at the client's EOF (upstream -> client bulk)
 *         'E'  echo everything, the first byte included, until EOF (ping-pong)
 *         'C'  answer "c" and close at once: the upstream closes first (connection rate)
 *         'I'  answer "i", then echo until EOF (idle connections)
 *   bench_load bulk PORT up|down BYTES        prints the seconds the transfer took
 *   bench_load pingpong PORT COUNT WARMUP     prints p50 p99 mean, microseconds per round trip
 *   bench_load sporadic PORT COUNT GAP_US     one connection at a time, GAP_US apart (connect, "C",
 *                                             read to EOF); prints p50 p99 mean max, microseconds
 *                                             per connection; exits 1 at the first that fails
 *   bench_load connrate PORT THREADS WARMUP_S SECONDS
 *                                             prints connections/s, completed, failed, and the
 *                                             slowest connect() and connection in milliseconds
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* ---------------------------------------------------------------- server */

enum state { FREE, LISTENER, NEW, SINK, HEADER, SEND, DRAIN, ECHO };

struct conn {
    enum state state;
    int epfd;
    uint64_t remaining;     /* SEND: bytes left */
    unsigned char header[9];
    int header_len;
    char *pending;          /* ECHO: bytes read but not yet written */
    size_t pending_off, pending_len;
};

static struct conn *conns;
static int max_fds;
static char *source_bytes;
static __thread int thread_epfd;  /* the epoll of the server thread running */

static void conn_close(int fd) {
    struct conn *c = &conns[fd];
    free(c->pending);
    memset(c, 0, sizeof *c);
    close(fd);
}

static void want(int fd, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(conns[fd].epfd, EPOLL_CTL_MOD, fd, &ev);
}

/* Writes what is pending; returns 1 when all is written, 0 when the socket is full, -1 on error. */
static int echo_flush(int fd) {
    struct conn *c = &conns[fd];
    while (c->pending_off < c->pending_len) {
        ssize_t n = send(fd, c->pending + c->pending_off, c->pending_len - c->pending_off, MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        c->pending_off += n;
    }
    c->pending_off = c->pending_len = 0;
    return 1;
}

static void send_more(int fd) {
    struct conn *c = &conns[fd];
    while (c->remaining > 0) {
        size_t len = c->remaining < CHUNK ? c->remaining : CHUNK;
        ssize_t n = send(fd, source_bytes, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) return;
            conn_close(fd);
            return;
        }
        c->remaining -= n;
    }
    shutdown(fd, SHUT_WR);
    c->state = DRAIN;
    want(fd, EPOLLIN);
}

/* Counts bytes received in state SINK; answers and closes after the last. */
static void sink(int fd, ssize_t n) {
    struct conn *c = &conns[fd];
    c->remaining -= (uint64_t)n < c->remaining ? (uint64_t)n : c->remaining;
    if (c->remaining == 0) {
        send(fd, "!", 1, MSG_NOSIGNAL);
        conn_close(fd);
    }
}

/* Handles bytes just read in state NEW or HEADER or ECHO. */
static void take(int fd, char *data, ssize_t n) {
    struct conn *c = &conns[fd];
    if (c->state == NEW) {
        switch (data[0]) {
        case 'S': c->state = HEADER; break;
        case 'C': send(fd, "c", 1, MSG_NOSIGNAL); conn_close(fd); return;
        case 'I': send(fd, "i", 1, MSG_NOSIGNAL); c->state = ECHO; data++; n--; break;
        case 'E': c->state = ECHO; break;
        case 'G': c->state = HEADER; break;
        default: conn_close(fd); return;
        }
    }
    if (c->state == HEADER) {
        while (n > 0 && c->header_len < 9) { c->header[c->header_len++] = *data++; n--; }
        if (c->header_len == 9) {
            memcpy(&c->remaining, c->header + 1, 8);
            if (c->header[0] == 'G') {
                c->state = SEND;
                want(fd, EPOLLOUT);
                send_more(fd);
                return;
            }
            c->state = SINK;
            sink(fd, n);
        }
        return;
    }
    if (c->state == ECHO && n > 0) {
        if (!c->pending) c->pending = malloc(CHUNK);
        memcpy(c->pending, data, n);
        c->pending_off = 0;
        c->pending_len = n;
        int r = echo_flush(fd);
        if (r < 0) conn_close(fd);
        else if (r == 0) want(fd, EPOLLOUT);
    }
}

static void on_readable(int fd, char *buf) {
    struct conn *c = &conns[fd];
    if (c->state == LISTENER) {
        for (;;) {
            int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (cfd < 0) return;  /* EAGAIN (another thread took it), or EMFILE */
            if (cfd >= max_fds) { close(cfd); continue; }
            int one = 1;
            setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            conns[cfd].state = NEW;
            conns[cfd].epfd = thread_epfd;
            struct epoll_event ev = {.events = EPOLLIN, .data.fd = cfd};
            epoll_ctl(thread_epfd, EPOLL_CTL_ADD, cfd, &ev);
        }
    }
    /* ECHO reads at most what the pending buffer holds; the others read into the shared buffer. */
    ssize_t n = recv(fd, buf, CHUNK, 0);
    if (n < 0) {
        if (errno != EAGAIN) conn_close(fd);
        return;
    }
    if (n == 0) {
        conn_close(fd);
        return;
    }
    if (c->state == SINK) {
        sink(fd, n);
        return;
    }
    if (c->state == DRAIN) return;
    take(fd, buf, n);
}

static void on_writable(int fd) {
    struct conn *c = &conns[fd];
    if (c->state == SEND) {
        send_more(fd);
    } else if (c->state == ECHO) {
        int r = echo_flush(fd);
        if (r < 0) conn_close(fd);
        else if (r == 1) want(fd, EPOLLIN);
    }
}

struct server_thread { int epfd; };

static void *server_loop(void *arg) {
    struct server_thread *t = arg;
    thread_epfd = t->epfd;
    char *buf = malloc(CHUNK);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(t->epfd, events, 256, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (conns[fd].state == FREE) continue;
            if (events[i].events & EPOLLOUT) on_writable(fd);
            if (conns[fd].state != FREE && events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                if (conns[fd].state == SEND && !(events[i].events & EPOLLIN)) continue;
                on_readable(fd, buf);
            }
        }
    }
    return NULL;
}

static int server(int argc, char **argv) {
    if (argc < 2) return 2;
    raise_nofile();
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    max_fds = rl.rlim_cur > 1 << 20 ? 1 << 20 : (int)rl.rlim_cur;
    conns = calloc(max_fds, sizeof *conns);
    source_bytes = malloc(CHUNK);
    for (int i = 0; i < CHUNK; i++) source_bytes[i] = (char)(i * 131 + 7);
    int threads = atoi(argv[0]);
    if (threads < 1) threads = 1;
    struct server_thread *ts = calloc(threads, sizeof *ts);
    for (int t = 0; t < threads; t++)
        if ((ts[t].epfd = epoll_create1(EPOLL_CLOEXEC)) < 0) die("epoll_create1");
    for (int i = 1; i < argc; i++) {
        int first, last;
        if (sscanf(argv[i], "%d-%d", &first, &last) != 2) first = last = atoi(argv[i]);
        for (int port = first; port <= last; port++) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            int one = 1;
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
            struct sockaddr_in a = loopback(port);
            if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
                fprintf(stderr, "bench_load: bind 127.0.0.1:%d: %s\n", port, strerror(errno));
                return 1;
            }
            if (listen(fd, 4096) < 0) die("listen");
            conns[fd].state = LISTENER;
            for (int t = 0; t < threads; t++) {
                struct epoll_event ev = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.fd = fd};
                if (epoll_ctl(ts[t].epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
            }
        }
    }
    printf("ready\n");
    fflush(stdout);
    pthread_t *ids = calloc(threads, sizeof *ids);
    for (int t = 1; t < threads; t++) pthread_create(&ids[t], NULL, server_loop, &ts[t]);
    server_loop(&ts[0]);
    return 0;
}

/* ------------------------------------------------------------------ clients */

static int dial(int port, int nodelay) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (nodelay) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    struct sockaddr_in a = loopback(port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void send_all(int fd, const char *p, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("send");
        }
        p += n;
        len -= n;
    }
}

static int bulk(int argc, char **argv) {
    if (argc < 3) return 2;
    int port = atoi(argv[0]);
    int up = strcmp(argv[1], "up") == 0;
    uint64_t bytes = strtoull(argv[2], NULL, 10);
    char *buf = malloc(CHUNK);
    for (int i = 0; i < CHUNK; i++) buf[i] = (char)(i * 31 + 1);
    double start = now();
    int fd = dial(port, 0);
    if (fd < 0) die("connect");
    if (up) {
        unsigned char header[9] = {'S'};
        memcpy(header + 1, &bytes, 8);
        send_all(fd, (char *)header, 9);
        uint64_t left = bytes;
        while (left > 0) {
            size_t len = left < CHUNK ? left : CHUNK;
            send_all(fd, buf, len);
            left -= len;
        }
        char ack;
        ssize_t n = recv(fd, &ack, 1, MSG_WAITALL);
        if (n != 1 || ack != '!') {
            fprintf(stderr, "bench_load: bulk up: no acknowledgement (%zd)\n", n);
            return 1;
        }
    } else {
        unsigned char header[9] = {'G'};
        memcpy(header + 1, &bytes, 8);
        send_all(fd, (char *)header, 9);
        uint64_t got = 0;
        while (got < bytes) {  /* to the last byte; EOF is not waited for */
            ssize_t n = recv(fd, buf, CHUNK, 0);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) die("recv");
            if (n == 0) break;
            got += n;
        }
        if (got != bytes) {
            fprintf(stderr, "bench_load: bulk down: %llu of %llu bytes\n", (unsigned long long)got,
                    (unsigned long long)bytes);
            return 1;
        }
    }
    double elapsed = now() - start;
    close(fd);
    printf("%.6f\n", elapsed);
    return 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Prints the median, 99th percentile and mean of `count` microsecond samples (sorting them),
 * and the largest when `with_max`. */
static void print_latencies(double *samples, int count, int with_max) {
    double sum = 0;
    for (int i = 0; i < count; i++) sum += samples[i];
    qsort(samples, count, sizeof *samples, cmp_double);
    printf("%.2f %.2f %.2f", samples[count / 2], samples[(int)(count * 0.99)], sum / count);
    if (with_max) printf(" %.2f", samples[count - 1]);
    printf("\n");
}

static int pingpong(int argc, char **argv) {
    if (argc < 3) return 2;
    int port = atoi(argv[0]);
    int count = atoi(argv[1]), warmup = atoi(argv[2]);
    int fd = dial(port, 1);
    if (fd < 0) die("connect");
    char msg[64], reply[64];
    memset(msg, 'x', sizeof msg);
    msg[0] = 'E';
    double *rtt = malloc(sizeof(double) * count);
    for (int i = -warmup; i < count; i++) {
        double t0 = now();
        send_all(fd, msg, sizeof msg);
        size_t got = 0;
        while (got < sizeof reply) {
            ssize_t n = recv(fd, reply + got, sizeof reply - got, 0);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                fprintf(stderr, "bench_load: pingpong: connection ended after %d round trips\n", i + warmup);
                return 1;
            }
            got += n;
        }
        if (i >= 0) rtt[i] = (now() - t0) * 1e6;
    }
    close(fd);
    print_latencies(rtt, count, 0);
    return 0;
}

static atomic_long completed, failed;
static atomic_long slowest_connect_us, slowest_total_us;  /* the slowest connection's phases */

static void note_max(atomic_long *slot, long value) {
    long seen = atomic_load(slot);
    while (value > seen && !atomic_compare_exchange_weak(slot, &seen, value)) {}
}
static atomic_int stop;
static int rate_port;

/* The rest of a conn/s or sporadic connection once dialled: "C", the answer read to EOF, close.
 * 0 when it went through (one byte, then EOF), -1 when the answer was not that, -2 when the
 * relay reset it before the "C" went out. */
static int finish_connection(int fd) {
    int result = -2;
    if (send(fd, "C", 1, MSG_NOSIGNAL) == 1) {
        char buf[8];
        ssize_t total = 0, n;
        while ((n = recv(fd, buf, sizeof buf, 0)) > 0) total += n;
        result = n == 0 && total == 1 ? 0 : -1;
    }
    close(fd);
    return result;
}

static void *connrate_worker(void *arg) {
    (void)arg;
    while (!atomic_load(&stop)) {
        double t0 = now();
        int fd = dial(rate_port, 0);
        note_max(&slowest_connect_us, (long)((now() - t0) * 1e6));
        if (fd < 0) {
            atomic_fetch_add(&failed, 1);
            usleep(1000);
            continue;
        }
        int result = finish_connection(fd);
        if (result != -2) note_max(&slowest_total_us, (long)((now() - t0) * 1e6));
        if (result == 0) atomic_fetch_add(&completed, 1);
        else atomic_fetch_add(&failed, 1);
    }
    return NULL;
}

static void sleep_for(double seconds) {
    struct timespec ts = {.tv_sec = (time_t)seconds, .tv_nsec = (long)((seconds - (time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

static int connrate(int argc, char **argv) {
    if (argc < 4) return 2;
    rate_port = atoi(argv[0]);
    int threads = atoi(argv[1]);
    double warmup = atof(argv[2]), seconds = atof(argv[3]);
    pthread_t *ids = calloc(threads, sizeof *ids);
    for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, connrate_worker, NULL);
    sleep_for(warmup);
    long c0 = atomic_load(&completed), f0 = atomic_load(&failed);
    double t0 = now();
    sleep_for(seconds);
    long c1 = atomic_load(&completed), f1 = atomic_load(&failed);
    double elapsed = now() - t0;
    atomic_store(&stop, 1);
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    printf("%.1f %ld %ld %.1f %.1f\n", (c1 - c0) / elapsed, c1 - c0, f1 - f0,
           atomic_load(&slowest_connect_us) / 1e3, atomic_load(&slowest_total_us) / 1e3);
    return 0;
}

/* Connections that come one at a time after a pause: what a relay that has gone quiet (between
 * a partner's occasional connections) adds to each. */
static int sporadic(int argc, char **argv) {
    if (argc < 3) return 2;
    int port = atoi(argv[0]), count = atoi(argv[1]), gap = atoi(argv[2]);
    if (count < 1 || gap < 0) return 2;
    double *took = malloc(sizeof(double) * count);
    for (int i = 0; i < count; i++) {
        struct timespec pause = {.tv_sec = gap / 1000000, .tv_nsec = (long)(gap % 1000000) * 1000};
        while (nanosleep(&pause, &pause) < 0 && errno == EINTR) {}
        double t0 = now();
        int fd = dial(port, 0);
        if (fd < 0 || finish_connection(fd) != 0) {
            fprintf(stderr, "bench_load: sporadic: connection %d of %d failed\n", i + 1, count);
            return 1;
        }
        took[i] = (now() - t0) * 1e6;
    }
    print_latencies(took, count, 1);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: bench_load server|bulk|pingpong|sporadic|connrate ...\n");
        return 2;
    }
    int r = 2;
    if (strcmp(argv[1], "server") == 0) r = server(argc - 2, argv + 2);
    else if (strcmp(argv[1], "bulk") == 0) r = bulk(argc - 2, argv + 2);
    else if (strcmp(argv[1], "pingpong") == 0) r = pingpong(argc - 2, argv + 2);
    else if (strcmp(argv[1], "sporadic") == 0) r = sporadic(argc - 2, argv + 2);
    else if (strcmp(argv[1], "connrate") == 0) r = connrate(argc - 2, argv + 2);
    if (r == 2) fprintf(stderr, "bench_load: bad arguments\n");
    return r;
}
