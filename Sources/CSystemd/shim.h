// libsystemd's sd-daemon API (sd_listen_fds_with_names, sd_notify, sd_watchdog_enabled,
// sd_is_socket_inet), from the libsystemd-dev package. Its calls return negative errno values.
#ifndef SAMEPORT_CSYSTEMD_SHIM_H
#define SAMEPORT_CSYSTEMD_SHIM_H
#include <systemd/sd-daemon.h>
#endif
