#!/usr/bin/python3
"""Write a directory tree as a newc cpio archive (an initramfs), no root
needed:

  mkcpio.py ROOT OUT.cpio

Directories come before what they hold (sorted, so the archive is
reproducible), symbolic links keep their target, hard links are written
as links (the data once, with the first name), modes and mtimes are kept
(the kernel keeps mtimes: CONFIG_INITRAMFS_PRESERVE_MTIME, which the
precompiled .pyc files rely on).  Owners are kept when the tree was
unpacked by root, 0 otherwise.  dev/console (character 5:1) is added:
the kernel opens it for PID 1 before anything is mounted.
"""
import os
import stat
import sys


class Writer:
    def __init__(self, f):
        self.f = f
        self.ino = 100
        self.links = {}         # (dev, ino) of hard-linked files -> our ino
        self.own = os.geteuid() == 0

    def entry(self, name, mode, data=b"", uid=0, gid=0, nlink=1, mtime=0,
              rdev=(0, 0), ino=None):
        if ino is None:
            self.ino += 1
            ino = self.ino
        name_b = name.encode("utf-8", "surrogateescape") + b"\0"
        hdr = "070701" + "".join("%08x" % v for v in (
            ino, mode, uid, gid, nlink, mtime, len(data), 0, 0,
            rdev[0], rdev[1], len(name_b), 0))
        out = hdr.encode() + name_b
        out += b"\0" * (-len(out) % 4)
        self.f.write(out)
        self.f.write(data)
        self.f.write(b"\0" * (-len(data) % 4))

    def path(self, root, rel):
        full = os.path.join(root, rel)
        st = os.lstat(full)
        uid, gid = (st.st_uid, st.st_gid) if self.own else (0, 0)
        mtime = int(st.st_mtime)
        if stat.S_ISLNK(st.st_mode):
            self.entry(rel, st.st_mode, os.readlink(full).encode(
                "utf-8", "surrogateescape"), uid, gid, mtime=mtime)
        elif stat.S_ISDIR(st.st_mode):
            self.entry(rel, st.st_mode, uid=uid, gid=gid, nlink=2, mtime=mtime)
        elif stat.S_ISREG(st.st_mode):
            data, ino = None, None
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in self.links:
                    ino, data = self.links[key], b""
                else:
                    self.ino += 1
                    ino = self.links[key] = self.ino
            if data is None:
                with open(full, "rb") as f:
                    data = f.read()
            self.entry(rel, st.st_mode, data, uid, gid, nlink=st.st_nlink,
                       mtime=mtime, ino=ino)
        else:
            sys.exit("mkcpio: %s: not a file, directory or symlink" % full)


def main():
    root, out = sys.argv[1], sys.argv[2]
    with open(out, "wb") as f:
        w = Writer(f)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            names = sorted(filenames + [d for d in dirnames
                                        if os.path.islink(os.path.join(dirpath, d))])
            # os.walk lists symlinks to directories among dirnames; they are
            # written as links here and not descended into.
            dirnames[:] = [d for d in dirnames
                           if not os.path.islink(os.path.join(dirpath, d))]
            if rel_dir != ".":
                w.path(root, rel_dir)
            for n in names:
                w.path(root, n if rel_dir == "." else os.path.join(rel_dir, n))
            if rel_dir == "dev":
                w.entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        w.entry("TRAILER!!!", 0)
        f.write(b"\0" * (-f.tell() % 512))


if __name__ == "__main__":
    main()
