#!/usr/bin/python3
"""Write the seed corpora of the fuzzers.

fuzz-proto (tests/fuzz/corpus): one valid frame of each message type
(docs/devel/broker-protocol.md), plus a few near misses.

fuzz-broker (tests/fuzz/corpus-broker): scripts of operations by several
clients, in the input format of tests/fuzz/fuzz-broker.c (its top comment
and config_parse()): members that join, look pages up, upload them (the
harness computes the hashes with the group's secret), meet, release,
park, exit; refusals, limits, reloads, and hostile bytes.

    tests/fuzz/make-corpus.py [--proto DIR] [--broker DIR]

Without an option, both, into their directories in the tree.  The files
are rewritten from scratch: a seed removed here stays until deleted.
"""

import argparse
import os
import struct

MAGIC, VERSION = 0x4B42534D, 1
(HELLO, WELCOME, LOOKUP, LOOKUP_REPLY, UPLOAD, UPLOAD_REPLY, RELEASE,
 RELEASE_REPLY, STATS, STATS_REPLY, ERROR, ANSWERED, ANSWERED_REPLY) = range(1, 14)
GROUP_FIELDS = 20
PAGE = 4096


def frame(mtype, payload, msg_id=1):
    return struct.pack("<IHHII", MAGIC, VERSION, mtype, len(payload), msg_id) + payload


def hello_payload(group=b"group-1", name=b"qemu-vm1"):
    return struct.pack("<BBH", len(group), len(name), 0) + group + name


def stats_record(name, values):
    return name.ljust(64, b"\0") + struct.pack("<%dQ" % len(values), *values)


def broker_record(values):
    return struct.pack("<13Q", *values)


def seeds():
    page = bytes((i * 7) & 0xFF for i in range(PAGE))
    yield "hello", frame(HELLO, hello_payload())
    yield "welcome", frame(WELCOME, struct.pack("<7I", PAGE, 262144, 262144, 4096, 64, 4096, 1)
                           + bytes(range(192)))
    yield "lookup", frame(LOOKUP, struct.pack("<II3Q", 3, 0, 1, 2, 0xFFFFFFFFFFFFFFFF))
    yield "lookup-reply", frame(LOOKUP_REPLY, struct.pack("<II4I", 2, 0, 7, 0, 0xFFFFFFFF, 1))
    yield "upload", frame(UPLOAD, struct.pack("<IIQ", 1, PAGE, 0x1234) + page)
    yield "upload-reply", frame(UPLOAD_REPLY, struct.pack("<II4I", 2, 0, 3, 0, 0xFFFFFFFF, 2))
    yield "release", frame(RELEASE, struct.pack("<II4I", 2, 0, 3, 1, 9, 5))
    yield "release-reply", frame(RELEASE_REPLY, struct.pack("<Q", 6))
    yield "stats", frame(STATS, b"")
    yield "stats-reply", frame(STATS_REPLY, struct.pack("<II", 2, 0)
                               + stats_record(b"g1", range(GROUP_FIELDS))
                               + stats_record(b"g-2", range(16, 16 + GROUP_FIELDS)))
    yield "stats-reply-broker", frame(STATS_REPLY, struct.pack("<II", 1, 1) + broker_record(range(13))
                                      + stats_record(b"web", [1] * 13 + [0xFFFFFFFFFFFFFFFF]
                                                     + [2] * (GROUP_FIELDS - 14)))
    # records of an older broker (19 fields) and of a newer one (24)
    yield "stats-reply-19", frame(STATS_REPLY, struct.pack("<II", 1, 0)
                                  + stats_record(b"old", range(19)))
    yield "stats-reply-24", frame(STATS_REPLY, struct.pack("<II", 2, 0)
                                  + stats_record(b"new", range(24)) * 2)
    yield "answered", frame(ANSWERED, b"")
    yield "answered-reply", frame(ANSWERED_REPLY, struct.pack("<IIQ2Q", 2, 1, 3, 0x1234, 0xFFFFFFFFFFFFFFFF))
    yield "error", frame(ERROR, struct.pack("<IHH", 13, 14, 0) + b"access denied!")
    # near misses: the decoder must refuse them
    yield "bad-count", frame(LOOKUP, struct.pack("<IIQ", 2, 0, 1))
    yield "bad-length", struct.pack("<IHHII", MAGIC, VERSION, LOOKUP, 1 << 24, 1)
    yield "bad-name", frame(HELLO, hello_payload(group=b"../etc"))
    yield "bad-broker", frame(STATS_REPLY, struct.pack("<II", 0, 2) + broker_record(range(13)) * 2)


# fuzz-broker's scripts (keep in step with tests/fuzz/fuzz-broker.c)

OPS = {name: i for i, name in enumerate(
    "CONNECT HELLO LOOKUP UPLOAD RELEASE STATS RAW MUTATE FLUSH READ CLOSE"
    " SHUTDOWN PUMP SPAWN EXIT RECONFIGURE READ_ALL ANSWERED".split())}
GROUPS = ["fz", "dr", "dg", "dx", "dm", "p0", "p1", "p2", "p3"]
F_SPLIT, F_BAD, F_BAD2 = 1, 2, 4


def config(slots=16, client_quota=0, uid_quota=0, strict=False,
           max_clients=64, reserved=8, per_uid=0, max_groups=16,
           groups_per_uid=4, decl=()):
    """The 3 configuration bytes (config_parse()); values from its tables"""
    c0 = ([16, 4, 64, 256].index(slots) | [0, 1, 3, 8].index(client_quota) << 2
          | [0, 1, 2, 6].index(uid_quota) << 4 | strict << 6)
    c1 = ([64, 2, 4, 9].index(max_clients) | [8, 0, 1, 3].index(reserved) << 2
          | [0, 1, 3, 64].index(per_uid) << 4 | [16, 1, 2, 4].index(max_groups) << 6)
    c2 = [4, 1, 2, 3].index(groups_per_uid)
    for g in decl:
        c2 |= 1 << (GROUPS.index(g) + 1)
    return bytes([c0, c1, c2])


def op(name, k=0, *args):
    return bytes([OPS[name] | k << 5, *args])


def with_split(flags, split):
    flags |= F_SPLIT if split else 0
    return bytes([flags]) + (bytes([split]) if split else b"")


def hello(k, group="fz", name=0, flags=0, split=0):
    return op("HELLO", k, GROUPS.index(group), name) + with_split(flags, split)


def count_byte(n, special, small):
    return 0xf8 + special.index(n) if n in special else (n - 1) % small


def entries(given, count):
    """The harness reads min(count, 8) entries, and repeats them past 8"""
    return [given[i % len(given)] for i in range(min(count, 8))] if given else []


def lookup(k, sels, count=None, flags=0, split=0):
    """sels: ("pool", i), ("seed", n) or ("raw", hash), at most 8"""
    count = len(sels) if count is None else count
    out = op("LOOKUP", k, count_byte(count, [16, 256, 4096, 4097, 0], 8))
    out += with_split(flags, split)
    for kind, v in entries(sels, count):
        if kind == "pool":
            out += bytes([v])
        elif kind == "seed":
            out += bytes([0x80]) + struct.pack("<H", v)
        else:
            out += bytes([0xc0]) + struct.pack("<Q", v)
    return out


def upload(k, pages, count=None, flags=0, split=0):
    """pages: ("pool", i) or ("seed", n), "!" appended for a wrong hash"""
    count = len(pages) if count is None else count
    out = op("UPLOAD", k, count_byte(count, [8, 64, 65, 0], 4))
    out += with_split(flags, split)
    for page in entries(pages, count):
        sel = 0x08 if page[-1] == "!" else 0
        if page[0] == "pool":
            out += bytes([sel | page[1]])
        else:
            out += bytes([sel | 0x10]) + struct.pack("<H", page[1])
    return out


def release(k, given, count=None, flags=0, split=0):
    """entries: ("held", i, r): the i-th slot held, 1 + r % held references;
    ("over", i): one more than held; ("raw", slot, refs 1..3)"""
    count = len(given) if count is None else count
    n = {0: 0xfc, 4097: 0xfd}.get(count, (count - 1) % 8)
    out = op("RELEASE", k, n) + with_split(flags, split)
    for e in entries(given, count):
        if e[0] == "held":
            out += bytes([e[1], e[2]])
        elif e[0] == "over":
            out += bytes([0x80 + e[1], 0])
        else:
            out += bytes([0xc0 + e[2] - 1, e[1]])
    return out


def stats(k, split=0):
    return op("STATS", k) + with_split(0, split)


def answered(k, split=0):
    return op("ANSWERED", k) + with_split(0, split)


def raw(k, data):
    return op("RAW", k, len(data) - 1) + data


def mutate(k, mtype, changes=(), cut=0):
    out = op("MUTATE", k, mtype, len(changes))
    for pos, val in changes:
        out += struct.pack("<HB", pos, val)
    return out + bytes([0x80 | cut if cut else 0])


def reconfigure(cfg):
    return op("RECONFIGURE") + cfg


def ops(*names_and_clients):
    return b"".join(op(n, k) for n, k in names_and_clients)


def broker_seeds():
    read = lambda k: op("READ", k)
    pool = lambda *ids: [("pool", i) for i in ids]
    yield "join-share-release", config() + op("CONNECT", 0) + hello(0) + read(0) \
        + lookup(0, pool(1, 2)) + read(0) + upload(0, pool(1, 2)) + read(0) \
        + lookup(0, pool(1, 1)) + read(0) + release(0, [("held", 0, 0), ("held", 1, 1)]) \
        + read(0) + stats(0) + read(0) + op("CLOSE", 0)
    yield "meeting", config() + op("CONNECT", 0) + op("CONNECT", 1) + hello(0, name=1) \
        + hello(1, name=2) + op("READ_ALL") + lookup(0, pool(3, 4)) + read(0) \
        + lookup(1, pool(3)) + read(1) + upload(1, pool(3)) + read(1) \
        + lookup(0, pool(3)) + read(0) + stats(1) + read(1) \
        + release(1, [("held", 0, 0)]) + read(1) + op("CLOSE", 0) + op("PUMP") \
        + stats(1) + read(1) + op("CLOSE", 1)
    # ANSWERED: A's first says lost, then names the miss B met and the
    # one B's upload answered; B is told of none of them
    yield "answered", config() + op("CONNECT", 0) + op("CONNECT", 1) + hello(0, name=1) \
        + hello(1, name=2) + op("READ_ALL") + answered(0) + lookup(0, pool(3, 4)) + read(0) \
        + lookup(1, pool(3)) + read(1) + upload(1, pool(3, 4)) + read(1) \
        + answered(0) + answered(1) + op("READ_ALL") + answered(0, split=5) + op("PUMP") \
        + op("FLUSH", 0) + read(0) + answered(2) + read(2)
    yield "parked-exit", config() + op("SPAWN", 2) + hello(2, "p0") + read(2) \
        + upload(2, [("pool", 4), ("seed", 7)]) + read(2) + op("CLOSE", 2) + op("PUMP") \
        + op("CONNECT", 3) + stats(3) + read(3) + op("EXIT", 2) + op("PUMP") \
        + op("CONNECT", 4) + stats(4) + read(4)
    yield "exit-connected", config() + op("SPAWN", 1) + hello(1, "fz") + read(1) \
        + upload(1, pool(5, 6)) + read(1) + op("EXIT", 1) + op("PUMP") \
        + lookup(1, pool(5)) + read(1) + op("CLOSE", 1) + op("PUMP")
    yield "parked-shared", config() + op("CONNECT", 0) + op("CONNECT", 1) + hello(0) \
        + hello(1) + op("READ_ALL") + upload(0, pool(1, 2, 3)) + read(0) \
        + lookup(1, pool(1, 2, 3)) + read(1) + op("CLOSE", 0) + op("PUMP") \
        + release(1, [("held", 0, 0), ("held", 1, 0), ("held", 2, 0)]) + read(1) \
        + op("CONNECT", 2) + hello(2) + lookup(2, pool(1, 2)) + read(2)
    yield "client-quota", config(client_quota=1) + op("CONNECT", 0) + hello(0, "p1") \
        + upload(0, pool(1, 2, 3)) + read(0) + lookup(0, pool(1, 1)) + read(0) \
        + release(0, [("held", 0, 0)]) + read(0) + upload(0, pool(2)) + read(0)
    yield "uid-quota", config(uid_quota=1) + op("CONNECT", 0) + hello(0, "fz") \
        + upload(0, pool(1, 2)) + read(0) + op("CONNECT", 1) + hello(1, "fz") \
        + upload(1, pool(1, 3)) + read(1)
    yield "store-full", config(slots=4, client_quota=8) + op("CONNECT", 0) + hello(0, "p2") \
        + upload(0, [("seed", i) for i in range(1, 5)]) + read(0) \
        + upload(0, [("seed", 9), ("pool", 1)]) + read(0) \
        + release(0, [("held", 0, 0)]) + read(0) + upload(0, [("seed", 9)]) + read(0)
    yield "max-clients", config(max_clients=2, reserved=0) \
        + b"".join(op("CONNECT", k) for k in range(4)) + op("READ_ALL") \
        + hello(0) + hello(3) + op("READ_ALL")
    yield "reserve", config(max_clients=2, reserved=1, per_uid=1) + op("CONNECT", 0) \
        + hello(0) + read(0) + upload(0, pool(1)) + read(0) + op("CLOSE", 0) \
        + op("CONNECT", 1) + op("CONNECT", 2) + op("READ_ALL") + stats(1) + read(1)
    yield "groups-strict", config(strict=True, decl=("dr", "dx")) \
        + op("CONNECT", 0) + hello(0, "p0") + op("CONNECT", 1) + hello(1, "dx") \
        + op("CONNECT", 2) + hello(2, "dr") + op("CONNECT", 3) + hello(3, "fz") \
        + op("READ_ALL") + stats(2) + stats(3) + op("READ_ALL")
    yield "groups-limits", config(max_groups=2, groups_per_uid=1, decl=("dg", "dm")) \
        + op("CONNECT", 0) + hello(0, "p0") + op("CONNECT", 1) + hello(1, "p1") \
        + op("CONNECT", 2) + hello(2, "dg") + op("CONNECT", 3) + hello(3, "dm") \
        + op("READ_ALL") + op("CLOSE", 0) + op("PUMP") + op("CONNECT", 0) \
        + hello(0, "p1") + read(0) + upload(3, pool(1, 2)) + read(3)
    yield "reload", config(decl=("dr", "dm")) + op("CONNECT", 0) + hello(0, "dr") \
        + op("CONNECT", 1) + hello(1, "dm") + op("READ_ALL") + upload(0, pool(1)) \
        + upload(1, pool(2)) + op("READ_ALL") \
        + reconfigure(config(strict=False, max_clients=4)) \
        + op("CONNECT", 2) + hello(2, "dr") + read(2) + op("CLOSE", 0) \
        + op("CLOSE", 1) + op("PUMP") \
        + reconfigure(config(client_quota=1, decl=("dr", "dx"))) \
        + op("CONNECT", 3) + hello(3, "dr") + read(3) + upload(3, pool(1, 2)) + read(3)
    # ms_broker_group_decl_equal() compared two empty uid lists (uids=*)
    # with memcmp() of NULL: undefined behaviour at every reload
    yield "regress-reload-uids-any", config() + reconfigure(config())
    yield "hostile", config() + op("CONNECT", 0) + raw(0, b"MSBK\x01\x00\x01\x00" * 3) \
        + read(0) + op("CONNECT", 1) + mutate(1, 3, [(8, 0xff)]) + read(1) \
        + op("CONNECT", 2) + mutate(2, 2) + read(2) + op("CONNECT", 3) + mutate(3, 1, cut=5) \
        + op("CLOSE", 3) + op("CONNECT", 4) + mutate(4, 0) + read(4)
    yield "violations", config() + op("CONNECT", 0) + lookup(0, pool(1)) + read(0) \
        + op("CONNECT", 1) + hello(1) + hello(1, "p0") + read(1) \
        + op("CONNECT", 2) + hello(2) + upload(2, pool(1), flags=F_BAD2) + read(2) \
        + op("CONNECT", 3) + hello(3) + upload(3, pool(1)) + read(3) \
        + release(3, [("held", 0, 0), ("over", 0)]) + read(3) \
        + op("CONNECT", 4) + hello(4, flags=F_BAD) + read(4) \
        + op("CONNECT", 5) + hello(5) + lookup(5, pool(1), count=4097) + read(5) \
        + op("CONNECT", 6) + hello(6) + release(6, [("raw", 3, 1)]) + read(6) \
        + op("CONNECT", 7) + hello(7, flags=F_BAD2) + read(7)
    yield "split", config() + op("CONNECT", 0) + hello(0, split=40) + op("PUMP") \
        + op("FLUSH", 0) + read(0) + upload(0, pool(1, 2), split=200) + op("PUMP") \
        + lookup(0, pool(1), split=3) + op("PUMP") + op("FLUSH", 0) + read(0) \
        + op("CONNECT", 1) + hello(1, split=128) + op("CLOSE", 1)
    yield "pipeline", config() + op("CONNECT", 0) + hello(0) \
        + b"".join(upload(0, [("seed", i)]) + lookup(0, [("seed", i)]) for i in range(8)) \
        + stats(0) + op("PUMP") + read(0) + op("CONNECT", 1) + hello(1) \
        + b"".join(lookup(1, [("seed", i)]) for i in range(8)) + op("CLOSE", 1)
    yield "shutdown", config() + op("CONNECT", 0) + hello(0) + read(0) \
        + upload(0, pool(1, 2)) + op("SHUTDOWN", 0) + read(0) + op("PUMP") \
        + op("CONNECT", 1) + stats(1) + read(1)
    yield "big-batches", config(slots=64) + op("CONNECT", 0) + hello(0) + read(0) \
        + upload(0, pool(1, 2, 3), count=64) + read(0) \
        + lookup(0, pool(1, 2), count=4096) + read(0) + stats(0) + read(0)
    yield "backpressure", config(slots=4) + op("CONNECT", 0) + hello(0) + read(0) \
        + b"".join(lookup(0, pool(1, 2), count=4096) for i in range(10)) + op("PUMP") \
        + op("CONNECT", 1) + hello(1) + upload(1, pool(1)) + op("READ_ALL")
    # The broker drops its ERROR to a client whose socket buffer is full
    # (it never blocks on a client): the hang-up that follows a malformed
    # request was judged at every read after it, with nothing expected
    yield "regress-hangup-read-twice", config() + op("CONNECT", 0) + hello(0) + read(0) \
        + b"".join(lookup(0, pool(1, 2), count=4096) for i in range(7)) \
        + lookup(0, pool(1, 2), count=4096, flags=F_BAD) + op("PUMP") + read(0) \
        + lookup(0, pool(1)) + read(0) + op("READ_ALL")
    yield "admin-stats", config(decl=("dr", "dg", "dx", "dm")) + op("CONNECT", 0) \
        + hello(0, "dg") + op("CONNECT", 1) + hello(1, "p3") + op("READ_ALL") \
        + op("CONNECT", 2) + stats(2) + read(2)


def main():
    here = os.path.dirname(__file__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proto", metavar="DIR", help="fuzz-proto's seeds only, into DIR")
    ap.add_argument("--broker", metavar="DIR", help="fuzz-broker's seeds only, into DIR")
    args = ap.parse_args()
    jobs = []
    if args.proto or not args.broker:
        jobs.append((args.proto or os.path.join(here, "corpus"), seeds()))
    if args.broker or not args.proto:
        jobs.append((args.broker or os.path.join(here, "corpus-broker"), broker_seeds()))
    for out, gen in jobs:
        os.makedirs(out, exist_ok=True)
        for name, data in gen:
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
