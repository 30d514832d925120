/* TCP_NODELAY on every TCP socket a process connects or accepts, through LD_PRELOAD.
 *
 * For `bench/bench_channels.py --sms N --kannel-nodelay` only: Kannel 1.4.5 leaves Nagle's algorithm on
 * its internal links (smsbox <-> bearerbox, bearerbox <-> SMSC), and with delivery reports flowing a
 * sendsms message can wait there for the peer's delayed ACK (about 40 ms on Linux).  Started with this
 * library, Kannel shows whether that is where its sendsms throughput goes.  Not for production use.
 *
 *   cc -shared -fPIC -O2 -o kannel_nodelay.so bench/kannel_nodelay.c -ldl   (the bench does this itself)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* fails harmlessly on non-TCP sockets */
}

int connect(int fd, const struct sockaddr *address, socklen_t length) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    if (address && (address->sa_family == AF_INET || address->sa_family == AF_INET6)) nodelay(fd);
    return real(fd, address, length);
}

int accept(int fd, struct sockaddr *address, socklen_t *length) {
    static int (*real)(int, struct sockaddr *, socklen_t *);
    if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    int client = real(fd, address, length);
    if (client >= 0) nodelay(client);
    return client;
}

int accept4(int fd, struct sockaddr *address, socklen_t *length, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    int client = real(fd, address, length, flags);
    if (client >= 0) nodelay(client);
    return client;
}
