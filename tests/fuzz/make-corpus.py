#!/usr/bin/python3
"""Write the seed corpus of fuzz-proto: one valid frame of each message
type (docs/devel/broker-protocol.md), plus a few near misses.

    tests/fuzz/make-corpus.py [DIR]     (default: tests/fuzz/corpus)
"""

import os
import struct
import sys

MAGIC, VERSION = 0x4B42534D, 1
(HELLO, WELCOME, LOOKUP, LOOKUP_REPLY, UPLOAD, UPLOAD_REPLY, RELEASE,
 RELEASE_REPLY, STATS, STATS_REPLY, ERROR) = range(1, 12)
PAGE = 4096


def frame(mtype, payload, msg_id=1):
    return struct.pack("<IHHII", MAGIC, VERSION, mtype, len(payload), msg_id) + payload


def hello(group=b"group-1", name=b"qemu-vm1"):
    return struct.pack("<BBH", len(group), len(name), 0) + group + name


def stats_record(name, values):
    return name.ljust(64, b"\0") + struct.pack("<16Q", *values)


def broker_record(values):
    return struct.pack("<13Q", *values)


def seeds():
    page = bytes((i * 7) & 0xFF for i in range(PAGE))
    yield "hello", frame(HELLO, hello())
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
                               + stats_record(b"g1", range(16)) + stats_record(b"g-2", range(16, 32)))
    yield "stats-reply-broker", frame(STATS_REPLY, struct.pack("<II", 1, 1) + broker_record(range(13))
                                      + stats_record(b"web", [1] * 13 + [0xFFFFFFFFFFFFFFFF, 2, 1]))
    yield "error", frame(ERROR, struct.pack("<IHH", 13, 14, 0) + b"access denied!")
    # near misses: the decoder must refuse them
    yield "bad-count", frame(LOOKUP, struct.pack("<IIQ", 2, 0, 1))
    yield "bad-length", struct.pack("<IHHII", MAGIC, VERSION, LOOKUP, 1 << 24, 1)
    yield "bad-name", frame(HELLO, hello(group=b"../etc"))
    yield "bad-broker", frame(STATS_REPLY, struct.pack("<II", 0, 2) + broker_record(range(13)) * 2)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
    os.makedirs(out, exist_ok=True)
    for name, data in seeds():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
