#!/usr/bin/env python3
"""What one durable 4 KiB append costs on a machine's disk, several ways (ci/lab/lab.sh sync-costs).

Run inside a lab machine on its ext4 (cache=none virtual disk). Each line: p50 and mean of N
appends into a 16 MiB file, three rounds interleaved so that a slow spell falls on all of them:
  - through a shared mapping, then fdatasync, into blocks written once before;
  - the same with the file's header page stored too (two pages per sync);
  - the same into preallocated ("unwritten") blocks (fallocate): each first write converts;
  - O_DIRECT + O_DSYNC pwrite (one block request, as fio's on a block device).
"""
import mmap
import os
import statistics
import sys
import time

SIZE = 16 << 20
REC = 4096
N = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
PATH = os.path.join(sys.argv[1] if len(sys.argv) > 1 else "/disk", "sync-costs.tmp")


def make(written):
    fd = os.open(PATH, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    if written:
        zeros = b"\0" * (1 << 20)
        for i in range(SIZE >> 20):
            os.pwrite(fd, zeros, i << 20)
    else:
        os.posix_fallocate(fd, 0, SIZE)
    os.fsync(fd)
    return fd


def timed(step):
    xs = []
    for i in range(N):
        t = time.perf_counter()
        step(i)
        xs.append((time.perf_counter() - t) * 1e6)
    return statistics.median(xs), statistics.mean(xs)


def offset(i):
    return 4096 + (i * REC) % (SIZE - 8192)


def mapped(written, header):
    fd = make(written)
    m = mmap.mmap(fd, SIZE)
    data = b"x" * REC

    def step(i):
        m[offset(i):offset(i) + REC] = data
        if header:
            m[0:8] = i.to_bytes(8, "little")
        os.fdatasync(fd)

    r = timed(step)
    m.close()
    os.close(fd)
    return r


def direct():
    os.close(make(True))
    fd = os.open(PATH, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    buf = mmap.mmap(-1, REC)
    buf.write(b"x" * REC)
    r = timed(lambda i: os.pwritev(fd, [buf], offset(i)))
    os.close(fd)
    return r


WAYS = [
    ("mapping + fdatasync, written blocks", lambda: mapped(True, False)),
    ("mapping + header page + fdatasync, written blocks", lambda: mapped(True, True)),
    ("mapping + fdatasync, preallocated (unwritten) blocks", lambda: mapped(False, False)),
    ("O_DIRECT + O_DSYNC pwrite", direct),
]
print(f"durable 4 KiB appends, {N} per way and round, p50 / mean in µs")
for rnd in range(3):
    for name, way in WAYS:
        p50, mean = way()
        print(f"round {rnd}: {name}: {p50:.0f} / {mean:.0f}")
os.unlink(PATH)
