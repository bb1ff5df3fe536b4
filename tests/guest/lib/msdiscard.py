"""Helpers of the discard tests (test-balloon, test-virtio-mem): what a
range of guest RAM holds, seen from the host through /proc/PID."""
import re
import struct
import time

import msguest as mg

PAGE = 4096


def store_vmas(pid, rng):
    """(start, end) of the private mappings of a mem-share store inside
    rng: guest pages that map the store (the scanner's own view of the
    store is a shared mapping)."""
    out = []
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) .*mem-share-store", line)
            if m and m.group(3)[3] == "p":
                s, e = int(m.group(1), 16), int(m.group(2), 16)
                if s >= rng[0] and e <= rng[1]:
                    out.append((s, e))
    return out


def merged_pages(pid, rng):
    """Page numbers (from rng's start) whose host page maps the store:
    inside a private store mapping and not a private copy (absent: not
    touched since the merge; or present as a file page, pagemap bit 61)."""
    pages = set()
    with open("/proc/%d/pagemap" % pid, "rb") as pm:
        for s, e in store_vmas(pid, rng):
            n = (e - s) // PAGE
            pm.seek(s // PAGE * 8)
            data = pm.read(n * 8)
            for k, (ent,) in enumerate(struct.iter_unpack("<Q", data)):
                if not ent >> 63 & 1 or ent >> 61 & 1:
                    pages.add((s - rng[0]) // PAGE + k)
    return pages


def read_pages(pid, rng, pages):
    """{page number: bytes} of the pages of rng, read at their host address."""
    out = {}
    with open("/proc/%d/mem" % pid, "rb") as mem:
        for p in pages:
            mem.seek(rng[0] + p * PAGE)
            out[p] = mem.read(PAGE)
    return out


def nonzero(contents):
    """Sorted page numbers of {page: bytes} that are not all zeros."""
    return sorted(p for p, b in contents.items() if b.count(0) != PAGE)


def wait_for(cond, timeout, what):
    """Poll cond() until true; GuestError after timeout (scaled) seconds."""
    deadline = time.monotonic() + mg.scaled(timeout)
    while not cond():
        if time.monotonic() > deadline:
            raise mg.GuestError("%s within %d s" % (what, mg.scaled(timeout)))
        time.sleep(0.5)


def trace_lines(path, rx):
    """Matches of rx (compiled) in the trace log at path, in order."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                m = rx.search(line)
                if m:
                    out.append(m)
    except OSError:
        pass
    return out
