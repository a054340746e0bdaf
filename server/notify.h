/* notify.h - tells the service manager how the server is doing, by the
 * sd_notify protocol (systemd's Type=notify) without libsystemd. */
#ifndef RRN_NOTIFY_H
#define RRN_NOTIFY_H

/* Sends `state` (newline-separated VAR=value lines, e.g. "READY=1") as
 * one datagram to the socket named by $NOTIFY_SOCKET: a path, or an
 * abstract socket when it starts with '@'.  0 when sent or when
 * NOTIFY_SOCKET is unset or empty (nothing to tell); -1 when it could not
 * be sent.  Safe from any thread. */
int notify_send(const char *state);

/* "RELOADING=1" with MONOTONIC_USEC (the time now), which a newer systemd
 * (Type=notify-reload) needs to match it to the signal it sent; send
 * "READY=1" when the reload is done.  As notify_send. */
int notify_reloading(void);

#endif
