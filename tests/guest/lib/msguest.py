"""Helpers of the mem-share real-guest tests (tests/guest/test-*) and demo.

Python standard library only, plus QEMU's own python package (qemu.machine),
found through $QEMU_PYTHON (default build/qemu-src/python).

Environment:
  QEMU            QEMU binary (default build/qemu-system-x86_64)
  QEMU_PYTHON     QEMU's python/ directory (default build/qemu-src/python)
  MS_GUEST_DIR    guest artifacts (default build/guest)
  MS_LOG_DIR      where serial and QEMU logs are kept (default: a temporary
                  directory that is removed unless a test fails)
  MEM_SHARE_TIMEOUT_SCALE  multiplies every deadline (slow machines)
  QEMU_EXTRA_ARGS extra QEMU arguments (shell words), e.g. "-L DIR"
  MS_BACKEND      development only: "ram" replaces the mem-share object by
                  memory-backend-ram (merge=on for mode=kernel) and emulates
                  query-mem-share from /proc, to exercise the tests on a
                  plain QEMU; every test says so in a diagnostic line.
"""

import contextlib
import errno
import fcntl
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
KSM_DIR = "/sys/kernel/mm/ksm"


def _path_env(name, default):
    v = os.environ.get(name)
    return os.path.abspath(v if v else os.path.join(ROOT, default))


QEMU = _path_env("QEMU", "build/qemu-system-x86_64")
QEMU_PYTHON = _path_env("QEMU_PYTHON", "build/qemu-src/python")
GUEST_DIR = _path_env("MS_GUEST_DIR", "build/guest")
EXTRA_ARGS = shlex.split(os.environ.get("QEMU_EXTRA_ARGS", ""))
DEV_BACKEND = os.environ.get("MS_BACKEND", "")
# Deadlines are generous already; slow or loaded machines can stretch them
# (the same variable tests/run-tests reads for its own timeouts).
TIMEOUT_SCALE = float(os.environ.get("MEM_SHARE_TIMEOUT_SCALE") or 1)


def scaled(seconds):
    return seconds * TIMEOUT_SCALE

VMLINUZ = os.path.join(GUEST_DIR, "vmlinuz")
INITRAMFS = os.path.join(GUEST_DIR, "initramfs.cpio.gz")
TINY = os.path.join(GUEST_DIR, "tiny.elf")
WORKLOAD = os.path.join(GUEST_DIR, "workload")


def import_qemu_machine():
    """Return qemu.machine.QEMUMachine from QEMU's python package."""
    if QEMU_PYTHON not in sys.path:
        sys.path.insert(0, QEMU_PYTHON)
    from qemu.machine import QEMUMachine  # pylint: disable=import-outside-toplevel
    return QEMUMachine


def missing_prerequisites(*files):
    """List of human-readable problems with the binary and artifacts."""
    probs = []
    if not os.access(QEMU, os.X_OK):
        probs.append("no QEMU binary at %s (set QEMU=...)" % QEMU)
    if not os.path.isfile(os.path.join(QEMU_PYTHON, "qemu", "machine", "machine.py")):
        probs.append("no QEMU python package at %s (set QEMU_PYTHON=...)" % QEMU_PYTHON)
    for f in files:
        if not os.path.isfile(f):
            probs.append("missing %s (run make guest)" % f)
    return probs


# --------------------------------------------------------------------- TAP

class Tap:
    """TAP 13 writer. Every planned test is reported exactly once: those
    never reached are reported 'not ok ... # not reached' by finish()."""

    def __init__(self, names):
        self.names = list(names)
        self.done = {}
        self.failed = False
        print("TAP version 13")
        print("1..%d" % len(self.names), flush=True)

    def _num(self, name):
        return self.names.index(name) + 1

    def diag(self, msg):
        for line in str(msg).splitlines() or [""]:
            print("# " + line)
        sys.stdout.flush()

    def ok(self, name, cond, diag=None):
        if name in self.done:
            raise RuntimeError("test %r reported twice" % name)
        self.done[name] = bool(cond)
        if diag:
            self.diag(diag)
        print("%s %d - %s" % ("ok" if cond else "not ok", self._num(name), name),
              flush=True)
        if not cond:
            self.failed = True
        return bool(cond)

    def skip(self, name, reason):
        if name in self.done:
            raise RuntimeError("test %r reported twice" % name)
        self.done[name] = True
        print("ok %d - %s # SKIP %s" % (self._num(name), name, reason), flush=True)

    def fail_rest(self, reason):
        for n in self.names:
            if n not in self.done:
                self.ok(n, False, diag=reason)

    def skip_rest(self, reason):
        for n in self.names:
            if n not in self.done:
                self.skip(n, reason)

    def finish(self):
        self.fail_rest("not reached")
        return 1 if self.failed else 0


# --------------------------------------------------------------------- signals

class Interrupted(BaseException):
    pass


_ACTIVE_KSM = []     # KsmSettings in effect, restored first thing on a signal


def _raise_interrupted(signum, _frame):
    # Restore host KSM at once: the test runner sends SIGKILL 5 s after
    # SIGTERM, which may be before the finally blocks got there.
    for k in list(_ACTIVE_KSM):
        try:
            k.restore()
        except OSError:
            pass
    raise Interrupted("signal %d" % signum)


def install_signal_handlers():
    """SIGINT/SIGTERM/SIGHUP raise Interrupted so that every finally block
    and context manager (KSM restore, VM shutdown) runs."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _raise_interrupted)


# --------------------------------------------------------------------- /proc, KSM

def read_int(path):
    with open(path) as f:
        return int(f.read().split()[0])


def ksm_sysfs():
    """All integer settings/counters of host KSM."""
    out = {}
    for name in sorted(os.listdir(KSM_DIR)):
        try:
            with open(os.path.join(KSM_DIR, name)) as f:
                out[name] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def ksm_available():
    return os.path.isfile(os.path.join(KSM_DIR, "run"))


def ksm_writable():
    return ksm_available() and os.access(os.path.join(KSM_DIR, "run"), os.W_OK)


def _ksm_write(name, value):
    with open(os.path.join(KSM_DIR, name), "w") as f:
        f.write("%d\n" % value)


class KsmSettings:
    """Context manager: apply host KSM settings and restore every setting it
    changed on exit, also on exceptions, Ctrl-C and SIGTERM (signal handlers
    turn those into exceptions; atexit is a last resort).

        with KsmSettings(run=1, pages_to_scan=2000, sleep_millisecs=10) as k:
            ...
            k.set(run=0)     # also restored on exit
    """

    def __init__(self, **settings):
        self.initial = settings
        self.saved = {}
        self.changed = []

    def set(self, **settings):
        # Change 'run' last: scanning starts with the other settings in place.
        for name in sorted(settings, key=lambda n: n == "run"):
            if name not in self.saved:
                self.saved[name] = read_int(os.path.join(KSM_DIR, name))
            if name not in self.changed:
                self.changed.append(name)
            _ksm_write(name, settings[name])

    def restore(self):
        errors = []
        # 'run' first: stop scanning before restoring the speed settings.
        for name in sorted(self.changed, key=lambda n: n != "run"):
            try:
                _ksm_write(name, self.saved[name])
            except OSError as e:
                errors.append("%s=%d: %s" % (name, self.saved[name], e))
        self.changed = []
        if errors:
            raise OSError("could not restore host KSM settings: " + "; ".join(errors))

    def restored_ok(self):
        """True if every saved setting has its saved value now."""
        return all(read_int(os.path.join(KSM_DIR, n)) == v
                   for n, v in self.saved.items())

    def __enter__(self):
        import atexit  # pylint: disable=import-outside-toplevel
        atexit.register(self._atexit)
        _ACTIVE_KSM.append(self)
        self.set(**self.initial)
        return self

    def _atexit(self):
        if self.changed:
            self.restore()

    def __exit__(self, *exc):
        # Signals must not interrupt the restore itself.
        old = {s: signal.signal(s, signal.SIG_IGN)
               for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.restore()
        finally:
            if self in _ACTIVE_KSM:
                _ACTIVE_KSM.remove(self)
            for s, h in old.items():
                signal.signal(s, h)
        return False


class Sysctl:
    """Set host sysctls; restore() puts the saved values back (also from
    atexit, should the caller die in between).  As a context manager it
    applies on entry and restores on exit, exceptions included.

        with Sysctl({"vm.max_map_count": 1048576}):
            ...
    """

    def __init__(self, settings):
        self.settings = settings or {}
        self.saved = {}

    @staticmethod
    def path(name):
        return "/proc/sys/" + name.replace(".", "/")

    def apply(self):
        import atexit  # pylint: disable=import-outside-toplevel
        atexit.register(self.restore)
        for name, value in self.settings.items():
            if name not in self.saved:
                self.saved[name] = read_int(self.path(name))
            with open(self.path(name), "w") as f:
                f.write("%d\n" % value)

    def restore(self):
        for name, value in list(self.saved.items()):
            with open(self.path(name), "w") as f:
                f.write("%d\n" % value)
            del self.saved[name]

    def __enter__(self):
        self.apply()
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def proc_ksm_merging_pages(pid):
    return read_int("/proc/%d/ksm_merging_pages" % pid)


def proc_ksm_stat(pid):
    """/proc/PID/ksm_stat as a dict (ints where numeric)."""
    out = {}
    with open("/proc/%d/ksm_stat" % pid) as f:
        for line in f:
            k, _, v = line.partition(" ")
            v = v.strip()
            out[k] = int(v) if re.fullmatch(r"-?\d+", v) else v
    return out


def proc_status(pid):
    """/proc/PID/status; sizes ("1234 kB") as ints in kB."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            v = v.strip()
            m = re.fullmatch(r"(\d+) kB", v)
            out[k] = int(m.group(1)) if m else v
    return out


def vmstat(name):
    with open("/proc/vmstat") as f:
        for line in f:
            k, _, v = line.partition(" ")
            if k == name:
                return int(v)
    return None


def ksmd_cpu_ns():
    """CPU time of the host's ksmd thread (utime + stime), in ns, or None."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % pid) as f:
                if f.read().strip() != "ksmd":
                    continue
            with open("/proc/%s/stat" % pid) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # fields[0] is field 3 (state): utime is field 14, stime field 15
        return (int(fields[11]) + int(fields[12])) * 1000000000 // tick
    return None


def host_ksm_figures():
    """Host-wide KSM figures as query-mem-share reports them in mode=kernel."""
    k = ksm_sysfs()
    return {"pages-scanned": k.get("pages_scanned"), "full-scans": k.get("full_scans"),
            "cow-breaks": vmstat("cow_ksm"), "scan-cpu-ns": ksmd_cpu_ns(),
            "kernel.pages-shared": k.get("pages_shared"),
            "kernel.pages-sharing": k.get("pages_sharing"),
            "kernel.pages-unshared": k.get("pages_unshared"),
            "kernel.pages-volatile": k.get("pages_volatile")}


# --------------------------------------------------------------------- page census

KPF_KSM = 1 << 21
KPF_ZERO_PAGE = 1 << 24     # the shared zero page and the huge zero page
PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1


def mergeable_ranges(pid):
    """[(start, end)] of the VMAs of PID marked MADV_MERGEABLE ('mg')."""
    ranges = []
    cur = None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                cur = (int(m.group(1), 16), int(m.group(2), 16))
            elif line.startswith("VmFlags:") and cur and "mg" in line.split()[1:]:
                ranges.append(cur)
    return ranges


def find_ram_range(pid, size):
    """(start, end) of the mapping of guest RAM of `size` bytes in PID, found
    by its size (QEMU may round it up a little) among the private anonymous
    mappings (mode=user's store, a shared memfd mapping, has the same size):
    call it before merges split the RAM into many mappings. None if there
    is no such mapping."""
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) rw-p \S+ \S+ 0\s*$", line)
            if m:
                s, e = int(m.group(1), 16), int(m.group(2), 16)
                if size <= e - s < size + (4 << 20):
                    return s, e
    return None


def range_anon_kb(pid, rng):
    """Sum of the 'Anonymous:' kB of the smaps entries of PID inside rng =
    (start, end): the private memory of guest RAM, however many mappings
    merges split it into (store pages, mapped from a memfd, are not
    anonymous)."""
    start, end = rng
    kb = 0
    inside = False
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                s, e = int(m.group(1), 16), int(m.group(2), 16)
                inside = s >= start and e <= end
            elif inside and line.startswith("Anonymous:"):
                kb += int(line.split()[1])
    return kb


def quiet_user_snapshot(g, rng, timeout=120):
    """(entry, anon_kb, quiet) of a stopped VM on mode=user: its
    query-mem-share entry and range_anon_kb(rng), read after the scanner
    looked at every page once more (mem-share-scan-now) and while it is
    quiet (the same figures, zero-merges included, before and after the
    smaps read: a hole the guest read holds a page until the scanner's
    next visit). quiet is False if that did not happen within timeout s."""
    keys = ("pages-merged", "pages-zero")
    ukeys = ("pages-shared", "store-pages", "merges", "zero-merges")
    deadline = time.monotonic() + scaled(timeout)
    # The figures describe each page as of the scanner's last visit, and a
    # converged scanner backs off to long passes: holes the guest read
    # before it was stopped may still count as holes.  Have every page
    # looked at once more, now that the VM is stopped.
    e0 = g.query_mem_share("m0")
    if e0.get("user") is not None and not g.backend_emulated:
        target = e0["pages-scanned"] + e0["size"] // e0["page-size"]
        g.qmp("mem-share-scan-now", id="m0")
        while (g.query_mem_share("m0")["pages-scanned"] < target and
               time.monotonic() < deadline):
            time.sleep(0.2)
    while True:
        e1 = g.query_mem_share("m0")
        anon = range_anon_kb(g.pid, rng)
        e2 = g.query_mem_share("m0")
        u1, u2 = e1.get("user") or {}, e2.get("user") or {}
        same = (all(e1.get(k) == e2.get(k) for k in keys) and
                all(u1.get(k) == u2.get(k) for k in ukeys))
        if same or time.monotonic() > deadline:
            return e2, anon, same
        time.sleep(0.5)


def thread_names(pid):
    """comm of every thread of PID."""
    names = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return names


def thread_cpu_seconds(pid, comm):
    """CPU time (user + system) of PID's threads named comm, or None."""
    total, found = 0, False
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                if f.read().strip() != comm:
                    continue
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        found = True
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK") if found else None


class CensusUnavailable(Exception):
    pass


def page_census(pid, ranges):
    """Count the pages of the given VMAs of PID by what they map, from
    /proc/PID/pagemap and /proc/kpageflags (root only: page frame numbers).
    Only present pages are looked at; nothing is faulted in.

    Returns dict(present, ksm, zero_pfn, ksm_zero_content, ksm_pfns,
    ksm_pfn_set): pages present, pages mapping a KSM page, pages mapping the
    zero page, KSM-mapped pages whose content is zero, distinct KSM pages
    (and their frame numbers)."""
    out = dict(present=0, ksm=0, zero_pfn=0, ksm_zero_content=0, ksm_pfns=0)
    zero_cache = {}
    zero_page = bytes(PAGE_SIZE)
    try:
        pm = os.open("/proc/%d/pagemap" % pid, os.O_RDONLY)
        kf = os.open("/proc/kpageflags", os.O_RDONLY)
        mem = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
    except OSError as e:
        raise CensusUnavailable("cannot open pagemap/kpageflags/mem: %s" % e.strerror)
    try:
        for start, end in ranges:
            npages = (end - start) // PAGE_SIZE
            step = 65536
            for first in range(0, npages, step):
                n = min(step, npages - first)
                buf = os.pread(pm, 8 * n, (start // PAGE_SIZE + first) * 8)
                for idx in range(len(buf) // 8):
                    ent = int.from_bytes(buf[8 * idx:8 * idx + 8], "little")
                    if not ent & PM_PRESENT:
                        continue
                    out["present"] += 1
                    pfn = ent & PM_PFN_MASK
                    if pfn == 0:
                        raise CensusUnavailable("page frame numbers hidden "
                                                "(needs CAP_SYS_ADMIN)")
                    flags = int.from_bytes(os.pread(kf, 8, pfn * 8), "little")
                    if flags & KPF_ZERO_PAGE:
                        out["zero_pfn"] += 1
                    elif flags & KPF_KSM:
                        out["ksm"] += 1
                        if pfn not in zero_cache:
                            va = start + (first + idx) * PAGE_SIZE
                            zero_cache[pfn] = os.pread(mem, PAGE_SIZE, va) == zero_page
                        if zero_cache[pfn]:
                            out["ksm_zero_content"] += 1
        out["ksm_pfns"] = len(zero_cache)
        out["ksm_pfn_set"] = set(zero_cache)
    except OSError as e:
        raise CensusUnavailable("reading pagemap/kpageflags/mem: %s" % e.strerror)
    finally:
        for fd in (pm, kf, mem):
            os.close(fd)
    return out


# --------------------------------------------------------------------- KVM

KVM_GET_API_VERSION = 0xAE00


def kvm_usable(dev="/dev/kvm"):
    """(True, '') or (False, reason)."""
    if not os.path.exists(dev):
        return False, "%s does not exist on this host" % dev
    if not os.access(dev, os.R_OK | os.W_OK):
        return False, "%s is not readable and writable by this user" % dev
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, "cannot open %s read-write: %s" % (dev, e.strerror)
    try:
        ver = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return False, "KVM_GET_API_VERSION failed: %s" % e.strerror
    finally:
        os.close(fd)
    if ver != 12:
        return False, "unexpected KVM API version %d" % ver
    return True, ""


# --------------------------------------------------------------------- QEMU

def qemu_has_object(type_name):
    """True if the QEMU binary knows the QOM object type."""
    import subprocess  # pylint: disable=import-outside-toplevel
    try:
        out = subprocess.run([QEMU, "-object", "help"] + EXTRA_ARGS,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=60, check=False).stdout.decode(errors="replace")
    except OSError:
        return False
    return re.search(r"^\s*%s\s*$" % re.escape(type_name), out, re.M) is not None


def backend_args(mode="kernel", size="256M", obj_id="m0", extra=""):
    """-object arguments of the guest RAM backend.

    mem-share,id=m0,size=256M,mode=... normally; memory-backend-ram when
    MS_BACKEND=ram (development on a QEMU without mem-share)."""
    if DEV_BACKEND == "ram":
        opt = "memory-backend-ram,id=%s,size=%s" % (obj_id, size)
        if mode == "kernel":
            opt += ",merge=on"
    else:
        opt = "mem-share,id=%s,size=%s,mode=%s" % (obj_id, size, mode)
    if extra:
        opt += "," + extra
    return ["-object", opt]


def size_bytes(size):
    m = re.fullmatch(r"(\d+)([KMGT]?)", str(size))
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


class GuestError(Exception):
    pass


class Guest:
    """One QEMU process (qemu.machine.QEMUMachine) with its serial console on
    a UNIX socket: a reader thread keeps every line (and a log file), writes
    go to the guest's serial input.

    The VM is started paused (-S) and continued once the console is
    connected, so no early output is lost.
    """

    def __init__(self, name, args, log_dir, accel="tcg"):
        self.name = name
        self.log_dir = log_dir
        self.serial_path = os.path.join(log_dir, name + ".serial.sock")
        self.serial_log = os.path.join(log_dir, name + ".serial.log")
        QEMUMachine = import_qemu_machine()
        all_args = ["-accel", accel, "-nodefaults", "-S",
                    "-chardev", "socket,id=ser0,path=%s,server=on,wait=off"
                    % self.serial_path,
                    "-serial", "chardev:ser0"] + EXTRA_ARGS + list(args)
        # qmp_timer bounds the wait for QMP at launch (a QEMU that hangs
        # while starting must not hang the test until the runner's timeout).
        self.vm = QEMUMachine(QEMU, args=all_args, name=name,
                              base_temp_dir=log_dir, log_dir=log_dir,
                              qmp_timer=scaled(120))
        self.lines = []
        self._partial = b""
        self._cond = threading.Condition()
        self._sock = None
        self._reader = None
        self._eof = False
        self._logf = None
        self.backend_emulated = DEV_BACKEND == "ram"

    # -- life cycle
    def launch(self, cont=True):
        """Start QEMU and connect the console; then run the VM, unless
        cont=False (the caller sends QMP cont itself, e.g. after looking at
        the process while the guest has not run yet)."""
        try:
            self.vm.launch()
            # Every QMP command gets a deadline too.
            self.vm._qmp.settimeout(scaled(120))  # pylint: disable=protected-access
        except Exception as e:  # VMLaunchFailure and friends
            out = getattr(e, "output", None)
            raise GuestError("%s: QEMU failed to start (exit status %s): %s"
                             % (self.name, getattr(e, "exitcode", None),
                                (out or str(e)).strip())) from e
        deadline = time.monotonic() + scaled(30)
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.serial_path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline or not self.vm.is_running():
                    raise GuestError("%s: cannot connect to the serial socket"
                                     % self.name)
                time.sleep(0.05)
        self._sock = s
        self._logf = open(self.serial_log, "ab")
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        if cont:
            self.qmp("cont")

    def _read_loop(self):
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._eof = True
                    self._cond.notify_all()
                return
            self._logf.write(data)
            self._logf.flush()
            buf = self._partial + data
            *complete, self._partial = buf.split(b"\n")
            if complete:
                with self._cond:
                    for line in complete:
                        self.lines.append(line.decode("utf-8", "replace")
                                          .rstrip("\r"))
                    self._cond.notify_all()

    @property
    def pid(self):
        return self.vm.get_pid()

    def cpu_seconds(self):
        """CPU time QEMU has used so far (user + system), or None."""
        try:
            with open("/proc/%d/stat" % self.pid) as f:
                fields = f.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, TypeError, ValueError, IndexError):
            return None

    def is_running(self):
        return self.vm.is_running()

    def exitcode(self):
        return self.vm.exitcode()

    def send(self, text):
        """Write text to the guest's serial input."""
        self._sock.sendall(text.encode())

    def wait_exit(self, timeout):
        """Wait for QEMU to exit on its own (guest power off, debug exit)."""
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        while self.vm.is_running() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.vm.is_running():
            raise GuestError("%s: QEMU still running after %d s" % (self.name, timeout))
        self.vm.wait(timeout=10)   # cleanup (QMP connection, temp files)
        if self._reader:
            self._reader.join(timeout=5)
        return self.vm.exitcode()

    def shutdown(self):
        """Stop QEMU (quit over QMP, then kill) and clean up. Idempotent."""
        try:
            self.vm.shutdown(timeout=10)
        except Exception:  # pylint: disable=broad-except
            try:
                self.vm.kill()
            except Exception:  # pylint: disable=broad-except
                pass
        if self._sock:
            try:
                self._sock.close()
            except OSError:
                pass
        if self._reader:
            self._reader.join(timeout=5)
        if self._logf:
            self._logf.close()
            self._logf = None

    def qemu_log(self):
        try:
            return self.vm.get_log() or ""
        except Exception:  # pylint: disable=broad-except
            return ""

    def qemu_log_now(self):
        """QEMU's output so far, while it runs (qemu_log() has it only
        after the shutdown)."""
        path = getattr(self.vm, "_qemu_log_path", None)
        if not path:
            return ""
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # -- console
    def wait_line(self, pattern, timeout, start=0, fail_pattern=None):
        """Wait until a console line (index >= start) matches pattern.
        Returns (index, match). Raises GuestError on timeout, on QEMU exit,
        or when a line matches fail_pattern first."""
        rx = re.compile(pattern)
        frx = re.compile(fail_pattern) if fail_pattern else None
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        cpu0 = self.cpu_seconds()
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    line = self.lines[i]
                    if frx and frx.search(line):
                        raise GuestError("%s: %s" % (self.name, line))
                    m = rx.search(line)
                    if m:
                        return i, m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    cpu = self.cpu_seconds()
                    raise GuestError("%s: no line matching %r within %d s (QEMU used "
                                     "%s s of CPU meanwhile; a starved machine can "
                                     "set MEM_SHARE_TIMEOUT_SCALE)"
                                     % (self.name, pattern, timeout,
                                        "%.1f" % (cpu - cpu0) if None not in (cpu, cpu0)
                                        else "?"))
                if self._eof:
                    raise GuestError("%s: console closed (QEMU exited, status %s) "
                                     "before a line matched %r"
                                     % (self.name, self.vm.exitcode(), pattern))
                self._cond.wait(min(left, 0.5))

    def tail(self, n=15):
        with self._cond:
            return self.lines[-n:]

    def console_text(self):
        """Everything the console printed, the unfinished last line too:
        a migration's destination continues the source's line where the
        switch-over cut it, so a test that follows one guest across QEMUs
        joins their console_text()s before it splits lines."""
        with self._cond:
            return "".join(l + "\n" for l in self.lines) + \
                self._partial.decode("utf-8", "replace")

    # -- QMP
    def qmp(self, cmd, **args):
        """Run a QMP command; return its 'return' value or raise GuestError."""
        r = self.vm.qmp(cmd, args_dict=args) if args else self.vm.qmp(cmd)
        if "error" in r:
            raise GuestError("%s: QMP %s failed: %s" % (self.name, cmd, r["error"]))
        return r.get("return")

    def hmp(self, command):
        """Run a human monitor command; return its output."""
        return self.qmp("human-monitor-command", **{"command-line": command})

    def query_mem_share(self, obj_id="m0"):
        """The query-mem-share entry of object obj_id."""
        if self.backend_emulated:
            return emulated_mem_share(self.pid, obj_id)
        for e in self.qmp("query-mem-share"):
            if e.get("id") == obj_id:
                return e
        raise GuestError("%s: query-mem-share has no entry %r" % (self.name, obj_id))


def emulated_mem_share(pid, obj_id):
    """Development only (MS_BACKEND=ram): a query-mem-share entry made from
    /proc, so the tests' flow can run on a plain QEMU. Not a test of
    anything."""
    st = proc_ksm_stat(pid)
    zero = st.get("ksm_zero_pages", 0)
    merging = st.get("ksm_merging_pages", 0)
    try:
        c = page_census(pid, mergeable_ranges(pid))
        merged, zeros = c["ksm"] + c["zero_pfn"], c["zero_pfn"] + c["ksm_zero_content"]
    except CensusUnavailable:
        merged, zeros = merging + zero, zero
    return {"id": obj_id, "mode": "kernel", "size": 0,
            "pages-merged": merged, "pages-zero": zeros,
            "pages-scanned": 0, "full-scans": 0, "cow-breaks": 0,
            "scan-cpu-ns": 0,
            "kernel": {"running": read_int(KSM_DIR + "/run") == 1,
                       "merging-pages": merging, "zero-pages": zero,
                       "rmap-items": st.get("ksm_rmap_items", 0),
                       "process-profit": st.get("ksm_process_profit", 0)},
            "emulated": True}


BROKER = os.path.join(ROOT, "build", "mem-share-broker")


def start_broker(log_dir, extra_args=()):
    """Start mem-share-broker on log_dir/broker.sock (log in broker.log),
    with extra_args; return (process, socket path) once it listens."""
    sock = os.path.join(log_dir, "broker.sock")
    with open(os.path.join(log_dir, "broker.log"), "w") as log:
        proc = subprocess.Popen([BROKER, "--socket", sock] + list(extra_args),
                                stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise GuestError("mem-share-broker did not start (status %s)"
                             % proc.poll())
        time.sleep(0.01)
    return proc, sock


def broker_stats(sock, broker=None):
    """{group: {field: value}} from mem-share-broker --stats (the broker
    binary BROKER unless given)."""
    out = subprocess.run([broker or BROKER, "--stats", "--socket", sock], check=False,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=30).stdout
    groups, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"^group (\S+)", line)
        if m:
            cur = groups.setdefault(m.group(1), {})
            continue
        m = re.match(r"^\s+(\S+)\s+(\d+)$", line)
        if m and cur is not None:
            cur[m.group(1)] = int(m.group(2))
    return groups


def linux_guest_args(mem="256M", mode="kernel", cmdline="", machine="q35",
                     backend_extra="", initrd=None):
    """QEMU arguments of a Linux guest running the workload as PID 1 (or
    what @initrd holds: default INITRAMFS)."""
    return (backend_args(mode, mem, extra=backend_extra) +
            ["-m", mem,
             "-machine", "%s,memory-backend=m0,mem-merge=off" % machine,
             "-kernel", VMLINUZ, "-initrd", initrd or INITRAMFS,
             "-append", "console=ttyS0 quiet panic=-1 " + cmdline,
             "-no-reboot"])


@contextlib.contextmanager
def log_directory(prefix, tap=None):
    """A directory for sockets and logs: $MS_LOG_DIR/<prefix>-<pid> (kept),
    else a temporary directory removed on success and kept on failure (an
    exception, or tap.failed)."""
    base = os.environ.get("MS_LOG_DIR")
    if base:
        d = os.path.join(os.path.abspath(base), "%s-%d" % (prefix, os.getpid()))
        os.makedirs(d, exist_ok=True)
        yield d
        return
    d = tempfile.mkdtemp(prefix=prefix + "-", dir="/tmp")
    ok = False
    try:
        yield d
        ok = True
    finally:
        if ok and not (tap and tap.failed):
            shutil.rmtree(d, ignore_errors=True)
        else:
            sys.stdout.write("# logs kept in %s\n" % d)


def errno_name(e):
    return errno.errorcode.get(e, str(e))


# --------------------------------------------------------------------- fleet

# The fleet guest (tests/guest/fleet/, built by build.sh): a minimal Debian
# 12 root with python3, perl and sqlite3 services, unpacked from the
# initramfs into the guest's memory.
FLEET_IMAGE = os.path.join(GUEST_DIR, "fleet.cpio.gz")
# The root takes about 150 MiB once unpacked (its 50 MiB archive too until
# the kernel has unpacked it), the three programs 3 x ms.fleet.mib MiB and
# about as much again for their own overheads (sqlite's page cache holds
# the whole database, the database itself is on a tmpfs), the kernel some
# 40 MiB: 512 MiB leaves room for ms.fleet.mib up to about 32.
FLEET_MEM = "512M"
FLEET_FILLED_RX = r"^MS-FLEET filled "
FLEET_VERIFY_RX = r"^MS-FLEET verify (ok|bad=(\d+) failed=(\S+))"
FLEET_FAIL_RX = r"^MS-FLEET FAIL"


def fleet_guest_args(mem=FLEET_MEM, mode="kernel", cmdline="", backend_extra="",
                     machine="q35"):
    """QEMU arguments of a fleet guest (its init reads ms.fleet.* from
    cmdline, see tests/guest/fleet/init)."""
    return linux_guest_args(mem, mode, cmdline, machine, backend_extra,
                            initrd=FLEET_IMAGE)


def proc_pss_kb(pid):
    """Pss of PID in kB (/proc/PID/smaps_rollup): its private pages plus its
    share of the pages it maps with other processes."""
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise GuestError("no Pss in /proc/%d/smaps_rollup" % pid)
