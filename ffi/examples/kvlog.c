/*
 * kvlog: a tiny persistent key-value log whose every write is mirrored to a backup node through
 * libmirror's C API.
 *
 *   kvlog backup DIR [ADDR:]PORT     serve as the backup on ADDR:PORT (ADDR defaults to 127.0.0.1;
 *                                    PORT 0 picks one) until Ctrl-C / SIGTERM
 *   kvlog put DIR [HOST:]PEER_PORT KEY VALUE
 *                                    append KEY=VALUE through a primary node in DIR; returns once
 *                                    the backup on HOST:PEER_PORT (HOST defaults to 127.0.0.1)
 *                                    holds it too
 *   kvlog get DIR KEY                print the latest value of KEY (reads DIR/kv.region directly:
 *                                    the region file is the data; works on the backup's DIR too)
 *   kvlog list DIR                   print every entry, oldest first
 *
 * Any other configuration key (README.md lists them) comes from the environment: KVLOG_SET holds
 * space-separated KEY=VALUE pairs that backup and put pass to mirror_config_set after their own
 * keys, so they can also override those (a value cannot contain a space). A key or value the
 * library refuses is printed with its message and kvlog exits with status 1. Across two machines
 * over RDMA, with the same secret file (32 to 4096 bytes, mode 600) on both:
 *
 *   KVLOG_SET="transport=rdma rdma_device=rxe0 secret_file=/etc/kvlog.key" \
 *     kvlog backup /var/lib/kv 10.78.0.2:7500                              (on 10.78.0.2)
 *   KVLOG_SET="transport=rdma rdma_device=rxe0 secret_file=/etc/kvlog.key" \
 *     kvlog put /var/lib/kv 10.78.0.2:7500 greeting hello                 (on 10.78.0.1)
 *
 * Build against an installed libmirror:
 *   cc -std=c11 -O2 -o kvlog kvlog.c $(pkg-config --cflags --libs mirror)
 *
 * The region (1 MiB) holds a 64-byte header (magic, entry count) and then fixed 256-byte entries.
 * A put writes the entry first and the count second, each with mirror_write, which returns once
 * the backup acknowledged the write and it is applied here; writes complete in order, so after a
 * crash the count never covers an entry that is not there, on either node.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <mirror.h>

#define REGION_SIZE (1u << 20)
#define HEADER_SIZE 64u
#define ENTRY_SIZE 256u
#define KEY_MAX 64u
#define VALUE_MAX (ENTRY_SIZE - KEY_MAX)
#define MAX_ENTRIES ((REGION_SIZE - HEADER_SIZE) / ENTRY_SIZE)
static const char MAGIC[8] = {'K', 'V', 'L', 'O', 'G', '0', '0', '1'};

struct header {
    char magic[8];
    uint64_t count;
};

struct entry {
    char key[KEY_MAX];     /* NUL-terminated */
    char value[VALUE_MAX]; /* NUL-terminated */
};

static volatile sig_atomic_t stop;
static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

/* Prints what failed, with libmirror's message for this thread, and exits. */
static void die(const char *what, int rc) {
    char msg[512];
    mirror_last_error(msg, sizeof msg);
    fprintf(stderr, "kvlog: %s: %s: %s\n", what, mirror_strerror(rc), msg);
    exit(1);
}

/* A configuration for a node whose files are DIR/kv.region and DIR/kv.queue. */
static mirror_config *node_config(const char *role, const char *dir) {
    char region[4096], queue[4096];
    snprintf(region, sizeof region, "%s/kv.region", dir);
    snprintf(queue, sizeof queue, "%s/kv.queue", dir);
    mirror_config *cfg = mirror_config_new();
    if (cfg == NULL) die("mirror_config_new", MIRROR_EPANIC);
    const char *keys[][2] = {
        {"role", role},     {"region", region},      {"region_size", "1MiB"},
        {"queue", queue},   {"queue_size", "4MiB"},  {"idle_spin_us", "20"},
        {"wait_spin_us", "5"},
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        int rc = mirror_config_set(cfg, keys[i][0], keys[i][1]);
        if (rc != MIRROR_OK) die("mirror_config_set", rc);
    }
    return cfg;
}

/* ADDR:PORT from an argument "[ADDR:]PORT" into `out` (ADDR defaults to 127.0.0.1). */
static void address(const char *arg, char *out, size_t out_size) {
    int n = strchr(arg, ':') != NULL ? snprintf(out, out_size, "%s", arg)
                                     : snprintf(out, out_size, "127.0.0.1:%s", arg);
    if (n < 0 || (size_t)n >= out_size) {
        fprintf(stderr, "kvlog: address too long: %s\n", arg);
        exit(2);
    }
}

/* Applies KVLOG_SET (space-separated KEY=VALUE pairs) to `cfg`, after the program's own keys so
 * that they win. The last `listen` given there, if any, is copied into `listen` (for the
 * message that says where the backup listens). */
static void apply_env(mirror_config *cfg, char *listen, size_t listen_size) {
    const char *env = getenv("KVLOG_SET");
    if (env == NULL) return;
    char *pairs = strdup(env);
    if (pairs == NULL) {
        perror("kvlog: KVLOG_SET");
        exit(1);
    }
    char *save = NULL;
    for (char *pair = strtok_r(pairs, " \t\n", &save); pair != NULL;
         pair = strtok_r(NULL, " \t\n", &save)) {
        char *eq = strchr(pair, '=');
        if (eq == NULL || eq == pair) {
            fprintf(stderr, "kvlog: KVLOG_SET: '%s' is not KEY=VALUE\n", pair);
            exit(2);
        }
        *eq = '\0';
        const char *key = pair, *value = eq + 1;
        int rc = mirror_config_set(cfg, key, value);
        if (rc != MIRROR_OK) die("KVLOG_SET", rc);
        if (listen != NULL && strcmp(key, "listen") == 0) {
            if (strlen(value) >= listen_size) {
                fprintf(stderr, "kvlog: KVLOG_SET: address too long: %s\n", value);
                exit(2);
            }
            memcpy(listen, value, strlen(value) + 1);
        }
    }
    free(pairs);
}

static int cmd_backup(const char *dir, const char *listen_arg) {
    mirror_config *cfg = node_config("backup", dir);
    char listen[256];
    address(listen_arg, listen, sizeof listen);
    int rc = mirror_config_set(cfg, "listen", listen);
    if (rc != MIRROR_OK) die("mirror_config_set(listen)", rc);
    apply_env(cfg, listen, sizeof listen);
    mirror *m = NULL;
    rc = mirror_open(cfg, &m);
    mirror_config_free(cfg);
    if (rc != MIRROR_OK) die("mirror_open", rc);
    uint16_t bound = 0;
    rc = mirror_listen_port(m, &bound);
    if (rc != MIRROR_OK) die("mirror_listen_port", rc);
    char *colon = strrchr(listen, ':'); /* mirror_open took it, so it is HOST:PORT */
    if (colon != NULL) *colon = '\0';    /* the host; the port is the bound one (0 picks one) */
    printf("kvlog: backup listening on %s:%u\n", listen, (unsigned)bound);
    fflush(stdout);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    while (!stop) {
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
    rc = mirror_close(m); /* a backup serves until it is closed */
    if (rc != MIRROR_OK) die("mirror_close", rc);
    printf("kvlog: backup stopped\n");
    return 0;
}

static int cmd_put(const char *dir, const char *peer_arg, const char *key, const char *value) {
    if (strlen(key) >= KEY_MAX || strlen(value) >= VALUE_MAX || key[0] == '\0') {
        fprintf(stderr, "kvlog: key must be 1..%u bytes, value at most %u bytes\n", KEY_MAX - 1,
                VALUE_MAX - 1);
        return 2;
    }
    mirror_config *cfg = node_config("primary", dir);
    char peer[256];
    address(peer_arg, peer, sizeof peer);
    int rc = mirror_config_set(cfg, "peer", peer);
    /* Refuse to complete a put the backup does not hold, but do not wait forever for it. */
    if (rc == MIRROR_OK) rc = mirror_config_set(cfg, "on_peer_loss", "block");
    if (rc == MIRROR_OK) rc = mirror_config_set(cfg, "write_timeout_ms", "10000");
    if (rc != MIRROR_OK) die("mirror_config_set", rc);
    apply_env(cfg, NULL, 0);
    mirror *m = NULL;
    rc = mirror_open(cfg, &m);
    mirror_config_free(cfg);
    if (rc != MIRROR_OK) die("mirror_open", rc);

    /* After a crash, recovery may still be replaying requests into the region: read the
     * header once the node mirrors synchronously (connected and recovered). */
    rc = mirror_wait_synchronous(m, INT64_C(10000000));
    if (rc != MIRROR_OK) die("mirror_wait_synchronous", rc);
    /* Zero-copy look at the current header. */
    size_t len = 0;
    const unsigned char *region = mirror_region(m, &len);
    if (region == NULL || len != REGION_SIZE) die("mirror_region", MIRROR_EINVAL);
    struct header h;
    memcpy(&h, region, sizeof h);
    if (memcmp(h.magic, MAGIC, sizeof MAGIC) != 0) { /* a fresh region: all zeros */
        memcpy(h.magic, MAGIC, sizeof MAGIC);
        h.count = 0;
    }
    if (h.count >= MAX_ENTRIES) {
        fprintf(stderr, "kvlog: the log is full (%u entries)\n", (unsigned)MAX_ENTRIES);
        mirror_close(m);
        return 1;
    }
    struct entry e;
    memset(&e, 0, sizeof e);
    memcpy(e.key, key, strlen(key));
    memcpy(e.value, value, strlen(value));
    rc = mirror_write(m, HEADER_SIZE + h.count * ENTRY_SIZE, &e, sizeof e);
    if (rc != MIRROR_OK) die("mirror_write(entry)", rc);
    h.count++;
    rc = mirror_write(m, 0, &h, sizeof h);
    if (rc != MIRROR_OK) die("mirror_write(header)", rc);
    printf("kvlog: put %s (entry %llu), mirrored\n", key, (unsigned long long)h.count);
    rc = mirror_close(m);
    if (rc != MIRROR_OK) die("mirror_close", rc);
    return 0;
}

/* Reads DIR/kv.region; calls `visit` for each entry. Returns the number of entries. */
static long scan(const char *dir, void (*visit)(const struct entry *, void *), void *arg) {
    char path[4096];
    snprintf(path, sizeof path, "%s/kv.region", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        perror(path);
        exit(1);
    }
    struct header h;
    if (pread(fd, &h, sizeof h, 0) != (ssize_t)sizeof h) {
        perror("kvlog: reading the header");
        exit(1);
    }
    if (memcmp(h.magic, MAGIC, sizeof MAGIC) != 0) h.count = 0;
    if (h.count > MAX_ENTRIES) {
        fprintf(stderr, "kvlog: %s: bad entry count %llu\n", path, (unsigned long long)h.count);
        exit(1);
    }
    for (uint64_t i = 0; i < h.count; i++) {
        struct entry e;
        if (pread(fd, &e, sizeof e, (off_t)(HEADER_SIZE + i * ENTRY_SIZE)) != (ssize_t)sizeof e) {
            perror("kvlog: reading an entry");
            exit(1);
        }
        e.key[KEY_MAX - 1] = '\0';
        e.value[VALUE_MAX - 1] = '\0';
        visit(&e, arg);
    }
    close(fd);
    return (long)h.count;
}

struct lookup {
    const char *key;
    char value[VALUE_MAX];
    int found;
};

static void find_latest(const struct entry *e, void *arg) {
    struct lookup *l = arg;
    if (strcmp(e->key, l->key) == 0) {
        memcpy(l->value, e->value, sizeof l->value);
        l->found = 1;
    }
}

static void print_entry(const struct entry *e, void *arg) {
    (void)arg;
    printf("%s=%s\n", e->key, e->value);
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "backup") == 0) return cmd_backup(argv[2], argv[3]);
    if (argc == 6 && strcmp(argv[1], "put") == 0) return cmd_put(argv[2], argv[3], argv[4], argv[5]);
    if (argc == 4 && strcmp(argv[1], "get") == 0) {
        struct lookup l = {argv[3], {0}, 0};
        scan(argv[2], find_latest, &l);
        if (!l.found) {
            fprintf(stderr, "kvlog: %s: not found\n", argv[3]);
            return 1;
        }
        printf("%s\n", l.value);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "list") == 0) {
        scan(argv[2], print_entry, NULL);
        return 0;
    }
    fprintf(stderr,
            "usage: kvlog backup DIR [ADDR:]PORT\n"
            "       kvlog put DIR [HOST:]PEER_PORT KEY VALUE\n"
            "       kvlog get DIR KEY\n"
            "       kvlog list DIR\n"
            "ADDR and HOST default to 127.0.0.1; KVLOG_SET=\"KEY=VALUE ...\" sets more config keys\n"
            "(libmirror %s)\n",
            mirror_version());
    return 2;
}
