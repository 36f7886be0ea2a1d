// C shims for the Linux calls that Swift's Glibc module does not import.
//
// Every symbol is prefixed `sameport_`; each says why it exists. The target is compiled with
// _GNU_SOURCE (see Package.swift), which is what makes these declarations visible to C at all.
#ifndef SAMEPORT_SHIMS_H
#define SAMEPORT_SHIMS_H

#include <sys/socket.h>

/// accept4(2): not visible from `import Glibc` (it is a GNU extension). Lets the relay accept a
/// client already non-blocking and close-on-exec in one call instead of three.
int sameport_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);

/// ioctl(SIOCOUTQ): the bytes a socket still holds unsent or unacknowledged, or -1. ioctl is
/// variadic, so Swift cannot call it. The idle timeout uses it to see a slow reader consuming
/// what the relay already handed to the kernel.
int sameport_unsent_bytes(int fd);

#endif
