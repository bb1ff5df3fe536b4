#!/usr/bin/python3
"""The python3 service of the fleet guest (tests/guest/fleet/init).

Holds a deterministic structure in memory for as long as the guest runs,
as a long-lived Python service holds its caches:

  blobs    dict "blob%05d" -> bytes of 128 KiB (about 3/4 of the data;
           glibc gives each its own mmap, so their pages hold data only)
  records  list of (int, str, float) tuples (the rest: many small objects,
           pointer-rich, laid out by the allocator)

Blob i (record j) is built from the fixed key SHARED_KEY when i (j) falls
in the first `shared` percent, from the guest's seed otherwise: the shared
part is identical in every guest of the fleet, the rest differs with the
seed.  Every `interval` seconds it looks up a few entries, as a service
answering requests would (which touches reference counts: Python's objects
are not read-only in memory).

Commands, one per line on the FIFO DIR/python.in (kept open read-write, so
writers never block and the service never sees EOF):
  verify   rebuild every blob and record from the seed, compare; write the
           result to DIR/python.result ("ok ..." or "bad=N first=KEY ...")
  corrupt  the verifier's self-test: replace the last blob by a copy with
           one byte flipped (the next verify must report it); says what it
           changed in DIR/python.corrupted

  fleet.py SEED MIB SHARED DIR INTERVAL
"""
import os
import random
import select
import sys
import time

SHARED_KEY = 0x5EED5EED
BLOB = 128 << 10
RECORD_BYTES = 128          # about what one record tuple costs


def key_of(index, nshared, seed):
    return SHARED_KEY if index < nshared else seed


def blob(key, i):
    return random.Random(key * 1000003 + i).randbytes(BLOB)


def record(key, j):
    h = (key * 2654435761 + j * 40503) & 0xFFFFFFFF
    return (j, "rec-%d-%08x" % (j, h), h / 65536.0)


def write_result(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.rename(path + ".tmp", path)


def main():
    seed, mib, shared = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rundir, interval = sys.argv[4], float(sys.argv[5])
    t0 = time.monotonic()
    total = mib << 20
    nblobs = max(1, total * 3 // 4 // BLOB)
    nrec = max(1, (total - nblobs * BLOB) // RECORD_BYTES)
    bshared = nblobs * shared // 100
    rshared = nrec * shared // 100
    blobs = {}
    for i in range(nblobs):
        blobs["blob%05d" % i] = blob(key_of(i, bshared, seed), i)
    records = [record(key_of(j, rshared, seed), j) for j in range(nrec)]

    fd = os.open(os.path.join(rundir, "python.in"), os.O_RDWR)
    result = os.path.join(rundir, "python.result")
    write_result(os.path.join(rundir, "python.ready"),
                 "blobs=%d shared=%d records=%d shared=%d mib=%.1f s=%.1f"
                 % (nblobs, bshared, nrec, rshared,
                    (nblobs * BLOB + nrec * RECORD_BYTES) / (1 << 20),
                    time.monotonic() - t0))
    buf = b""
    tick = 0
    while True:
        r, _, _ = select.select([fd], [], [], interval)
        if not r:
            # A few requests: look entries up, as a service would.
            tick += 1
            n = 0
            for k in range(16):
                b = blobs["blob%05d" % ((tick * 16 + k) * 7 % nblobs)]
                n += b[k] + len(records[(tick * 16 + k) * 13 % nrec][1])
            continue
        buf += os.read(fd, 4096)
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = line.decode(errors="replace").strip()
            if cmd == "verify":
                t = time.monotonic()
                bad, first = 0, None
                if len(blobs) != nblobs:
                    bad += abs(len(blobs) - nblobs)
                    first = first or "blobs=%d" % len(blobs)
                for i in range(nblobs):
                    name = "blob%05d" % i
                    if blobs.get(name) != blob(key_of(i, bshared, seed), i):
                        bad += 1
                        first = first or name
                if len(records) != nrec:
                    bad += abs(len(records) - nrec)
                    first = first or "records=%d" % len(records)
                for j, rec in enumerate(records):
                    if rec != record(key_of(j, rshared, seed), j):
                        bad += 1
                        first = first or "record%d" % j
                what = "blobs=%d records=%d s=%.1f" % (nblobs, nrec,
                                                        time.monotonic() - t)
                write_result(result, ("ok " if not bad else
                                      "bad=%d first=%s " % (bad, first)) + what)
            elif cmd == "corrupt":
                name = "blob%05d" % (nblobs - 1)
                b = bytearray(blobs[name])
                b[BLOB // 2] ^= 0x01
                blobs[name] = bytes(b)
                write_result(os.path.join(rundir, "python.corrupted"),
                             "%s byte=%d" % (name, BLOB // 2))
            elif cmd:
                print("MS-FLEET python unknown command %r" % cmd, flush=True)


if __name__ == "__main__":
    main()
