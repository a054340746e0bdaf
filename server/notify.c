/* notify.c - the sd_notify protocol in a few lines: one datagram per state
 * change to the AF_UNIX socket systemd names in $NOTIFY_SOCKET (see
 * sd_notify(3), "Notes"), so that Type=notify needs no libsystemd. */
#include "notify.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

int notify_send(const char *state)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path)
        return 0;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t len = strlen(path);
    /* An absolute path, or '@' for the abstract namespace, whose name is
     * the rest after a leading NUL byte (and is not NUL-terminated). */
    if ((path[0] != '/' && path[0] != '@') || len < 2 || len > sizeof a.sun_path - (path[0] == '/'))
        return -1;
    memcpy(a.sun_path, path, len);
    if (path[0] == '@')
        a.sun_path[0] = 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    size_t n = strlen(state);
    ssize_t sent = sendto(fd, state, n, MSG_NOSIGNAL, (const struct sockaddr *)&a,
                          (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len));
    close(fd);
    return sent == (ssize_t)n ? 0 : -1;
}

int notify_reloading(void)
{
    struct timespec t;
    char msg[64];
    clock_gettime(CLOCK_MONOTONIC, &t);
    snprintf(msg, sizeof msg, "RELOADING=1\nMONOTONIC_USEC=%llu",
             (unsigned long long)t.tv_sec * 1000000ULL + (unsigned long long)t.tv_nsec / 1000ULL);
    return notify_send(msg);
}
