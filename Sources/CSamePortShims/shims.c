#include "CSamePortShims.h"

#include <fcntl.h>
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

int sameport_pipe2(int fds[2], int flags) {
    return pipe2(fds, flags);
}

ssize_t sameport_splice(int fd_in, int fd_out, size_t len, unsigned int flags) {
    return splice(fd_in, NULL, fd_out, NULL, len, flags);
}

const unsigned int sameport_splice_move = SPLICE_F_MOVE;
const unsigned int sameport_splice_nonblock = SPLICE_F_NONBLOCK;

int sameport_set_pipe_size(int fd, int size) {
    return fcntl(fd, F_SETPIPE_SZ, size);
}

int sameport_pipe_size(int fd) {
    return fcntl(fd, F_GETPIPE_SZ);
}
