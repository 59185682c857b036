// cxx_header.cpp: mirror.h compiles as C++17 (-Wall -Wextra -Werror) and links through its
// extern "C" guard; a few calls run, including a backup opened and closed from C++.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include <mirror.h>

static int passed = 0, failed = 0;

static void check(bool ok, const char *what) {
    if (ok) {
        ++passed;
    } else {
        ++failed;
        char msg[256];
        mirror_last_error(msg, sizeof msg);
        std::fprintf(stderr, "FAILED: %s (last error: %s)\n", what, msg);
    }
}

int main() {
    check(std::string(mirror_strerror(MIRROR_OK)) == "success", "strerror(0)");
    check(mirror_strerror(-1) != nullptr, "strerror of an unknown code");
    check(std::strncmp(mirror_version(), "0.", 2) == 0, "version");

    mirror_config *cfg = mirror_config_new();
    check(cfg != nullptr, "config_new");
    check(mirror_config_set(cfg, "no_such_key", "1") == MIRROR_EKEY, "unknown key");
    check(mirror_last_error(nullptr, 0) > 0, "last error");

    char dir[] = "/tmp/mirror-ffi-cxx-XXXXXX";
    check(mkdtemp(dir) != nullptr, "mkdtemp");
    const std::string region = std::string(dir) + "/b.region";
    const std::string queue = std::string(dir) + "/b.queue";
    check(mirror_config_set(cfg, "role", "backup") == MIRROR_OK, "role");
    check(mirror_config_set(cfg, "region", region.c_str()) == MIRROR_OK, "region");
    check(mirror_config_set(cfg, "region_size", "64KiB") == MIRROR_OK, "region_size");
    check(mirror_config_set(cfg, "queue", queue.c_str()) == MIRROR_OK, "queue");
    check(mirror_config_set(cfg, "queue_size", "1MiB") == MIRROR_OK, "queue_size");
    check(mirror_config_set(cfg, "max_write", "64KiB") == MIRROR_OK, "max_write");
    check(mirror_config_set(cfg, "listen", "127.0.0.1:0") == MIRROR_OK, "listen");
    check(mirror_config_set(cfg, "idle_spin_us", "20") == MIRROR_OK, "idle_spin_us");

    mirror *m = nullptr;
    check(mirror_open(cfg, &m) == MIRROR_OK && m != nullptr, "open a backup");
    mirror_config_free(cfg);
    if (m != nullptr) {
        struct mirror_stats s{};
        s.size = sizeof s;
        check(mirror_stats(m, &s) == MIRROR_OK, "stats");
        check(s.role == MIRROR_ROLE_BACKUP && s.region_size == 64 * 1024, "stats fields");
        std::uint16_t port = 0;
        check(mirror_listen_port(m, &port) == MIRROR_OK && port != 0, "listen port");
        std::size_t len = 0;
        check(mirror_region(m, &len) != nullptr && len == 64 * 1024, "region view");
        const char x = 'x';
        check(mirror_write(m, 0, &x, 1) == MIRROR_EROLE, "a backup refuses writes");
        check(mirror_close(m) == MIRROR_OK, "close");
    }
    check(mirror_close(nullptr) == MIRROR_OK, "close(NULL)");
    // Everything the node made there (its files, the control socket), then the directory.
    std::filesystem::remove_all(dir);
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
