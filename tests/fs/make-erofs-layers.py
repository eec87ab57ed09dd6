#!/usr/bin/env python3
"""Build the OCI layer tars of the EROFS TurboOCI tests.

Usage: make-erofs-layers.py [--upstream] OUTDIR

--upstream leaves out what upstream's EROFS writer (erofs-utils) handles
differently from OCI, on purpose (see fs/src/erofs/writer.rs): hard links
into lower layers, undeclared parents of lower directories, whiteouts of
same-layer entries, whiteout then re-creation, a directory declared twice,
the root declared by an upper layer, 255-byte names. What is left is
built byte for byte like upstream (fs/tests/erofs_oracle.rs checks that
against erofs-utils itself).

Writes, deterministically, OUTDIR/layer1.tar layer2.tar layer3.tar and
OUTDIR/layers.txt. Together they cover what an EROFS layer stack must
show like the reference unpack (tests/fs/treecmp.py): every entry type
(files incl. 0-byte, 4 KiB and multi-MiB, dirs, symlinks short, long and
nearly PATH_MAX, hard links in one layer and into lower layers, char/block
devices with large numbers, fifos), setuid/setgid/sticky modes, uid/gid
above 65535 (extended inodes), nanosecond mtimes, xattrs (user.*,
security.capability, trusted.*, binary values), PAX and GNU long names and
link targets, 255-byte and unicode names, absolute member names, whiteouts
of files and directories, opaque directories, file<->dir replacement,
whiteout then re-creation, a whiteout of an entry of the same layer (OCI:
it stays), parents missing from a layer (they keep the lower metadata),
directories re-declared in one layer, directories whose last block does
not fit inline (with and without full blocks before it), and a directory
with thousands of entries later thinned out by whiteouts, and a root
directory entry ("./") in an upper layer only.

Hard link headers carry their target's metadata: upstream's EROFS writer
(like umoci) ignores a link header's owner, mode and times, containerd
applies them; the two agree when they match.
"""

import importlib.util
import os
import sys
import tarfile

# The tar-writing helpers of the ext4 tests' generator.
_spec = importlib.util.spec_from_file_location(
    "make_layers", os.path.join(os.path.dirname(os.path.abspath(__file__)), "make-layers.py"))
_ml = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ml)
Layer, data, T0, CAP = _ml.Layer, _ml.data, _ml.T0, _ml.CAP

UPSTREAM = False


def layer1(out):
    l = Layer(tarfile.PAX_FORMAT)
    l.dir("etc/", mtime=T0 + 1)
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
    # No nanoseconds: layer 2's GNU-format link header to it cannot carry them.
    l.file("usr/bin/tool", data(1, 70_000), mode=0o4755)
    l.hardlink("usr/bin/tool-link", "usr/bin/tool", mode=0o4755)
    l.file("usr/bin/sgid", b"#!/bin/sh\necho sgid\n", mode=0o2755, gid=50)
    l.file("usr/bin/ping", data(2, 3000), mode=0o755, xattrs={"security.capability": CAP})
    l.dir("home/", mode=0o755)
    l.dir("home/user/", mode=0o700, uid=1000, gid=1000, mtime=T0 + 4, xattrs={"user.old": "x"})
    l.file("home/user/.profile", b"export A=1\n", uid=1000, gid=1000)
    l.dir("tmp/", mode=0o1777, mtime=T0 + 3)
    l.dir("data/", xattrs={"user.dirattr": "dir value", "trusted.overlay.opaque": "y"})
    l.file("data/empty", b"")
    l.file("data/exact4k", data(6, 4096))
    l.file("data/medium", data(3, 100_000), xattrs={"user.comment": "hello", "user.bin": b"\x00\x01\xfe\xff"})
    l.file("data/big.bin", data(4, 3 * 1024 * 1024 + 123))
    l.file("data/bigid", b"large ids\n", uid=100_000, gid=70_000)
    l.file("data/ünïcödé-文件.txt", "unicode\n".encode())
    l.file("data/" + "n" * (254 if UPSTREAM else 255), b"a long name\n")
    deep = "data/" + "/".join(["deep-directory-level-%02d" % i for i in range(8)])
    l.file(deep + "/file-with-a-long-path.txt", b"pax path\n")
    l.symlink("data/long-target", "../" + "x" * 150 + "/target")
    # 4050 bytes: too long to sit inline next to its inode.
    l.symlink("data/huge-target", "/" + "/".join("%04d" % i for i in range(810)))
    l.symlink("data/sym-with-xattr", "empty", xattrs={"trusted.t": "kept"})
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
    l.dir("opt/keep2/")
    l.file("opt/keep2/lower", b"hidden by the whiteout of opt/keep2\n")
    l.dir("data2/")
    l.file("data2/lower-only", b"hidden when data2 is whited out and re-made\n")
    # Directories whose last block does not fit inline next to the inode:
    # one block only, and one full block + such a tail.
    l.dir("tail1/")
    for i in range(65):
        l.file("tail1/%s-%03d" % ("t" * 46, i), b"")
    l.dir("tail2/")
    for i in range(131):
        l.file("tail2/%s-%03d" % ("u" * 46, i), b"")
    l.dir("many/")
    for i in range(3000):
        l.file("many/entry-%05d-with-a-longish-name" % i, b"%d\n" % i)
    l.save(out)


def lower_parents(l, names):
    """Declare lower directories again with their layer-1 metadata, as
    Docker-made layers do for the parents of what they change."""
    meta = {
        "etc/": dict(mtime=T0 + 1),
        "usr/": dict(mtime=T0 + 2),
        "usr/bin/": {},
        "opt/": {},
        "data/": dict(xattrs={"user.dirattr": "dir value", "trusted.overlay.opaque": "y"}),
        "many/": {},
        "home/": {},
    }
    for n in names:
        l.dir(n, **meta[n])


def layer2(out):
    l = Layer(tarfile.GNU_FORMAT)
    lower_parents(l, ["etc/", "usr/", "usr/bin/", "opt/", "data/"])
    l.whiteout("opt/.wh.gone")
    l.whiteout("data/.wh.medium")
    l.whiteout("data/.wh.not-there")
    l.dir("opt/opq/", mtime=T0 + 20)
    l.whiteout("opt/opq/.wh..wh..opq")
    l.file("opt/opq/new1", b"new\n")
    l.file("etc/replace-me-dir", b"now a file\n", mode=0o600)
    l.dir("etc/replace-me-file/", mode=0o750)
    l.file("etc/replace-me-file/inner", b"inside the new dir\n")
    if not UPSTREAM:
        # A hard link into the lower layer (same metadata as its target).
        l.hardlink("usr/bin/tool-link2", "usr/bin/tool", mode=0o4755)
    l.file("usr/bin/sgid", b"replaced\n", mode=0o2711, gid=51, mtime=T0 + 21)
    deep = "/".join(["gnu-long-%02d" % i for i in range(10)])
    l.file("data/" + deep + "/leaf", b"gnu long name\n")
    l.symlink("data/gnu-long-link", "/" + "/".join(["t%03d" % i for i in range(40)]))
    l.file("data/gnu-ünïcödé", b"gnu unicode\n")
    if UPSTREAM:
        l.save(out)
        return
    # Parents not in this layer keep the lower metadata.
    l.file("home/user/added", b"parent not declared\n", uid=1000, gid=1000)
    l.file("tmp/x", b"in the sticky dir\n")
    # Whiteout then re-creation: the new directory hides the lower one.
    l.whiteout(".wh.data2")
    l.dir("data2/", mode=0o711)
    l.file("data2/fresh", b"new\n")
    # A path below a name whited out in this layer.
    l.whiteout("opt/.wh.keep2")
    l.file("opt/keep2/new", b"under a whited-out name\n")
    # An entry of this layer survives a whiteout of this layer.
    l.file("opt/keep/same-layer", b"kept\n")
    l.whiteout("opt/keep/.wh.same-layer")
    # Declared twice: the last declaration counts.
    l.dir("twice/", mode=0o700, xattrs={"user.first": "1"})
    l.dir("twice/", mode=0o750, mtime=T0 + 22, xattrs={"user.second": "2"})
    l.file("twice/f", b"f\n")
    l.save(out)


def layer3(out):
    l = Layer(tarfile.PAX_FORMAT)
    lower_parents(l, ["many/", "data/", "home/"])
    if not UPSTREAM:
        # The root declared by an upper layer: an extended inode replacing
        # the lower layers' compact one in place.
        l.dir("./", mode=0o751, mtime=T0 + 60, ns=7)
    for i in range(0, 3000, 2):
        l.whiteout("many/.wh.entry-%05d-with-a-longish-name" % i)
    for i in range(300):
        l.file("many/new-%04d" % i, data(1000 + i, 100))
    l.file("data/big.bin", data(5, 1 << 20), mtime=T0 + 50)
    if not UPSTREAM:
        # A hard link to a name a lower layer linked into an even lower one.
        l.hardlink("usr/bin/tool-link3", "usr/bin/tool-link2", mode=0o4755)
    l.dir("home/user/", mode=0o750, uid=1001, gid=1001, mtime=T0 + 22, xattrs={"user.new": "y"})
    l.save(out)


def main():
    global UPSTREAM
    args = sys.argv[1:]
    if args and args[0] == "--upstream":
        UPSTREAM = True
        args = args[1:]
    if len(args) != 1:
        sys.exit(__doc__)
    outdir = args[0]
    os.makedirs(outdir, exist_ok=True)
    names = ["layer1.tar", "layer2.tar", "layer3.tar"]
    for fn, name in zip((layer1, layer2, layer3), names):
        fn(os.path.join(outdir, name))
    with open(os.path.join(outdir, "layers.txt"), "w") as f:
        f.write("\n".join(names) + "\n")


if __name__ == "__main__":
    main()
