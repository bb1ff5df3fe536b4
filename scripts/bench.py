#!/usr/bin/python3
"""mem-share benchmark: no dedup vs kernel KSM (default, tuned) vs mode=user.

One run, same guests and workload for every configuration (`make bench`):

  off          -object mem-share,mode=off: nothing merged (the reference)
  ksm-default  mode=kernel, host KSM run=1 pages_to_scan=100 sleep_millisecs=20
  ksm-tuned    mode=kernel, host KSM run=1 pages_to_scan=2000 sleep_millisecs=10
  user         mode=user with its default scan-rate/max-cpu/stable-scans
  user-maps    the same with vm.max_map_count raised to 1048576 for the run
               (restored afterwards), as an operator running mode=user on
               guests with scattered duplicates sets it (docs/system)
  user-group   user-maps with the guests in one mem-share-broker group
               (group=bench): they also share with each other, as KSM's
               host-wide merging does

Each configuration boots N TCG Linux guests (--guests; a list such as
1,2,4,8 runs every configuration at each count) running a workload
(--workload):

  busy         the test workload (tests/guest/workload: zero/shared/unique
               pages, every byte verified every round) that keeps writing
               after the fill: ms.busy percent of the pages rewritten each
               tick (half identical, half changed), ms.flip pages a second
               altered and put back (the default)
  idle         the same workload quiet after the fill

and samples every --interval seconds:

  host memory used   AnonPages+Shmem of /proc/meminfo minus a baseline taken
                     just before the guests start (primary figure)
  Pss                sum of Pss_Anon+Pss_Shmem of the QEMU processes (only our
                     guests: immune to other processes on the host), and of
                     the mem-share-broker for a group
  RSS / RssAnon      per QEMU process, for reference
  dedup CPU          ksmd's utime+stime (KSM), scan-cpu-ns of query-mem-share
                     summed over the guests (mode=user), plus the broker's
                     utime+stime for a group
  interference       /sys/kernel/mm/ksm run/pages_to_scan/sleep_millisecs
                     against what this configuration expects, and other QEMU
                     processes on the host

Saved memory is the off run's steady host memory minus this run's (the off
run of the same guest count).  After every workload reported `filled`
(t=0), a run converges when the saving is stable (the last --stable-n
samples within 2% of their mean, at least 2 full scans since t=0, and a
saving of at least 5% of the ideal) or stops converging at the cap; then
it samples --steady seconds more (the steady window).  The final saving is
the mean over the steady window; the convergence time is when the curve
first reached 98% of it; the steady cost is the dedup CPU spent in the
window.  KSM configurations then hold --hold seconds with ksmd stopped
(run=0 keeps its merged pages): the saving left is the part that lasts
without merging again.

Host KSM settings changed by the benchmark are restored afterwards, also on
failure, Ctrl-C and SIGTERM (msguest.KsmSettings).  Output: a table on stdout,
build/bench/{report.txt,samples.csv,<config>.csv,summary.json,bench.png}
(per guest count in build/bench/g<N>/ when several), and for several guest
counts scaling.csv and scaling.png.

  scripts/bench.py [--workload busy|idle] [--guests 2|1,2,4,8]
                   [--configs off,ksm-default,...] [--mem 256M] [--mib 128]
                   [--steady 60] [--cap-default 240] [--cap 180] ...
"""
import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "guest", "lib"))
import msguest as mg  # noqa: E402

MIB = 1 << 20
KSM_SELFTEST_MIBS = 220.0     # tools/testing/selftests/mm/ksm_tests -P, roughly

CONFIGS = {
    "off": dict(label="no dedup (mode=off)", mode="off", ksm=None),
    "ksm-default": dict(label="KSM default (100 pages/20 ms)", mode="kernel",
                        ksm=dict(run=1, pages_to_scan=100, sleep_millisecs=20)),
    "ksm-tuned": dict(label="KSM tuned (2000 pages/10 ms)", mode="kernel",
                      ksm=dict(run=1, pages_to_scan=2000, sleep_millisecs=10)),
    "user": dict(label="mem-share mode=user (defaults)", mode="user", ksm=None),
    "user-maps": dict(label="mode=user, max-map-count 1M", mode="user", ksm=None,
                      sysctl={"vm.max_map_count": 1048576}),
    "user-group": dict(label="mode=user, one group, maps 1M", mode="user",
                       ksm=None, sysctl={"vm.max_map_count": 1048576},
                       group=True),
}
ORDER = ["off", "ksm-default", "ksm-tuned", "user", "user-maps", "user-group"]
# A run over several guest counts: the configurations the issue plots
SCALING_ORDER = ["off", "ksm-default", "ksm-tuned", "user", "user-group"]
# The targets are evaluated at these guest counts (when they ran)
TARGET_GUESTS = (2, 8)
MIN_GUEST_MIB = 128         # guest RAM the guests' kernel boots in, with room


KSM_WATCH = ("run", "pages_to_scan", "sleep_millisecs")

# gnuplot reads columns 2, 3, 5 and 6 (scripts/bench.gnuplot): add new
# columns at the end.
CSV_FIELDS = ["config", "t", "t_launch", "phase", "host_used_mib", "saved_mib",
              "host_raw_mib",
              "pss_mib", "saved_pss_mib", "rss_mib", "rss_anon_mib", "rss_shmem_mib",
              "dedup_cpu_s", "qemu_cpu_s", "full_scans", "merged_pages", "zero_pages",
              "user_bytes_saved_mib", "broker_pss_mib", "broker_cpu_s", "kernel_mib",
              "ksm_pages_sharing", "ksm_run",
              "ksm_pages_to_scan", "ksm_sleep_millisecs", "other_qemus",
              "other_qemu_mib", "interference", "guests", "churn_skips",
              "merges_wasted", "thp_mib", "thp_fault_alloc", "thp_collapse_alloc",
              "thp_split_pmd"]

SCALING_FIELDS = ["config", "guests", "saved_mib", "saved_pss_mib", "steady_cpu_pct",
                  "steady_cpu_s", "steady_s", "converge_s", "converged", "cpu_t98",
                  "guest_mib", "fill_mib", "verified", "thp_mib_end",
                  "thp_collapse_alloc"]

# mode=user counters of the engine's churn handling (query-mem-share's
# `user`): printed and sampled when the QEMU reports them
CHURN_KEYS = ("churn-skips", "merges-wasted")
# ... and what the scanner did, summed over the guests: the steady window's
# deltas say what its CPU went on
WORK_KEYS = ("full-scans", "pages-dirty", "candidates", "merges",
             "cow-breaks", "group.lookups", "group.hits", "group.uploads",
             "group.retries-skipped")


def say(msg=""):
    print(msg, flush=True)


# --------------------------------------------------------------------- workloads

class Workload:
    """What the guests run: their QEMU arguments, when a guest is resident
    ("filled"), how it is stopped and whether it verified its memory.

    A workload that boots something else (e.g. a fleet of real userlands)
    is a subclass with its own guest_args(), FILLED/FAIL patterns, finish()
    and describe(); ideal_mib() may return None (no ideal known)."""
    name = None
    mem = "256M"                # default guest RAM
    mib = 128                   # default MiB each guest fills
    FILLED = None               # regex of the line that says "resident"
    FAIL = None                 # regex of a line that says "memory is wrong"

    def __init__(self, args):
        self.args = args

    def guest_args(self, mem, mib, mode, index, backend_extra):
        raise NotImplementedError

    def describe(self, mib):
        raise NotImplementedError

    def fill_info(self, match):
        """What a FILLED line tells (a tuple, kept in the results)."""
        return tuple(int(x) for x in match.groups())

    def ideal_mib(self, fills):
        """The saving a perfect deduplicator reaches on the workload alone
        (MiB), from the fill_info of every guest; None if unknown."""
        return None

    def finish(self, guests):
        """Stop the workloads; return one (rounds verified, [failures]) a guest."""
        raise NotImplementedError

    def activity(self, g):
        """The guest's own report of its activity (dict) or None."""
        return None


class TestWorkload(Workload):
    """tests/guest/workload: zero/shared/unique pages verified every round."""
    FILLED = r"MS-WORKLOAD filled pages=(\d+) zero=(\d+) shared=(\d+) unique=(\d+)"
    FAIL = r"MS-WORKLOAD FAIL.*"
    SHARED_SLOTS = 1024         # distinct shared contents (workload.c)

    def cmdline(self, mib, seed):
        a = self.args
        return ("ms.mib=%d ms.seed=%d ms.zero=%d ms.shared=%d ms.idle=1 "
                "ms.interval=%d ms.rewrite=0" % (mib, seed, a.zero, a.shared,
                                                 a.verify_interval))

    def guest_args(self, mem, mib, mode, index, backend_extra):
        return mg.linux_guest_args(mem, mode, self.cmdline(mib, index),
                                   backend_extra=backend_extra)

    def describe(self, mib):
        a = self.args
        return ("workload %d MiB each (zero %d%%, shared %d%%, unique %d%%), %s "
                "verify every %d s" % (mib, a.zero, a.shared, 100 - a.zero - a.shared,
                                       self.name, a.verify_interval))

    def ideal_mib(self, fills):
        zero_p = sum(f[1] for f in fills)
        shared_p = sum(f[2] for f in fills)
        return ((zero_p - 1) + max(0, shared_p - self.SHARED_SLOTS)) * mg.PAGE_SIZE / MIB

    def finish(self, guests):
        # every round's verify line, also the last round the workload runs
        # after the stop request, then "done ok"
        for g in guests:
            g.send("q\n")
        out = []
        for g in guests:
            extra = []
            try:
                g.wait_line(r"^MS-WORKLOAD done ok", 120, fail_pattern="MS-WORKLOAD FAIL")
                g.wait_exit(60)
            except mg.GuestError as e:
                extra = [str(e)]
            oks = [l for l in g.lines if re.search(r"MS-WORKLOAD verify .* bad=0", l)]
            fails = [l for l in g.lines if "MS-WORKLOAD FAIL" in l]
            out.append((len(oks), fails + extra))
        return out


class IdleWorkload(TestWorkload):
    name = "idle"
    mem = "512M"
    mib = 384


BUSY_RX = re.compile(r"MS-WORKLOAD busy round=\d+ ms=(\d+) ticks=(\d+) missed=(\d+) "
                     r"writes=(\d+) identical=(\d+) changed=(\d+) flips=(\d+)")


class BusyWorkload(TestWorkload):
    name = "busy"
    mem = "256M"
    mib = 128

    def cmdline(self, mib, seed):
        a = self.args
        return (super().cmdline(mib, seed) + " ms.busy=%d ms.hz=%d ms.flip=%d ms.hot=%d"
                % (a.busy, a.hz, a.flip, 0 if a.random_busy else 1))

    def describe(self, mib):
        a = self.args
        return ("%s; after the fill %d%% of the pages (%s) rewritten per tick at %d "
                "ticks/s (half identical, half changed), %d pages/s flipped"
                % (super().describe(mib), a.busy,
                   "chosen anew each tick" if a.random_busy else "the same working set",
                   a.hz, a.flip))

    def activity(self, g):
        m = None
        for line in reversed(list(g.lines)):
            m = BUSY_RX.search(line)
            if m:
                break
        if not m:
            return None
        ms, ticks, missed, writes, ident, changed, flips = (int(x) for x in m.groups())
        return dict(ms=ms, ticks=ticks, missed=missed, writes=writes, identical=ident,
                    changed=changed, flips=flips)


class FleetWorkload(Workload):
    """Guests that boot a real Debian 12 userland (tests/guest/fleet):
    python3, perl and sqlite3 services stay resident; at the end every
    root file is checked against the image's manifest and each program
    checks its data."""
    name = "fleet"
    mem = mg.FLEET_MEM
    mib = 16                    # MiB of data per program
    FILLED = (r"MS-FLEET filled seed=(\d+) mib=(\d+) shared=(\d+) files=(\d+) "
              r"root-kib=(\d+)")
    FAIL = mg.FLEET_FAIL_RX

    def guest_args(self, mem, mib, mode, index, backend_extra):
        return mg.fleet_guest_args(mem, mode, "ms.fleet.seed=%d ms.fleet.mib=%d"
                                   % (index, mib), backend_extra=backend_extra)

    def describe(self, mib):
        return ("fleet: Debian 12 userland in the initramfs, python3, perl and "
                "sqlite3 resident with %d MiB of data each; files and data "
                "verified at the end" % mib)

    def finish(self, guests):
        marks = {g.name: len(g.lines) for g in guests}
        for g in guests:
            g.send("q\n")
        out = []
        for g in guests:
            problems = []
            try:
                _, m = g.wait_line(mg.FLEET_VERIFY_RX, 300, start=marks[g.name],
                                   fail_pattern=mg.FLEET_FAIL_RX)
                if m.group(1) != "ok":
                    problems.append(m.group(0))
                g.wait_exit(60)
            except mg.GuestError as e:
                problems.append(str(e))
            out.append((0 if problems else 1, problems))
        return out


WORKLOADS = {w.name: w for w in (BusyWorkload, IdleWorkload, FleetWorkload)}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="busy", choices=sorted(WORKLOADS),
                    help="what the guests run (default %(default)s)")
    ap.add_argument("--configs", default=None,
                    help="comma-separated subset of %s (default: all; with several "
                    "guest counts %s); off is always run first (it is the reference)"
                    % (",".join(ORDER), ",".join(SCALING_ORDER)))
    ap.add_argument("--guests", default="2",
                    help="guests per configuration, or a list (1,2,4,8): every "
                    "configuration at each count (default %(default)s)")
    ap.add_argument("--mem", default=None,
                    help="guest RAM (default: the workload's, busy 256M, idle 512M)")
    ap.add_argument("--mib", type=int, default=None,
                    help="MiB each guest fills (default: the workload's, busy 128, "
                    "idle 384)")
    ap.add_argument("--max-total", type=int, default=None,
                    help="MiB of guest RAM at most over the guests of a run: a guest "
                    "count that needs more gets smaller guests (RAM and fill scaled "
                    "alike, RAM at least %d MiB); 0 = never (default: 1024 a CPU, "
                    "at most half the available memory)" % MIN_GUEST_MIB)
    ap.add_argument("--zero", type=int, default=25, help="zero pages %% (default 25)")
    ap.add_argument("--shared", type=int, default=50, help="shared pages %% (default 50)")
    ap.add_argument("--busy", type=int, default=20,
                    help="busy workload: %% of the pages rewritten each tick "
                    "(default %(default)s)")
    ap.add_argument("--hz", type=int, default=4,
                    help="busy workload: ticks a second (default %(default)s)")
    ap.add_argument("--random-busy", action="store_true",
                    help="busy workload: the pages rewritten are chosen anew each "
                    "tick (every page churns), not one working set of --busy %%")
    ap.add_argument("--flip", type=int, default=4,
                    help="busy workload: pages a second altered and put back "
                    "(default %(default)s)")
    ap.add_argument("--verify-interval", type=int, default=5,
                    help="workload seconds between verify rounds (default %(default)s)")
    ap.add_argument("--interval", type=float, default=2.0,
                    help="seconds between samples (default %(default)s)")
    ap.add_argument("--stable-n", type=int, default=6,
                    help="samples within 2%% for convergence (default %(default)s)")
    ap.add_argument("--steady", type=float, default=60.0,
                    help="seconds sampled after convergence (or the cap): the steady "
                    "window, where the steady dedup CPU and the final saving are "
                    "measured; 0 = none (default %(default)s)")
    ap.add_argument("--hold", type=float, default=30.0,
                    help="KSM configurations: seconds sampled after the steady window "
                    "with ksmd stopped (run=0 keeps what it merged): the part of its "
                    "saving that lasts without merging again; 0 = none "
                    "(default %(default)s)")
    ap.add_argument("--off-window", type=float, default=20.0,
                    help="seconds sampled after fill in the off run (default %(default)s)")
    ap.add_argument("--cap-default", type=float, default=240.0,
                    help="cap after fill for default KSM (default %(default)s s)")
    ap.add_argument("--cap", type=float, default=180.0,
                    help="cap after fill for the other configurations (default %(default)s s)")
    ap.add_argument("--boot-timeout", type=float, default=300.0,
                    help="boot + fill deadline (default %(default)s s)")
    ap.add_argument("--quiet-wait", type=float, default=240.0,
                    help="before each configuration, wait this long at most for other "
                    "KSM users (test-kernel-mode, mode=kernel QEMUs) to finish "
                    "(default %(default)s s)")
    ap.add_argument("--retries", type=int, default=1,
                    help="re-run a configuration whose KSM settings were changed by "
                    "someone else meanwhile (default %(default)s)")
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "bench"),
                    help="output directory (default build/bench)")
    a = ap.parse_args()
    try:
        a.guest_counts = sorted({int(x) for x in a.guests.split(",") if x.strip()})
    except ValueError:
        ap.error("--guests: a number or a comma-separated list of numbers")
    if not a.guest_counts or min(a.guest_counts) < 1:
        ap.error("--guests: at least one count, each at least 1")
    if a.configs is None:
        a.configs = ",".join(SCALING_ORDER if len(a.guest_counts) > 1 else ORDER)
    cfgs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in cfgs if c not in CONFIGS]
    if bad:
        ap.error("unknown configuration(s): %s" % ", ".join(bad))
    if "off" not in cfgs:
        cfgs.insert(0, "off")
    a.configs = [c for c in ORDER if c in cfgs]
    a.wl = WORKLOADS[a.workload](a)
    a.mem = a.mem or a.wl.mem
    a.mib = a.mib if a.mib is not None else a.wl.mib
    try:
        mem_mib = mg.size_bytes(a.mem) // MIB
    except (AttributeError, KeyError):
        ap.error("--mem: a size such as 256M or 1G")
    if a.mib >= mem_mib:
        ap.error("--mib %d does not fit in --mem %s" % (a.mib, a.mem))
    if a.max_total is None:
        avail = meminfo_kb().get("MemAvailable", 0) // 1024
        a.max_total = min(1024 * (os.cpu_count() or 1), avail // 2)
    return a


def guest_sizes(args, n):
    """(guest RAM, fill MiB) of each of n guests: --mem and --mib, scaled down
    alike when n guests would need more than --max-total MiB of RAM."""
    mem = mg.size_bytes(args.mem) // MIB
    if not args.max_total or n * mem <= args.max_total:
        return "%dM" % mem, args.mib
    new = max(MIN_GUEST_MIB, args.max_total // n // 16 * 16)
    if new >= mem:
        return "%dM" % mem, args.mib
    return "%dM" % new, max(16, args.mib * new // mem)


# --------------------------------------------------------------------- /proc

def meminfo_kb():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = int(v.split()[0])
    return out


def host_used_kb(m=None):
    m = m or meminfo_kb()
    return m["AnonPages"] + m["Shmem"]


def kernel_kb(m=None):
    """Kernel memory that deduplication costs and AnonPages+Shmem does not
    show: page tables, and unreclaimable slab (KSM's rmap items and stable
    nodes; the VMAs and maple-tree nodes of mem-share's mappings)."""
    m = m or meminfo_kb()
    return m["PageTables"] + m["SUnreclaim"]


def smaps_rollup_kb(pid):
    out = {}
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                m = re.match(r"^(\w+):\s+(\d+) kB", line)
                if m:
                    out[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    return out


THP_EVENTS = ("thp_fault_alloc", "thp_collapse_alloc", "thp_split_pmd")


def thp_events():
    """/proc/vmstat's transparent huge page counters (host-wide)."""
    out = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k in THP_EVENTS:
                    out[k] = int(v)
    except OSError:
        pass
    return out


def proc_cpu_s(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def other_qemus(ours):
    """[(pid, Pss_Anon+Pss_Shmem kB)] of the QEMU processes that are not ours
    (other tests on the same host): their memory changes are taken out of the
    host-memory figure."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) in ours:
            continue
        try:
            with open("/proc/%s/comm" % p) as f:
                if not f.read().startswith("qemu-system"):
                    continue
        except OSError:
            continue
        r = smaps_rollup_kb(int(p))
        out.append((int(p), r.get("Pss_Anon", 0) + r.get("Pss_Shmem", 0)))
    return out


def other_ksm_users(ours=()):
    """Other processes that use or drive host KSM: QEMUs with mode=kernel or
    merge=on, and the guest tests that change /sys/kernel/mm/ksm. Returns
    ["pid name", ...]."""
    out = []
    me = os.getpid()
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) in ours or int(p) == me:
            continue
        try:
            with open("/proc/%s/cmdline" % p, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (("qemu-system" in cmd and re.search(r"mode=kernel|merge=on", cmd))
                or "test-kernel-mode" in cmd):
            out.append("%s %s" % (p, cmd.split()[0] if "qemu" in cmd else
                                  next((w for w in cmd.split() if "test-" in w), "?")))
    return out


def wait_quiet(max_wait, why):
    """Wait until no other KSM user runs (up to max_wait s). True if quiet."""
    t0 = time.monotonic()
    users = other_ksm_users()
    if not users:
        return True
    say("  waiting up to %.0f s for other KSM users to finish (%s): %s"
        % (max_wait, why, ", ".join(users)))
    while time.monotonic() - t0 < max_wait:
        time.sleep(2)
        users = other_ksm_users()
        if not users:
            say("  quiet after %.0f s" % (time.monotonic() - t0))
            time.sleep(2)
            return True
    say("  !! still not quiet after %.0f s: running anyway (%s)"
        % (max_wait, ", ".join(users)))
    return False


def machine_description():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return ("%d CPUs (%s), %d MiB RAM, Linux %s; TCG guests (no KVM)"
            % (os.cpu_count(), cpu, meminfo_kb()["MemTotal"] // 1024, platform.release()))


# --------------------------------------------------------------------- one configuration

def line_match(g, rx):
    for line in list(g.lines):
        m = re.search(rx, line)
        if m:
            return m
    return None


class Run:
    """One configuration at one guest count: guests, samples and the
    figures derived from them."""

    def __init__(self, name, args, n, ref=None):
        self.name = name
        self.cfg = CONFIGS[name]
        self.args = args
        self.wl = args.wl
        self.n = n                  # guests
        self.mem, self.mib = guest_sizes(args, n)
        self.ref = ref              # the off run's final figures (dict) or None
        self.broker_pid = None      # user-group: the broker, a cost of ours
        self.base_kern = 0
        self.thp0 = {}              # /proc/vmstat THP counters at launch
        self.samples = []
        self.flags = []             # interference notes (deduplicated)
        self.filled = []
        self.verify = []
        self.activity = []          # the workloads' own counters at the end
        self.t_filled = None
        self.t_window = None        # start of the steady window (t_abs)
        self.t_hold = None          # KSM: ksmd stopped after the window
        self.hold_samples = []
        self.stop_reason = ""
        self.ksm_expect = None
        self.ksm_settings = {}
        self.result = {}
        self.other_pids = set()
        self.last_entry = {}
        self.ksm_changed = False
        self.quiet = True
        self.other_swing = 0.0
        self.other_seen = False
        self.t_fill_launch = None
        self.ideal_mib = None

    def flag(self, msg):
        if msg not in self.flags:
            self.flags.append(msg)
            say("  !! %s" % msg)

    def cap(self):
        if self.name == "off":
            return self.args.off_window
        return self.args.cap_default if self.name == "ksm-default" else self.args.cap

    def sample(self, guests, t_launch, base_kb, ksm_cpu0, scans0, others0):
        now = time.monotonic()
        mem = meminfo_kb()
        used_kb = host_used_kb(mem) - base_kb
        pss = rss = anon = shmem = thp = 0
        qcpu = 0.0
        merged = zero = ucpu = ubytes = 0
        churn = {}
        work = {}
        uscans = []
        ours = set()
        for g in guests:
            pid = g.pid
            ours.add(pid)
            st = mg.proc_status(pid)
            r = smaps_rollup_kb(pid)
            pss += r.get("Pss_Anon", 0) + r.get("Pss_Shmem", 0)
            thp += r.get("AnonHugePages", 0)
            rss += st.get("VmRSS", 0)
            anon += st.get("RssAnon", 0)
            shmem += st.get("RssShmem", 0)
            qcpu += proc_cpu_s(pid)
            e = g.query_mem_share("m0")
            self.last_entry[g.name] = e
            merged += e.get("pages-merged", 0)
            zero += e.get("pages-zero", 0)
            if self.cfg["mode"] == "user":
                uscans.append(e.get("full-scans", 0))
                ucpu += e.get("scan-cpu-ns", 0)
                us = e.get("user") or {}
                ubytes += us.get("bytes-saved", 0)
                for key in CHURN_KEYS:
                    if key in us:
                        churn[key] = churn.get(key, 0) + us[key]
                for key, v in flat(dict(us, **{"full-scans": e.get("full-scans", 0),
                                               "cow-breaks": e.get("cow-breaks", 0)})):
                    if key in WORK_KEYS:
                        work[key] = work.get(key, 0) + v
        # The group's broker is part of mem-share's cost: its memory (the
        # store's pages that no guest maps, its index) and its CPU (hashing
        # uploads, lookups) count as the QEMUs' do.
        bpss = bcpu = 0
        if self.broker_pid:
            r = smaps_rollup_kb(self.broker_pid)
            bpss = r.get("Pss_Anon", 0) + r.get("Pss_Shmem", 0)
            pss += bpss
            bcpu = proc_cpu_s(self.broker_pid)
        k = mg.ksm_sysfs()
        scans = min(uscans) if uscans else 0
        if self.cfg["mode"] == "kernel":
            scans = k.get("full_scans", 0)
            kc = mg.ksmd_cpu_ns()
            dcpu = (kc - ksm_cpu0) / 1e9 if kc is not None and ksm_cpu0 is not None else 0.0
        elif self.cfg["mode"] == "user":
            dcpu = ucpu / 1e9 + bcpu
        else:
            dcpu = 0.0
        # interference: host KSM settings and other QEMUs
        bad = []
        for n in KSM_WATCH:
            if k.get(n) != self.ksm_expect.get(n):
                bad.append("%s=%s (expected %s)" % (n, k.get(n), self.ksm_expect.get(n)))
        if bad:
            self.ksm_changed = True
            self.flag("host KSM settings changed under the run: " + ", ".join(bad))
        if self.cfg["ksm"]:
            users = other_ksm_users(ours)
            if users:
                self.ksm_changed = True
                self.flag("other KSM users during a KSM run: " + ", ".join(users))
        oth = other_qemus(ours)
        oth_kb = sum(v for _, v in oth)
        raw_kb = used_kb
        used_kb -= oth_kb - others0
        for p, _ in oth:
            self.other_pids.add(p)
        self.other_swing = max(self.other_swing, abs(oth_kb - others0) / 1024)
        if oth and not self.other_seen:
            self.other_seen = True
            say("  !! other QEMU processes on the host (pids %s): their Pss changes are "
                "subtracted from the host-memory figure" % " ".join(str(p) for p, _ in oth))
        s = dict(config=self.name, guests=self.n, t_abs=now, t_launch=now - t_launch,
                 host_used_mib=used_kb / 1024, host_raw_mib=raw_kb / 1024, pss_mib=pss / 1024, rss_mib=rss / 1024,
                 rss_anon_mib=anon / 1024, rss_shmem_mib=shmem / 1024,
                 dedup_cpu_s=dcpu, qemu_cpu_s=qcpu, full_scans=scans - scans0,
                 merged_pages=merged, zero_pages=zero, user_bytes_saved_mib=ubytes / MIB,
                 broker_pss_mib=bpss / 1024, broker_cpu_s=bcpu,
                 kernel_mib=(kernel_kb(mem) - self.base_kern) / 1024,
                 ksm_pages_sharing=k.get("pages_sharing", 0), ksm_run=k.get("run"),
                 ksm_pages_to_scan=k.get("pages_to_scan"),
                 ksm_sleep_millisecs=k.get("sleep_millisecs"),
                 other_qemus=len(oth), other_qemu_mib=oth_kb / 1024,
                 interference=";".join(bad + (["others"] if oth else [])),
                 churn_skips=churn.get("churn-skips"),
                 merges_wasted=churn.get("merges-wasted"),
                 work=work,
                 thp_mib=thp / 1024)
        ev = thp_events()
        for key in THP_EVENTS:
            s[key] = ev.get(key, 0) - self.thp0.get(key, 0)
        if self.ref:
            s["saved_mib"] = self.ref["host_used_mib"] - s["host_used_mib"]
            s["saved_pss_mib"] = self.ref["pss_mib"] - s["pss_mib"]
        else:
            s["saved_mib"] = s["saved_pss_mib"] = 0.0
        self.samples.append(s)
        return s

    def execute(self, log_root):
        a = self.args
        cfg = self.cfg
        say()
        say("=== %s: %s, %d guest%s of %s, %s"
            % (self.name, cfg["label"], self.n, "s" if self.n > 1 else "", self.mem,
               self.wl.describe(self.mib)))
        ksm_ctx = mg.KsmSettings(**cfg["ksm"]) if cfg["ksm"] else None
        sysctl = mg.Sysctl(cfg.get("sysctl"))
        guests = []
        broker = None
        backend_extra = ""
        log_dir = os.path.join(log_root, self.name)
        shutil.rmtree(log_dir, ignore_errors=True)
        os.makedirs(log_dir)
        self.quiet = wait_quiet(self.args.quiet_wait, "host KSM is host-global")
        try:
            if cfg.get("group"):
                broker, sock = mg.start_broker(log_dir)
                self.broker_pid = broker.pid
                backend_extra = "group=bench,broker=%s" % sock
                say("  broker started (pid %d), group=bench" % broker.pid)
            sysctl.apply()
            if sysctl.saved:
                say("  sysctl set: %s (saved: %s)" % (
                    " ".join("%s=%d" % kv for kv in sysctl.settings.items()),
                    " ".join("%s=%d" % kv for kv in sysctl.saved.items())))
            if ksm_ctx:
                ksm_ctx.__enter__()
                say("  host KSM set: %s (saved: %s)"
                    % (" ".join("%s=%d" % kv for kv in sorted(cfg["ksm"].items())),
                       " ".join("%s=%d" % kv for kv in sorted(ksm_ctx.saved.items()))))
            k0 = mg.ksm_sysfs()
            self.ksm_expect = {n: k0.get(n) for n in KSM_WATCH}
            if ksm_ctx:
                self.ksm_expect.update(cfg["ksm"])
            self.ksm_settings = {n: k0.get(n) for n in
                                 ("run", "pages_to_scan", "sleep_millisecs",
                                  "use_zero_pages", "max_page_sharing", "smart_scan",
                                  "merge_across_nodes") if n in k0}
            self.ksm_settings["advisor_mode"] = None
            try:
                with open(os.path.join(mg.KSM_DIR, "advisor_mode")) as f:
                    self.ksm_settings["advisor_mode"] = re.search(
                        r"\[(\S+)\]", f.read()).group(1)
            except (OSError, AttributeError):
                pass
            # baseline: median of 3 readings just before the guests start
            time.sleep(1.0)
            base = sorted(host_used_kb() for _ in range(3))[1]
            self.base_kern = kernel_kb()
            self.thp0 = thp_events()
            others0 = sum(v for _, v in other_qemus(set()))
            ksm_cpu0 = mg.ksmd_cpu_ns() if cfg["mode"] == "kernel" else None
            scans0 = k0.get("full_scans", 0) if cfg["mode"] == "kernel" else 0
            t_launch = time.monotonic()
            for i in range(1, self.n + 1):
                g = mg.Guest("vm%d" % i, self.wl.guest_args(
                    self.mem, self.mib, cfg["mode"], i, backend_extra), log_dir)
                guests.append(g)
                g.launch()
            say("  guests launched (pids %s); baseline AnonPages+Shmem %.0f MiB"
                % (" ".join(str(g.pid) for g in guests), base / 1024))
            ideal = None
            scans_at_fill = None
            next_t = time.monotonic()
            last_print = 0
            while True:
                s = self.sample(guests, t_launch, base, ksm_cpu0, scans0, others0)
                s["hold"] = self.t_hold is not None
                now = s["t_abs"]
                for g in guests:
                    if not g.is_running():
                        raise mg.GuestError("%s: QEMU exited (status %s)"
                                            % (g.name, g.exitcode()))
                    m = line_match(g, self.wl.FAIL)
                    if m:
                        raise mg.GuestError("%s: %s" % (g.name, m.group(0)))
                if self.t_filled is None:
                    ms = [line_match(g, self.wl.FILLED) for g in guests]
                    if all(ms):
                        self.t_filled = now
                        self.filled = [self.wl.fill_info(m) for m in ms]
                        self.t_fill_launch = now - t_launch
                        ideal = self.wl.ideal_mib(self.filled)
                        self.ideal_mib = ideal
                        scans_at_fill = s["full_scans"]
                        say("  %s filled %.0f s after launch (ideal saving %s MiB)"
                            % ("all %d guests" % self.n if self.n > 1 else "the guest",
                               self.t_fill_launch, fmt(ideal)))
                    elif now - t_launch > mg.scaled(a.boot_timeout):
                        raise mg.GuestError("guests not filled within %d s of launch"
                                            % a.boot_timeout)
                else:
                    # full scans counted from the fill on
                    s["full_scans_since_fill"] = s["full_scans"] - scans_at_fill
                el = (now - self.t_filled) if self.t_filled else None
                if el is not None and now - last_print >= 10:
                    last_print = now
                    say("  t=%5.0fs used %6.0f MiB saved %6.0f MiB (Pss %6.0f) "
                        "dedup cpu %6.1f s scans %d%s%s"
                        % (el, s["host_used_mib"], s["saved_mib"], s["saved_pss_mib"],
                           s["dedup_cpu_s"], s.get("full_scans_since_fill", 0),
                           "  [steady]" if self.t_window else "",
                           "  [%s]" % s["interference"] if s["interference"] else ""))
                if el is not None:
                    if self.t_hold is not None:
                        if now - self.t_hold >= a.hold:
                            break
                    elif self.t_window is not None:
                        if now - self.t_window < a.steady:
                            pass
                        elif not (ksm_ctx and a.hold > 0):
                            break
                        else:
                            # What lasts of KSM's saving without ksmd
                            ksm_ctx.set(run=0)
                            self.ksm_expect["run"] = 0
                            self.t_hold = now
                            say("  t=%5.0fs ksmd stopped (run=0 keeps its merged "
                                "pages) for %.0f s" % (el, a.hold))
                    else:
                        if self.name != "off" and self._stable(ideal):
                            self.stop_reason = "stable"
                        elif el >= self.cap():
                            self.stop_reason = "window" if self.name == "off" else "cap"
                        if self.stop_reason:
                            if self.name == "off" or a.steady <= 0:
                                break
                            self.t_window = now
                            say("  t=%5.0fs %s: steady window of %.0f s"
                                % (el, "converged" if self.stop_reason == "stable"
                                   else "cap reached", a.steady))
                next_t += a.interval
                time.sleep(max(0.0, next_t - time.monotonic()))
            self.activity = [self.wl.activity(g) for g in guests]
            self.verify = self.wl.finish(guests)
        finally:
            for g in guests:
                g.shutdown()
            if broker:
                broker.terminate()
                broker.wait(10)
            if sysctl.saved:
                saved = dict(sysctl.saved)
                sysctl.restore()
                say("  sysctl restored: %s" % " ".join(
                    "%s=%d" % kv for kv in saved.items()))
            if ksm_ctx:
                ksm_ctx.__exit__(None, None, None)
                say("  host KSM restored: %s" % " ".join(
                    "%s=%d" % (n, mg.ksm_sysfs().get(n, -1)) for n in sorted(ksm_ctx.saved)))
        self.analyse()

    def _stable(self, ideal):
        post = [s for s in self.samples if s["t_abs"] >= self.t_filled]
        n = self.args.stable_n
        if len(post) < n or post[-n].get("full_scans_since_fill", 0) < 2:
            return False
        # Pss of our QEMUs only: the host figure moves with other tests' guests
        for key in ("saved_pss_mib",):
            vals = [s[key] for s in post[-n:]]
            mean = sum(vals) / n
            if (ideal and mean < 0.05 * ideal) or max(vals) - min(vals) > 0.02 * abs(mean):
                return False
        return True

    def analyse(self):
        n = self.args.stable_n
        # The hold is after the run proper: its figures are its own
        self.hold_samples = [s for s in self.samples if s.get("hold")]
        self.samples = [s for s in self.samples if not s.get("hold")]
        for s in self.hold_samples:
            s["t"] = s["t_abs"] - self.t_filled
        for s in self.samples:
            s["t"] = s["t_abs"] - self.t_filled
            s["window"] = self.t_window is not None and s["t_abs"] >= self.t_window
        post = [s for s in self.samples if s["t"] >= 0]
        win = [s for s in post if s["window"]]
        # the final figures: the steady window, else the last samples
        last = win if len(win) >= 2 else post[-n:]

        def mean(key):
            return sum(s[key] for s in last) / len(last)

        r = dict(config=self.name, label=self.cfg["label"], guests=self.n,
                 guest_mib=mg.size_bytes(self.mem) // MIB, fill_mib=self.mib,
                 stop=self.stop_reason,
                 ksm_interference=self.ksm_changed, started_quiet=self.quiet,
                 t_fill_launch=self.t_fill_launch, ideal_mib=self.ideal_mib,
                 filled=self.filled, flags=self.flags, ksm_settings=self.ksm_settings)
        for key in ("host_used_mib", "pss_mib", "rss_mib", "rss_anon_mib",
                    "rss_shmem_mib", "saved_mib", "saved_pss_mib",
                    "user_bytes_saved_mib", "merged_pages", "zero_pages",
                    "kernel_mib", "broker_pss_mib", "thp_mib"):
            r[key] = mean(key)
        # Huge pages: what the guests' RAM keeps at the end, and the
        # host's faults, collapses (khugepaged) and splits during the run
        r["thp_mib_end"] = self.samples[-1]["thp_mib"]
        for key in THP_EVENTS:
            r[key] = self.samples[-1][key]
        r["duration"] = post[-1]["t"]
        # when the run converged or reached its cap (the steady window's start)
        r["t_stop"] = win[0]["t"] if win else r["duration"]
        r["converged"] = self.stop_reason == "stable"
        if self.other_pids:
            note = ("other QEMU processes ran meanwhile (%d; their Pss swung by up to "
                    "%.0f MiB, subtracted from the host figure)"
                    % (len(self.other_pids), self.other_swing))
            if note not in self.flags:
                self.flags.append(note)
        # first time the curve reached 98% of the final saving
        for key, out in (("saved_mib", "t98"), ("saved_pss_mib", "t98_pss")):
            fin = r[key]
            t98 = None
            if fin > 0:
                for s in post:      # after the fill only: before it, "saved" is unfilled RAM
                    if s[key] >= 0.98 * fin:
                        t98 = max(0.0, s["t"])
                        break
            r[out] = t98
        # The host figure moves with everything else on the host: when its
        # final saving is not positive, the Pss curve (ours only) tells
        r["t98_from"] = "host"
        if r["t98"] is None and r["t98_pss"] is not None:
            r["t98"] = r["t98_pss"]
            r["t98_from"] = "Pss"
        # dedup CPU: from the configuration's start to the 98% point, and at the end
        r["cpu_total"] = self.samples[-1]["dedup_cpu_s"]
        r["cpu_t98"] = None
        if r["t98"] is not None:
            for s in self.samples:
                if s["t"] >= r["t98"]:
                    r["cpu_t98"] = s["dedup_cpu_s"]
                    break
        # steady cost: dedup CPU over the steady window (else the last samples)
        span = win if len(win) >= 2 else last
        dt = span[-1]["t_abs"] - span[0]["t_abs"]
        r["steady_s"] = dt
        r["steady_window"] = len(win) >= 2
        r["cpu_steady_s"] = span[-1]["dedup_cpu_s"] - span[0]["dedup_cpu_s"]
        r["cpu_steady_pct"] = 100.0 * r["cpu_steady_s"] / dt if dt > 0 else 0.0
        for key in ("churn_skips", "merges_wasted"):
            v0, v1 = span[0].get(key), span[-1].get(key)
            r[key] = v1
            r[key + "_steady"] = v1 - v0 if None not in (v0, v1) else None
        w0, w1 = span[0].get("work") or {}, span[-1].get("work") or {}
        r["work_steady"] = [(k, w1[k] - w0[k]) for k in WORK_KEYS if k in w0 and k in w1]
        r["full_scans_since_fill"] = post[-1].get("full_scans_since_fill", 0)
        r["query"] = self.last_entry
        r["activity"] = self.activity
        r["verify_rounds"] = [v[0] for v in self.verify]
        r["verify_fail"] = [v[1] for v in self.verify]
        r["verified"] = bool(self.verify) and all(v[0] > 0 and not v[1] for v in self.verify)
        if self.hold_samples:
            h = self.hold_samples[-1]
            r["hold_s"] = h["t_abs"] - self.t_hold
            r["hold_saved_mib"] = h["saved_mib"]
            r["hold_saved_pss_mib"] = h["saved_pss_mib"]
        self.samples += self.hold_samples
        self.result = r
        return r


# --------------------------------------------------------------------- report

def fmt(v, f="%.0f", none="-"):
    return none if v is None else f % v


def plural(n, word):
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def disturbed(*runs):
    """A note for a comparison of runs of which one was flagged."""
    return "; interference flagged" if any(r["flags"] for r in runs) else ""


def user_targets(u, d, t, args, add):
    """The issue's targets for one mode=user run @u against default (@d) and
    tuned (@t) KSM at the same guest count; prints the comparison through
    @add.  Returns [(name, ok, why)], ok None when the reference did not run."""
    targets = []
    cfg = u["config"]
    add("")
    add("%s against kernel KSM:%s" % (u["label"], "" if d or t else " (no KSM run)"))
    if t:
        ratio = u["saved_mib"] / t["saved_mib"] if t["saved_mib"] > 0 else None
        add("  savings ratio vs tuned KSM:    %s (%.0f vs %.0f MiB; Pss %.0f vs %.0f MiB)"
            % (fmt(ratio, "%.3f"), u["saved_mib"], t["saved_mib"], u["saved_pss_mib"],
               t["saved_pss_mib"]))
        for key, what in (("saved_mib", "host figure"), ("saved_pss_mib", "Pss")):
            ok = u[key] >= t[key] - 0.01 * abs(t[key])
            targets.append((cfg + ": saved >= tuned KSM's (%s, 1%% band)" % what, ok,
                            "%.0f vs %.0f MiB%s" % (u[key], t[key], disturbed(u, t))))
    else:
        targets.append((cfg + ": saved >= tuned KSM's", None, "ksm-tuned not run"))
    if d:
        ratio = u["saved_mib"] / d["saved_mib"] if d["saved_mib"] > 0 else None
        add("  savings ratio vs default KSM:  %s (%.0f vs %.0f MiB%s)"
            % (fmt(ratio, "%.3f"), u["saved_mib"], d["saved_mib"],
               "" if d["converged"] else ", default KSM not converged"))
        name = cfg + ": converged in <= 1/10 of default KSM's time"
        if u["converged"] and u["t98"] is not None:
            ut = max(u["t98"], args.interval)   # resolution of the samples
            if d["converged"] and d["t98"]:
                sp = d["t98"] / ut
                spt = "%.1fx" % sp
            else:
                sp = d["t_stop"] / ut       # lower bound
                spt = ">= %.1fx (default KSM not converged within %.0f s)" % (
                    sp, d["t_stop"])
            add("  convergence speed-up vs default KSM: %s (%.0f s vs %s; user "
                "time floored at the %g s sample interval)"
                % (spt, u["t98"], fmt(d["t98"], "%.0f s") if d["converged"]
                   else "n.c.", args.interval))
            targets.append((name, sp >= 10, spt))
        else:
            targets.append((name, False, "%s did not converge" % cfg))
        name = cfg + ": steady dedup CPU < default KSM's"
        if u["steady_window"] and d["steady_window"]:
            add("  steady dedup CPU vs default KSM: %.1f s in %.0f s (%.1f%% of a CPU) vs "
                "%.1f s in %.0f s (%.1f%%)"
                % (u["cpu_steady_s"], u["steady_s"], u["cpu_steady_pct"],
                   d["cpu_steady_s"], d["steady_s"], d["cpu_steady_pct"]))
            targets.append((name, u["cpu_steady_pct"] < d["cpu_steady_pct"],
                            "%.1f%% vs %.1f%% of a CPU%s" % (u["cpu_steady_pct"],
                                                             d["cpu_steady_pct"],
                                                             disturbed(u, d))))
        else:
            targets.append((name, None, "no steady window (--steady 0)"))
    else:
        targets.append((cfg + ": converged in <= 1/10 of default KSM's time", None,
                        "ksm-default not run"))
        targets.append((cfg + ": steady dedup CPU < default KSM's", None,
                        "ksm-default not run"))
    if t:
        if u["cpu_t98"] is not None and t["cpu_t98"]:
            cr = u["cpu_t98"] / t["cpu_t98"]
            add("  dedup CPU ratio vs tuned KSM (to 98%%): %.2f (%.1f s vs %.1f s); "
                "steady %.1f%% vs %.1f%% of a CPU"
                % (cr, u["cpu_t98"], t["cpu_t98"], u["cpu_steady_pct"],
                   t["cpu_steady_pct"]))
    targets.append((cfg + ": every guest verified its memory (bad=0)", u["verified"],
                    "bad=0 in %s" % plural(u["guests"], "guest") if u["verified"]
                    else "FAILED: %s" % [f for f in u["verify_fail"] if f][:1]))
    return targets


def flat(d, prefix=""):
    """[(key, value)] of a query-mem-share dict, nested ones as a.b, sorted."""
    out = []
    for k, v in sorted(d.items()):
        if isinstance(v, dict):
            out += flat(v, prefix + k + ".")
        else:
            out.append((prefix + k, v))
    return out


def conv_saved(r):
    """The saving whose curve gave the convergence time (MiB)."""
    return r["saved_pss_mib"] if r.get("t98_from") == "Pss" else r["saved_mib"]


def verify_text(r):
    if not r["verified"]:
        return "FAILED"
    rounds = r["verify_rounds"]
    if len(rounds) <= 2:
        return "bad=0 (%s rounds)" % "+".join(str(x) for x in rounds)
    return "bad=0 (%d-%d rounds x%d)" % (min(rounds), max(rounds), len(rounds))


def activity_text(r, args):
    """The busy workload's writes as the guests report them, against what
    they were asked (a guest on a starved host falls behind)."""
    acts = [x for x in r.get("activity") or [] if x and x["ms"] > 0]
    if not acts:
        return None
    wps = sum(x["writes"] * 1000.0 / x["ms"] for x in acts) / len(acts)
    fps = sum(x["flips"] * 1000.0 / x["ms"] for x in acts) / len(acts)
    missed = sum(x["missed"] for x in acts)
    ticks = sum(x["ticks"] for x in acts)
    pages = sum(f[0] for f in r["filled"]) / max(1, len(r["filled"]))
    asked = pages * args.busy / 100.0 * args.hz
    return ("%.0f page writes/s per guest (asked %.0f), %.1f%% of the ticks missed, "
            "%.1f flips/s" % (wps, asked, 100.0 * missed / max(1, ticks + missed), fps))


def count_report(runs, args, add):
    """The table and the comparisons of the runs at one guest count."""
    R = {r.name: r.result for r in runs}
    off = R.get("off")
    d = R.get("ksm-default")
    t = R.get("ksm-tuned")
    r0 = runs[0].result
    add("%s of %d MiB RAM per configuration, %s"
        % (plural(r0["guests"], "guest"), r0["guest_mib"], args.wl.describe(r0["fill_mib"])))
    if off and off["ideal_mib"] is not None:
        add("ideal saving of the workload (zero pages -> 1, shared pages -> 1024): %.0f MiB"
            % off["ideal_mib"])
    add("")
    hdr = ("%-32s %8s %8s %8s %6s %8s %15s %9s %9s %8s %8s %9s %s"
           % ("configuration", "used", "saved", "savedPss", "%ideal", "RSS",
              "converge s", "cpu@98%", "cpu tot", "cpu win", "steady", "MiB/s", "verify"))
    add(hdr)
    add("-" * len(hdr))
    for r in [x.result for x in runs]:
        if r["config"] == "off":
            conv = "-"
        elif r["converged"]:
            conv = fmt(r["t98"], "%.0f") + ("p" if r["t98_from"] == "Pss" else "")
        else:
            conv = "n.c. @%.0f" % r["t_stop"]
        thr = (conv_saved(r) / max(r["t98"], args.interval)
               if r["converged"] and r["t98"] is not None else None)
        add("%-32s %8.0f %8.0f %8.0f %6s %8.0f %15s %9s %9s %8s %7s%% %9s %s"
            % (r["label"], r["host_used_mib"], r["saved_mib"], r["saved_pss_mib"],
               fmt(100 * r["saved_mib"] / r["ideal_mib"] if r["ideal_mib"] else None,
                   "%.0f%%"), r["rss_mib"], conv, fmt(r["cpu_t98"], "%.1f"),
               fmt(r["cpu_total"], "%.1f"),
               fmt(r["cpu_steady_s"] if r["steady_window"] else None, "%.1f"),
               fmt(r["cpu_steady_pct"], "%.1f"), fmt(thr, "%.1f"), verify_text(r)))
    add("")
    add("kernel memory the figures above leave out (page tables + unreclaimable "
        "slab: KSM's rmap items, the VMAs of mem-share's mappings), vs the off run:")
    for r in [x.result for x in runs]:
        if r["config"] == "off" or off is None:
            continue
        extra = r["kernel_mib"] - off["kernel_mib"]
        add("  %-32s %+7.1f MiB  -> saved with it %7.1f MiB"
            % (r["label"], extra, r["saved_mib"] - extra))
    held = [x.result for x in runs if x.result.get("hold_s")]
    if held:
        add("")
        add("KSM's saving that lasts: ksmd stopped after the steady window (run=0 "
            "keeps what it merged); what its writes took back is what KSM "
            "merges again and again:")
        for r in held:
            add("  %-32s saved %6.0f MiB (Pss %6.0f) after %.0f s, from %.0f (Pss %.0f)"
                " in the window"
                % (r["label"], r["hold_saved_mib"], r["hold_saved_pss_mib"],
                   r["hold_s"], r["saved_mib"], r["saved_pss_mib"]))
    add("")
    add("transparent huge pages: AnonHugePages of the QEMU processes (mean of the "
        "final samples, and at the end), and the host's THP events from launch to "
        "the end (faults, khugepaged collapses, PMD splits):")
    for r in [x.result for x in runs]:
        if "thp_mib" not in r:
            continue
        add("  %-32s %7.0f MiB (end %7.0f)  faults %6d  collapses %5d  splits %6d"
            % (r["label"], r["thp_mib"], r["thp_mib_end"], r["thp_fault_alloc"],
               r["thp_collapse_alloc"], r["thp_split_pmd"]))
    acts = [(r["label"], activity_text(r, args)) for r in [x.result for x in runs]]
    if any(a for _, a in acts):
        add("")
        add("the guests' writes (their own counters, over the run):")
        for label, a in acts:
            if a:
                add("  %-32s %s" % (label, a))
    for r in [x.result for x in runs]:
        if not r["converged"] and r["config"] != "off":
            add("%s: NOT CONVERGED within the %.0f s cap: saving reached %.0f MiB%s"
                % (r["label"], r["t_stop"], r["saved_mib"],
                   " (%.0f%% of ideal)" % (100 * r["saved_mib"] / r["ideal_mib"])
                   if r["ideal_mib"] else ""))
        if r["flags"]:
            add("%s: INTERFERENCE: %s" % (r["label"], "; ".join(r["flags"])))
        if not r["verified"]:
            add("%s: VERIFICATION FAILED: %s" % (r["label"], r["verify_fail"]))
    targets = []
    for u in [x.result for x in runs if x.cfg["mode"] == "user"]:
        targets += user_targets(u, d, t, args, add)
    add("")
    add("merge throughput (kernel selftest ksm_tests -P: ~%.0f MiB/s for KSM):"
        % KSM_SELFTEST_MIBS)
    for r in [x.result for x in runs]:
        if r["config"] == "off":
            continue
        wthr = (conv_saved(r) / max(r["t98"], args.interval)
                if r["converged"] and r["t98"] is not None else None)
        percpu = conv_saved(r) / r["cpu_t98"] if r["cpu_t98"] else None
        extra = ""
        if r["config"].startswith("user"):
            extra = "; counters: bytes-saved %.0f MiB / scan cpu %.1f s = %s MiB/cpu-s" % (
                r["user_bytes_saved_mib"], r["cpu_total"],
                fmt(r["user_bytes_saved_mib"] / r["cpu_total"] if r["cpu_total"] else None,
                    "%.0f"))
        add("  %-32s wall %s MiB/s (saved/converge s), %s MiB per dedup CPU-second%s"
            % (r["label"], ("%s%.1f" % (">= " if r["t98"] < args.interval else "", wthr))
               if wthr else "n.c.",
               fmt(percpu, "%.0f"), extra))
    for u in [x.result for x in runs if x.cfg["mode"] == "user"]:
        if not u.get("query"):
            continue
        add("")
        add("%s: engine counters at the end (per guest):" % u["label"])
        for gname, e in sorted(u["query"].items()):
            us = e.get("user") or {}
            churn = " ".join("%s %d" % (k, us[k]) for k in CHURN_KEYS if k in us)
            add("  %s: merged %d (zero %d) full-scans %d cow-breaks %d%s; %s"
                % (gname, e.get("pages-merged", 0), e.get("pages-zero", 0),
                   e.get("full-scans", 0), e.get("cow-breaks", 0),
                   " " + churn if churn else "",
                   " ".join("%s=%s" % kv for kv in flat(us) if kv[0] not in CHURN_KEYS)))
        if any(u.get(k) is not None for k in ("churn_skips", "merges_wasted")):
            add("  all guests: churn-skips %s, merges-wasted %s; in the steady window "
                "+%s and +%s"
                % (fmt(u["churn_skips"], "%d"), fmt(u["merges_wasted"], "%d"),
                   fmt(u["churn_skips_steady"], "%d"),
                   fmt(u["merges_wasted_steady"], "%d")))
        if u.get("work_steady"):
            add("  all guests, in the steady window (%.0f s): %s"
                % (u["steady_s"], ", ".join("%s +%d" % kv for kv in u["work_steady"])))
    return targets


def scaling_report(by_n, add):
    """Saving and steady dedup CPU of each configuration against the guest
    count."""
    counts = sorted(by_n)
    add("scaling: saved MiB (host figure / Pss) and steady dedup CPU (% of one CPU) "
        "by guest count")
    add("%-32s" % "configuration" + "".join(
        "%24s" % ("%s (%d MiB)" % (plural(n, "guest"), by_n[n][0].result["guest_mib"]))
        for n in counts))
    names = [c for c in ORDER if c != "off" and
             any(r.name == c for n in counts for r in by_n[n])]
    for c in names:
        cells = []
        for n in counts:
            r = next((x.result for x in by_n[n] if x.name == c), None)
            cells.append("%24s" % ("-" if r is None else "%.0f / %.0f  %5.1f%%" % (
                r["saved_mib"], r["saved_pss_mib"], r["cpu_steady_pct"])))
        add("%-32s" % CONFIGS[c]["label"] + "".join(cells))


def make_report(by_n, args, started, wall):
    lines = []
    add = lines.append
    counts = sorted(by_n)
    add("mem-share benchmark, %s" % started.strftime("%Y-%m-%d %H:%M"))
    add("machine: %s" % machine_description())
    add("workload %s; samples every %g s; steady window %g s after convergence or the cap"
        % (args.workload, args.interval, args.steady))
    add("guest counts: %s" % ", ".join(
        "%d (%d MiB RAM, %d MiB filled each)" % (n, by_n[n][0].result["guest_mib"],
                                                by_n[n][0].result["fill_mib"])
        for n in counts))
    targets = []
    for n in counts:
        add("")
        add("=" * 20 + " %s " % plural(n, "guest") + "=" * 20)
        tn = count_report(by_n[n], args, add)
        if n in TARGET_GUESTS or not any(c in TARGET_GUESTS for c in counts):
            targets.append((n, tn))
    add("")
    add("used: host AnonPages+Shmem minus the baseline before launch (MiB, mean over the "
        "steady window, else the last %d samples); saved: vs the off run of the same "
        "guest count; savedPss: from the QEMU processes' (and the broker's) Pss; "
        "converge: s after all guests filled until the saving first reached 98%% of its "
        "final value (n.c. = not converged within the cap; p: of the Pss saving, the "
        "host figure's being <= 0); cpu@98%%: dedup CPU s from launch to that point "
        "(ksmd for KSM, scan-cpu-ns for mode=user, plus the broker's CPU for a group); "
        "cpu win: dedup CPU s in the steady window; "
        "steady: that as %% of one CPU; MiB/s = saved / converge s." % args.stable_n)
    if len(counts) > 1:
        add("")
        scaling_report(by_n, add)
    if targets:
        add("")
        add("targets (issue; evaluated with %s):"
            % " and ".join(plural(n, "guest") for n, _ in targets))
        for n, tn in targets:
            for name, ok, why in tn:
                add("  %-9s  %-58s %s  (%s)"
                    % (plural(n, "guest"), name, "n/a " if ok is None else "PASS" if ok
                       else "MISS", why))
    add("")
    add("run time: %.0f s; samples: %s" % (wall, os.path.join(args.out, "samples.csv")))
    return lines, [(n, name, ok, why) for n, tn in targets for name, ok, why in tn]


def count_dir(args, n):
    """Where the CSVs and the plot of one guest count go: build/bench, or
    build/bench/g<N> when the run has several guest counts."""
    d = args.out if len(args.guest_counts) == 1 else os.path.join(args.out, "g%d" % n)
    os.makedirs(d, exist_ok=True)
    return d


def csv_row(s):
    row = dict(s)
    row["phase"] = ("hold" if s.get("hold") else "steady" if s.get("window")
                    else "post-fill" if s["t"] >= 0 else "boot")
    for k, v in row.items():
        if isinstance(v, float):
            row[k] = "%.3f" % v
    return row


def write_outputs(by_n, args):
    os.makedirs(args.out, exist_ok=True)
    allp = os.path.join(args.out, "samples.csv")
    with open(allp, "w", newline="") as fa:
        wa = csv.DictWriter(fa, fieldnames=CSV_FIELDS, extrasaction="ignore")
        wa.writeheader()
        for n in sorted(by_n):
            for r in by_n[n]:
                with open(os.path.join(count_dir(args, n), "%s.csv" % r.name), "w",
                          newline="") as f:
                    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
                    w.writeheader()
                    for s in r.samples:
                        row = csv_row(s)
                        w.writerow(row)
                        wa.writerow(row)
    if len(by_n) < 2:
        return
    # scaling: one file per configuration (gnuplot plots a file a line)
    names = [c for c in ORDER if any(r.name == c for rs in by_n.values() for r in rs)]
    for c in names:
        with open(os.path.join(args.out, "scaling-%s.csv" % c), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SCALING_FIELDS, extrasaction="ignore")
            w.writeheader()
            for n in sorted(by_n):
                for r in by_n[n]:
                    if r.name == c:
                        w.writerow(scaling_row(r.result))
    with open(os.path.join(args.out, "scaling.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SCALING_FIELDS, extrasaction="ignore")
        w.writeheader()
        for c in names:
            for n in sorted(by_n):
                for r in by_n[n]:
                    if r.name == c:
                        w.writerow(scaling_row(r.result))


def scaling_row(r):
    row = dict(r)
    row["converge_s"] = r["t98"] if r["converged"] else ""
    row["steady_cpu_pct"] = r["cpu_steady_pct"]
    row["steady_cpu_s"] = r["cpu_steady_s"]
    for k, v in row.items():
        if isinstance(v, float):
            row[k] = "%.3f" % v
    return row


def gnuplot(script, ev):
    gp = shutil.which("gnuplot")
    if not gp:
        say("bench: no gnuplot: no plot")
        return False
    p = subprocess.run([gp, "-e", ev, os.path.join(ROOT, "scripts", script)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if p.returncode:
        say("bench: gnuplot failed: %s" % p.stdout.decode(errors="replace"))
        return False
    return True


def plot(runs, args, n):
    """Saving and host memory over time, one line a configuration."""
    d = count_dir(args, n)
    png = os.path.join(d, "bench.png")
    files = " ".join("%s/%s.csv" % (d, r.name) for r in runs)
    titles = " ".join("'%s'" % r.cfg["label"].replace("'", "") for r in runs)
    ideal = runs[0].result.get("ideal_mib") or 0
    ev = ("files='%s'; titles=\"%s\"; out='%s'; ideal=%f; n=%d; guests=%d; workload='%s'"
          % (files, titles, png, ideal, len(runs), n, args.workload))
    return png if gnuplot("bench.gnuplot", ev) else None


def plot_scaling(by_n, args):
    """Saving (host, Pss) and steady dedup CPU against the guest count, one
    line a configuration (off is the reference, not plotted)."""
    names = [c for c in ORDER if c != "off" and
             any(r.name == c for rs in by_n.values() for r in rs)]
    if not names:
        return None
    png = os.path.join(args.out, "scaling.png")
    files = " ".join("%s/scaling-%s.csv" % (args.out, c) for c in names)
    titles = " ".join("'%s'" % CONFIGS[c]["label"].replace("'", "") for c in names)
    counts = sorted(by_n)
    sizes = ", ".join("%d: %d/%d" % (n, by_n[n][0].result["guest_mib"],
                                        by_n[n][0].result["fill_mib"]) for n in counts)
    ev = ("files='%s'; titles=\"%s\"; out='%s'; n=%d; workload='%s'; sizes='%s'; "
          "maxg=%d" % (files, titles, png, len(names), args.workload, sizes, max(counts)))
    return png if gnuplot("bench-scaling.gnuplot", ev) else None


def main():
    args = parse_args()
    mg.install_signal_handlers()
    started = datetime.datetime.now()
    t_start = time.monotonic()
    probs = mg.missing_prerequisites(mg.VMLINUZ, mg.INITRAMFS)
    if not probs and not mg.qemu_has_object("mem-share"):
        probs.append("%s does not know -object mem-share" % mg.QEMU)
    if any(CONFIGS[c]["ksm"] for c in args.configs) and not mg.ksm_writable():
        probs.append("host KSM settings not writable (%s): run as root" % mg.KSM_DIR)
    if probs:
        for p in probs:
            say("bench: " + p)
        return 1
    if mg.DEV_BACKEND:
        say("bench: MS_BACKEND is a development setting: unset it")
        return 1
    os.makedirs(args.out, exist_ok=True)
    say("mem-share bench: %s; workload %s; %s"
        % (", ".join(args.configs), args.workload, ", ".join(
            "%s of %s (%d MiB filled)" % ((plural(n, "guest"),) + guest_sizes(args, n))
            for n in args.guest_counts)))
    say("machine: %s" % machine_description())
    by_n = {}
    rc = 1
    try:
        for n in args.guest_counts:
            log_root = os.path.join(count_dir(args, n), "logs")
            ref = None
            for name in args.configs:
                for attempt in range(args.retries + 1):
                    r = Run(name, args, n, ref)
                    r.execute(log_root)
                    if not (r.cfg["ksm"] and r.ksm_changed) or attempt == args.retries:
                        break
                    say("  !! %s: host KSM interference: running it again" % name)
                by_n.setdefault(n, []).append(r)
                if name == "off":
                    ref = r.result
                    # the off run's own saving is 0 by definition
                    for s in r.samples:
                        s["saved_mib"] = ref["host_used_mib"] - s["host_used_mib"]
                        s["saved_pss_mib"] = ref["pss_mib"] - s["pss_mib"]
                    r.analyse()
                    ref = r.result
                write_outputs(by_n, args)
        rc = 0
    except mg.Interrupted:
        say("\nbench: interrupted")
    except mg.GuestError as e:
        say("bench: %s" % e)
        say("  logs in %s" % os.path.join(count_dir(args, n), "logs", name))
    by_n = {n: [r for r in rs if r.result] for n, rs in by_n.items()}
    by_n = {n: rs for n, rs in by_n.items() if rs}
    if not by_n:
        return 1
    write_outputs(by_n, args)
    pngs = [plot(rs, args, n) for n, rs in sorted(by_n.items())]
    if len(by_n) > 1:
        pngs.append(plot_scaling(by_n, args))
    lines, targets = make_report(by_n, args, started, time.monotonic() - t_start)
    say()
    for l in lines:
        say(l)
    for png in pngs:
        if png:
            say("plot: %s" % png)
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(dict(started=started.isoformat(),
                       args={k: v for k, v in vars(args).items() if k != "wl"},
                       machine=machine_description(),
                       results=[r.result for n in sorted(by_n) for r in by_n[n]],
                       targets=[dict(guests=n, name=name, ok=ok, why=why)
                                for n, name, ok, why in targets]),
                  f, indent=1, default=str)
    if rc == 0 and not all(r.result["verified"] for rs in by_n.values() for r in rs):
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
