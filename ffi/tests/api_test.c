/*
 * api_test.c: every function of the C API, its success and its error paths, with a backup and a
 * primary in this process over loopback TCP.
 *
 * Built with -Wall -Wextra -Werror, run under AddressSanitizer + UBSan and, built without
 * sanitizers, under valgrind (see ci/ffi-test.sh). Ends with the line "N passed, N failed".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "mirror.h"

#define REGION_SIZE (1u << 20)
#define MAX_WRITE (64u << 10)
#define SECOND_US INT64_C(1000000)

static char tmpdir[64];

/* ------------------------------------------------------------------------------------------ */
/* helpers */

static void path_of(char *out, size_t n, const char *name, const char *ext) {
    snprintf(out, n, "%s/%s.%s", tmpdir, name, ext);
}

static void remove_tmpdir(void) {
    DIR *d = opendir(tmpdir);
    if (d == NULL) return;
    struct dirent *e;
    char p[512];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(tmpdir);
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int last_error_contains(const char *needle) {
    return strstr(last_error(), needle) != NULL;
}

/* Sets the keys common to every node of these tests (short spins: 2-core machines). */
static mirror_config *base_config(const char *role, const char *name, const char *region_size) {
    char region[256], queue[256];
    path_of(region, sizeof region, name, "region");
    path_of(queue, sizeof queue, name, "queue");
    mirror_config *cfg = mirror_config_new();
    REQUIRE(cfg != NULL);
    CHECK_RC(mirror_config_set(cfg, "role", role), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "region", region), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "queue", queue), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "region_size", region_size), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "queue_size", "1MiB"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "max_write", "64KiB"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "idle_spin_us", "20"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "wait_spin_us", "5"), MIRROR_OK);
    return cfg;
}

static int open_backup(const char *name, const char *region_size, uint16_t port, mirror **out) {
    mirror_config *cfg = base_config("backup", name, region_size);
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%u", (unsigned)port);
    CHECK_RC(mirror_config_set(cfg, "listen", listen), MIRROR_OK);
    int rc = mirror_open(cfg, out);
    mirror_config_free(cfg);
    return rc;
}

static int open_primary(const char *name, uint16_t port, const char *policy, mirror **out) {
    mirror_config *cfg = base_config("primary", name, "1MiB");
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%u", (unsigned)port);
    CHECK_RC(mirror_config_set(cfg, "peer", peer), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "on_peer_loss", policy), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "ack_timeout_ms", "2000"), MIRROR_OK);
    int rc = mirror_open(cfg, out);
    mirror_config_free(cfg);
    return rc;
}

static struct mirror_stats stats_of(const mirror *m) {
    struct mirror_stats s;
    memset(&s, 0, sizeof s);
    s.size = sizeof s;
    CHECK_RC(mirror_stats(m, &s), MIRROR_OK);
    return s;
}

/* Waits until the backup applied everything the primary has sequenced. */
static int backup_caught_up(const mirror *p, const mirror *b) {
    for (int i = 0; i < 2000; i++) {
        struct mirror_stats ps = stats_of(p), bs = stats_of(b);
        if (bs.applied_through + 1 >= ps.next_seq) return 1;
        sleep_ms(5);
    }
    return 0;
}

static int regions_equal(const mirror *p, const mirror *b) {
    size_t plen = 0, blen = 0;
    const void *pv = mirror_region(p, &plen);
    const void *bv = mirror_region(b, &blen);
    return pv != NULL && bv != NULL && plen == blen && memcmp(pv, bv, plen) == 0;
}

/* ------------------------------------------------------------------------------------------ */
/* result codes, strings, last error */

static void test_codes_and_strings(void) {
    CHECK(strcmp(mirror_strerror(MIRROR_OK), "success") == 0);
    const char *unknown = mirror_strerror(12345);
    CHECK(unknown != NULL && strstr(unknown, "unknown") != NULL);
    CHECK(mirror_strerror(INT_MIN) != NULL);
    CHECK(mirror_strerror(-1000) == unknown || strcmp(mirror_strerror(-1000), unknown) == 0);
    const int codes[] = {MIRROR_EINVAL,   MIRROR_EKEY,      MIRROR_EVALUE,      MIRROR_EMISSING,
                         MIRROR_ESTORAGE, MIRROR_EBUSY,     MIRROR_EIO,         MIRROR_ERANGE,
                         MIRROR_EROLE,    MIRROR_ETICKET,   MIRROR_ETIMEDOUT,   MIRROR_ECLOSED,
                         MIRROR_EFAILED,  MIRROR_EUNSUPPORTED, MIRROR_EPANIC,  MIRROR_EFENCED,
                         MIRROR_EPEERALIVE, MIRROR_ENOTREADY};
    const size_t n = sizeof codes / sizeof codes[0];
    for (size_t i = 0; i < n; i++) {
        const char *s = mirror_strerror(codes[i]);
        CHECK(codes[i] <= -1001 && codes[i] >= -1999);
        CHECK(s != NULL && strcmp(s, unknown) != 0 && strlen(s) > 0);
        for (size_t j = 0; j < i; j++) CHECK(codes[i] != codes[j]);
    }
    const char *v = mirror_version();
    CHECK(v != NULL && strncmp(v, "0.", 2) == 0);
}

static void *thread_with_own_error(void *arg) {
    int *ok = arg;
    /* A new thread starts with no message. */
    *ok = mirror_last_error(NULL, 0) == 0;
    mirror_config *cfg = mirror_config_new();
    *ok = *ok && mirror_config_set(cfg, "other_thread_key", "1") == MIRROR_EKEY;
    *ok = *ok && last_error_contains("other_thread_key");
    mirror_config_free(cfg);
    return NULL;
}

static void test_last_error(void) {
    CHECK_RC(mirror_config_set(NULL, "role", "primary"), MIRROR_EINVAL);
    size_t n = mirror_last_error(NULL, 0);
    CHECK(n > 0);
    char full[256];
    CHECK(mirror_last_error(full, sizeof full) == n);
    CHECK(strlen(full) == n);
    CHECK(strstr(full, "cfg") != NULL);
    /* snprintf semantics: at most len-1 bytes and a NUL; the result is the full length. */
    char small[5];
    memset(small, 'x', sizeof small);
    CHECK(mirror_last_error(small, sizeof small) == n);
    CHECK(small[4] == '\0' && strncmp(small, full, 4) == 0);
    char one[1] = {'x'};
    CHECK(mirror_last_error(one, 1) == n && one[0] == '\0');
    CHECK(mirror_last_error(NULL, 10) == n);
    /* A successful call leaves the message as it was. */
    mirror_config *cfg = mirror_config_new();
    CHECK_RC(mirror_config_set(cfg, "role", "primary"), MIRROR_OK);
    mirror_config_free(cfg);
    CHECK(strcmp(last_error(), full) == 0);
    /* Per thread. */
    int ok = 0;
    pthread_t t;
    REQUIRE(pthread_create(&t, NULL, thread_with_own_error, &ok) == 0);
    pthread_join(t, NULL);
    CHECK(ok);
    CHECK(strcmp(last_error(), full) == 0);
}

/* ------------------------------------------------------------------------------------------ */
/* configuration */

static void test_config(void) {
    mirror_config *cfg = mirror_config_new();
    REQUIRE(cfg != NULL);
    /* Every key of the engine's TOML configuration is accepted. */
    const char *good[][2] = {
        {"role", "primary"},        {"role", "backup"},
        {"region", "/tmp/r"},       {"region_size", "16MiB"},
        {"region_size", "4096"},    {"queue", "/tmp/q"},
        {"queue_size", "64MiB"},    {"listen", "127.0.0.1:7400"},
        {"peer", "127.0.0.1:7400"}, {"transport", "tcp"},
        {"durability", "process"},  {"durability", "power"},
        {"on_peer_loss", "block"},  {"on_peer_loss", "continue"},
        {"cpu", "none"},            {"cpu", "0"},
        {"idle_spin_us", "20"},     {"wait_spin_us", "5"},
        {"ack_timeout_ms", "500"},  {"handshake_timeout_ms", "1000"},
        {"reconnect_interval_ms", "50"}, {"write_timeout_ms", "0"},
        {"submit_ring", "1024"},    {"max_write", "64KiB"},
        {"secret_file", "/tmp/k"},  {"accept_secret_file", "/tmp/k2"},
        {"auth", "none"},           {"auth", "secret"},
        {"tls", "on"},              {"tls", "off"},
        {"tls_cert", "/tmp/c.pem"}, {"tls_key", "/tmp/k.pem"},
        {"tls_ca", "/tmp/ca.pem"},  {"tls_server_name", "node-b"},
        {"tls_peer_fingerprint",
         "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"},
        {"chunk_size", "64KiB"},    {"chunk_size", "4096"},
        {"resync_rate", "200MiB"},  {"resync_rate", "0"},
        {"initial_sync", "true"},   {"initial_sync", "false"},
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        CHECK_RC(mirror_config_set(cfg, good[i][0], good[i][1]), MIRROR_OK);
    }
    /* The shipped library has no test fail points (cargo feature fail-points). */
    CHECK(mirror_config_set(cfg, "crash_before_apply_seq", "99999") < 0);
    CHECK(last_error_contains("fail-points"));
    /* An unknown key is MIRROR_EKEY and the message names it. */
    CHECK_RC(mirror_config_set(cfg, "regoin", "/tmp/r"), MIRROR_EKEY);
    CHECK(last_error_contains("regoin"));
    /* A bad value is MIRROR_EVALUE and the message names the key. */
    const char *bad[][2] = {
        {"role", "prime"},           {"region_size", "lots"},     {"region_size", "-1"},
        {"queue_size", "3 parsecs"}, {"durability", "sometimes"}, {"on_peer_loss", "maybe"},
        {"transport", "pigeon"},     {"cpu", "one"},              {"idle_spin_us", "-5"},
        {"region", ""},              {"peer", "  "},              {"max_write", "1 ton"},
        {"auth", "maybe"},           {"tls", "sometimes"},        {"tls_peer_fingerprint", "abc"},
        {"chunk_size", "3000"},      {"chunk_size", "2MiB"},      {"initial_sync", "perhaps"},
        {"resync_rate", "fast"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_RC(mirror_config_set(cfg, bad[i][0], bad[i][1]), MIRROR_EVALUE);
        CHECK(last_error_contains(bad[i][0]));
    }
    /* NULLs and strings that are not UTF-8. */
    CHECK_RC(mirror_config_set(NULL, "role", "primary"), MIRROR_EINVAL);
    CHECK_RC(mirror_config_set(cfg, NULL, "primary"), MIRROR_EINVAL);
    CHECK(last_error_contains("key"));
    CHECK_RC(mirror_config_set(cfg, "role", NULL), MIRROR_EINVAL);
    CHECK(last_error_contains("value"));
    CHECK_RC(mirror_config_set(cfg, "r\xffle", "primary"), MIRROR_EKEY);
    CHECK_RC(mirror_config_set(cfg, "region", "/tmp/\xff"), MIRROR_EVALUE);
    CHECK(last_error_contains("region"));
    mirror_config_free(cfg);
    mirror_config_free(NULL);
}

static void test_open_errors(void) {
    static int sentinel_object;
    mirror *const sentinel = (mirror *)(void *)&sentinel_object;
    mirror *m = sentinel;
    mirror_config *cfg = mirror_config_new();
    REQUIRE(cfg != NULL);
    CHECK_RC(mirror_open(NULL, &m), MIRROR_EINVAL);
    CHECK(m == sentinel);
    CHECK_RC(mirror_open(cfg, NULL), MIRROR_EINVAL);
    /* Required keys. */
    CHECK_RC(mirror_open(cfg, &m), MIRROR_EMISSING);
    CHECK(last_error_contains("role"));
    CHECK(m == sentinel);
    CHECK_RC(mirror_config_set(cfg, "role", "backup"), MIRROR_OK);
    CHECK_RC(mirror_open(cfg, &m), MIRROR_EMISSING);
    CHECK(last_error_contains("region"));
    mirror_config_free(cfg);

    /* Keys that contradict each other or the role. */
    cfg = base_config("backup", "bad", "1MiB");
    CHECK_RC(mirror_open(cfg, &m), MIRROR_EMISSING);
    CHECK(last_error_contains("listen"));
    CHECK_RC(mirror_config_set(cfg, "listen", "not an address"), MIRROR_OK);
    CHECK_RC(mirror_open(cfg, &m), MIRROR_EVALUE);
    CHECK(last_error_contains("listen"));
    CHECK_RC(mirror_config_set(cfg, "listen", "127.0.0.1:1"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "peer", "127.0.0.1:1"), MIRROR_OK);
    CHECK_RC(mirror_open(cfg, &m), MIRROR_EVALUE);
    CHECK(last_error_contains("peer"));
    mirror_config_free(cfg);

    cfg = base_config("backup", "bad", "0");
    CHECK_RC(mirror_config_set(cfg, "listen", "127.0.0.1:0"), MIRROR_OK);
    CHECK_RC(mirror_open(cfg, &m), MIRROR_EVALUE);
    CHECK(last_error_contains("region_size"));
    CHECK_RC(mirror_config_set(cfg, "region_size", "1MiB"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "max_write", "1GiB"), MIRROR_OK);
    CHECK_RC(mirror_open(cfg, &m), MIRROR_EVALUE);
    CHECK(last_error_contains("max_write"));
    CHECK_RC(mirror_config_set(cfg, "max_write", "4KiB"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "transport", "rdma"), MIRROR_OK);
    CHECK_RC(mirror_open(cfg, &m), MIRROR_EUNSUPPORTED);
    CHECK_RC(mirror_config_set(cfg, "transport", "tcp"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "region", "/nonexistent-dir/x.region"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "queue", "/nonexistent-dir/x.queue"), MIRROR_OK);
    CHECK_RC(mirror_open(cfg, &m), MIRROR_ESTORAGE);
    CHECK(last_error_contains("nonexistent-dir"));
    CHECK(m == sentinel);
    mirror_config_free(cfg);

    /* Either role may have both addresses (failover), but not its own address as its peer. */
    cfg = base_config("primary", "bad", "1MiB");
    CHECK_RC(mirror_config_set(cfg, "peer", "127.0.0.1:1"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "listen", "127.0.0.1:1"), MIRROR_OK);
    CHECK_RC(mirror_open(cfg, &m), MIRROR_EVALUE);
    CHECK(last_error_contains("peer"));
    mirror_config_free(cfg);
    cfg = base_config("primary", "bad", "1MiB");
    CHECK_RC(mirror_config_set(cfg, "peer", "127.0.0.1:1"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "on_fenced", "retire"), MIRROR_EVALUE);
    CHECK(last_error_contains("on_fenced"));
    CHECK_RC(mirror_config_set(cfg, "after_split_brain", "discard-node:0"), MIRROR_EVALUE);
    CHECK(last_error_contains("after_split_brain"));
    mirror_config_free(cfg);

    /* Files held by an open node: MIRROR_EBUSY. A port in use: MIRROR_EIO. */
    mirror *b = NULL, *b2 = sentinel;
    REQUIRE(open_backup("busy", "1MiB", 0, &b) == MIRROR_OK);
    uint16_t port = 0;
    CHECK_RC(mirror_listen_port(b, &port), MIRROR_OK);
    CHECK(port != 0);
    CHECK_RC(open_backup("busy", "1MiB", 0, &b2), MIRROR_EBUSY);
    CHECK(b2 == sentinel);
    CHECK_RC(open_backup("other", "1MiB", port, &b2), MIRROR_EIO);
    CHECK(b2 == sentinel);
    CHECK_RC(mirror_close(b), MIRROR_OK);
    /* Reopening the files with another region size: MIRROR_ESTORAGE naming the region. */
    CHECK_RC(open_backup("busy", "2MiB", 0, &b2), MIRROR_ESTORAGE);
    CHECK(last_error_contains("region"));
    CHECK(b2 == sentinel);
    /* The same files and size open again after the close. */
    b = NULL;
    CHECK_RC(open_backup("busy", "1MiB", 0, &b), MIRROR_OK);
    CHECK_RC(mirror_close(b), MIRROR_OK);
    CHECK_RC(mirror_close(NULL), MIRROR_OK);
}

/* ------------------------------------------------------------------------------------------ */
/* a mirrored pair */

static void test_pair_and_error_paths(mirror *p, mirror *b, uint16_t port) {
    uint16_t got = 0;
    CHECK_RC(mirror_listen_port(b, &got), MIRROR_OK);
    CHECK(got == port);
    uint16_t untouched = 77;
    CHECK_RC(mirror_listen_port(p, &untouched), MIRROR_EROLE);
    CHECK(untouched == 77);
    CHECK_RC(mirror_listen_port(NULL, &got), MIRROR_EINVAL);
    CHECK_RC(mirror_listen_port(b, NULL), MIRROR_EINVAL);
    CHECK_RC(mirror_wait_synchronous(p, 10 * SECOND_US), MIRROR_OK);
    CHECK_RC(mirror_wait_synchronous(NULL, 0), MIRROR_EINVAL);

    /* Failover calls that cannot be done here: each refused with its code and a message. */
    uint64_t term = 77;
    CHECK_RC(mirror_promote(p, 0, &term), MIRROR_EROLE);
    CHECK(term == 77 && last_error_contains("already a primary"));
    CHECK_RC(mirror_promote(b, 0, &term), MIRROR_EMISSING); /* this backup has no `peer` */
    CHECK(term == 77 && last_error_contains("peer"));
    CHECK_RC(mirror_demote(b), MIRROR_EROLE);
    CHECK(last_error_contains("already a backup"));
    CHECK_RC(mirror_demote(p), MIRROR_EMISSING); /* this primary has no `listen` */
    CHECK(last_error_contains("listen"));
    CHECK_RC(mirror_promote(NULL, 0, &term), MIRROR_EINVAL);
    CHECK_RC(mirror_demote(NULL), MIRROR_EINVAL);
    uint64_t words[2] = {0, 0};
    CHECK_RC(mirror_promote(b, 1, (uint64_t *)((char *)words + 1)), MIRROR_EINVAL);
    CHECK(last_error_contains("misaligned"));

    /* write, read back, region view */
    const char hello[] = "hello, mirror";
    CHECK_RC(mirror_write(p, 0, hello, sizeof hello), MIRROR_OK);
    char buf[sizeof hello];
    CHECK_RC(mirror_read(p, 0, buf, sizeof buf), MIRROR_OK);
    CHECK(memcmp(buf, hello, sizeof hello) == 0);

    /* pipelined: tickets are consecutive, complete in order */
    uint64_t first = 0, last = 0;
    for (uint64_t i = 0; i < 1000; i++) {
        uint64_t t = 0;
        CHECK_RC(mirror_submit(p, 4096 + i * 8, &i, sizeof i, &t), MIRROR_OK);
        if (i == 0) first = t;
        else CHECK(t == last + 1);
        last = t;
    }
    CHECK(first == 2);
    CHECK_RC(mirror_wait(p, last, 10 * SECOND_US), MIRROR_OK);
    CHECK_RC(mirror_wait(p, first, 0), MIRROR_OK);
    CHECK_RC(mirror_wait(p, 1, -1), MIRROR_OK);
    size_t len = 0;
    const unsigned char *view = mirror_region(p, &len);
    REQUIRE(view != NULL);
    CHECK(len == REGION_SIZE);
    uint64_t v999 = 0;
    memcpy(&v999, view + 4096 + 999 * 8, sizeof v999);
    CHECK(v999 == 999);
    CHECK(memcmp(view, hello, sizeof hello) == 0);

    /* writes: NULLs, empty, outside the region, longer than max_write */
    CHECK_RC(mirror_write(NULL, 0, hello, 1), MIRROR_EINVAL);
    CHECK_RC(mirror_write(p, 0, NULL, 4), MIRROR_EINVAL);
    CHECK_RC(mirror_write(p, 0, hello, 0), MIRROR_ERANGE);
    CHECK_RC(mirror_write(p, REGION_SIZE - 2, hello, 4), MIRROR_ERANGE);
    CHECK(last_error_contains("offset"));
    CHECK_RC(mirror_write(p, UINT64_MAX, hello, 1), MIRROR_ERANGE);
    CHECK_RC(mirror_write(p, REGION_SIZE, hello, 1), MIRROR_ERANGE);
    unsigned char *big = calloc(1, MAX_WRITE + 1);
    REQUIRE(big != NULL);
    CHECK_RC(mirror_write(p, 0, big, MAX_WRITE + 1), MIRROR_ERANGE);
    CHECK_RC(mirror_write(p, REGION_SIZE - MAX_WRITE, big, MAX_WRITE), MIRROR_OK);
    free(big);
    CHECK_RC(mirror_write(p, 0, hello, SIZE_MAX), MIRROR_EINVAL);

    /* submit: the ticket is written only on success */
    uint64_t ticket = 777;
    CHECK_RC(mirror_submit(p, 0, hello, 1, NULL), MIRROR_EINVAL);
    CHECK_RC(mirror_submit(NULL, 0, hello, 1, &ticket), MIRROR_EINVAL);
    CHECK_RC(mirror_submit(p, 0, NULL, 1, &ticket), MIRROR_EINVAL);
    CHECK_RC(mirror_submit(p, REGION_SIZE, hello, 1, &ticket), MIRROR_ERANGE);
    CHECK(ticket == 777);

    /* wait: unknown tickets, NULL */
    CHECK_RC(mirror_wait(p, 0, -1), MIRROR_ETICKET);
    CHECK_RC(mirror_wait(p, last + 1000, 0), MIRROR_ETICKET);
    CHECK(last_error_contains("never issued"));
    CHECK_RC(mirror_wait(NULL, 1, 0), MIRROR_EINVAL);

    /* read: outside the region, NULLs; the buffer is written only on success */
    memset(buf, 'z', sizeof buf);
    CHECK_RC(mirror_read(p, REGION_SIZE - 1, buf, 2), MIRROR_ERANGE);
    CHECK_RC(mirror_read(p, UINT64_MAX, buf, 1), MIRROR_ERANGE);
    CHECK_RC(mirror_read(p, 0, buf, SIZE_MAX), MIRROR_EINVAL);
    CHECK(buf[0] == 'z' && buf[1] == 'z');
    CHECK_RC(mirror_read(p, 0, NULL, 1), MIRROR_EINVAL);
    CHECK_RC(mirror_read(NULL, 0, buf, 1), MIRROR_EINVAL);
    CHECK_RC(mirror_read(p, REGION_SIZE, buf, 0), MIRROR_OK);
    CHECK_RC(mirror_read(p, REGION_SIZE - 1, buf, 1), MIRROR_OK);

    /* region: NULLs; *len untouched on failure */
    len = 12345;
    CHECK(mirror_region(NULL, &len) == NULL);
    CHECK(len == 12345);
    CHECK(mirror_region(p, NULL) == NULL);
    CHECK(last_error_contains("len"));

    /* stats: NULLs, size checks, growth */
    struct mirror_stats s;
    memset(&s, 0xEE, sizeof s);
    s.size = 0;
    CHECK_RC(mirror_stats(p, &s), MIRROR_EINVAL);
    CHECK(last_error_contains("size"));
    CHECK(s.size == 0 && s.next_seq == UINT64_C(0xEEEEEEEEEEEEEEEE));
    /* Below the first version of the struct: refused. */
    s.size = offsetof(struct mirror_stats, current_term) - 1;
    CHECK_RC(mirror_stats(p, &s), MIRROR_EINVAL);
    /* A caller built against the first version gets exactly its fields. */
    s.size = offsetof(struct mirror_stats, current_term);
    s.current_term = UINT64_C(0xEEEEEEEEEEEEEEEE);
    CHECK_RC(mirror_stats(p, &s), MIRROR_OK);
    CHECK(s.size == offsetof(struct mirror_stats, current_term));
    CHECK(s.current_term == UINT64_C(0xEEEEEEEEEEEEEEEE) && s.next_seq == 1003);
    CHECK_RC(mirror_stats(p, NULL), MIRROR_EINVAL);
    CHECK_RC(mirror_stats(NULL, &s), MIRROR_EINVAL);
    s = stats_of(p);
    CHECK(s.size == sizeof s);
    CHECK(s.role == MIRROR_ROLE_PRIMARY);
    CHECK(s.phase == MIRROR_PHASE_SYNCHRONOUS);
    CHECK(s.degraded == 0);
    CHECK(s.writes_submitted == 1002 && s.writes_completed == 1002);
    CHECK(s.next_seq == 1003);
    CHECK(s.region_size == REGION_SIZE);
    CHECK(s.queue_capacity > 0);
    CHECK(s.current_term >= 1); /* a primary starts a new term at every open */
    CHECK(s.diverged_records == 0 && s.diverged_bytes == 0);
    struct {
        struct mirror_stats s;
        unsigned char newer_fields[64];
    } grown;
    memset(&grown, 0xAB, sizeof grown);
    grown.s.size = sizeof grown;
    CHECK_RC(mirror_stats(p, &grown.s), MIRROR_OK);
    CHECK(grown.s.size == sizeof(struct mirror_stats));
    CHECK(grown.s.next_seq == 1003);
    int tail_untouched = 1;
    for (size_t i = 0; i < sizeof grown.newer_fields; i++)
        tail_untouched &= grown.newer_fields[i] == 0xAB;
    CHECK(tail_untouched);

    /* the backup: writes need the primary; it shows what it applied */
    CHECK_RC(mirror_write(b, 0, hello, 1), MIRROR_EROLE);
    CHECK(last_error_contains("backup"));
    CHECK_RC(mirror_submit(b, 0, hello, 1, &ticket), MIRROR_EROLE);
    CHECK(ticket == 777);
    CHECK_RC(mirror_wait(b, 1, 0), MIRROR_ETICKET);
    struct mirror_stats bs = stats_of(b);
    CHECK(bs.role == MIRROR_ROLE_BACKUP);
    CHECK(backup_caught_up(p, b));
    CHECK(regions_equal(p, b));
    CHECK_RC(mirror_read(b, 0, buf, sizeof buf), MIRROR_OK);
    CHECK(memcmp(buf, hello, sizeof hello) == 0);
}

/* ------------------------------------------------------------------------------------------ */
/* many threads on one handle */

#define THREADS 4
#define OPS_PER_THREAD 150

struct worker {
    mirror *p;
    int index;
    int failures;
};

static void *worker_main(void *arg) {
    struct worker *w = arg;
    const uint64_t base = 256 * 1024 + (uint64_t)w->index * 16 * 1024;
    for (uint64_t i = 0; i < OPS_PER_THREAD; i++) {
        uint64_t value = ((uint64_t)w->index << 32) | i;
        uint64_t off = base + (i % 512) * 8;
        if (i % 2 == 0) {
            w->failures += mirror_write(w->p, off, &value, sizeof value) != MIRROR_OK;
        } else {
            uint64_t t = 0;
            w->failures += mirror_submit(w->p, off, &value, sizeof value, &t) != MIRROR_OK;
            w->failures += mirror_wait(w->p, t, 10 * SECOND_US) != MIRROR_OK;
        }
        uint64_t back = 0;
        w->failures += mirror_read(w->p, off, &back, sizeof back) != MIRROR_OK;
        w->failures += back != value; /* completed writes are visible to the writer */
        if (i % 16 == 0) {
            struct mirror_stats s;
            s.size = sizeof s;
            w->failures += mirror_stats(w->p, &s) != MIRROR_OK;
            size_t len = 0;
            w->failures += mirror_region(w->p, &len) == NULL;
        }
    }
    return NULL;
}

/* Online verify of the live pair: nothing differs; a byte flipped in the backup's region file
 * behind the engine's back is found at its chunk, and a repairing verify brings it back. */
static void test_verify(mirror *p, mirror *b) {
    struct mirror_verify_report r;
    uint64_t offsets[4] = {0, 0, 0, 0};
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    CHECK_RC(mirror_verify(p, 0, &r, offsets, 4), MIRROR_OK);
    CHECK(r.chunks_compared == REGION_SIZE / r.chunk_size && r.chunks_differing == 0);
    /* The backup cannot verify (the primary drives it); bad arguments. */
    CHECK_RC(mirror_verify(b, 0, &r, NULL, 0), MIRROR_ENOTREADY);
    CHECK(last_error_contains("primary"));
    CHECK_RC(mirror_verify(p, 0, NULL, NULL, 0), MIRROR_EINVAL);
    CHECK_RC(mirror_verify(p, 0, &r, NULL, 4), MIRROR_EINVAL);
    struct mirror_verify_report small = {.size = 4};
    CHECK_RC(mirror_verify(p, 0, &small, NULL, 0), MIRROR_EINVAL);
    CHECK(last_error_contains("sizeof(struct mirror_verify_report)"));
    /* Flip one byte of the backup's region file (its mapping sees it). */
    char path[256];
    path_of(path, sizeof path, "backup", "region");
    int fd = open(path, O_RDWR);
    REQUIRE(fd >= 0);
    unsigned char byte = 0;
    const off_t at = 3 * 65536 + 17;
    REQUIRE(pread(fd, &byte, 1, at) == 1);
    byte ^= 0xa5;
    REQUIRE(pwrite(fd, &byte, 1, at) == 1);
    close(fd);
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    CHECK_RC(mirror_verify(p, 0, &r, offsets, 4), MIRROR_OK);
    CHECK(r.chunks_differing == 1 && offsets[0] == 3 * 65536);
    CHECK_RC(mirror_verify(p, 1, &r, offsets, 4), MIRROR_OK);
    CHECK(r.chunks_differing == 1 && r.chunks_repaired == 1);
    CHECK_RC(mirror_verify(p, 0, &r, offsets, 4), MIRROR_OK);
    CHECK(r.chunks_differing == 0);
    struct mirror_stats s;
    memset(&s, 0, sizeof s);
    s.size = sizeof s;
    CHECK_RC(mirror_stats(p, &s), MIRROR_OK);
    CHECK(s.transfer_kind == MIRROR_TRANSFER_NONE && s.dirty_chunks == 0 && s.chunk_size == 65536);
}

static void test_threads(mirror *p, mirror *b) {
    pthread_t threads[THREADS];
    struct worker workers[THREADS];
    for (int i = 0; i < THREADS; i++) {
        workers[i] = (struct worker){p, i, 0};
        REQUIRE(pthread_create(&threads[i], NULL, worker_main, &workers[i]) == 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        CHECK(workers[i].failures == 0);
    }
    CHECK(backup_caught_up(p, b));
    CHECK(regions_equal(p, b));
}

/* ------------------------------------------------------------------------------------------ */
/* block: a write waits for the backup; mirror_wait times out, then completes */

static void test_block_timeout(mirror *p, mirror **b, uint16_t port) {
    CHECK_RC(mirror_close(*b), MIRROR_OK);
    *b = NULL;
    uint64_t t = 0;
    const char data[] = "while the backup is away";
    CHECK_RC(mirror_submit(p, 8192, data, sizeof data, &t), MIRROR_OK);
    CHECK_RC(mirror_wait(p, t, 0), MIRROR_ETIMEDOUT);
    CHECK_RC(mirror_wait(p, t, 50000), MIRROR_ETIMEDOUT);
    CHECK(last_error_contains("timed out"));
    /* The backup returns on the same port; the pending write completes. */
    REQUIRE(open_backup("backup", "1MiB", port, b) == MIRROR_OK);
    CHECK_RC(mirror_wait(p, t, 20 * SECOND_US), MIRROR_OK);
    CHECK_RC(mirror_wait_synchronous(p, 10 * SECOND_US), MIRROR_OK);
    CHECK(backup_caught_up(p, *b));
    char back[sizeof data];
    CHECK_RC(mirror_read(*b, 8192, back, sizeof back), MIRROR_OK);
    CHECK(memcmp(back, data, sizeof data) == 0);
    CHECK(regions_equal(p, *b));
}

/* continue: writes complete degraded while the backup is away; it catches up on return */
static void test_continue_degraded(void) {
    mirror *b = NULL, *p = NULL;
    REQUIRE(open_backup("cbackup", "1MiB", 0, &b) == MIRROR_OK);
    uint16_t port = 0;
    CHECK_RC(mirror_listen_port(b, &port), MIRROR_OK);
    REQUIRE(open_primary("cprimary", port, "continue", &p) == MIRROR_OK);
    CHECK_RC(mirror_wait_synchronous(p, 10 * SECOND_US), MIRROR_OK);
    uint64_t x = 1;
    CHECK_RC(mirror_write(p, 0, &x, sizeof x), MIRROR_OK);
    CHECK_RC(mirror_close(b), MIRROR_OK);
    for (x = 2; x < 50; x++) CHECK_RC(mirror_write(p, x * 8, &x, sizeof x), MIRROR_OK);
    struct mirror_stats s = stats_of(p);
    CHECK(s.degraded == 1);
    CHECK(s.phase != MIRROR_PHASE_SYNCHRONOUS);
    REQUIRE(open_backup("cbackup", "1MiB", port, &b) == MIRROR_OK);
    CHECK_RC(mirror_wait_synchronous(p, 10 * SECOND_US), MIRROR_OK);
    s = stats_of(p);
    CHECK(s.degraded == 0);
    CHECK(s.recoveries >= 2);
    CHECK(s.last_recovery_records >= 1);
    CHECK(backup_caught_up(p, b));
    CHECK(regions_equal(p, b));
    CHECK_RC(mirror_close(p), MIRROR_OK);
    CHECK_RC(mirror_close(b), MIRROR_OK);
}

/* authenticated peers: the secret file's rules, and a pair that shares one */

static void write_secret(const char *name, mode_t mode, size_t len) {
    char p[256];
    path_of(p, sizeof p, name, "key");
    FILE *f = fopen(p, "w");
    REQUIRE(f != NULL);
    for (size_t i = 0; i < len; i++) fputc((int)(i * 37 + 11) & 0xff, f);
    fclose(f);
    REQUIRE(chmod(p, mode) == 0);
}

static void test_authentication(void) {
    mirror *b = NULL, *p = NULL;
    char key[256];
    path_of(key, sizeof key, "pair", "key");
    /* A secret readable by others, or too short: MIRROR_EVALUE naming secret_file. */
    write_secret("pair", 0644, 32);
    mirror_config *cfg = base_config("backup", "abackup", "1MiB");
    CHECK_RC(mirror_config_set(cfg, "listen", "127.0.0.1:0"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "secret_file", key), MIRROR_OK);
    CHECK_RC(mirror_open(cfg, &b), MIRROR_EVALUE);
    CHECK(last_error_contains("secret_file") && last_error_contains("group or others"));
    write_secret("pair", 0600, 16);
    CHECK_RC(mirror_open(cfg, &b), MIRROR_EVALUE);
    CHECK(last_error_contains("secret_file") && last_error_contains("16"));
    write_secret("pair", 0600, 32);
    REQUIRE(mirror_open(cfg, &b) == MIRROR_OK);
    mirror_config_free(cfg);
    uint16_t port = 0;
    CHECK_RC(mirror_listen_port(b, &port), MIRROR_OK);
    /* A primary with the same secret mirrors. */
    cfg = base_config("primary", "aprimary", "1MiB");
    char peer[64];
    snprintf(peer, sizeof peer, "127.0.0.1:%u", (unsigned)port);
    CHECK_RC(mirror_config_set(cfg, "peer", peer), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "secret_file", key), MIRROR_OK);
    REQUIRE(mirror_open(cfg, &p) == MIRROR_OK);
    mirror_config_free(cfg);
    CHECK_RC(mirror_wait_synchronous(p, 10 * SECOND_US), MIRROR_OK);
    for (uint64_t x = 1; x < 100; x++) CHECK_RC(mirror_write(p, x * 64, &x, sizeof x), MIRROR_OK);
    CHECK(backup_caught_up(p, b));
    CHECK(regions_equal(p, b));
    CHECK_RC(mirror_close(p), MIRROR_OK);
    CHECK_RC(mirror_close(b), MIRROR_OK);
    /* Reachable from other machines: a secret, or auth = none said explicitly. */
    cfg = base_config("backup", "exposed", "1MiB");
    CHECK_RC(mirror_config_set(cfg, "listen", "0.0.0.0:0"), MIRROR_OK);
    CHECK_RC(mirror_open(cfg, &b), MIRROR_EVALUE);
    CHECK(last_error_contains("secret_file") && last_error_contains("auth = none"));
    CHECK_RC(mirror_config_set(cfg, "auth", "none"), MIRROR_OK);
    REQUIRE(mirror_open(cfg, &b) == MIRROR_OK);
    CHECK_RC(mirror_close(b), MIRROR_OK);
    mirror_config_free(cfg);
}

/* events: a second thread polls the subscription's descriptor and takes what arrives */

struct event_reader {
    mirror_events *sub;
    volatile int stop;
    int kinds[256];
    uint64_t records[256];
    uint64_t seqs[256];
    int n;
    int bad;
};

static void *read_events(void *arg) {
    struct event_reader *r = arg;
    struct pollfd pfd = {.fd = mirror_events_fd(r->sub), .events = POLLIN};
    if (pfd.fd < 0) r->bad = 1;
    while (!r->stop && !r->bad) {
        int n = poll(&pfd, 1, 50);
        if (n < 0) r->bad = 1;
        if (n <= 0) continue;
        for (;;) {
            struct mirror_event ev;
            memset(&ev, 0, sizeof ev);
            ev.size = sizeof ev;
            int rc = mirror_events_next(r->sub, &ev);
            if (rc == MIRROR_EAGAIN) break;
            if (rc != MIRROR_OK || r->n >= 256) {
                r->bad = rc != MIRROR_ECLOSED;
                return NULL;
            }
            r->kinds[r->n] = ev.kind;
            r->records[r->n] = ev.records;
            r->seqs[r->n] = ev.seq;
            r->n++;
        }
    }
    return NULL;
}

/* Whether `want` appear in `r`'s events in this order (others may come between). */
static int in_order(const struct event_reader *r, const int *want, int n_want) {
    int w = 0;
    for (int i = 0; i < r->n && w < n_want; i++)
        if (r->kinds[i] == want[w]) w++;
    return w == n_want;
}

static void test_events(void) {
    mirror *b = NULL, *p = NULL;
    REQUIRE(open_backup("ebackup", "1MiB", 0, &b) == MIRROR_OK);
    uint16_t port = 0;
    CHECK_RC(mirror_listen_port(b, &port), MIRROR_OK);
    REQUIRE(open_primary("eprimary", port, "continue", &p) == MIRROR_OK);
    CHECK_RC(mirror_wait_synchronous(p, 10 * SECOND_US), MIRROR_OK);
    struct event_reader r;
    memset(&r, 0, sizeof r);
    CHECK_RC(mirror_events_subscribe(p, NULL), MIRROR_EINVAL);
    REQUIRE(mirror_events_subscribe(p, &r.sub) == MIRROR_OK);
    CHECK(mirror_events_fd(r.sub) >= 0);
    struct mirror_event small;
    memset(&small, 0, sizeof small);
    small.size = 8;
    CHECK_RC(mirror_events_next(r.sub, &small), MIRROR_EINVAL);
    CHECK(last_error_contains("sizeof(struct mirror_event)"));
    small.size = sizeof small;
    CHECK_RC(mirror_events_next(r.sub, &small), MIRROR_EAGAIN);
    pthread_t t;
    REQUIRE(pthread_create(&t, NULL, read_events, &r) == 0);
    /* An outage: the backup goes, the primary writes alone; it returns and catches up. */
    CHECK_RC(mirror_close(b), MIRROR_OK);
    for (uint64_t x = 1; x <= 5; x++) CHECK_RC(mirror_write(p, x * 64, &x, sizeof x), MIRROR_OK);
    REQUIRE(open_backup("ebackup", "1MiB", port, &b) == MIRROR_OK);
    CHECK_RC(mirror_wait_synchronous(p, 10 * SECOND_US), MIRROR_OK);
    for (int i = 0; i < 100 && !in_order(&r, (int[]){MIRROR_EVENT_SYNCHRONOUS}, 1); i++) sleep_ms(10);
    r.stop = 1;
    pthread_join(t, NULL);
    CHECK(!r.bad);
    const int want[] = {MIRROR_EVENT_PEER_LOST, MIRROR_EVENT_DEGRADED, MIRROR_EVENT_CONNECTED,
                        MIRROR_EVENT_RECOVERING, MIRROR_EVENT_SYNCHRONOUS};
    CHECK(in_order(&r, want, 5));
    for (int i = 0; i < r.n; i++) {
        if (r.kinds[i] == MIRROR_EVENT_RECOVERING) CHECK(r.records[i] == 5);
        if (i > 0) CHECK(r.seqs[i] > r.seqs[i - 1]);
    }
    /* After the close: what is left, then MIRROR_ECLOSED; the subscription outlives the node. */
    CHECK_RC(mirror_close(p), MIRROR_OK);
    int rc;
    for (int i = 0; i < 300 && (rc = mirror_events_next(r.sub, &small)) == MIRROR_OK; i++) {
    }
    CHECK_RC(rc, MIRROR_ECLOSED);
    mirror_events_free(r.sub);
    mirror_events_free(NULL);
    CHECK_RC(mirror_close(b), MIRROR_OK);
}

/* a peer failure: a backup of another region size stops the primary; every later call says so */
static void test_peer_failure(void) {
    mirror *b = NULL, *p = NULL;
    REQUIRE(open_backup("small", "512KiB", 0, &b) == MIRROR_OK);
    uint16_t port = 0;
    CHECK_RC(mirror_listen_port(b, &port), MIRROR_OK);
    REQUIRE(open_primary("big", port, "block", &p) == MIRROR_OK);
    struct mirror_stats s = stats_of(p);
    for (int i = 0; i < 2000 && s.phase != MIRROR_PHASE_FAILED; i++) {
        sleep_ms(5);
        s = stats_of(p);
    }
    CHECK(s.phase == MIRROR_PHASE_FAILED);
    const char data[] = "after the failure";
    uint64_t t = 5;
    CHECK_RC(mirror_write(p, 0, data, sizeof data), MIRROR_EFAILED);
    CHECK(last_error_contains("region"));
    CHECK_RC(mirror_submit(p, 0, data, sizeof data, &t), MIRROR_EFAILED);
    CHECK(t == 5);
    CHECK_RC(mirror_wait_synchronous(p, SECOND_US), MIRROR_EFAILED);
    /* Reading and the counters still work; the node is closed normally. */
    char buf[4];
    CHECK_RC(mirror_read(p, 0, buf, sizeof buf), MIRROR_OK);
    CHECK(stats_of(p).phase == MIRROR_PHASE_FAILED);
    CHECK_RC(mirror_close(p), MIRROR_OK);
    /* The backup refused the primary and goes on serving. */
    CHECK(stats_of(b).phase != MIRROR_PHASE_FAILED);
    CHECK_RC(mirror_close(b), MIRROR_OK);
}

/* ------------------------------------------------------------------------------------------ */
/* failover: a forced promotion fences the old primary */

static int open_either(const char *name, const char *role, uint16_t own, uint16_t peer,
                       mirror **out) {
    mirror_config *cfg = base_config(role, name, "1MiB");
    char listen[64], peer_addr[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%u", (unsigned)own);
    snprintf(peer_addr, sizeof peer_addr, "127.0.0.1:%u", (unsigned)peer);
    CHECK_RC(mirror_config_set(cfg, "listen", listen), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "peer", peer_addr), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "on_peer_loss", "block"), MIRROR_OK);
    CHECK_RC(mirror_config_set(cfg, "reconnect_interval_ms", "20"), MIRROR_OK);
    int rc = mirror_open(cfg, out);
    mirror_config_free(cfg);
    return rc;
}

/* A free loopback port: bind port 0, read it back, release it. */
static uint16_t free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd >= 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(bind(fd, (struct sockaddr *)&a, sizeof a) == 0);
    socklen_t len = sizeof a;
    REQUIRE(getsockname(fd, (struct sockaddr *)&a, &len) == 0);
    close(fd);
    return ntohs(a.sin_port);
}

static void test_forced_promotion_fences(void) {
    uint16_t px = free_port(), py = free_port();
    mirror *x = NULL, *y = NULL;
    REQUIRE(open_either("fx", "primary", px, py, &x) == MIRROR_OK);
    REQUIRE(open_either("fy", "backup", py, px, &y) == MIRROR_OK);
    CHECK_RC(mirror_wait_synchronous(x, 10 * SECOND_US), MIRROR_OK);
    CHECK_RC(mirror_write(x, 0, "before", 6), MIRROR_OK);
    for (int i = 0; i < 2000 && stats_of(y).phase != MIRROR_PHASE_SYNCHRONOUS; i++) sleep_ms(5);
    /* x is alive: promoting y is refused unless forced. */
    uint64_t term = 0;
    CHECK_RC(mirror_promote(y, 0, &term), MIRROR_EPEERALIVE);
    CHECK(last_error_contains("force"));
    CHECK_RC(mirror_promote(y, 1, &term), MIRROR_OK);
    CHECK(term > stats_of(x).current_term);
    CHECK(stats_of(y).role == MIRROR_ROLE_PRIMARY);
    /* x learns of the newer term at its first contact with y: no write of its old term
     * completes after that, and its callers get MIRROR_EFENCED. */
    int rc = MIRROR_OK;
    for (int i = 0; i < 2000 && rc == MIRROR_OK; i++) {
        rc = mirror_write(x, 64, "stale", 5);
        if (rc == MIRROR_OK) sleep_ms(5);
    }
    CHECK_RC(rc, MIRROR_EFENCED);
    CHECK(last_error_contains("newer primary"));
    struct mirror_stats xs = stats_of(x);
    CHECK(xs.fenced == 1);
    /* Demoted (the default on_fenced), x rejoins y as its backup. */
    for (int i = 0; i < 2000 && stats_of(x).role != MIRROR_ROLE_BACKUP; i++) sleep_ms(5);
    CHECK(stats_of(x).role == MIRROR_ROLE_BACKUP);
    CHECK_RC(mirror_wait_synchronous(y, 10 * SECOND_US), MIRROR_OK);
    CHECK_RC(mirror_write(y, 128, "after", 5), MIRROR_OK);
    CHECK(backup_caught_up(y, x));
    CHECK(regions_equal(y, x));
    CHECK_RC(mirror_write(x, 0, "x", 1), MIRROR_EFENCED);
    CHECK_RC(mirror_close(x), MIRROR_OK);
    CHECK_RC(mirror_close(y), MIRROR_OK);
}

int main(void) {
    alarm(600); /* a hang is a failure (SIGALRM ends the process) */
    strcpy(tmpdir, "/tmp/mirror-ffi-api-XXXXXX");
    REQUIRE(mkdtemp(tmpdir) != NULL);

    test_codes_and_strings();
    test_last_error();
    test_config();
    test_open_errors();

    mirror *b = NULL, *p = NULL;
    REQUIRE(open_backup("backup", "1MiB", 0, &b) == MIRROR_OK);
    uint16_t port = 0;
    REQUIRE(mirror_listen_port(b, &port) == MIRROR_OK);
    REQUIRE(open_primary("primary", port, "block", &p) == MIRROR_OK);
    test_pair_and_error_paths(p, b, port);
    test_verify(p, b);
    test_threads(p, b);
    test_block_timeout(p, &b, port);
    CHECK_RC(mirror_close(p), MIRROR_OK);
    CHECK_RC(mirror_close(b), MIRROR_OK);

    test_continue_degraded();
    test_authentication();
    test_events();
    test_peer_failure();
    test_forced_promotion_fences();

    remove_tmpdir();
    return finish();
}
