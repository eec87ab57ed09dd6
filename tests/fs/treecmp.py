#!/usr/bin/env python3
"""Describe a filesystem tree as a JSON manifest, three independent ways, and
compare manifests.

  treecmp.py reference LAYER.tar [LAYER.tar ...] > ref.json
      Apply OCI layer tars in memory (Python's tarfile; OCI whiteout and
      opaque-directory rules) and describe the result.
  treecmp.py image EXT4.img > img.json
      Describe the tree inside an ext4 image using debugfs (e2fsprogs).
  treecmp.py dir DIR > dir.json
      Describe a real directory tree (a loop mount, an umoci rootfs).
  treecmp.py compare A.json B.json [--ignore FIELD] [--ignore-path PATH]
                     [--ignore-xattr NAME] [--ignore-dir-mtime] ...
      Print the differences; exit status 1 if any.

A manifest maps each path (relative, no leading '/', root excluded,
top-level lost+found excluded) to: type (f d l c b p), mode (permission
bits incl. setuid/setgid/sticky), uid, gid, mtime ("sec.nsec"), and per
type: size + sha256 (files), target (symlinks, hex of the bytes), rdev
(devices), xattrs (name -> hex value), and "link" (the smallest path of
the hard-link group, for non-directories with more than one name).
"""

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import tempfile

# ---------------------------------------------------------------------------
# Reference unpack


class Node:
    def __init__(self, kind, mode=0o755, uid=0, gid=0, mtime="0.000000000"):
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.data = b""
        self.target = b""
        self.rdev = None
        self.xattrs = {}
        self.children = {} if kind == "d" else None


class RefError(Exception):
    pass


def clean(path):
    out = []
    for c in path.split(b"/"):
        if c in (b"", b"."):
            continue
        if c == b"..":
            if not out:
                return None
            out.pop()
        else:
            out.append(c)
    return out


def mtime_of(m):
    raw = m.pax_headers.get("mtime")
    if raw is not None:
        sec, _, frac = raw.partition(".")
        neg = sec.startswith("-")
        s = int(sec)
        ns = int((frac + "000000000")[:9]) if frac else 0
        if neg and ns:
            s -= 1
            ns = 1_000_000_000 - ns
        return "%d.%09d" % (s, ns)
    return "%d.%09d" % (int(m.mtime), 0)


def pax_bytes(v):
    return v.encode("utf-8", "surrogateescape")


def member_xattrs(m, kind):
    out = {}
    for k, v in m.pax_headers.items():
        if not k.startswith("SCHILY.xattr."):
            continue
        name = k[len("SCHILY.xattr."):]
        known = name.startswith(("user.", "trusted.", "security.")) or name in (
            "system.posix_acl_access", "system.posix_acl_default")
        if not known:
            continue
        if name.startswith("user.") and kind not in ("f", "d"):
            continue
        out[name] = pax_bytes(v).hex()
    return out


class Tree:
    def __init__(self):
        self.root = Node("d")

    def resolve_dir(self, comps, create):
        """Directory node holding the last component. Symlinks are followed
        inside the root as containerd's fs.RootPath does: an absolute target
        restarts at the root and '..' stops at the root."""
        stack = [self.root]
        queue = list(comps)
        hops = 0
        while queue:
            c = queue.pop(0)
            if c in (b"", b"."):
                continue
            if c == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            cur = stack[-1]
            n = cur.children.get(c)
            if n is None:
                if not create:
                    raise RefError("does not exist")
                n = Node("d", 0o755, 0, 0, "0.000000000")
                cur.children[c] = n
                stack.append(n)
            elif n.kind == "d":
                stack.append(n)
            elif n.kind == "l":
                hops += 1
                if hops > 40:
                    raise RefError("too many levels of symbolic links")
                if n.target.startswith(b"/"):
                    del stack[1:]
                queue = n.target.split(b"/") + queue
            else:
                raise RefError("is not a directory")
        return stack[-1]

    def remove_lower(self, parent, name, unpacked):
        n = parent.children[name]
        mine = (id(parent), name) in unpacked
        if n.kind == "d":
            for c in sorted(list(n.children)):
                self.remove_lower(n, c, unpacked)
            if not mine and not n.children:
                del parent.children[name]
        elif not mine:
            del parent.children[name]

    def names_itself(self, m, parent, name):
        """Whether hard link `m`, at `name` in `parent`, names that entry."""
        lc = clean(os.fsencode(m.linkname))
        if not lc:
            return False
        *lp, ln = lc
        try:
            return ln == name and self.resolve_dir(lp, False) is parent
        except RefError:
            return False

    def apply(self, path):
        unpacked = set()
        dirtimes = []
        with tarfile.open(path, "r:") as t:
            for m in t:
                if m.type in (tarfile.XGLTYPE,):
                    continue
                comps = clean(os.fsencode(m.name))
                if comps is None:
                    raise RefError("%s: leaves the layer root" % m.name)
                if not comps:
                    continue
                *parents, name = comps
                parent = self.resolve_dir(parents, True)
                if name.startswith(b".wh."):
                    target = name[4:]
                    if target == b".wh..opq":
                        for c in sorted(list(parent.children)):
                            self.remove_lower(parent, c, unpacked)
                    elif target.startswith(b".wh."):
                        pass
                    elif target in parent.children:
                        self.remove_lower(parent, target, unpacked)
                    continue
                existing = parent.children.get(name)
                mt = mtime_of(m)
                if m.isdir() and existing is not None and existing.kind == "d":
                    existing.mode, existing.uid, existing.gid = m.mode & 0o7777, m.uid, m.gid
                    existing.xattrs = member_xattrs(m, "d")
                    dirtimes.append((existing, mt))
                    unpacked.add((id(parent), name))
                    continue
                if m.islnk() and existing is not None and self.names_itself(m, parent, name):
                    # A hard link to its own name (`tar cf x.tar f f`) changes
                    # nothing (erofs-utils, GNU tar): the file stays as it is.
                    unpacked.add((id(parent), name))
                    continue
                if existing is not None:
                    del parent.children[name]
                if m.islnk():
                    lc = clean(os.fsencode(m.linkname))
                    if lc is None:
                        raise RefError("hard link target leaves the layer root")
                    *lp, ln = lc
                    tdir = self.resolve_dir(lp, False)
                    target = tdir.children.get(ln)
                    if target is None:
                        raise RefError("hard link target does not exist")
                    if target.kind == "d":
                        raise RefError("hard link target is a directory")
                    target.uid, target.gid, target.mtime = m.uid, m.gid, mt
                    if target.kind != "l":
                        target.mode = m.mode & 0o7777
                    target.xattrs.update(member_xattrs(m, target.kind))
                    parent.children[name] = target
                    unpacked.add((id(parent), name))
                    continue
                if m.isdir():
                    n = Node("d", m.mode & 0o7777, m.uid, m.gid, mt)
                    dirtimes.append((n, mt))
                elif m.isreg():
                    n = Node("f", m.mode & 0o7777, m.uid, m.gid, mt)
                    n.data = t.extractfile(m).read()
                elif m.issym():
                    n = Node("l", 0o777, m.uid, m.gid, mt)
                    n.target = os.fsencode(m.linkname)
                elif m.ischr() or m.isblk():
                    n = Node("c" if m.ischr() else "b", m.mode & 0o7777, m.uid, m.gid, mt)
                    n.rdev = [m.devmajor, m.devminor]
                elif m.isfifo():
                    n = Node("p", m.mode & 0o7777, m.uid, m.gid, mt)
                else:
                    raise RefError("unsupported member type %r" % m.type)
                n.xattrs = member_xattrs(m, n.kind)
                parent.children[name] = n
                unpacked.add((id(parent), name))
        for n, mt in dirtimes:
            n.mtime = mt

    def manifest(self):
        out = {}
        groups = {}

        def walk(d, prefix):
            for name in sorted(d.children):
                n = d.children[name]
                p = prefix + name
                groups.setdefault(id(n), []).append(p)
                out[p] = n
                if n.kind == "d":
                    walk(n, p + b"/")

        walk(self.root, b"")
        man = {}
        for p, n in out.items():
            e = {"type": n.kind, "mode": n.mode, "uid": n.uid, "gid": n.gid, "mtime": n.mtime,
                 "xattrs": dict(sorted(n.xattrs.items()))}
            if n.kind == "f":
                e["size"] = len(n.data)
                e["sha256"] = hashlib.sha256(n.data).hexdigest()
            elif n.kind == "l":
                e["target"] = n.target.hex()
            elif n.kind in "cb":
                e["rdev"] = n.rdev
            g = groups[id(n)]
            if n.kind != "d" and len(g) > 1:
                e["link"] = os.fsdecode(min(g))
            man[os.fsdecode(p)] = e
        return man


# ---------------------------------------------------------------------------
# Real directory


def dir_manifest(root):
    man = {}
    inodes = {}
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel == "lost+found":
                continue
            entries.append((rel, full, os.lstat(full)))
        dirnames[:] = [d for d in dirnames if os.path.relpath(os.path.join(dirpath, d), root) != "lost+found"]
    for rel, full, st in entries:
        inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    for rel, full, st in entries:
        m = st.st_mode
        kind = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
                stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}[stat.S_IFMT(m)]
        xattrs = {}
        for k in sorted(os.listxattr(full, follow_symlinks=False)):
            xattrs[k] = os.getxattr(full, k, follow_symlinks=False).hex()
        e = {"type": kind, "mode": stat.S_IMODE(m), "uid": st.st_uid, "gid": st.st_gid,
             "mtime": "%d.%09d" % (st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9), "xattrs": xattrs}
        if kind == "f":
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            e["size"] = st.st_size
            e["sha256"] = h.hexdigest()
        elif kind == "l":
            e["target"] = os.fsencode(os.readlink(full)).hex()
        elif kind in "cb":
            e["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        g = inodes[(st.st_dev, st.st_ino)]
        if kind != "d" and len(g) > 1:
            e["link"] = min(g, key=os.fsencode)
        man[rel] = e
    return man


# ---------------------------------------------------------------------------
# ext4 image through debugfs


def debugfs(img, cmds):
    """Run debugfs commands; return the output of each command (bytes)."""
    with tempfile.NamedTemporaryFile("w", suffix=".cmds", delete=False) as f:
        f.write("\n".join(cmds) + "\n")
        cmdfile = f.name
    try:
        r = subprocess.run(["debugfs", "-f", cmdfile, img], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, check=True)
    finally:
        os.unlink(cmdfile)
    outs = []
    cur = None
    for line in r.stdout.split(b"\n"):
        if line.startswith(b"debugfs: "):
            if cur is not None:
                outs.append(b"\n".join(cur))
            cur = []
        elif cur is not None:
            cur.append(line)
    if cur is not None:
        outs.append(b"\n".join(cur))
    if len(outs) != len(cmds):
        raise SystemExit("debugfs returned %d outputs for %d commands:\n%s" %
                         (len(outs), len(cmds), r.stderr.decode(errors="replace")))
    return outs


TYPES = {0o100000: "f", 0o040000: "d", 0o120000: "l", 0o020000: "c", 0o060000: "b", 0o010000: "p",
         0o140000: "s"}


def image_manifest(img):
    # 1. Walk the tree with "ls -p <ino>", one debugfs run per level.
    paths = {}  # rel path (bytes) -> ino
    level = [(b"", 2)]
    while level:
        outs = debugfs(img, ["ls -p <%d>" % ino for _, ino in level])
        nxt = []
        for (prefix, _), out in zip(level, outs):
            for line in out.split(b"\n"):
                line = line.strip()
                if not line.startswith(b"/"):
                    continue
                # /ino/mode/uid/gid/name/size/ ; names have no '/'.
                parts = line.split(b"/")
                ino, mode, name = int(parts[1]), int(parts[2], 8), b"/".join(parts[5:-2])
                # ls lists a block's first entry even when unused (inode 0).
                if name in (b".", b"..") or ino == 0:
                    continue
                rel = prefix + name
                if rel == b"lost+found":
                    continue
                paths[rel] = ino
                if stat.S_ISDIR(mode):
                    nxt.append((rel + b"/", ino))
        level = nxt
    inos = sorted(set(paths.values()))
    # 2. stat every inode.
    info = {}
    outs = debugfs(img, ["stat <%d>" % i for i in inos])
    for ino, out in zip(inos, outs):
        info[ino] = parse_stat(out)
    # 3. xattr values (to files) and file/symlink contents (catted).
    tmp = tempfile.mkdtemp()
    cmds = []
    for ino in inos:
        for k, name in enumerate(info[ino]["xattr_names"]):
            cmds.append('ea_get -f %s/x%d_%d <%d> %s' % (tmp, ino, k, ino, name))
    if cmds:
        debugfs(img, cmds)
    contents = cat_inodes(img, [i for i in inos if info[i]["type"] == "f" or
                                (info[i]["type"] == "l" and info[i]["fast_target"] is None)], info)
    by_ino = {}
    for rel, ino in paths.items():
        by_ino.setdefault(ino, []).append(rel)
    man = {}
    for rel, ino in paths.items():
        st = info[ino]
        e = {"type": st["type"], "mode": st["mode"], "uid": st["uid"], "gid": st["gid"],
             "mtime": st["mtime"], "xattrs": {}}
        for k, name in enumerate(st["xattr_names"]):
            with open("%s/x%d_%d" % (tmp, ino, k), "rb") as f:
                e["xattrs"][name] = f.read().hex()
        e["xattrs"] = dict(sorted(e["xattrs"].items()))
        if st["type"] == "f":
            d = contents[ino]
            e["size"] = len(d)
            e["sha256"] = hashlib.sha256(d).hexdigest()
        elif st["type"] == "l":
            if st["fast_target"] is not None:
                e["target"] = st["fast_target"].hex()
            else:
                e["target"] = contents[ino].hex()
        elif st["type"] in "cb":
            e["rdev"] = st["rdev"]
        g = by_ino[ino]
        if st["type"] != "d" and len(g) > 1:
            e["link"] = os.fsdecode(min(g))
        man[os.fsdecode(rel)] = e
    subprocess.run(["rm", "-rf", tmp], check=True)
    return man


def cat_inodes(img, inos, info):
    """Contents of inodes via one `debugfs cat` run: each command's echo
    line is followed by exactly the inode's size in bytes."""
    if not inos:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".cmds", delete=False) as f:
        f.write("".join("cat <%d>\n" % i for i in inos))
        cmdfile = f.name
    try:
        r = subprocess.run(["debugfs", "-f", cmdfile, img], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, check=True)
    finally:
        os.unlink(cmdfile)
    out, pos, res = r.stdout, 0, {}
    for ino in inos:
        echo = b"debugfs: cat <%d>\n" % ino
        if out[pos:pos + len(echo)] != echo:
            raise SystemExit("unexpected debugfs cat output for inode %d: %r" % (ino, out[pos:pos + 80]))
        pos += len(echo)
        n = info[ino]["size"]
        res[ino] = out[pos:pos + n]
        if len(res[ino]) != n:
            raise SystemExit("short debugfs cat output for inode %d" % ino)
        pos += n
    return res


def parse_stat(out):
    text = out.decode("utf-8", "surrogateescape")
    st = {"xattr_names": [], "fast_target": None, "rdev": None}
    m = re.search(r"Mode:\s+(\d+)", text)
    st["mode"] = int(m.group(1), 8) & 0o7777
    m = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", text)
    st["uid"], st["gid"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"Size: (\d+)", text)
    st["size"] = int(m.group(1))
    m = re.search(r"Type: (\S+)", text)
    st["type"] = {"regular": "f", "directory": "d", "symlink": "l", "character": "c", "block": "b",
                  "FIFO": "p", "socket": "s"}[m.group(1)]
    m = re.search(r"\bmtime: 0x([0-9a-f]+)(?::([0-9a-f]+))?", text)
    lo = int(m.group(1), 16)
    extra = int(m.group(2), 16) if m.group(2) else 0
    sec = (lo - (1 << 32) if lo >= 1 << 31 else lo) + ((extra & 3) << 32)
    st["mtime"] = "%d.%09d" % (sec, extra >> 2)
    m = re.search(r"Device major/minor number: (\d+):(\d+)", text)
    if m:
        st["rdev"] = [int(m.group(1)), int(m.group(2))]
    if "Extended attributes:" in text:
        block = text.split("Extended attributes:", 1)[1]
        for line in block.split("\n")[1:]:
            mm = re.match(r"^  (\S+) \((\d+)\)", line)
            if not mm:
                break
            st["xattr_names"].append(mm.group(1))
    raw = out
    i = raw.find(b'Fast link dest: "')
    if i >= 0:
        start = i + len(b'Fast link dest: "')
        st["fast_target"] = raw[start:start + st["size"]]
    return st


# ---------------------------------------------------------------------------


def compare(a, b, ignore=(), ignore_paths=(), ignore_xattrs=(), ignore_dir_mtime=False):
    for m in (a, b):
        for e in m.values():
            if ignore_dir_mtime and e["type"] == "d":
                e.pop("mtime", None)
            for x in ignore_xattrs:
                e.get("xattrs", {}).pop(x, None)
    diffs = []
    for p in sorted(set(a) | set(b)):
        if any(p == ip or p.startswith(ip + "/") for ip in ignore_paths):
            continue
        if p not in a:
            diffs.append("only in second: %s" % p)
            continue
        if p not in b:
            diffs.append("only in first: %s" % p)
            continue
        for k in sorted(set(a[p]) | set(b[p])):
            if k in ignore:
                continue
            if a[p].get(k) != b[p].get(k):
                diffs.append("%s: %s differs: %r != %r" % (p, k, a[p].get(k), b[p].get(k)))
    return diffs


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd = sys.argv[1]
    if cmd == "reference":
        t = Tree()
        for layer in sys.argv[2:]:
            try:
                t.apply(layer)
            except RefError as e:
                sys.exit("reference unpack of %s refused it: %s" % (layer, e))
        json.dump(t.manifest(), sys.stdout, indent=1, sort_keys=True)
    elif cmd == "image":
        json.dump(image_manifest(sys.argv[2]), sys.stdout, indent=1, sort_keys=True)
    elif cmd == "dir":
        json.dump(dir_manifest(sys.argv[2]), sys.stdout, indent=1, sort_keys=True)
    elif cmd == "compare":
        args = sys.argv[2:]
        files, ignore, ignore_paths, ignore_xattrs, idm = [], [], [], [], False
        while args:
            x = args.pop(0)
            if x == "--ignore":
                ignore.append(args.pop(0))
            elif x == "--ignore-path":
                ignore_paths.append(args.pop(0))
            elif x == "--ignore-xattr":
                ignore_xattrs.append(args.pop(0))
            elif x == "--ignore-dir-mtime":
                idm = True
            else:
                files.append(x)
        with open(files[0]) as f:
            a = json.load(f)
        with open(files[1]) as f:
            b = json.load(f)
        diffs = compare(a, b, ignore, ignore_paths, ignore_xattrs, idm)
        for d in diffs[:200]:
            print(d)
        if len(diffs) > 200:
            print("... %d more differences" % (len(diffs) - 200))
        print("%d paths compared, %d differences" % (len(set(a) | set(b)), len(diffs)), file=sys.stderr)
        sys.exit(1 if diffs else 0)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
