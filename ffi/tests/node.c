/*
 * node.c: a backup or a primary node run through the C API, for the two-process crash test
 * (ffi/tests/two_process.sh).
 *
 *   node backup  DIR PORT PORTFILE                      PORT 0 picks a port and writes it to PORTFILE
 *   node primary DIR PORT COMPLETIONS START_ID POLICY   POLICY: block | continue
 *   node failover NAME DIR OWN_PORT PEER_PORT COMPLETIONS ROLE
 *                 either role (ffi/tests/failover.sh): writes while it is the primary, and
 *                 SIGUSR1 promotes it (mirror_promote); `on_peer_loss = block`
 *
 * The primary writes the seeded, self-checking workload of `mirror::workload::Workload` (seed 1,
 * 64-byte writes: the same bytes, so `mirror check-workload` verifies a region from outside),
 * 8 writes in flight through mirror_submit + mirror_wait, and appends the id of every completed
 * write to COMPLETIONS with one write(2) per line, so a SIGKILL never loses a logged completion.
 * SIGTERM: stop submitting, drain, wait until mirroring synchronously, close, exit 0.
 * The backup serves until SIGTERM, then closes and exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mirror.h"

#define SEED UINT64_C(1)
#define WRITE_SIZE 64
#define REGION_SIZE "256KiB"
#define REGION_BYTES (256u * 1024u)
#define DEPTH 8
#define SECOND_US INT64_C(1000000)

static volatile sig_atomic_t stop;

static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

static void die(const char *what, int rc) {
    char msg[512];
    mirror_last_error(msg, sizeof msg);
    fprintf(stderr, "node: %s failed: %d (%s): %s\n", what, rc, mirror_strerror(rc), msg);
    exit(2);
}

/* ----------------------------------------------------------------------------------------- */
/* the workload (byte for byte as src/workload.rs) */

static uint64_t mix(uint64_t z) {
    z += UINT64_C(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static uint32_t crc32c(const unsigned char *p, size_t n) {
    static uint32_t table[256];
    static int ready;
    if (!ready) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ UINT32_C(0x82F63B78) : c >> 1;
            table[i] = c;
        }
        ready = 1;
    }
    uint32_t crc = UINT32_C(0xFFFFFFFF);
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return crc ^ UINT32_C(0xFFFFFFFF);
}

static void put_le(unsigned char *p, uint64_t v, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t offset_of(uint64_t id) {
    const uint64_t slots = REGION_BYTES / WRITE_SIZE;
    return (mix(SEED ^ mix(id)) % slots) * WRITE_SIZE;
}

static void fill(uint64_t id, unsigned char buf[WRITE_SIZE]) {
    put_le(buf + 8, id, 8);
    put_le(buf + 16, SEED, 8);
    uint64_t state = mix(SEED + id);
    for (size_t at = 24; at < WRITE_SIZE; at += 8) {
        state = mix(state);
        size_t n = WRITE_SIZE - at < 8 ? WRITE_SIZE - at : 8;
        put_le(buf + at, state, n);
    }
    memcpy(buf, "WLD1", 4);
    put_le(buf + 4, crc32c(buf + 8, WRITE_SIZE - 8), 4);
}

/* ----------------------------------------------------------------------------------------- */

static mirror_config *config(const char *role, const char *dir) {
    char region[512], queue[512];
    snprintf(region, sizeof region, "%s/%s.region", dir, role);
    snprintf(queue, sizeof queue, "%s/%s.queue", dir, role);
    mirror_config *cfg = mirror_config_new();
    if (cfg == NULL) die("mirror_config_new", MIRROR_EPANIC);
    const char *keys[][2] = {
        {"role", role},           {"region", region},       {"region_size", REGION_SIZE},
        {"queue", queue},         {"queue_size", "4MiB"},   {"idle_spin_us", "20"},
        {"wait_spin_us", "5"},    {"ack_timeout_ms", "500"}, {"reconnect_interval_ms", "20"},
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        int rc = mirror_config_set(cfg, keys[i][0], keys[i][1]);
        if (rc != MIRROR_OK) die("mirror_config_set", rc);
    }
    return cfg;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int run_backup(const char *dir, const char *port_arg, const char *portfile) {
    mirror_config *cfg = config("backup", dir);
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%s", port_arg);
    int rc = mirror_config_set(cfg, "listen", listen);
    if (rc != MIRROR_OK) die("mirror_config_set(listen)", rc);
    mirror *m = NULL;
    rc = mirror_open(cfg, &m);
    mirror_config_free(cfg);
    if (rc != MIRROR_OK) die("mirror_open(backup)", rc);
    uint16_t port = 0;
    rc = mirror_listen_port(m, &port);
    if (rc != MIRROR_OK) die("mirror_listen_port", rc);
    /* Publish the port atomically (write a temporary file, then rename). */
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s.tmp", portfile);
    FILE *f = fopen(tmp, "w");
    if (f == NULL || fprintf(f, "%u\n", (unsigned)port) < 0 || fclose(f) != 0 ||
        rename(tmp, portfile) != 0) {
        perror("node: writing the port file");
        return 2;
    }
    fprintf(stderr, "node: backup listening on port %u\n", (unsigned)port);
    while (!stop) {
        sleep_ms(10);
        struct mirror_stats s;
        s.size = sizeof s;
        rc = mirror_stats(m, &s);
        if (rc != MIRROR_OK) die("mirror_stats", rc);
        if (s.phase == MIRROR_PHASE_FAILED) {
            fprintf(stderr, "node: backup failed\n");
            mirror_close(m);
            return 2;
        }
    }
    rc = mirror_close(m);
    if (rc != MIRROR_OK) die("mirror_close", rc);
    fprintf(stderr, "node: backup closed\n");
    return 0;
}

struct inflight {
    uint64_t id, ticket;
};

static void log_completion(int fd, uint64_t id) {
    char line[32];
    int n = snprintf(line, sizeof line, "%llu\n", (unsigned long long)id);
    /* One write per line: a SIGKILL leaves a line whole or absent (a torn tail is ignored). */
    if (write(fd, line, (size_t)n) != n) {
        perror("node: writing completions");
        exit(2);
    }
}

static int run_primary(const char *dir, const char *port_arg, const char *completions,
                       uint64_t start_id, const char *policy) {
    mirror_config *cfg = config("primary", dir);
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%s", port_arg);
    int rc = mirror_config_set(cfg, "peer", peer);
    if (rc == MIRROR_OK) rc = mirror_config_set(cfg, "on_peer_loss", policy);
    if (rc != MIRROR_OK) die("mirror_config_set(peer, on_peer_loss)", rc);
    int fd = open(completions, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror("node: opening completions");
        return 2;
    }
    mirror *m = NULL;
    rc = mirror_open(cfg, &m);
    mirror_config_free(cfg);
    if (rc != MIRROR_OK) die("mirror_open(primary)", rc);
    fprintf(stderr, "node: primary started at id %llu\n", (unsigned long long)start_id);

    struct inflight ring[DEPTH];
    size_t head = 0, count = 0;
    uint64_t next_id = start_id, completed = 0;
    unsigned char buf[WRITE_SIZE];
    while (!stop || count > 0) {
        if (!stop && count < DEPTH) {
            fill(next_id, buf);
            uint64_t t = 0;
            rc = mirror_submit(m, offset_of(next_id), buf, sizeof buf, &t);
            if (rc != MIRROR_OK) die("mirror_submit", rc);
            ring[(head + count) % DEPTH] = (struct inflight){next_id, t};
            count++;
            next_id++;
            continue;
        }
        rc = mirror_wait(m, ring[head].ticket, stop ? 10 * SECOND_US : 100000);
        if (rc == MIRROR_ETIMEDOUT) {
            if (stop) die("draining mirror_wait", rc);
            continue;
        }
        if (rc != MIRROR_OK) die("mirror_wait", rc);
        log_completion(fd, ring[head].id);
        completed++;
        head = (head + 1) % DEPTH;
        count--;
    }
    /* Everything completed is logged; leave only once the backup holds it all. */
    rc = mirror_wait_synchronous(m, 30 * SECOND_US);
    if (rc != MIRROR_OK) die("mirror_wait_synchronous", rc);
    struct mirror_stats s;
    s.size = sizeof s;
    rc = mirror_stats(m, &s);
    if (rc != MIRROR_OK) die("mirror_stats", rc);
    fprintf(stderr, "node: primary done: %llu completed in this run, next_seq %llu\n",
            (unsigned long long)completed, (unsigned long long)s.next_seq);
    close(fd);
    rc = mirror_close(m);
    if (rc != MIRROR_OK) die("mirror_close", rc);
    return 0;
}

/* ----------------------------------------------------------------------------------------- */
/* failover: a node that can take either role (ffi/tests/failover.sh) */

static volatile sig_atomic_t promote_requested;

static void on_promote_signal(int sig) {
    (void)sig;
    promote_requested = 1;
}

static int current_role(mirror *m, uint64_t *term) {
    struct mirror_stats s;
    s.size = sizeof s;
    int rc = mirror_stats(m, &s);
    if (rc != MIRROR_OK) die("mirror_stats", rc);
    if (s.phase == MIRROR_PHASE_FAILED) {
        fprintf(stderr, "node: failed\n");
        exit(2);
    }
    if (term != NULL) *term = s.current_term;
    return s.role;
}

/* Writes as long as it is the primary: ids start at term << 20 (terms only grow across the
 * pair, so the ids of a later primary are above every earlier one, as the check expects). */
static int run_failover(const char *name, const char *dir, const char *own, const char *peer,
                        const char *completions, const char *role) {
    char region[512], queue[512], listen[64], peer_addr[64];
    snprintf(region, sizeof region, "%s/%s.region", dir, name);
    snprintf(queue, sizeof queue, "%s/%s.queue", dir, name);
    snprintf(listen, sizeof listen, "127.0.0.1:%s", own);
    snprintf(peer_addr, sizeof peer_addr, "127.0.0.1:%s", peer);
    mirror_config *cfg = mirror_config_new();
    if (cfg == NULL) die("mirror_config_new", MIRROR_EPANIC);
    const char *keys[][2] = {
        {"role", role},          {"region", region},         {"region_size", REGION_SIZE},
        {"queue", queue},        {"queue_size", "4MiB"},     {"idle_spin_us", "20"},
        {"wait_spin_us", "5"},   {"ack_timeout_ms", "500"},  {"reconnect_interval_ms", "20"},
        {"listen", listen},      {"peer", peer_addr},        {"on_peer_loss", "block"},
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        int rc = mirror_config_set(cfg, keys[i][0], keys[i][1]);
        if (rc != MIRROR_OK) die("mirror_config_set", rc);
    }
    int fd = open(completions, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror("node: opening completions");
        return 2;
    }
    mirror *m = NULL;
    int rc = mirror_open(cfg, &m);
    mirror_config_free(cfg);
    if (rc != MIRROR_OK) die("mirror_open", rc);
    fprintf(stderr, "node: %s opened as %s\n", name, role);

    struct inflight ring[DEPTH];
    size_t head = 0, count = 0;
    uint64_t next_id = 0, term = 0, writing_term = 0;
    unsigned char buf[WRITE_SIZE];
    while (!stop || count > 0) {
        if (promote_requested) {
            /* The old primary's death reaches us a moment after its SIGKILL: until then the
             * promotion is refused as "connected to a live primary". */
            uint64_t new_term = 0;
            rc = mirror_promote(m, 0, &new_term);
            if (rc == MIRROR_OK) {
                promote_requested = 0;
                fprintf(stderr, "node: %s promoted, term %llu\n", name,
                        (unsigned long long)new_term);
            } else if (rc != MIRROR_EPEERALIVE) {
                die("mirror_promote", rc);
            } else {
                sleep_ms(2);
                continue;
            }
        }
        if (current_role(m, &term) != MIRROR_ROLE_PRIMARY) {
            if (count > 0) {
                fprintf(stderr, "node: %s lost the primary role with writes in flight\n", name);
                return 2;
            }
            sleep_ms(5);
            continue;
        }
        if (term != writing_term) {
            writing_term = term;
            next_id = term << 20;
        }
        if (!stop && count < DEPTH) {
            fill(next_id, buf);
            uint64_t t = 0;
            rc = mirror_submit(m, offset_of(next_id), buf, sizeof buf, &t);
            if (rc != MIRROR_OK) die("mirror_submit", rc);
            ring[(head + count) % DEPTH] = (struct inflight){next_id, t};
            count++;
            next_id++;
            continue;
        }
        rc = mirror_wait(m, ring[head].ticket, stop ? 10 * SECOND_US : 100000);
        if (rc == MIRROR_ETIMEDOUT) {
            if (stop) die("draining mirror_wait", rc);
            continue;
        }
        if (rc != MIRROR_OK) die("mirror_wait", rc);
        log_completion(fd, ring[head].id);
        head = (head + 1) % DEPTH;
        count--;
    }
    if (current_role(m, NULL) == MIRROR_ROLE_PRIMARY) {
        rc = mirror_wait_synchronous(m, 30 * SECOND_US);
        if (rc != MIRROR_OK) die("mirror_wait_synchronous", rc);
    }
    close(fd);
    rc = mirror_close(m);
    if (rc != MIRROR_OK) die("mirror_close", rc);
    fprintf(stderr, "node: %s closed\n", name);
    return 0;
}

int main(int argc, char **argv) {
    /* The workload's checksum must be CRC-32C (its standard check value). */
    if (crc32c((const unsigned char *)"123456789", 9) != UINT32_C(0xE3069283)) {
        fprintf(stderr, "node: crc32c self-test failed\n");
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    struct sigaction usr1;
    memset(&usr1, 0, sizeof usr1);
    usr1.sa_handler = on_promote_signal;
    sigemptyset(&usr1.sa_mask);
    sigaction(SIGUSR1, &usr1, NULL);
    if (argc == 8 && strcmp(argv[1], "failover") == 0) {
        return run_failover(argv[2], argv[3], argv[4], argv[5], argv[6], argv[7]);
    }
    if (argc == 5 && strcmp(argv[1], "backup") == 0) {
        return run_backup(argv[2], argv[3], argv[4]);
    }
    if (argc == 7 && strcmp(argv[1], "primary") == 0) {
        char *end = NULL;
        errno = 0;
        unsigned long long start = strtoull(argv[5], &end, 10);
        if (errno != 0 || end == argv[5] || *end != '\0') {
            fprintf(stderr, "node: bad START_ID '%s'\n", argv[5]);
            return 2;
        }
        return run_primary(argv[2], argv[3], argv[4], start, argv[6]);
    }
    fprintf(stderr,
            "usage: node backup DIR PORT PORTFILE\n"
            "       node primary DIR PORT COMPLETIONS START_ID block|continue\n"
            "       node failover NAME DIR OWN_PORT PEER_PORT COMPLETIONS primary|backup\n");
    return 2;
}
