#!/usr/bin/python3
"""mem-share demo: two small Linux guests (TCG) deduplicated on one host.

Each guest runs the test workload (build/guest) in idle mode: it fills its
memory with zero pages, pages whose content both guests share, and pages
unique to it, then verifies every byte every 2 seconds. The demo prints the
merge figures every 2 s until they are stable for ~10 s (or --max-time), then
a summary, and shuts the guests down cleanly.

  scripts/demo.py [--mode user|kernel] [--mib N] [--max-time S]

In mode=user (the default) mem-share's own scanner thread merges each
guest's pages onto its store (zero pages become holes or map zero pages of
the store), and the two guests are in one group of a mem-share-broker the
demo starts: pages the guests have in common are shared between them
through the group's store (--no-group: each guest on its own). The objects are
created with mode=user but switched to mode=off before the guests run, so
that the guest RAM's anonymous memory can be measured once the workloads
filled it, unmerged; then mode=user is switched on and the demo shows, per
VM, pages merged, zero holes, store pages, bytes saved, the guest RAM's
resident anonymous memory (from /proc/PID/smaps) and the scanner's CPU time.

In mode=kernel the host's KSM does the merging. If it is off and we are
root, the demo turns it on with brisk settings for its run and restores the
previous settings at the end (also on Ctrl-C).
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "guest", "lib"))
import msguest as mg  # noqa: E402

DEFAULT_MODE = "user"
GUEST_MEM = "256M"
KSM_BRISK = dict(pages_to_scan=2000, sleep_millisecs=10)
MIB = 1 << 20


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default=DEFAULT_MODE, choices=("kernel", "user"),
                    help="mem-share mode (default %(default)s)")
    ap.add_argument("--no-group", action="store_true",
                    help="mode=user: no broker group, each guest on its own")
    ap.add_argument("--mib", type=int, default=128,
                    help="workload memory per guest in MiB (default %(default)s)")
    ap.add_argument("--interval", type=float, default=2.0,
                    help="seconds between table rows (default %(default)s)")
    ap.add_argument("--stable", type=float, default=10.0,
                    help="stop when figures are stable this long (default %(default)s s)")
    ap.add_argument("--max-time", type=float, default=240.0,
                    help="stop after this many seconds anyway (default %(default)s)")
    return ap.parse_args()


def say(msg=""):
    print(msg, flush=True)


def snapshot(guests):
    rows = []
    for g in guests:
        e = g.query_mem_share("m0")
        st = mg.proc_status(g.pid)
        k = e.get("kernel") or {}
        if "process-profit" in k:
            saved = k["process-profit"]
        else:
            saved = e.get("pages-merged", 0) * e.get("page-size", mg.PAGE_SIZE)
        rows.append(dict(merged=e.get("pages-merged", 0), zero=e.get("pages-zero", 0),
                         saved=saved, rss=st.get("VmRSS", 0), anon=st.get("RssAnon", 0),
                         entry=e))
    return rows


def user_snapshot(guests, ranges):
    rows = []
    for g, rng in zip(guests, ranges):
        e = g.query_mem_share("m0")
        u = e.get("user") or {}
        rows.append(dict(merged=e.get("pages-merged", 0), zero=e.get("pages-zero", 0),
                         store=u.get("store-pages", 0), saved=u.get("bytes-saved", 0),
                         group=(u.get("group") or {}).get("pages", 0),
                         anon=mg.range_anon_kb(g.pid, rng) * 1024,
                         cpu=e.get("scan-cpu-ns", 0) / 1e9, entry=e))
    return rows


def say_verified(guests):
    """Summary lines of the workloads' verifications; True if all good."""
    ok = True
    for g in guests:
        n = len([l for l in g.lines if re.search(r"MS-WORKLOAD verify .* bad=0", l)])
        bad = [l for l in g.lines if "MS-WORKLOAD FAIL" in l]
        if bad:
            say("  %s: workload FAILED verification: %s" % (g.name, bad[0]))
        else:
            say("  %s: workload verified all its memory %d times (bad=0)" % (g.name, n))
        ok = ok and n > 0 and not bad
    return ok


def shutdown_guests(guests):
    """Ask the workloads to stop; True if both ended 'done ok'."""
    ok = True
    say()
    say("shutting the guests down")
    for g in guests:
        g.send("q\n")
    for g in guests:
        try:
            g.wait_line(r"^MS-WORKLOAD done ok", 120, fail_pattern="MS-WORKLOAD FAIL")
            g.wait_exit(60)
            say("%s: done ok, powered off" % g.name)
        except mg.GuestError as e:
            ok = False
            say("%s: %s" % (g.name, e))
    return ok


class Stability:
    """Tracks when the per-VM merged counts stopped moving (by more than
    0.5%) for `hold` seconds."""

    def __init__(self, t0, hold):
        self.t0, self.hold = t0, hold
        self.last, self.last_change = None, t0
        self.converged_at = None

    def update(self, fig, now):
        """Record the figures sampled at `now`; True once they are stable."""
        if self.last is None or any(abs(a - b) > max(8, b // 200)
                                    for a, b in zip(fig, self.last)):
            self.last, self.last_change = fig, now
        elif now - self.last_change >= self.hold and any(fig):
            self.converged_at = self.last_change - self.t0
            return True
        return False


def keep_watching(stability, rows, now, args, guests):
    """After a sample: False once the merged counts are stable or the time
    is up; raises if a QEMU exited; else waits for the next sample."""
    if stability.update([r["merged"] for r in rows], now):
        return False
    if now - stability.t0 >= args.max_time:
        return False
    for g in guests:
        if not g.is_running():
            raise mg.GuestError("%s: QEMU exited" % g.name)
    time.sleep(args.interval)
    return True


def user_demo(args, guests, ranges, filled, sock=None):
    """mode=user: measure the unmerged guest RAM, switch mode=user on, show
    the figures until they are stable, summarize. Returns the exit status."""
    for g in guests:
        g.qmp("stop")
    anon0 = [mg.range_anon_kb(g.pid, r) * 1024 for g, r in zip(guests, ranges)]
    for g in guests:
        set_mode(g, "user")
        g.qmp("cont")
    t0 = time.monotonic()
    say()
    say("guest RAM resident (anonymous) with nothing merged: %s"
        % ", ".join("%s %.1f MiB" % (g.name, a / MIB) for g, a in zip(guests, anon0)))
    say("mem-share mode=user switched on for both (scanner threads mem-share-m0)")
    say("(anon MiB moves while the guests read their zero pages: a read of a zero hole "
        "holds a page until the scanner's next visit)")
    say()
    cell = "%7s %6s %6s %9s %9s %7s"
    hdr = ("%6s | %s | %s" % ("time", cell % ("merged", "zero", "store", "saved MiB",
                                                "anon MiB", "cpu s"),
                              cell % ("merged", "zero", "store", "saved MiB",
                                      "anon MiB", "cpu s")))
    width = len(cell % (("",) * 6))
    say("%6s | %-*s | %-*s" % ("", width, "vm1", width, "vm2"))
    say(hdr)
    say("-" * len(hdr))
    stability = Stability(t0, args.stable)
    while True:
        rows = user_snapshot(guests, ranges)
        now = time.monotonic()
        cells = ["%7d %6d %6d %9.1f %9.1f %7.2f" % (r["merged"], r["zero"], r["store"],
                                                   r["saved"] / MIB, r["anon"] / MIB,
                                                   r["cpu"])
                 for r in rows]
        say("%5.0fs | %s | %s" % (now - t0, cells[0], cells[1]))
        if not keep_watching(stability, rows, now, args, guests):
            break

    # Final figures with both VMs stopped and their scanners quiet: holes
    # the guests read (which hold a page until the next visit) made holes
    # again, figures and anonymous memory of one moment.
    for g in guests:
        g.qmp("stop")
    for g, rng, r in zip(guests, ranges, rows):
        e, anon_kb, _quiet = mg.quiet_user_snapshot(g, rng, 30)
        u = e.get("user") or {}
        r.update(merged=e.get("pages-merged", 0), zero=e.get("pages-zero", 0),
                 store=u.get("store-pages", 0), saved=u.get("bytes-saved", 0),
                 group=(u.get("group") or {}).get("pages", 0),
                 anon=anon_kb * 1024, cpu=e.get("scan-cpu-ns", 0) / 1e9, entry=e)
    for g in guests:
        g.qmp("cont")

    say()
    say("Summary (mode=user)")
    say("  guest RAM total:      2 x %s = %d MiB (workload %d MiB each)"
        % (GUEST_MEM, 2 * mg.size_bytes(GUEST_MEM) // MIB, args.mib))
    total_saved = total_drop = total_store = total_cpu = 0
    for g, r, f, a0 in zip(guests, rows, filled, anon0):
        page = r["entry"].get("page-size", mg.PAGE_SIZE)
        drop = a0 - r["anon"]
        store = r["store"] * page
        total_saved += r["saved"]
        total_drop += drop
        total_store += store
        total_cpu += r["cpu"]
        say("  %s: pages merged %d (zero %d, on the group's store %d) of its %d guest "
            "pages (workload %s); its own store %d pages"
            % (g.name, r["merged"], r["zero"], r["group"],
               mg.size_bytes(GUEST_MEM) // page, f.group(1), r["store"]))
        say("       bytes-saved %.1f MiB; measured (VMs stopped): guest RAM anonymous "
            "memory %.1f -> %.1f MiB (-%.1f MiB), store %.1f MiB: net %.1f MiB freed"
            % (r["saved"] / MIB, a0 / MIB, r["anon"] / MIB, drop / MIB, store / MIB,
               (drop - store) / MIB))
    group_held = broker_bytes_held(sock)
    if sock:
        say("  group 'demo':         %s pages on the group's store (vm1 %d, vm2 %d), "
            "which holds %.1f MiB for both" % (
                sum(r["group"] for r in rows), rows[0]["group"], rows[1]["group"],
                group_held / MIB))
        total_saved -= group_held
    say("  memory saved:         %.1f MiB by mem-share's count (bytes-saved%s), %.1f MiB "
        "measured on the host (anonymous memory freed minus the stores)"
        % (total_saved / MIB, " less the group's store" if sock else "",
           (total_drop - total_store - group_held) / MIB))
    if stability.converged_at is not None:
        say("  time to converge:     %.0f s after mode=user was switched on"
            % stability.converged_at)
    else:
        say("  time to converge:     not stable within %.0f s" % args.max_time)
    say("  scanner CPU:          %.2f s in all (%s)"
        % (total_cpu, ", ".join("%s %.2f s" % (g.name, r["cpu"])
                                for g, r in zip(guests, rows))))
    ok = say_verified(guests)
    ok = shutdown_guests(guests) and ok
    return 0 if ok else 1


def broker_bytes_held(sock):
    """Memory the broker's group store holds, from mem-share-broker --stats."""
    if not sock:
        return 0
    out = subprocess.run([mg.BROKER, "--stats", "--socket", sock], check=False,
                         stdout=subprocess.PIPE, universal_newlines=True).stdout
    return sum(int(m) for m in re.findall(r"bytes-held\s+(\d+)", out))


def set_mode(g, mode):
    g.qmp("qom-set", path="/objects/m0", property="mode", value=mode)


def main():
    args = parse_args()
    mg.install_signal_handlers()
    say("mem-share demo: mode=%s, two TCG Linux guests of %s, %d MiB workload each"
        % (args.mode, GUEST_MEM, args.mib))
    probs = mg.missing_prerequisites(mg.VMLINUZ, mg.INITRAMFS)
    if not probs and not mg.DEV_BACKEND and not mg.qemu_has_object("mem-share"):
        probs.append("%s does not know -object mem-share" % mg.QEMU)
    if probs:
        for p in probs:
            say("demo: " + p)
        return 1
    if mg.DEV_BACKEND:
        say("DEVELOPMENT MODE: MS_BACKEND=%s replaces mem-share; figures come from /proc"
            % mg.DEV_BACKEND)

    ksm_ctx = None
    if args.mode == "kernel":
        if not mg.ksm_available():
            say("demo: the host kernel has no KSM: nothing can merge in mode=kernel")
            return 1
        if mg.ksm_sysfs().get("run") != 1:
            if mg.ksm_writable():
                say("host KSM was off; the demo enables it for its run and restores it "
                    "(run=1 pages_to_scan=%d sleep_millisecs=%d)"
                    % (KSM_BRISK["pages_to_scan"], KSM_BRISK["sleep_millisecs"]))
                ksm_ctx = mg.KsmSettings(run=1, **KSM_BRISK)
            else:
                say("WARNING: host KSM is off and we are not root: nothing will merge "
                    "(echo 1 > %s/run as root)" % mg.KSM_DIR)
        else:
            say("host KSM is running with the host's settings (pages_to_scan=%d "
                "sleep_millisecs=%d)" % (mg.ksm_sysfs().get("pages_to_scan", 0),
                                         mg.ksm_sysfs().get("sleep_millisecs", 0)))

    guests = []
    ranges = []
    user_mode = args.mode == "user"
    broker = sock = None
    rc = 1
    try:
        if ksm_ctx:
            ksm_ctx.__enter__()
        ksm0 = mg.ksm_sysfs()
        with mg.log_directory("ms-demo") as d:
            extra_obj = ""
            if user_mode and not args.no_group:
                broker, sock = mg.start_broker(d)
                extra_obj = "group=demo,broker=%s" % sock
                say("mem-share-broker pid %d on %s: both guests join group 'demo'"
                    % (broker.pid, sock))
            for i in (1, 2):
                cmd = ("ms.mib=%d ms.seed=%d ms.zero=25 ms.shared=50 ms.idle=1 "
                       "ms.interval=2 ms.rewrite=0" % (args.mib, i))
                extra = ["-name", "vm%d,debug-threads=on" % i]
                g = mg.Guest("vm%d" % i, mg.linux_guest_args(
                    GUEST_MEM, args.mode, cmd, backend_extra=extra_obj) + extra, d)
                guests.append(g)
                g.launch(cont=False)
                if user_mode:
                    # Found by its size before the guest runs: merges split
                    # it into many mappings later.
                    rng = mg.find_ram_range(g.pid, mg.size_bytes(GUEST_MEM))
                    if rng is None:
                        raise mg.GuestError("%s: guest RAM mapping not found" % g.name)
                    ranges.append(rng)
                    set_mode(g, "off")
                g.qmp("cont")
                say("vm%d: QEMU pid %d booting%s" % (
                    i, g.pid, " (mem-share mode=off until the workload filled its "
                    "memory)" if user_mode else ""))
            filled = []
            for g in guests:
                _, m = g.wait_line(r"MS-WORKLOAD filled pages=(\d+) zero=(\d+) "
                                   r"shared=(\d+) unique=(\d+)", 300,
                                   fail_pattern="MS-WORKLOAD FAIL")
                filled.append(m)
                say("%s: %s" % (g.name, m.group(0)))
            if user_mode:
                rc = user_demo(args, guests, ranges, filled, sock)
                return rc
            t0 = time.monotonic()
            hdr = ("%6s | %-41s | %-41s | %s" %
                   ("time", "vm1: merged  zero  saved MiB  RSS MiB",
                    "vm2: merged  zero  saved MiB  RSS MiB", "host sharing"))
            say()
            say(hdr)
            say("-" * len(hdr))
            stability = Stability(t0, args.stable)
            while True:
                rows = snapshot(guests)
                now = time.monotonic()
                sharing = mg.ksm_sysfs().get("pages_sharing", 0)
                cells = ["%11d %5d %10.1f %8.1f" % (r["merged"], r["zero"],
                                                    r["saved"] / MIB, r["rss"] / 1024)
                         for r in rows]
                say("%5.0fs | %-41s | %-41s | %d" % (now - t0, "  " + cells[0],
                                                     "  " + cells[1], sharing))
                if not keep_watching(stability, rows, now, args, guests):
                    break

            ksm1 = mg.ksm_sysfs()

            page = rows[0]["entry"].get("page-size", mg.PAGE_SIZE)
            say()
            say("Summary (mode=%s)" % args.mode)
            say("  guest RAM total:      2 x %s = %d MiB (workload %d MiB each)"
                % (GUEST_MEM, 2 * mg.size_bytes(GUEST_MEM) // MIB, args.mib))
            for g, r, f in zip(guests, rows, filled):
                say("  %s: pages merged %d (zero %d) of its %d guest pages (workload %s); "
                    "saved %.1f MiB%s; RSS %.1f MiB"
                    % (g.name, r["merged"], r["zero"],
                       mg.size_bytes(GUEST_MEM) // r["entry"].get("page-size", mg.PAGE_SIZE),
                       f.group(1), r["saved"] / MIB,
                       " (ksm_process_profit)" if args.mode == "kernel" else "",
                       r["rss"] / 1024))
            if args.mode == "kernel":
                delta = ksm1.get("pages_sharing", 0) - ksm0.get("pages_sharing", 0)
                say("  memory saved on the host: %.1f MiB (KSM pages_sharing grew by %d "
                    "pages of %d KiB)" % (delta * page / MIB, delta, page // 1024))
            if stability.converged_at is not None:
                say("  time to converge:     %.0f s after both guests filled their memory"
                    % stability.converged_at)
            else:
                say("  time to converge:     not stable within %.0f s" % args.max_time)
            ok = say_verified(guests)
            ok = shutdown_guests(guests) and ok
            rc = 0 if ok else 1
    except mg.Interrupted:
        say("\ninterrupted")
    except mg.GuestError as e:
        say("demo: %s" % e)
        for g in guests:
            say("%s console tail:\n  %s" % (g.name, "\n  ".join(g.tail())))
    finally:
        for g in guests:
            g.shutdown()
        if broker:
            broker.terminate()
            broker.wait(10)
        if ksm_ctx:
            ksm_ctx.__exit__(None, None, None)
            say("host KSM settings restored (run=%d)" % mg.ksm_sysfs().get("run", -1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
