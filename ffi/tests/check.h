/*
 * check.h: a tiny self-contained test harness for the C tests of libmirror.
 *
 * CHECK(cond) and CHECK_RC(expr, code) count a pass or print the failure (with the library's
 * last error) and count a failure; REQUIRE(cond) stops the program when later checks would be
 * meaningless. finish() prints the closing line "N passed, N failed" and gives the exit status.
 */
#ifndef MIRROR_CHECK_H
#define MIRROR_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mirror.h"

static int checks_passed;
static int checks_failed;

static inline int finish(void) {
    printf("%d passed, %d failed\n", checks_passed, checks_failed);
    fflush(stdout);
    return checks_failed == 0 ? 0 : 1;
}

static inline void check_failed(const char *file, int line, const char *what) {
    char msg[512];
    size_t n = mirror_last_error(msg, sizeof msg);
    checks_failed++;
    fprintf(stderr, "%s:%d: FAILED: %s (last error: %s)\n", file, line, what, n ? msg : "none");
}

#define CHECK(cond)                                           \
    do {                                                      \
        if (cond) {                                           \
            checks_passed++;                                  \
        } else {                                              \
            check_failed(__FILE__, __LINE__, #cond);          \
        }                                                     \
    } while (0)

#define CHECK_RC(expr, want)                                                          \
    do {                                                                              \
        int rc_ = (expr);                                                             \
        int want_ = (want);                                                           \
        if (rc_ == want_) {                                                           \
            checks_passed++;                                                          \
        } else {                                                                      \
            char what_[512];                                                          \
            snprintf(what_, sizeof what_, "%s returned %d (%s), expected %d (%s)",     \
                     #expr, rc_, mirror_strerror(rc_), want_, mirror_strerror(want_)); \
            check_failed(__FILE__, __LINE__, what_);                                  \
        }                                                                             \
    } while (0)

#define REQUIRE(cond)                                                   \
    do {                                                                \
        if (cond) {                                                     \
            checks_passed++;                                            \
        } else {                                                        \
            check_failed(__FILE__, __LINE__, "required: " #cond);       \
            (void)finish();                                             \
            exit(1);                                                    \
        }                                                               \
    } while (0)

/* This thread's last error as a string (static buffer; for messages in checks). */
static inline const char *last_error(void) {
    static _Thread_local char buf[1024];
    mirror_last_error(buf, sizeof buf);
    return buf;
}

#endif /* MIRROR_CHECK_H */
