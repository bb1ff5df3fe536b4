"""libvirt from the build tree (build/libvirt-build) for the real-guest tests.

Python standard library only.

The daemons (virtlogd, virtqemud) run as root from the build tree with the
environment libvirt's `run` script gives them (scripts/build-libvirt.sh),
set here rather than through `run`, which on a systemd host stops a system
libvirt's units for the time being (a test must not touch the host's
services, and needs not: nothing is shared with them), and in a
mount namespace of their own: there a directory of the test is mounted
over the build's sysconfdir (/usr/local/etc, so /usr/local/etc/libvirt
holds the test's qemu.conf, virtqemud.conf and virtlogd.conf) and another
over its localstatedir (/var/local: state, sockets, logs, the capability
cache).  The host's /usr/local/etc and /var/local are left as they are, and
the test can run next to another libvirt of the same prefix.  virsh runs in
the same namespace (nsenter), with the same URI an operator types,
qemu:///system.  QEMU processes inherit the namespace (libvirt makes each
its private /dev inside it); namespaces change only mounts, so /tmp paths
(broker socket, kernel, serial log) are the host's.

The QEMU driver runs QEMU as `libvirt-qemu` (Debian's default, compiled
in); HostAccounts creates that user and the `kvm` group when they are
missing and takes them away again.

Environment:
  LIBVIRT_BUILD   the libvirt build tree (default build/libvirt-build)
  LIBVIRT_PREFIX  the prefix it was configured with (default /usr/local)
"""

import grp
import json
import os
import pwd
import re
import shlex
import signal
import subprocess
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _path_env(name, default):
    v = os.environ.get(name)
    return os.path.abspath(v if v else os.path.join(ROOT, default))


BUILD = _path_env("LIBVIRT_BUILD", "build/libvirt-build")
VIRTQEMUD = os.path.join(BUILD, "src", "virtqemud")
VIRTLOGD = os.path.join(BUILD, "src", "virtlogd")
VIRSH = os.path.join(BUILD, "tools", "virsh")
QEMU_DRIVER = os.path.join(BUILD, "src", "libvirt_driver_qemu.so")

PREFIX = os.environ.get("LIBVIRT_PREFIX") or "/usr/local"
SYSCONFDIR = "/etc" if PREFIX == "/usr" else PREFIX + "/etc"
LOCALSTATEDIR = {"/usr": "/var", "/usr/local": "/var/local"}.get(PREFIX, PREFIX + "/var")

QEMU_USER = "libvirt-qemu"     # the build's default QEMU user and group (Debian)
QEMU_GROUP = "libvirt-qemu"
KVM_GROUP = "kvm"
URI = "qemu:///system"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class LibvirtError(Exception):
    pass


def missing_prerequisites():
    """Human-readable problems with the libvirt build and the host tools."""
    probs = []
    for f in (VIRTQEMUD, VIRTLOGD, VIRSH, QEMU_DRIVER):
        if not os.path.isfile(f):
            probs.append("missing %s (run make libvirt)" % f)
    if os.geteuid() != 0:
        probs.append("not root: virtqemud's system instance runs as root")
    for tool in ("unshare", "nsenter", "useradd", "groupadd", "userdel",
                 "groupdel", "gpasswd"):
        if not any(os.access(os.path.join(d, tool), os.X_OK)
                   for d in SYSTEM_PATH.split(":")):
            probs.append("no %s on this host" % tool)
    for d in (SYSCONFDIR, LOCALSTATEDIR):
        if not os.path.isdir(d):
            probs.append("no %s to mount the test's directory on" % d)
    return probs


def driver_knows(word):
    """True if the built QEMU driver module contains the bytes `word`
    (e.g. "mem-share": the driver patch is in the build)."""
    try:
        with open(QEMU_DRIVER, "rb") as f:
            return word.encode() in f.read()
    except OSError:
        return False


def build_env():
    """The environment of libvirt's `run` script: the build tree's
    libraries, programs, modules and data (LIBVIRT_DIR_OVERRIDE)."""
    env = dict(os.environ)
    for var, d in (("LD_LIBRARY_PATH", "src"), ("PKG_CONFIG_PATH", "src")):
        env[var] = os.path.join(BUILD, d) + (":" + env[var] if env.get(var) else "")
    env["PATH"] = "%s:%s:%s" % (os.path.join(BUILD, "src"), os.path.join(BUILD, "tools"),
                                SYSTEM_PATH)
    env["LIBVIRT_DIR_OVERRIDE"] = "1"
    env["abs_builddir"] = env["abs_top_builddir"] = BUILD
    return env


def _run(argv, **kw):
    env = dict(os.environ, PATH=SYSTEM_PATH + ":" + os.environ.get("PATH", ""))
    return subprocess.run(argv, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True,
                          check=False, **kw)


# --------------------------------------------------------------------- accounts

class HostAccounts:
    """The libvirt-qemu user (and its group) and the kvm group, with
    libvirt-qemu a member of kvm, as on a stock Debian host with libvirt.
    ensure() creates what is missing and remembers it; restore() undoes
    exactly that."""

    def __init__(self):
        self.done = []          # what ensure() changed, in order
        self.notes = []

    def _do(self, argv, undo, what):
        r = _run(argv, timeout=60)
        if r.returncode != 0:
            raise LibvirtError("%s failed: %s" % (" ".join(argv), r.stdout.strip()))
        self.done.append((undo, what))
        self.notes.append(what)

    def ensure(self):
        try:
            grp.getgrnam(KVM_GROUP)
        except KeyError:
            self._do(["groupadd", "--system", KVM_GROUP],
                     ["groupdel", KVM_GROUP], "created group %s" % KVM_GROUP)
        try:
            pwd.getpwnam(QEMU_USER)
        except KeyError:
            self._do(["useradd", "--system", "--no-create-home", "--user-group",
                      "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                      QEMU_USER],
                     ["userdel", QEMU_USER], "created user %s" % QEMU_USER)
        try:
            grp.getgrnam(QEMU_GROUP)
        except KeyError:    # a user libvirt-qemu without its group
            self._do(["groupadd", "--system", QEMU_GROUP],
                     ["groupdel", QEMU_GROUP], "created group %s" % QEMU_GROUP)
        kvm = grp.getgrnam(KVM_GROUP)
        if QEMU_USER not in kvm.gr_mem and pwd.getpwnam(QEMU_USER).pw_gid != kvm.gr_gid:
            self._do(["gpasswd", "--add", QEMU_USER, KVM_GROUP],
                     ["gpasswd", "--delete", QEMU_USER, KVM_GROUP],
                     "added %s to group %s" % (QEMU_USER, KVM_GROUP))
        if not self.notes:
            self.notes.append("user %s and group %s were there" % (QEMU_USER, KVM_GROUP))

    def restore(self):
        """Undo ensure(); returns a list of problems (empty if all went)."""
        probs = []
        while self.done:
            undo, _what = self.done.pop()
            r = _run(undo, timeout=60)
            if r.returncode != 0:
                probs.append("%s: %s" % (" ".join(undo), r.stdout.strip()))
        # userdel removes the user's own group when it is empty; make sure.
        try:
            if any(n == "created user %s" % QEMU_USER for n in self.notes):
                grp.getgrnam(QEMU_USER)
                r = _run(["groupdel", QEMU_USER], timeout=60)
                if r.returncode != 0:
                    probs.append("groupdel %s: %s" % (QEMU_USER, r.stdout.strip()))
        except KeyError:
            pass
        return probs


def ids():
    """(uid, gid) QEMU runs with: the QEMU user's and the QEMU group's."""
    return pwd.getpwnam(QEMU_USER).pw_uid, grp.getgrnam(QEMU_GROUP).gr_gid


# --------------------------------------------------------------------- daemons

VIRTQEMUD_CONF = """\
# virtqemud.conf of tests/guest (lib/mslibvirt.py)
log_filters="1:qemu.qemu_process 1:qemu.qemu_command 1:qemu.qemu_hotplug 1:qemu.qemu_namespace 1:qemu.qemu_domain 1:qemu.qemu_driver 1:security 1:conf.domain_conf 3:*"
log_outputs="1:file:{var}/log/libvirt/virtqemud.log"
"""

VIRTLOGD_CONF = """\
# virtlogd.conf of tests/guest (lib/mslibvirt.py)
log_outputs="2:file:{var}/log/libvirt/virtlogd.log"
"""


class Libvirt:
    """virtlogd and virtqemud from the build tree in a mount namespace of
    their own (see the module's comment), configured from base_dir:

      base_dir/etc    mounted on SYSCONFDIR (libvirt/qemu.conf, ...)
      base_dir/var    mounted on LOCALSTATEDIR (run/, lib/, log/, cache/)

    qemu_conf: the text of qemu.conf (None: no qemu.conf, the defaults)."""

    def __init__(self, base_dir, qemu_conf=None):
        self.base = base_dir
        self.etc = os.path.join(base_dir, "etc")
        self.var = os.path.join(base_dir, "var")
        self.qemu_conf = qemu_conf
        self.holder = None
        self.daemons = {}       # name -> Popen
        self.starts = {}        # name -> number of starts (log file suffix)

    # paths as the host sees them
    def host_path(self, ns_path):
        """The host's path of a path under SYSCONFDIR or LOCALSTATEDIR in
        the namespace."""
        for ns_dir, host_dir in ((LOCALSTATEDIR, self.var), (SYSCONFDIR, self.etc)):
            if ns_path == ns_dir or ns_path.startswith(ns_dir + "/"):
                return host_dir + ns_path[len(ns_dir):]
        return ns_path

    @property
    def run_dir(self):
        return os.path.join(self.var, "run", "libvirt")

    @property
    def log_dir(self):
        return os.path.join(self.var, "log", "libvirt")

    def qemu_pid(self, dom):
        """QEMU's pid of a running domain (its pid file), or None."""
        try:
            with open(os.path.join(self.run_dir, "qemu", dom + ".pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def domain_log(self, dom):
        return os.path.join(self.log_dir, "qemu", dom + ".log")

    # life cycle
    def setup(self):
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)
        conf = os.path.join(self.etc, "libvirt")
        os.makedirs(conf, exist_ok=True)
        for sub in ("run", "lib", "log/libvirt", "cache"):
            os.makedirs(os.path.join(self.var, sub), exist_ok=True)
        with open(os.path.join(conf, "virtqemud.conf"), "w") as f:
            f.write(VIRTQEMUD_CONF.format(var=LOCALSTATEDIR))
        with open(os.path.join(conf, "virtlogd.conf"), "w") as f:
            f.write(VIRTLOGD_CONF.format(var=LOCALSTATEDIR))
        if self.qemu_conf is not None:
            with open(os.path.join(conf, "qemu.conf"), "w") as f:
                f.write(self.qemu_conf)
        # The namespace: a process that holds it (unshare, private mounts:
        # nothing propagates back to the host), the two directories mounted.
        script = ('mount --bind "$1" "$2" && mount --bind "$3" "$4" && '
                  'echo ready && exec sleep infinity')
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             script, "sh", self.etc, SYSCONFDIR, self.var, LOCALSTATEDIR],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            universal_newlines=True, env=dict(os.environ, PATH=SYSTEM_PATH))
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            rest = self.holder.stdout.read() if self.holder.poll() is not None else ""
            raise LibvirtError("cannot make a mount namespace: %s %s" % (line, rest))

    def ns(self, argv):
        """argv run inside the namespace."""
        return ["nsenter", "--target", str(self.holder.pid), "--mount", "--"] + list(argv)

    def start_daemon(self, name, wait_for):
        """Start a daemon (virtlogd, virtqemud) in the foreground (with
        `run`'s environment); its stdout/stderr go to log/libvirt/NAME.stderr; returns once
        the socket wait_for (a namespace path) exists."""
        binary = {"virtlogd": VIRTLOGD, "virtqemud": VIRTQEMUD}[name]
        self.starts[name] = self.starts.get(name, 0) + 1
        out = open(os.path.join(self.log_dir, "%s.stderr" % name), "a")
        out.write("---- start %d\n" % self.starts[name])
        out.flush()
        proc = subprocess.Popen(self.ns([binary]), stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, env=build_env(), cwd="/")
        out.close()
        self.daemons[name] = proc
        sock = self.host_path(wait_for)
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise LibvirtError("%s exited at start (status %s): %s"
                                   % (name, proc.returncode,
                                      tail_file(os.path.join(self.log_dir,
                                                             "%s.stderr" % name))))
            if time.monotonic() > deadline:
                raise LibvirtError("%s: no %s after 60 s" % (name, wait_for))
            time.sleep(0.05)
        return proc

    def start(self):
        self.start_daemon("virtlogd", LOCALSTATEDIR + "/run/libvirt/virtlogd-sock")
        self.start_virtqemud()

    def start_virtqemud(self):
        sock = LOCALSTATEDIR + "/run/libvirt/virtqemud-sock"
        try:
            os.unlink(self.host_path(sock))
        except FileNotFoundError:
            pass
        self.start_daemon("virtqemud", sock)
        # Ready when it answers.
        deadline = time.monotonic() + 60
        while True:
            r = self.virsh("uri", check=False, timeout=30)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline or self.daemons["virtqemud"].poll() is not None:
                raise LibvirtError("virtqemud does not answer: %s" % r.stdout.strip())
            time.sleep(0.2)

    def stop_daemon(self, name, sig=signal.SIGTERM, timeout=30):
        """Stop a daemon; returns its exit status (None if it had to be
        killed)."""
        proc = self.daemons.get(name)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return None
        return proc.returncode

    def daemon_pid(self, name):
        proc = self.daemons.get(name)
        return proc.pid if proc and proc.poll() is None else None

    def stop(self):
        for name in ("virtqemud", "virtlogd"):
            self.stop_daemon(name)
        if self.holder and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()

    # clients
    def virsh(self, *args, check=True, timeout=120, input_text=None):
        """virsh -c qemu:///system ARGS in the namespace; CompletedProcess
        (stdout and stderr together in .stdout). Raises LibvirtError when it
        fails and check is true."""
        argv = self.ns([VIRSH, "-c", URI] + list(args))
        try:
            r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               input=input_text, universal_newlines=True,
                               timeout=timeout, check=False, env=build_env())
        except subprocess.TimeoutExpired as e:
            raise LibvirtError("virsh %s: no answer in %d s" % (" ".join(args), timeout)) from e
        if check and r.returncode != 0:
            raise LibvirtError("virsh %s failed (status %d): %s"
                               % (" ".join(shlex.quote(a) for a in args), r.returncode,
                                  r.stdout.strip()))
        return r

    def qmp(self, dom, command, **arguments):
        """A QMP command through virsh qemu-monitor-command; its return."""
        cmd = {"execute": command}
        if arguments:
            cmd["arguments"] = arguments
        out = self.virsh("qemu-monitor-command", dom, json.dumps(cmd)).stdout
        reply = json.loads(out)
        if "error" in reply:
            raise LibvirtError("%s: QMP %s: %s" % (dom, command, reply["error"]))
        return reply.get("return")

    def domstats(self, *args):
        """virsh domstats ARGS parsed: {domain: {field: value}} (values as
        strings)."""
        out = self.virsh("domstats", *args).stdout
        stats, cur = {}, None
        for line in out.splitlines():
            m = re.match(r"^Domain: '(.*)'$", line)
            if m:
                cur = stats.setdefault(m.group(1), {})
                continue
            m = re.match(r"^\s+([^=\s]+)=(.*)$", line)
            if m and cur is not None:
                cur[m.group(1)] = m.group(2)
        return stats, out

    def logs(self, lines=40):
        """Every log of the daemons and the domains, in short (for a
        failure's diagnostics): the daemons' errors and warnings and their
        last lines, the domains' logs' last lines (QEMU's command line and
        messages)."""
        out = []
        for dirpath, _dirs, files in os.walk(self.log_dir):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                if os.path.dirname(path) == self.log_dir and name.endswith(".log"):
                    try:
                        with open(path, errors="replace") as f:
                            text = f.read().splitlines()
                    except OSError:
                        text = []
                    errs = [l for l in text if re.search(r": (error|warning) : ", l)]
                    out.append("---- %s: %d errors and warnings (last %d), last %d lines"
                               % (path, len(errs), lines // 2, lines // 2))
                    out += errs[-(lines // 2):] + ["...."] + text[-(lines // 2):]
                else:
                    out.append("---- %s (last %d lines)" % (path, lines))
                    out.append(tail_file(path, lines))
        return "\n".join(out)


def tail_file(path, n=20):
    try:
        with open(path, errors="replace") as f:
            return "\n".join(f.read().splitlines()[-n:])
    except OSError as e:
        return "(%s: %s)" % (path, e.strerror)


# --------------------------------------------------------------------- QEMU argv

def parse_object_arg(value):
    """The properties of an -object argument (JSON or key=value)."""
    if value.startswith("{"):
        return json.loads(value)
    props = {}
    for part in value.split(","):
        k, _, v = part.partition("=")
        if "qom-type" not in props and not _:
            props["qom-type"] = k
        else:
            props[k] = v
    return props


def qemu_objects(argv):
    """[properties] of every -object of a QEMU argv."""
    objs = []
    for i, a in enumerate(argv[:-1]):
        if a == "-object":
            objs.append(parse_object_arg(argv[i + 1]))
    return objs


def qemu_memdevs(argv):
    """Ids of the memory backends the guest's RAM uses: -machine
    memory-backend=ID and -numa node,memdev=ID (JSON or key=value)."""
    ids_ = []
    for i, a in enumerate(argv[:-1]):
        v = argv[i + 1]
        if a == "-machine":
            m = re.search(r"(?:^|,)memory-backend=([^,]+)", v)
            if m:
                ids_.append(m.group(1))
        elif a == "-numa":
            if v.startswith("{"):
                d = json.loads(v)
                if d.get("memdev"):
                    ids_.append(d["memdev"])
            else:
                m = re.search(r"(?:^|,)memdev=([^,]+)", v)
                if m:
                    ids_.append(m.group(1))
    return ids_


def proc_cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def proc_ids(pid):
    """{'Uid': [real, effective, saved, fs], 'Gid': [...], 'Groups': [...]}"""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "Groups"):
                out[k] = [int(x) for x in v.split()]
    return out


def shell_words(text):
    """The argv of a command line as virsh domxml-to-native qemu-argv prints
    it (environment assignments first, lines joined by backslashes)."""
    words = shlex.split(text.replace("\\\n", " "))
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words.pop(0)
    return words
