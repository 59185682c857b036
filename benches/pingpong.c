/*
 * The reference floor for a mirrored write: a two-process TCP ping-pong over loopback shaped like
 * one synchronous write (payload + 36 bytes of frame out, a 32-byte ack back),
 * non-blocking sockets busy-polled, TCP_NODELAY, the two processes pinned to different CPUs.
 * Independent of the engine and of `mirror bench`, so that the floor `mirror bench` measures in
 * its own process can be checked against it (docs/PERFORMANCE.md).
 *
 *   cc -O2 -o pingpong benches/pingpong.c && ./pingpong 64 20000
 *
 * Prints one line: payload, round trips, and p50 / p99 / p99.9 in microseconds; with a third
 * argument `raw`, each round trip's nanoseconds instead, a line each (`mirror bench --reference`
 * runs it so, in blocks interleaved with its own measurements).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WRITE_OVERHEAD 36
#define ACK_LEN 32

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void pin(int cpu) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus < 2)
        return; /* one CPU: nothing to separate */
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu % cpus, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0)
        die("sched_setaffinity");
}

static void tune(int fd) {
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
        die("TCP_NODELAY");
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0)
        die("O_NONBLOCK");
}

/* Busy-polls until all of buf is sent; 0, or -1 when the peer is gone. */
static int spin_write(int fd, const char *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = send(fd, buf + done, len - done, MSG_NOSIGNAL);
        if (n > 0)
            done += (size_t)n;
        else if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        else
            return -1;
    }
    return 0;
}

/* Busy-polls until all of buf is received; 0, or -1 when the peer closed. */
static int spin_read(int fd, char *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = recv(fd, buf + done, len - done, 0);
        if (n > 0)
            done += (size_t)n;
        else if (n < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        else
            return -1;
    }
    return 0;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 3 && !(argc == 4 && strcmp(argv[3], "raw") == 0)) {
        fprintf(stderr, "usage: %s PAYLOAD_BYTES ROUND_TRIPS [raw]\n", argv[0]);
        return 2;
    }
    int raw = argc == 4;
    size_t payload = strtoul(argv[1], NULL, 10);
    long iterations = strtol(argv[2], NULL, 10);
    if (iterations <= 0)
        return 2;
    size_t req_len = payload + WRITE_OVERHEAD;

    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof addr;
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(listener, 1) != 0 || getsockname(listener, (struct sockaddr *)&addr, &alen) != 0)
        die("listen");

    pid_t server = fork();
    if (server < 0)
        die("fork");
    if (server == 0) {
        pin(1);
        int s = accept(listener, NULL, NULL);
        if (s < 0)
            die("accept");
        tune(s);
        char *req = malloc(req_len), ack[ACK_LEN];
        memset(ack, 7, sizeof ack);
        while (spin_read(s, req, req_len) == 0 && spin_write(s, ack, sizeof ack) == 0) {
        }
        _exit(0);
    }
    close(listener);
    pin(0);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&addr, sizeof addr) != 0)
        die("connect");
    tune(c);
    char *req = malloc(req_len), reply[ACK_LEN];
    memset(req, 1, req_len);
    uint64_t *rtt = malloc(sizeof *rtt * (size_t)iterations);
    for (long i = -iterations / 10; i < iterations; i++) { /* a tenth more to warm up */
        uint64_t t = now_ns();
        if (spin_write(c, req, req_len) != 0 || spin_read(c, reply, sizeof reply) != 0)
            die("round trip");
        if (i >= 0)
            rtt[i] = now_ns() - t;
    }
    close(c);
    waitpid(server, NULL, 0);
    if (raw) {
        for (long i = 0; i < iterations; i++)
            printf("%llu\n", (unsigned long long)rtt[i]);
        return 0;
    }
    qsort(rtt, (size_t)iterations, sizeof *rtt, by_value);
    double p50 = rtt[iterations / 2] / 1e3, p99 = rtt[iterations * 99 / 100] / 1e3,
           p999 = rtt[iterations * 999 / 1000] / 1e3;
    printf("payload %zu round_trips %ld p50_us %.2f p99_us %.2f p999_us %.2f\n", payload, iterations,
           p50, p99, p999);
    return 0;
}
