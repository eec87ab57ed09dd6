#!/usr/bin/env python3
"""Write small tar seeds for the tar_reader and tar_apply fuzz targets.

Usage: make-tar-seeds.py OUTDIR [FIXTURES]

Covers PAX (xattrs, nanosecond times, long paths and link targets, a global
header), GNU long names and links, ustar prefixes, v7, every entry type,
whiteouts and opaque directories, symlinked parents, GNU tar's sparse
formats (old GNU, PAX 0.0, 0.1 and 1.0), and the head of the upstream
fixture input.tar (FIXTURES/input.tar) when given. Each seed is a few KiB.
"""

import io
import os
import subprocess
import sys
import tarfile
import tempfile

T0 = 1_600_000_000


def add(t, name, kind=tarfile.REGTYPE, data=b"", mode=0o644, link="", pax=None, **kw):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = T0
    ti.uname = ti.gname = ""
    ti.linkname = link
    for k, v in kw.items():
        setattr(ti, k, v)
    if pax:
        ti.pax_headers = pax
    ti.size = len(data)
    t.addfile(ti, io.BytesIO(data) if data else None)


def pax_tar(path):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        add(t, "etc/", tarfile.DIRTYPE, mode=0o755, pax={"mtime": "1600000000.123456789"})
        add(t, "etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n",
            pax={"SCHILY.xattr.user.k": "v", "SCHILY.xattr.security.capability": "\x01\x00\x00\x02"})
        add(t, "d/" + "long-component-" * 10 + "/f", data=b"long path\n")
        add(t, "s", tarfile.SYMTYPE, link="t/" * 70)
        add(t, "etc/hl", tarfile.LNKTYPE, link="etc/passwd")
        add(t, "dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        add(t, "dev/big", tarfile.BLKTYPE, devmajor=300, devminor=70000)
        add(t, "dev/fifo", tarfile.FIFOTYPE)
        add(t, "run/", tarfile.DIRTYPE, mode=0o755)
        add(t, "var/run", tarfile.SYMTYPE, link="/run")
        add(t, "var/run/foo", data=b"through a symlink\n")
        add(t, "etc/.wh.gone")
        add(t, "opt/.wh..wh..opq")
        add(t, "big-ids", data=b"x", uid=100000, gid=70000)


def gnu_tar(path):
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        add(t, "g/" * 60 + "leaf", data=b"gnu long name\n")
        add(t, "link", tarfile.SYMTYPE, link="/" + "x" * 150)
        add(t, "dir/", tarfile.DIRTYPE, mode=0o1777)
        add(t, "dir/f", data=b"0123456789" * 50, mode=0o4755)


def ustar_tar(path):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        add(t, "p/" * 60 + "file", data=b"prefix field\n")
        add(t, "h", tarfile.LNKTYPE, link="p/p/p/file")
        add(t, "p/p/p/file", data=b"short\n")
    with open(path, "rb") as f:
        data = f.read()
    # v7: the same entries without the ustar magic (checksums fixed up).
    out = bytearray(data)
    for off in range(0, len(out) - 512, 512):
        h = out[off:off + 512]
        if h[257:262] == b"ustar":
            h[257:265] = b"\0" * 8
            h[148:156] = b" " * 8
            h[148:156] = b"%06o\0" % sum(h) + b" "
            out[off:off + 512] = h
    with open(path.replace("ustar", "v7"), "wb") as f:
        f.write(bytes(out))


def global_pax(path):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as t:
        add(t, "a", data=b"a", pax={"path": "renamed/by/pax", "uid": "4294967295"})


def sparse_tars(outdir):
    with tempfile.TemporaryDirectory() as w:
        p = os.path.join(w, "sparse.img")
        with open(p, "wb") as f:
            f.truncate(40960)
            for off, c in ((0, b"a"), (8192, b"b"), (40000, b"c")):
                f.seek(off)
                f.write(c * 64)
        os.utime(p, (T0, T0))
        for name, fmt, ver in (("sparse-gnu.tar", "gnu", None), ("sparse-pax00.tar", "posix", "0.0"),
                               ("sparse-pax01.tar", "posix", "0.1"), ("sparse-pax10.tar", "posix", "1.0")):
            cmd = ["tar", "-C", w, "--sparse", "--format=" + fmt, "--numeric-owner", "--owner=0",
                   "--group=0", "--mtime=@%d" % T0, "--blocking-factor=1", "-cf",
                   os.path.join(outdir, name), "sparse.img"]
            if ver:
                cmd.insert(3, "--sparse-version=" + ver)
            subprocess.run(cmd, check=True)


def fixture_head(fixtures, path, members=12):
    """The first members of input.tar with their headers as upstream's
    fixture has them and file data cut to 300 bytes."""
    src = os.path.join(fixtures, "input.tar")
    with tarfile.open(src, "r:") as t, tarfile.open(path, "w", format=t.format) as o:
        for i, m in enumerate(t):
            if i == members:
                break
            data = t.extractfile(m).read(300) if m.isreg() else b""
            m.size = len(data)
            o.addfile(m, io.BytesIO(data) if data else None)


def trim(path):
    """Drop tarfile's record padding: the archive ends after two zero blocks."""
    with open(path, "rb") as f:
        data = f.read()
    end = len(data)
    while end >= 512 and data[end - 512:end] == bytes(512):
        end -= 512
    with open(path, "wb") as f:
        f.write(data[:end] + bytes(1024))


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    pax_tar(os.path.join(out, "pax.tar"))
    gnu_tar(os.path.join(out, "gnu.tar"))
    ustar_tar(os.path.join(out, "ustar.tar"))
    global_pax(os.path.join(out, "global-pax.tar"))
    sparse_tars(out)
    if len(sys.argv) == 3:
        fixture_head(sys.argv[2], os.path.join(out, "input-head.tar"))
    for f in os.listdir(out):
        trim(os.path.join(out, f))


if __name__ == "__main__":
    main()
