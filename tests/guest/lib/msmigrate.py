"""Migration of a mode=user guest between two QEMUs on this host (TCG).

Shared by tests/guest/test-migrate (precopy), test-migrate-postcopy and
test-migrate-postcopy-precopy (postcopy advised, completed in precopy).

The source runs the workload (rewrites 10% of its pages every round and
verifies every byte before and after each rewrite) on
`-object mem-share,...,mode=user`; once it merges and its rewrites break
merges, it migrates over a UNIX socket to a destination started with
`-incoming` and mode=user.  The workload then keeps verifying every byte
on the destination, whose scanner must merge again.
"""

import os
import re
import time

import msguest as mg

MEM = "256M"
MIB = 64                 # workload memory
REWRITE = 10             # percent of pages rewritten per round
INTERVAL = 2             # workload seconds between rounds
BOOT_TIMEOUT = 300       # boot + fill under TCG on a loaded 2-core machine
MERGE_TIMEOUT = 300      # until the source shows merging
MIGRATE_TIMEOUT = 300    # the migration itself
ROUND_TIMEOUT = 180      # one workload round
DST_ROUNDS = 3           # rounds the destination must verify
VERIFY_RX = r"MS-WORKLOAD verify round=(\d+) pages=\d+ bad=0 after=rewrite"
FAIL_RX = "MS-WORKLOAD FAIL"

T_PRE = "prerequisites: QEMU with mem-share, guest artifacts"
T_BOOT = "the source boots on mode=user and fills its memory"
T_SRC_MERGED = ("the source merges before migrating: pages-merged > 0, "
                "user.merges > 0, cow-breaks > 0 and merges or cow-breaks moving")
T_MIGRATE = ("the migration completes (source postmigrate, destination paused; "
             "postcopy-bytes > 0 if switched to postcopy, else 0)")
T_SRC_AFTER = ("the source reports after migrating: mode user, query-mem-share and "
               "HMP info mem-share answer, pages-merged > 0")
T_DST_VERIFY = ("the workload verifies every byte on the destination: %d rounds "
                "bad=0, continuing the source's round numbers" % DST_ROUNDS)
T_DST_MERGE = ("the destination merges again: pages-merged and user.merges grow "
               "after it starts running")
T_DONE = ("the workload ends 'done ok' on the destination, which powers off; "
          "no error in either QEMU's log")
T_ALL_OK = ("every verification on both sides reported bad=0, rounds contiguous "
            "across the migration (no lost write)")
NAMES = [T_PRE, T_BOOT, T_SRC_MERGED, T_MIGRATE, T_SRC_AFTER, T_DST_VERIFY,
         T_DST_MERGE, T_DONE, T_ALL_OK]


def cmdline(seed=1):
    return ("ms.mib=%d ms.seed=%d ms.zero=25 ms.shared=50 ms.rounds=0 "
            "ms.interval=%d ms.rewrite=%d" % (MIB, seed, INTERVAL, REWRITE))


def user(e, key):
    return (e.get("user") or {}).get(key, 0)


def fmt(e):
    keys = ("mode", "pages-merged", "pages-zero", "full-scans", "cow-breaks")
    return (" ".join("%s=%s" % (k, e.get(k)) for k in keys) +
            " merges=%s remerges=%s store-pages=%s" % (
                user(e, "merges"), user(e, "remerges"), user(e, "store-pages")))


def prerequisites(tap):
    """Report T_PRE; False if the test cannot run."""
    if mg.DEV_BACKEND:
        tap.ok(T_PRE, False, diag="MS_BACKEND=%s: mode=user has no emulation"
               % mg.DEV_BACKEND)
        return False
    probs = mg.missing_prerequisites(mg.VMLINUZ, mg.INITRAMFS)
    if not probs and not mg.qemu_has_object("mem-share"):
        probs.append("%s does not know -object mem-share" % mg.QEMU)
    tap.ok(T_PRE, not probs, diag="\n".join(probs) if probs else "QEMU %s" % mg.QEMU)
    return not probs


def wait_merging(tap, src):
    """Wait until the source merged and its rewrites break merges; T_SRC_MERGED."""
    deadline = time.monotonic() + mg.scaled(MERGE_TIMEOUT)
    first = None
    while True:
        e = src.query_mem_share("m0")
        if first is None and e.get("pages-merged", 0) > 0:
            first = e
        moving = first is not None and (
            user(e, "merges") + user(e, "remerges") >
            user(first, "merges") + user(first, "remerges") or
            e.get("cow-breaks", 0) > first.get("cow-breaks", 0))
        ok = (e.get("mode") == "user" and e.get("pages-merged", 0) > 0 and
              user(e, "merges") > 0 and e.get("cow-breaks", 0) > 0 and moving)
        if ok or time.monotonic() > deadline:
            break
        if not src.is_running():
            raise mg.GuestError("source: QEMU exited")
        time.sleep(1)
    tap.ok(T_SRC_MERGED, ok, diag="source: %s" % fmt(e))
    return e


def migrate(src, dst, uri, timeout=MIGRATE_TIMEOUT, postcopy=False):
    """Migrate src to dst; return (src query-migrate, dst status, seconds,
    switched).  postcopy=True: switch to postcopy as soon as the migration
    is active; "advise": postcopy-ram is set but the migration completes
    in precopy."""
    if postcopy is True:
        # Precopy must not converge before the switch: postcopy really runs.
        params = {"max-bandwidth": 64 << 20, "downtime-limit": 1}
    else:
        params = {"max-bandwidth": 1 << 30, "downtime-limit": 1000}
    src.qmp("migrate-set-parameters", **params)
    src.qmp("migrate", uri=uri)
    t0 = time.monotonic()
    deadline = t0 + mg.scaled(timeout)
    switched = False
    while True:
        info = src.qmp("query-migrate")
        status = info.get("status")
        if status in ("completed", "failed", "cancelled"):
            break
        if postcopy is True and not switched and status == "active":
            src.qmp("migrate-start-postcopy")
            switched = True
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # The destination finishes loading after the source completed.
    while time.monotonic() < deadline:
        if not dst.is_running():
            break
        st = dst.qmp("query-status")["status"]
        if status != "completed" or st not in ("inmigrate", "postmigrate") or \
                dst.qmp("query-migrate").get("status") == "completed":
            break
        time.sleep(0.2)
    dst_status = dst.qmp("query-status")["status"] if dst.is_running() else "exited"
    return info, dst_status, time.monotonic() - t0, switched


def source_after(tap, src):
    """T_SRC_AFTER: the source still answers and reports its merges."""
    problems = []
    e = src.query_mem_share("m0")
    st = src.qmp("query-status")["status"]
    out = src.hmp("info mem-share")
    if st != "postmigrate":
        problems.append("source run state %s, expected postmigrate" % st)
    if e.get("mode") != "user" or not e.get("pages-merged", 0) > 0:
        problems.append("source: %s" % fmt(e))
    if not re.search(r"^m0: mode user", out, re.M):
        problems.append("HMP info mem-share: %r" % out)
    tap.ok(T_SRC_AFTER, not problems,
           diag="\n".join(problems + ["source after migrating (%s): %s" % (st, fmt(e)),
                                      out.rstrip()]))


def destination_checks(tap, src, dst, arrival):
    """T_DST_VERIFY, T_DST_MERGE, T_DONE once dst runs; arrival is its
    query-mem-share entry when the migration completed."""
    src_rounds = rounds(src)
    last_src = src_rounds[-1] if src_rounds else 0
    mark = 0
    problems = []
    got = []
    try:
        for _ in range(DST_ROUNDS):
            i, m = dst.wait_line(VERIFY_RX, ROUND_TIMEOUT, start=mark,
                                 fail_pattern=FAIL_RX)
            got.append(int(m.group(1)))
            mark = i + 1
    except mg.GuestError as err:
        problems.append(str(err))
    if got and got[0] > last_src + 1:
        problems.append("destination's first round %d, the source's last %d"
                        % (got[0], last_src))
    tap.ok(T_DST_VERIFY, not problems,
           diag="\n".join(problems + ["source's last round %d; destination rounds "
                                      "verified after rewrite: %s" % (last_src, got)]))

    deadline = time.monotonic() + mg.scaled(MERGE_TIMEOUT)
    while True:
        e = dst.query_mem_share("m0")
        ok = (e.get("mode") == "user" and
              e.get("pages-merged", 0) > arrival.get("pages-merged", 0) and
              user(e, "merges") > user(arrival, "merges"))
        if ok or time.monotonic() > deadline or not dst.is_running():
            break
        time.sleep(1)
    tap.ok(T_DST_MERGE, ok, diag="destination at arrival: %s\ndestination now: %s"
           % (fmt(arrival), fmt(e)))

    problems = []
    dst.send("q\n")
    try:
        dst.wait_line(r"^MS-WORKLOAD done ok", ROUND_TIMEOUT, start=mark,
                      fail_pattern=FAIL_RX)
        code = dst.wait_exit(60)
        if code != 0:
            problems.append("destination QEMU exit status %s" % code)
        for g in (src, dst):
            bad = [l for l in g.qemu_log().splitlines()
                   if re.search(r"userfault|fail|error", l, re.I)]
            if bad:
                problems.append("%s QEMU log: %s" % (g.name, "; ".join(bad)))
    except mg.GuestError as err:
        problems.append(str(err))
    tap.ok(T_DONE, not problems, diag="\n".join(problems) if problems else None)


def rounds(g):
    return [int(m.group(1)) for m in (re.search(VERIFY_RX + "$", l) for l in g.lines) if m]


def check_all_verified(tap, src, dst):
    problems = []
    for g in (src, dst):
        if g is None:
            continue
        fails = [l for l in g.lines if FAIL_RX in l]
        if fails:
            problems.append("%s: %s" % (g.name, fails[0]))
    a = rounds(src) if src else []
    b = rounds(dst) if dst else []
    allr = a + [r for r in b if not a or r > a[-1]]
    if len(b) < DST_ROUNDS or not a or allr != list(range(allr[0], allr[0] + len(allr))) \
            or allr[0] != 1:
        problems.append("rounds verified after rewrite: source %s, destination %s" % (a, b))
    if dst is None or "MS-WORKLOAD done ok" not in dst.lines:
        problems.append("destination: no 'done ok'")
    tap.ok(T_ALL_OK, not problems,
           diag="\n".join(problems + ["source rounds %s, destination rounds %s, "
                                      "each verified bad=0" % (a, b)]))


def run(tap, log_dir, postcopy=False):
    src = dst = None
    uri = "unix:" + os.path.join(log_dir, "migrate.sock")
    try:
        src = mg.Guest("src", mg.linux_guest_args(MEM, "user", cmdline()) +
                       ["-name", "src,debug-threads=on"], log_dir)
        src.launch()
        _, m = src.wait_line(r"MS-WORKLOAD filled pages=(\d+)", BOOT_TIMEOUT,
                             fail_pattern=FAIL_RX)
        tap.ok(T_BOOT, True, diag="source: " + m.group(0))
        wait_merging(tap, src)
        # At least one full round on the source before it goes.
        src.wait_line(VERIFY_RX, ROUND_TIMEOUT, fail_pattern=FAIL_RX)

        dst = mg.Guest("dst", mg.linux_guest_args(MEM, "user", cmdline()) +
                       ["-name", "dst,debug-threads=on", "-incoming", uri], log_dir)
        dst.launch(cont=False)
        if postcopy:
            for g in (src, dst):
                g.qmp("migrate-set-capabilities", capabilities=[
                    {"capability": "postcopy-ram", "state": True}])
        info, dst_status, secs, switched = migrate(src, dst, uri, postcopy=postcopy)
        arrival = dst.query_mem_share("m0") if dst.is_running() else {}
        postcopy_bytes = (info.get("ram") or {}).get("postcopy-bytes", 0)
        if postcopy is True:
            ok = switched and postcopy_bytes > 0
        else:
            ok = postcopy_bytes == 0
        ok = ok and info.get("status") == "completed" and dst_status == "paused"
        if postcopy == "advise" and "user" in arrival:
            # mem-share steps aside when postcopy is advised, and resumes
            # when the VM starts (with postcopy, once its thread ended)
            ok = False
            tap.diag("destination's scanner ran through a postcopy migration")
        tap.ok(T_MIGRATE, ok,
               diag="source query-migrate after %.1f s: status %s, ram %s%s\n"
                    "destination run state %s; postcopy switched: %s\n"
                    "destination at arrival: %s"
               % (secs, info.get("status"), info.get("ram"),
                  " error %s" % info.get("error-desc") if info.get("error-desc") else "",
                  dst_status, switched, fmt(arrival)))
        if not ok:
            raise mg.GuestError("migration did not complete")
        source_after(tap, src)
        dst.qmp("cont")
        destination_checks(tap, src, dst, arrival)
    except mg.GuestError as err:
        tap.diag(str(err))
        for g in (src, dst):
            if g is None:
                continue
            tap.diag("%s console tail:\n%s" % (g.name, "\n".join(g.tail())))
            log = g.qemu_log()
            if log:
                tap.diag("%s QEMU log:\n%s" % (g.name, log))
    finally:
        for g in (src, dst):
            if g is not None:
                g.shutdown()
        check_all_verified(tap, src, dst)


# ------------------------------------------------------------ background snapshot

S_PRE = T_PRE
S_BOOT = T_BOOT
S_MERGED = T_SRC_MERGED
S_CAP = "the background-snapshot capability can be set while mode=user runs"
S_SNAP = "the background snapshot completes while the guest runs"
S_PAUSED = ("while the snapshot runs the source's scanner is stopped (no user "
            "figures) and qom-set mode=user is refused, saying why")
S_SRC_AFTER = ("the source goes on: its scanner started again after the snapshot "
               "(full-scans restarted below the figure before it), merges "
               "(user.merges > 0), and the workload verifies 2 more rounds bad=0")
S_RESTORE = ("a QEMU restored from the snapshot (mode=user) verifies every byte: "
             "%d rounds bad=0" % DST_ROUNDS)
S_RESTORE_MERGE = "the restored VM merges (pages-merged, user.merges > 0)"
S_DONE = "both workloads end 'done ok'; no error in either QEMU's log"
S_ALL_OK = "every verification of both reported bad=0 (no lost write)"
SNAP_NAMES = [S_PRE, S_BOOT, S_MERGED, S_CAP, S_PAUSED, S_SNAP, S_SRC_AFTER, S_RESTORE,
              S_RESTORE_MERGE, S_DONE, S_ALL_OK]


def wait_rounds(g, n, start):
    """Wait for n more verified rounds from line start; return (rounds, index)."""
    got = []
    for _ in range(n):
        i, m = g.wait_line(VERIFY_RX, ROUND_TIMEOUT, start=start, fail_pattern=FAIL_RX)
        got.append(int(m.group(1)))
        start = i + 1
    return got, start


def wait_merges(g, deadline_s=MERGE_TIMEOUT):
    deadline = time.monotonic() + mg.scaled(deadline_s)
    while True:
        e = g.query_mem_share("m0")
        ok = e.get("pages-merged", 0) > 0 and user(e, "merges") > 0
        if ok or time.monotonic() > deadline or not g.is_running():
            return ok, e
        time.sleep(1)


def run_snapshot(tap, log_dir):
    src = dst = None
    snap = os.path.join(log_dir, "snapshot.bin")
    guests = []
    try:
        src = mg.Guest("src", mg.linux_guest_args(MEM, "user", cmdline()) +
                       ["-name", "src,debug-threads=on"], log_dir)
        guests.append(src)
        src.launch()
        _, m = src.wait_line(r"MS-WORKLOAD filled pages=(\d+)", BOOT_TIMEOUT,
                             fail_pattern=FAIL_RX)
        tap.ok(S_BOOT, True, diag="source: " + m.group(0))
        wait_merging(tap, src)
        src.wait_line(VERIFY_RX, ROUND_TIMEOUT, fail_pattern=FAIL_RX)

        r = src.vm.qmp("migrate-set-capabilities", capabilities=[
            {"capability": "background-snapshot", "state": True}])
        before = src.query_mem_share("m0")
        tap.ok(S_CAP, "error" not in r and "user" in before,
               diag="%s; source: %s" % (r, fmt(before)))
        if "error" in r:
            raise mg.GuestError("cannot set background-snapshot: %s" % r["error"])

        # Slow enough (~7 s) to look at the source while the snapshot runs
        src.qmp("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
        src.qmp("migrate", uri="exec:cat > %s" % snap)
        t0 = time.monotonic()
        deadline = t0 + mg.scaled(MIGRATE_TIMEOUT)
        paused = refused = None
        still = False
        while time.monotonic() < deadline:
            info = src.qmp("query-migrate")
            if info.get("status") != "setup":
                break
            time.sleep(0.05)
        if info.get("status") == "active":
            paused = src.query_mem_share("m0")
            refused = src.vm.qmp("qom-set", path="/objects/m0", property="mode",
                                 value="user")
            still = src.qmp("query-migrate").get("status") == "active"
        ok = (paused is not None and still and paused.get("mode") == "user" and
              "user" not in paused and
              "paused while a migration" in
              (refused.get("error") or {}).get("desc", ""))
        tap.ok(S_PAUSED, ok, diag="during the snapshot: %s; qom-set mode=user: %s"
               % (fmt(paused) if paused else None, refused))
        while True:
            info = src.qmp("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled") or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.1)
        e = src.query_mem_share("m0")
        st = src.qmp("query-status")["status"]
        mark = len(src.lines)
        ok = info.get("status") == "completed" and st == "running"
        tap.ok(S_SNAP, ok, diag="after %.1f s: %s, source %s, snapshot %d bytes; "
               "source right after: %s" % (time.monotonic() - t0, info.get("status"), st,
                                           os.path.getsize(snap) if os.path.exists(snap)
                                           else -1, fmt(e)))
        if not ok:
            raise mg.GuestError("snapshot failed: %s" % info)
        src.qmp("migrate-set-capabilities", capabilities=[
            {"capability": "background-snapshot", "state": False}])

        problems = []
        merged, e = wait_merges(src)
        if not merged:
            problems.append("source does not merge again: %s" % fmt(e))
        if not e.get("full-scans", 0) < before.get("full-scans", 0):
            problems.append("source's scanner was not restarted: full-scans %s "
                            "before the snapshot, %s after"
                            % (before.get("full-scans"), e.get("full-scans")))
        try:
            got, _ = wait_rounds(src, 2, mark)
        except mg.GuestError as err:
            got = []
            problems.append(str(err))
        tap.ok(S_SRC_AFTER, not problems,
               diag="\n".join(problems + ["source now: %s; rounds after the snapshot: %s"
                                          % (fmt(e), got)]))

        dst = mg.Guest("restored", mg.linux_guest_args(MEM, "user", cmdline()) +
                       ["-name", "restored,debug-threads=on",
                        "-incoming", "exec:cat %s" % snap], log_dir)
        guests.append(dst)
        dst.launch(cont=False)
        deadline = time.monotonic() + mg.scaled(MIGRATE_TIMEOUT)
        while dst.qmp("query-status")["status"] == "inmigrate" and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        dst.qmp("cont")
        problems = []
        try:
            got, _ = wait_rounds(dst, DST_ROUNDS, 0)
        except mg.GuestError as err:
            got = []
            problems.append(str(err))
        tap.ok(S_RESTORE, not problems,
               diag="\n".join(problems + ["restored rounds verified after rewrite: %s"
                                          % got]))
        merged, e = wait_merges(dst)
        tap.ok(S_RESTORE_MERGE, merged, diag="restored: %s" % fmt(e))

        problems = []
        for g in guests:
            g.send("q\n")
        for g in guests:
            try:
                g.wait_line(r"^MS-WORKLOAD done ok", ROUND_TIMEOUT, fail_pattern=FAIL_RX)
                code = g.wait_exit(60)
                if code != 0:
                    problems.append("%s: QEMU exit status %s" % (g.name, code))
            except mg.GuestError as err:
                problems.append(str(err))
            bad = [l for l in g.qemu_log().splitlines()
                   if re.search(r"userfault|fail|error|warning", l, re.I)]
            if bad:
                problems.append("%s QEMU log: %s" % (g.name, "; ".join(bad)))
        tap.ok(S_DONE, not problems, diag="\n".join(problems) if problems else None)
    except mg.GuestError as err:
        tap.diag(str(err))
        for g in guests:
            tap.diag("%s console tail:\n%s" % (g.name, "\n".join(g.tail())))
            log = g.qemu_log()
            if log:
                tap.diag("%s QEMU log:\n%s" % (g.name, log))
    finally:
        for g in guests:
            g.shutdown()
        problems = []
        for g in guests:
            fails = [l for l in g.lines if FAIL_RX in l]
            if fails:
                problems.append("%s: %s" % (g.name, fails[0]))
            if "MS-WORKLOAD done ok" not in g.lines:
                problems.append("%s: no 'done ok'" % g.name)
        if len(guests) < 2:
            problems.append("no restored VM")
        tap.ok(S_ALL_OK, not problems,
               diag="\n".join(problems + ["%s: rounds %s" % (g.name, rounds(g))
                                          for g in guests]))
