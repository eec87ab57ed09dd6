#!/usr/bin/env python3
"""Build the multi-layer OCI tar test set for overlaybd-apply.

Usage: make-layers.py [--umoci] OUTDIR

--umoci leaves out what umoci refuses outright: a user.* xattr on a symlink
(the kernel forbids it; containerd and overlaybd skip it) and the old-GNU
sparse member (type 'S', which umoci does not know), and gives a hard link
header the same mtime as its target (umoci ignores hard link metadata).

Writes, deterministically (fixed mtimes, owners and contents):
  OUTDIR/layer1.tar ... layerN.tar  applied in order; together they cover
      every entry type (files incl. 0-byte and multi-MiB, dirs, symlinks,
      hard links incl. into lower layers and to symlinks/fifos, char/block
      devices with old and new device-number encodings, fifos),
      setuid/setgid/sticky modes, uid/gid > 65535, nanosecond mtimes, xattrs
      (user.*, security.capability, trusted.overlay.*), PAX and GNU long
      names and link targets, unicode names, absolute member names, sparse
      files in old-GNU, PAX 0.1 and PAX 1.0 formats (made with GNU tar), OCI
      whiteouts across layers, opaque directories, file<->dir replacement,
      relative symlinks in parent paths, symlinks in parent paths resolved
      inside the root (Debian's var/run -> /run from a lower layer, chains
      of absolute and relative links, '..' clamped at the root, links made
      in the same layer), a directory with thousands of entries later
      thinned out by whiteouts.
  OUTDIR/layers.txt             the layer file names in order.
  OUTDIR/malicious-*.tar        layers that must be refused; OUTDIR/malicious.txt
      lists "file<TAB>expected error substring".

Python's tarfile writes the PAX/GNU layers; GNU tar (1.30+) writes the sparse
members, since tarfile cannot.
"""

import io
import os
import subprocess
import sys
import tarfile
import tempfile

T0 = 1_600_000_000  # base mtime


def data(seed, n):
    """Deterministic pseudo-random bytes."""
    out = bytearray()
    x = seed * 2654435761 + 12345
    while len(out) < n:
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out += x.to_bytes(8, "little")
    return bytes(out[:n])


class Layer:
    def __init__(self, fmt):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=fmt)

    def _info(self, name, kind, mode, uid=0, gid=0, mtime=T0, ns=None, xattrs=None):
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = mtime
        pax = {}
        if ns is not None:
            pax["mtime"] = "%d.%09d" % (mtime, ns)
        for k, v in (xattrs or {}).items():
            if isinstance(v, bytes):
                v = v.decode("utf-8", "surrogateescape")
            pax["SCHILY.xattr." + k] = v
        ti.pax_headers = pax
        return ti

    def dir(self, name, mode=0o755, **kw):
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, **kw))

    def file(self, name, content=b"", mode=0o644, **kw):
        ti = self._info(name, tarfile.REGTYPE, mode, **kw)
        ti.size = len(content)
        self.tar.addfile(ti, io.BytesIO(content))

    def symlink(self, name, target, **kw):
        ti = self._info(name, tarfile.SYMTYPE, 0o777, **kw)
        ti.linkname = target
        self.tar.addfile(ti)

    def hardlink(self, name, target, mode=0o644, **kw):
        ti = self._info(name, tarfile.LNKTYPE, mode, **kw)
        ti.linkname = target
        self.tar.addfile(ti)

    def dev(self, name, kind, major, minor, mode=0o600, **kw):
        ti = self._info(name, kind, mode, **kw)
        ti.devmajor, ti.devminor = major, minor
        self.tar.addfile(ti)

    def fifo(self, name, mode=0o644, **kw):
        self.tar.addfile(self._info(name, tarfile.FIFOTYPE, mode, **kw))

    def whiteout(self, name):
        self.file(name, b"", mode=0o644)

    def save(self, path):
        self.tar.close()
        with open(path, "wb") as f:
            f.write(self.buf.getvalue())


CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep


UMOCI = False


def layer1(out):
    l = Layer(tarfile.PAX_FORMAT)
    l.dir("etc/", mtime=T0 + 1, ns=111)
    l.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", ns=999_999_999)
    l.file("etc/replace-me-file", b"I become a directory\n")
    l.dir("etc/replace-me-dir/")
    l.file("etc/replace-me-dir/inside", b"gone when the dir is replaced\n")
    l.symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
    l.dir("usr/", mtime=T0 + 2)
    l.dir("usr/bin/")
    l.dir("usr/lib/")
    l.symlink("usr/lib64", "lib")
    l.symlink("bin", "usr/bin")
    # umoci ignores a hard link header's metadata while containerd and
    # overlaybd apply it to the shared inode; layer 2's GNU-format link
    # header cannot carry nanoseconds, so only the default set has them.
    tool_ns = None if UMOCI else 5
    l.file("usr/bin/tool", data(1, 70_000), mode=0o4755, ns=tool_ns)
    l.hardlink("usr/bin/tool-link", "usr/bin/tool", mode=0o4755, ns=tool_ns)
    l.file("usr/bin/sgid", b"#!/bin/sh\necho sgid\n", mode=0o2755, gid=50)
    l.file("usr/bin/ping", data(2, 3000), mode=0o755, xattrs={"security.capability": CAP})
    l.dir("home/", mode=0o755)
    l.dir("home/user/", mode=0o700, uid=1000, gid=1000, xattrs={"user.old": "x"})
    l.file("home/user/.profile", b"export A=1\n", uid=1000, gid=1000)
    l.dir("tmp/", mode=0o1777, mtime=T0 + 3)
    l.dir("data/", xattrs={"user.dirattr": "dir value", "trusted.overlay.opaque": "y"})
    l.file("data/empty", b"")
    l.file("data/medium", data(3, 100_000), xattrs={"user.comment": "hello", "user.bin": b"\x00\x01\xfe\xff"})
    l.file("data/big.bin", data(4, 6 * 1024 * 1024 + 123))
    l.file("data/bigid", b"large ids\n", uid=100_000, gid=70_000)
    l.file("data/ünïcödé-文件.txt", "unicode\n".encode())
    l.file("data/emoji-\U0001F600", b"smile\n")
    l.file("data/" + "n" * 255, b"a 255-byte name\n")
    deep = "data/" + "/".join(["deep-directory-level-%02d" % i for i in range(8)])
    l.file(deep + "/file-with-a-long-path.txt", b"pax path\n")
    l.symlink("data/long-target", "../" + "x" * 150 + "/target")
    sym_xattrs = {"trusted.t": "kept"}
    if not UMOCI:
        sym_xattrs["user.nope"] = "dropped"
    l.symlink("data/sym-with-xattr", "empty", xattrs=sym_xattrs)
    l.dev("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666)
    l.dev("dev/sda", tarfile.BLKTYPE, 8, 0, mode=0o660, gid=6)
    l.dev("dev/bignum", tarfile.CHRTYPE, 300, 70_000)
    l.fifo("dev/fifo")
    l.file("/abs-member", b"absolute member name\n")
    l.dir("opt/")
    l.dir("opt/gone/")
    l.file("opt/gone/a", b"a\n")
    l.dir("opt/gone/sub/")
    l.file("opt/gone/sub/b", b"b\n")
    l.dir("opt/opq/")
    l.file("opt/opq/old1", b"old\n")
    l.dir("opt/opq/oldsub/")
    l.file("opt/opq/oldsub/old2", b"old\n")
    l.dir("opt/keep/")
    l.file("opt/keep/x", b"x\n")
    # Debian's base: /var/run and /var/lock are absolute symlinks into /run.
    l.dir("run/")
    l.dir("run/lock/", mode=0o1777)
    l.file("run/old-pid", b"1\n")
    l.dir("var/")
    l.symlink("var/run", "/run")
    l.symlink("var/lock", "/run/lock")
    # Chains for layer 6: abs -> /chain/rel -> real; up climbs past the
    # root; dotdot is the root itself.
    l.dir("chain/")
    l.dir("chain/real/")
    l.symlink("chain/abs", "/chain/rel")
    l.symlink("chain/rel", "real")
    l.symlink("chain/up", "../../../../chain/./real/")
    l.symlink("chain/dotdot", "../..")
    l.symlink("chain/abs-dotdot", "/../../run")
    l.dir("many/")
    for i in range(3000):
        l.file("many/entry-%05d-with-a-longish-name" % i, b"%d\n" % i)
    l.save(out)


def layer2(out):
    l = Layer(tarfile.GNU_FORMAT)
    l.whiteout("opt/.wh.gone")
    l.whiteout("data/.wh.medium")
    l.whiteout("data/.wh.not-there")
    l.dir("opt/opq/", mtime=T0 + 20)
    l.whiteout("opt/opq/.wh..wh..opq")
    l.file("opt/opq/new1", b"new\n")
    l.file("etc/replace-me-dir", b"now a file\n", mode=0o600)
    l.dir("etc/replace-me-file/", mode=0o750)
    l.file("etc/replace-me-file/inner", b"inside the new dir\n")
    l.hardlink("usr/bin/tool-link2", "usr/bin/tool", mode=0o4755)
    l.file("usr/bin/sgid", b"replaced\n", mode=0o2711, gid=51, mtime=T0 + 21)
    deep = "/".join(["gnu-long-%02d" % i for i in range(10)])
    l.file("data/" + deep + "/leaf", b"gnu long name\n")
    l.symlink("data/gnu-long-link", "/" + "/".join(["t%03d" % i for i in range(40)]))
    l.file("data/gnu-ünïcödé", b"gnu unicode\n")
    l.file("usr/lib64/libfoo.so", b"through a relative symlink parent\n")
    l.save(out)


def gnu_tar_sparse(out, workdir):
    """Sparse members in three GNU formats, concatenated into one layer."""
    src = os.path.join(workdir, "src")
    os.makedirs(os.path.join(src, "sparse"), exist_ok=True)

    def sparse_file(name, segments, size):
        p = os.path.join(src, "sparse", name)
        with open(p, "wb") as f:
            f.truncate(size)
            for off, seed, n in segments:
                f.seek(off)
                f.write(data(seed, n))
        os.utime(p, (T0 + 30, T0 + 30))
        os.chmod(p, 0o640)
        return "sparse/" + name

    parts = []
    specs = [
        ("gnu.img", "gnu", None, [(0, 10, 65536), (1 << 20, 11, 5000), (3 << 20, 12, 4096)], 8 << 20),
        ("pax01.img", "posix", "0.1", [(8192, 13, 4096), (5 << 20, 14, 100)], 6 << 20),
        # 60 separate data runs: more extents than fit in the inode.
        ("pax10.img", "posix", "1.0", [(i * 65536, 100 + i, 4096) for i in range(60)], 60 * 65536 + 1000),
    ]
    if UMOCI:
        specs = specs[1:]
    for name, fmt, ver, segs, size in specs:
        member = sparse_file(name, segs, size)
        part = os.path.join(workdir, name + ".tar")
        cmd = ["tar", "-C", src, "--sparse", "--format=" + fmt, "--numeric-owner", "--owner=0", "--group=0",
               "--mtime=@%d" % (T0 + 30), "--blocking-factor=1", "-cf", part, member]
        if ver:
            cmd.insert(3, "--sparse-version=" + ver)
        subprocess.run(cmd, check=True)
        with open(part, "rb") as f:
            b = f.read()
        # With 512-byte records the archive ends with exactly two zero
        # blocks; drop them so the parts concatenate.
        assert b[-1024:] == bytes(1024)
        parts.append(b[:-1024])
    with open(out, "wb") as f:
        for p in parts:
            f.write(p)
        f.write(bytes(1024))


def layer4(out):
    l = Layer(tarfile.PAX_FORMAT)
    # Replace one name of a hard-linked file: the other names keep the old inode.
    l.file("usr/bin/tool", b"new tool\n", mode=0o755, mtime=T0 + 40)
    # Hard links to lower-layer symlink, fifo and device.
    l.hardlink("usr/bin/hl-to-symlink", "bin")
    l.hardlink("dev/fifo-link", "dev/fifo")
    l.hardlink("dev/null-link", "dev/null", mode=0o666)
    # An existing directory re-declared: new owner, mode, time and xattrs.
    l.dir("home/user/", mode=0o750, uid=1001, gid=1001, mtime=T0 + 22, xattrs={"user.new": "y"})
    # Whiteout and re-creation of the same name in one layer.
    l.whiteout("home/user/.wh..profile")
    l.dir("home/user/.profile/", mode=0o700, uid=1000, gid=1000)
    l.file("etc/passwd", b"root:x:0:0::/root:/bin/bash\n", ns=1)
    if not UMOCI:
        # OCI: a whiteout only hides what lower layers hold; an entry of the
        # same layer survives it (umoci deletes it anyway).
        l.file("opt/keep/same-layer", b"kept\n")
        l.whiteout("opt/keep/.wh.same-layer")
    l.save(out)


def layer5(out):
    l = Layer(tarfile.PAX_FORMAT)
    for i in range(0, 3000, 2):
        l.whiteout("many/.wh.entry-%05d-with-a-longish-name" % i)
    for i in range(500):
        l.file("many/new-%04d" % i, data(1000 + i, 100))
    l.file("data/big.bin", data(5, 1 << 20), mtime=T0 + 50)
    l.save(out)


def layer6(out):
    """Symlinks in parent paths, resolved inside the layer root."""
    l = Layer(tarfile.PAX_FORMAT)
    l.file("var/run/foo", b"lands at /run/foo\n")
    l.dir("var/lock/subdir/", mode=0o750)
    l.file("var/lock/subdir/x", b"lands at /run/lock/subdir/x\n")
    l.whiteout("var/run/.wh.old-pid")
    l.file("chain/abs/via-abs", b"abs -> /chain/rel -> real\n")
    l.file("chain/up/via-up", b"'..' stops at the root\n")
    l.file("chain/dotdot/at-root", b"../.. from /chain is /\n")
    l.file("chain/abs-dotdot/via-abs-dotdot", b"/../../run is /run\n")
    l.hardlink("chain/hl-through-links", "var/run/foo")
    # A link made in this layer, followed by the next entries.
    l.dir("same/")
    l.symlink("same/here", "/chain/abs/")
    l.file("same/here/new", b"same layer link\n")
    # Missing directories behind a dangling absolute link are created.
    l.symlink("same/dangling", "/made/by/apply")
    l.file("same/dangling/file", b"behind a dangling link\n")
    l.save(out)


def malicious(outdir):
    cases = []

    def mk(name, build, expect):
        l = Layer(tarfile.PAX_FORMAT)
        build(l)
        p = os.path.join(outdir, name)
        l.save(p)
        cases.append((name, expect))

    mk("malicious-dotdot.tar", lambda l: l.file("../evil", b"x"), "leaves the layer root")
    mk("malicious-dotdot-inner.tar", lambda l: l.file("a/../../evil", b"x"), "leaves the layer root")
    mk("malicious-symlink-loop.tar",
       lambda l: (l.symlink("loop1", "loop2"), l.symlink("loop2", "/loop1"), l.file("loop1/x", b"x")),
       "too many levels of symbolic links")
    mk("malicious-symlink-self-loop.tar",
       lambda l: (l.symlink("self", "./self/"), l.file("self/x", b"x")),
       "too many levels of symbolic links")
    mk("malicious-symlink-to-file-parent.tar",
       lambda l: (l.file("f", b"f"), l.symlink("s", "/f"), l.file("s/x", b"x")),
       "is not a directory")
    mk("malicious-hardlink-escape.tar", lambda l: l.hardlink("h", "../../etc/passwd"),
       "hard link target leaves the layer root")
    mk("malicious-hardlink-missing.tar", lambda l: l.hardlink("h", "no/such/file"), "does not exist")
    mk("malicious-hardlink-dir.tar", lambda l: l.hardlink("h", "etc"), "is a directory")
    with open(os.path.join(outdir, "malicious.txt"), "w") as f:
        for name, expect in cases:
            f.write("%s\t%s\n" % (name, expect))


def main():
    global UMOCI
    args = sys.argv[1:]
    if args and args[0] == "--umoci":
        UMOCI = True
        args = args[1:]
    if len(args) != 1:
        sys.exit(__doc__)
    outdir = args[0]
    os.makedirs(outdir, exist_ok=True)
    names = ["layer1.tar", "layer2.tar", "layer3.tar", "layer4.tar", "layer5.tar", "layer6.tar"]
    layer1(os.path.join(outdir, names[0]))
    layer2(os.path.join(outdir, names[1]))
    with tempfile.TemporaryDirectory() as w:
        gnu_tar_sparse(os.path.join(outdir, names[2]), w)
    layer4(os.path.join(outdir, names[3]))
    layer5(os.path.join(outdir, names[4]))
    layer6(os.path.join(outdir, names[5]))
    malicious(outdir)
    with open(os.path.join(outdir, "layers.txt"), "w") as f:
        f.write("\n".join(names) + "\n")


if __name__ == "__main__":
    main()
