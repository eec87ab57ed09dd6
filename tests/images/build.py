#!/usr/bin/env python3
"""Build OCI image layouts for convertor tests, demos and benchmarks, and compute the
reference filesystem tree of an image (its layers merged with OCI whiteout rules).

Everything is deterministic: fixed timestamps, sorted content, gzip with mtime 0,
seeded pseudo-random data. Only the Python standard library and the `zstd` CLI are used.

  build.py testset OUT       OUT/layers (tag v1: 4 layers, gzip/zstd/tar/empty-gzip,
                             whiteouts, opaque dirs, hardlinks, xattrs, devices, ...),
                             OUT/turbo (tag v1: the same layers as a Docker image,
                             gzip instead of zstd),
                             OUT/multi (tags multi = OCI index amd64+arm64+attestation
                             +SBOM artifact,
                             multi-docker = Docker manifest list, nested = index of
                             an index)
  build.py sample OUT        a small two-layer image tagged `latest` (README demo)
  build.py bench OUT [--size-mb N] [--from DIR]
                             a multi-layer gzip image of about N MB uncompressed,
                             tagged `bench` (files from DIR, else synthetic data)
  build.py tree LAYOUT REF [--platform os/arch]
                             print the merged tree of image REF (tag) as JSON
  build.py scan DIR          print the tree of a directory (e.g. a mounted ext4) as JSON
"""
import gzip
import hashlib
import io
import json
import os
import random
import stat
import subprocess
import sys
import tarfile

MTIME = 1700000000
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TYPES = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
}
# security.capability v2 with CAP_NET_RAW permitted+effective (all bytes < 0x80).
CAP_NET_RAW = bytes([1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def jdump(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Layout:
    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        self.index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": []}

    def blob(self, data, media_type):
        d = sha(data)
        p = os.path.join(self.root, "blobs", "sha256", d[7:])
        if not os.path.exists(p):
            with open(p, "wb") as f:
                f.write(data)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    def tag(self, desc, tag):
        d = dict(desc)
        d["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.index["manifests"] = [
            m for m in self.index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
        ] + [d]
        with open(os.path.join(self.root, "index.json"), "wb") as f:
            f.write(jdump(self.index))


# ---------------------------------------------------------------- tar building

class TarBuilder:
    """Collects entries, writes a PAX tar with fixed metadata."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name, typ, mode, uid=0, gid=0, xattrs=None, mtime=MTIME):
        ti = tarfile.TarInfo(name)
        ti.type = typ
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = mtime
        if xattrs:
            ti.pax_headers = {
                "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
                for k, v in xattrs.items()
            }
        return ti

    def dir(self, name, mode=0o755, **kw):
        self.tf.addfile(self._info(name.rstrip("/") + "/", tarfile.DIRTYPE, mode, **kw))

    def file(self, name, data, mode=0o644, **kw):
        ti = self._info(name, tarfile.REGTYPE, mode, **kw)
        ti.size = len(data)
        self.tf.addfile(ti, io.BytesIO(data))

    def symlink(self, name, target, **kw):
        ti = self._info(name, tarfile.SYMTYPE, 0o777, **kw)
        ti.linkname = target
        self.tf.addfile(ti)

    def hardlink(self, name, target, mode=0o644, **kw):
        ti = self._info(name, tarfile.LNKTYPE, mode, **kw)
        ti.linkname = target
        self.tf.addfile(ti)

    def fifo(self, name, mode=0o644, **kw):
        self.tf.addfile(self._info(name, tarfile.FIFOTYPE, mode, **kw))

    def dev(self, name, kind, major, minor, mode=0o666, **kw):
        ti = self._info(name, tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE, mode, **kw)
        ti.devmajor, ti.devminor = major, minor
        self.tf.addfile(ti)

    def whiteout(self, path):
        d, b = os.path.split(path)
        self.file(os.path.join(d, ".wh." + b), b"", mode=0o644)

    def opaque(self, d):
        self.file(os.path.join(d, ".wh..wh..opq"), b"", mode=0o644)

    def finish(self):
        self.tf.close()
        return self.buf.getvalue()


def compress(tar, kind):
    if kind == "gzip":
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6, filename="") as g:
            g.write(tar)
        return out.getvalue()
    if kind == "zstd":
        return subprocess.run(["zstd", "-q", "-3", "-c", "--no-progress"], input=tar,
                              check=True, capture_output=True).stdout
    return tar


def rnd(seed, n):
    return random.Random(seed).randbytes(n)


def text(seed, n):
    r = random.Random(seed)
    words = [b"overlaybd", b"layer", b"ext4", b"block", b"container", b"image", b"zfile",
             b"lsmt", b"registry", b"manifest", b"digest", b"\n", b"the", b"of", b"and"]
    out = bytearray()
    while len(out) < n:
        out += r.choice(words) + b" "
    return bytes(out[:n])


# ---------------------------------------------------------------- image assembly

def make_image(layout, layers, fmt="oci", arch="amd64", extra_config=None, history=None):
    """layers: list of (tar_bytes, compression). Returns the manifest descriptor."""
    descs, diff_ids = [], []
    for tar, kind in layers:
        blob = compress(tar, kind)
        descs.append(layout.blob(blob, LAYER_TYPES[(fmt, kind)]))
        diff_ids.append(sha(tar))
    cfg = {
        "created": "2023-11-14T22:13:20Z",
        "author": "overlaybd-rs tests",
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
            "Labels": {"org.example.test": "yes"},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history or [{"created": "2023-11-14T22:13:20Z", "created_by": "layer %d" % i}
                               for i in range(len(layers))],
    }
    if fmt == "docker":
        # Docker-only fields that upstream's Go struct round-trip drops.
        cfg["config"]["Healthcheck"] = {"Test": ["CMD", "true"], "Interval": 30000000000}
        cfg["config"]["OnBuild"] = ["RUN echo onbuild"]
        cfg["config"]["Shell"] = ["/bin/sh", "-c"]
        cfg["container_config"] = {"Cmd": ["/bin/sh", "-c", "#(nop) CMD [\"/bin/sh\"]"]}
        cfg["docker_version"] = "24.0.7"
        cfg["container"] = "0123456789ab"
    if extra_config:
        cfg.update(extra_config)
    cdesc = layout.blob(jdump(cfg), MT_DOCKER_CONFIG if fmt == "docker" else MT_OCI_CONFIG)
    m = {"schemaVersion": 2,
         "mediaType": MT_DOCKER_MANIFEST if fmt == "docker" else MT_OCI_MANIFEST,
         "config": cdesc, "layers": descs}
    if fmt == "oci":
        m["annotations"] = {"org.opencontainers.image.title": "overlaybd-rs test image"}
    return layout.blob(jdump(m), m["mediaType"])


def layers_image():
    # Layer 1: the base.
    t = TarBuilder()
    for d in ["bin", "etc", "usr", "usr/lib", "data", "data/sub", "opq", "opq/sub", "del",
              "keep", "home", "home/user"]:
        t.dir(d)
    t.dir("tmp", mode=0o1777)
    t.dir("data/xdir", xattrs={"user.dir": b"1"})
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    t.file("etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42)
    t.file("bin/tool", rnd(1, 300_000), mode=0o755)
    t.hardlink("bin/tool-link", "bin/tool", mode=0o755)
    t.hardlink("bin/tool-link2", "bin/tool", mode=0o755)
    t.file("bin/setuid", b"#!/bin/sh\necho hi\n", mode=0o4755)
    t.file("bin/ping", rnd(2, 5000), mode=0o755, xattrs={"security.capability": CAP_NET_RAW})
    t.file("usr/lib/libfoo.so.1", rnd(3, 70_000), mode=0o755)
    t.symlink("usr/lib/libfoo.so", "libfoo.so.1")
    t.symlink("bin/abs", "/etc/passwd")
    t.symlink("bin/dangling", "../nowhere/at/all")
    t.fifo("data/fifo")
    t.dev("data/null", "c", 1, 3)
    t.dev("data/blk", "b", 7, 0, mode=0o660)
    t.file("data/x-user", b"xattr holder\n", xattrs={"user.comment": b"hello", "user.empty": b""})
    t.file("data/empty", b"")
    big = bytearray(rnd(4, 3 << 20))
    big[1 << 20:(1 << 20) + 200_000] = bytes(200_000)  # a run of zeros
    t.file("data/big", bytes(big))
    t.file("data/text", text(5, 600_000))
    t.file("home/user/file", b"owned by 1000\n", uid=1000, gid=1000, mode=0o600)
    t.file("data/" + "long-name-" * 12 + "end", b"long name\n")
    t.file("data/ünïcode-файл", "unicode\n".encode())
    t.file("data/sub/a", b"a\n")
    t.file("opq/a", b"a\n")
    t.file("opq/b", b"b\n")
    t.file("opq/sub/c", b"c\n")
    t.file("del/x", b"x\n")
    t.file("del/y", b"y\n")
    t.file("keep/k", b"k\n")
    l1 = t.finish()

    # Layer 2: whiteouts, opaque dir, overwrites, hardlink into layer 1.
    t = TarBuilder()
    t.whiteout("del/x")
    t.opaque("opq")
    t.file("opq/new", b"new in layer 2\n")
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    t.hardlink("data/big-link", "data/big")
    t.dir("keep", mode=0o700, uid=5, gid=6)
    t.file("usr/lib/libfoo.so", b"now a regular file\n")
    t.dir("new")
    t.file("new/n1", text(6, 10_000))
    t.whiteout("data/empty")
    t.dir("data/empty")
    t.file("data/empty/child", b"child\n")
    l2 = t.finish()

    # Layer 3 (uncompressed): whole-dir whiteout, re-added path, same-layer whiteout,
    # xattr change.
    t = TarBuilder()
    t.whiteout("opq")
    t.file("del/x", b"x is back\n")
    t.file("new2/file", b"kept: the whiteout below only hides lower layers\n")
    t.whiteout("new2/file")
    t.file("data/x-user", b"xattr holder v2\n", xattrs={"user.comment": b"changed"})
    t.file("data/mode0", b"no permissions\n", mode=0)
    t.whiteout("bin/tool-link2")
    l3 = t.finish()

    # Layer 4: an empty layer (tar with no entries).
    l4 = TarBuilder().finish()
    return [(l1, "gzip"), (l2, "zstd"), (l3, "none"), (l4, "gzip")]


def small_image(seed, arch):
    t = TarBuilder()
    t.dir("etc")
    t.file("etc/arch", ("built for %s\n" % arch).encode())
    t.dir("bin")
    t.file("bin/app", rnd(seed, 50_000), mode=0o755)
    l1 = t.finish()
    t = TarBuilder()
    t.file("etc/version", b"2\n")
    l2 = t.finish()
    return [(l1, "gzip"), (l2, "gzip")]


def attestation(layout, subject):
    stmt = jdump({"_type": "https://in-toto.io/Statement/v0.1", "subject": []})
    ldesc = layout.blob(stmt, "application/vnd.in-toto+json")
    ldesc["annotations"] = {"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"}
    cfg = layout.blob(jdump({"architecture": "unknown", "os": "unknown", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [sha(stmt)]}}), MT_OCI_CONFIG)
    m = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "config": cfg, "layers": [ldesc]}
    d = layout.blob(jdump(m), MT_OCI_MANIFEST)
    d["annotations"] = {"vnd.docker.reference.type": "attestation-manifest",
                        "vnd.docker.reference.digest": subject["digest"]}
    d["platform"] = {"architecture": "unknown", "os": "unknown"}
    return d


def artifact(layout):
    """An SBOM-like OCI artifact (not an image) as found next to images in indexes."""
    body = layout.blob(jdump({"spdxVersion": "SPDX-2.3", "name": "test"}), "application/spdx+json")
    cfg = layout.blob(b"{}", "application/vnd.oci.empty.v1+json")
    m = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "artifactType": "application/spdx+json",
         "config": cfg, "layers": [body]}
    return layout.blob(jdump(m), MT_OCI_MANIFEST)


def cmd_testset(out):
    lay = Layout(os.path.join(out, "layers"))
    lay.tag(make_image(lay, layers_image()), "v1")

    # The same layers without zstd (TurboOCI reads layers by offset: gzip or tar only),
    # as a Docker image.
    turbo = Layout(os.path.join(out, "turbo"))
    tl = [(tar, "gzip" if kind == "zstd" else kind) for tar, kind in layers_image()]
    turbo.tag(make_image(turbo, tl, fmt="docker"), "v1")

    multi = Layout(os.path.join(out, "multi"))
    amd = make_image(multi, small_image(10, "amd64"), arch="amd64")
    arm = make_image(multi, small_image(11, "arm64"), arch="arm64",
                     extra_config={"variant": "v8"})
    amd_p = dict(amd, platform={"architecture": "amd64", "os": "linux"})
    arm_p = dict(arm, platform={"architecture": "arm64", "os": "linux", "variant": "v8"})
    idx = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
           "manifests": [amd_p, arm_p, attestation(multi, amd), artifact(multi)],
           "annotations": {"org.example.index": "multi"}}
    idesc = multi.blob(jdump(idx), MT_OCI_INDEX)
    multi.tag(idesc, "multi")

    damd = make_image(multi, small_image(12, "amd64"), fmt="docker", arch="amd64")
    darm = make_image(multi, small_image(13, "arm"), fmt="docker", arch="arm",
                      extra_config={"variant": "v7"})
    dl = {"schemaVersion": 2, "mediaType": MT_DOCKER_LIST, "manifests": [
        dict(damd, platform={"architecture": "amd64", "os": "linux"}),
        dict(darm, platform={"architecture": "arm", "os": "linux", "variant": "v7"})]}
    dldesc = multi.blob(jdump(dl), MT_DOCKER_LIST)
    multi.tag(dldesc, "multi-docker")

    nested = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
              "manifests": [dldesc, dict(amd, platform={"architecture": "amd64", "os": "linux"})]}
    multi.tag(multi.blob(jdump(nested), MT_OCI_INDEX), "nested")


def cmd_sample(out):
    lay = Layout(out)
    t = TarBuilder()
    for d in ["bin", "etc", "usr", "usr/share", "usr/share/doc"]:
        t.dir(d)
    t.file("etc/os-release", b'NAME="overlaybd-rs sample"\nID=sample\n')
    t.file("bin/hello", b"#!/bin/sh\necho hello from an overlaybd image\n", mode=0o755)
    t.file("usr/share/doc/README", text(20, 200_000))
    t.symlink("bin/sh-link", "hello")
    l1 = t.finish()
    t = TarBuilder()
    t.file("etc/motd", b"converted by overlaybd-rs\n")
    t.whiteout("usr/share/doc/README")
    l2 = t.finish()
    lay.tag(make_image(lay, [(l1, "gzip"), (l2, "gzip")]), "latest")


def cmd_bench(out, size_mb, src):
    lay = Layout(out)
    target = size_mb << 20
    layers, total, i = [], 0, 0
    per_layer = max(target // 4, 1 << 20)
    files = []
    if src:
        for root, dirs, names in os.walk(src):
            dirs.sort()
            for n in sorted(names):
                p = os.path.join(root, n)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_size < 64 << 20:
                    files.append(p)
    fi = 0
    while total < target:
        t = TarBuilder()
        size = 0
        t.dir("l%d" % i)
        j = 0
        while size < per_layer and total + size < target:
            name = "l%d/f%05d" % (i, j)
            if files:
                if fi >= len(files):
                    break
                try:
                    with open(files[fi], "rb") as f:
                        data = f.read()
                except OSError:
                    data = b""
                fi += 1
            else:
                n = random.Random(i * 100000 + j).randint(1000, 600_000)
                data = text(i * 100000 + j, n) if j % 3 else rnd(i * 100000 + j, n // 2) + bytes(n // 2)
            t.file(name, data, mode=0o755 if j % 7 == 0 else 0o644)
            size += len(data)
            j += 1
        layers.append((t.finish(), "gzip"))
        total += size
        i += 1
        if files and fi >= len(files):
            break
    lay.tag(make_image(lay, layers), "bench")
    print("%d layers, %.1f MB uncompressed" % (len(layers), total / 1e6))


# ---------------------------------------------------------------- reference trees

def read_blob(layout, desc):
    with open(os.path.join(layout, "blobs", "sha256", desc["digest"][7:]), "rb") as f:
        return f.read()


def decompress(data):
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return subprocess.run(["zstd", "-q", "-d", "-c"], input=data, check=True,
                              capture_output=True).stdout
    return data


def norm(p):
    parts = []
    for c in p.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if parts:
                parts.pop()
            continue
        parts.append(c)
    return "/".join(parts)


def merged_tree(layout, ref, platform=None):
    """Apply the image's layers with OCI semantics; return {path: node} where node is
    a dict of attributes; hard-linked paths share one node object."""
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref)
    doc = json.loads(read_blob(layout, desc))
    while "manifests" in doc:
        cands = [m for m in doc["manifests"]
                 if m.get("annotations", {}).get("vnd.docker.reference.type") != "attestation-manifest"]
        if platform:
            os_, arch = platform.split("/")[:2]
            cands = [m for m in cands if m.get("platform", {}).get("os") == os_
                     and m.get("platform", {}).get("architecture") == arch]
        doc = json.loads(read_blob(layout, cands[0]))
    tree = {"": {"type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "xattrs": {}}}

    def remove(path):
        for p in [p for p in tree if p == path or p.startswith(path + "/")]:
            del tree[p]

    def ensure_parents(path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in tree or tree[d]["type"] != "dir":
                if d in tree:
                    remove(d)
                tree[d] = {"type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "xattrs": {}}

    for ldesc in doc["layers"]:
        tar = decompress(read_blob(layout, ldesc))
        tf = tarfile.open(fileobj=io.BytesIO(tar), mode="r:")
        members = tf.getmembers()
        lower = set(tree)
        # Whiteouts only affect what lower layers put there.
        for m in members:
            p = norm(m.name)
            d, b = os.path.split(p)
            if b == ".wh..wh..opq":
                for q in [q for q in tree if q.startswith(d + "/" if d else "") and q != d
                          and q in lower and q != ""]:
                    tree.pop(q, None)
            elif b.startswith(".wh."):
                target = os.path.join(d, b[4:])
                if target in lower:
                    remove(target)
        for m in members:
            p = norm(m.name)
            b = os.path.basename(p)
            if b.startswith(".wh.") or p == "":
                continue
            ensure_parents(p)
            xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape").hex()
                      for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            if m.islnk():
                target = tree.get(norm(m.linkname))
                if p in tree:
                    remove(p)
                node = target
                node.update({"mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid})
                tree[p] = node
                continue
            if m.isdir():
                if p in tree and tree[p]["type"] == "dir":
                    tree[p].update({"mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid,
                                    "xattrs": xattrs})
                    continue
            if p in tree:
                remove(p)
            node = {"mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid, "xattrs": xattrs}
            if m.isreg():
                data = tf.extractfile(m).read()
                node.update({"type": "file", "size": len(data),
                             "sha256": hashlib.sha256(data).hexdigest(), "mtime": m.mtime})
            elif m.isdir():
                node["type"] = "dir"
            elif m.issym():
                node.update({"type": "symlink", "target": m.linkname})
            elif m.isfifo():
                node["type"] = "fifo"
            elif m.ischr() or m.isblk():
                node.update({"type": "char" if m.ischr() else "block",
                             "rdev": [m.devmajor, m.devminor]})
            tree[p] = node
    return tree


def render(tree):
    """Tree → JSON-able dict; hardlink groups as sorted path lists."""
    groups = {}
    for p, n in tree.items():
        groups.setdefault(id(n), []).append(p)
    out = {}
    for p, n in sorted(tree.items()):
        if p == "":
            continue
        e = {k: v for k, v in n.items()}
        if e["type"] == "symlink":
            e.pop("mode", None)  # symlink permissions are not meaningful
            e.pop("xattrs", None)
        if e["type"] != "dir":
            g = sorted(groups[id(n)])
            if len(g) > 1:
                e["links"] = g
        out[p] = e
    return out


def scan(root):
    tree = {}
    inodes = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel
        if rel == "lost+found":
            dirs[:] = []
            continue
        for n in sorted(dirs + files):
            if rel == "" and n == "lost+found":
                continue
            full = os.path.join(dirpath, n)
            p = os.path.join(rel, n) if rel else n
            st = os.lstat(full)
            key = (st.st_dev, st.st_ino)
            if key in inodes and not stat.S_ISDIR(st.st_mode):
                tree[p] = inodes[key]
                continue
            try:
                xs = {k: os.getxattr(full, k, follow_symlinks=False).hex()
                      for k in os.listxattr(full, follow_symlinks=False)}
            except OSError:
                xs = {}
            node = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                    "xattrs": xs}
            m = st.st_mode
            if stat.S_ISREG(m):
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                node.update({"type": "file", "size": st.st_size, "sha256": h.hexdigest(),
                             "mtime": int(st.st_mtime)})
            elif stat.S_ISDIR(m):
                node["type"] = "dir"
            elif stat.S_ISLNK(m):
                node.update({"type": "symlink", "target": os.readlink(full)})
            elif stat.S_ISFIFO(m):
                node["type"] = "fifo"
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                node.update({"type": "char" if stat.S_ISCHR(m) else "block",
                             "rdev": [os.major(st.st_rdev), os.minor(st.st_rdev)]})
            inodes[key] = node
            tree[p] = node
    return tree


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd = argv[1]
    if cmd == "testset":
        cmd_testset(argv[2])
    elif cmd == "sample":
        cmd_sample(argv[2])
    elif cmd == "bench":
        size, src = 400, None
        rest = argv[3:]
        while rest:
            if rest[0] == "--size-mb":
                size = int(rest[1])
                rest = rest[2:]
            elif rest[0] == "--from":
                src = rest[1]
                rest = rest[2:]
            else:
                raise SystemExit("unknown option " + rest[0])
        cmd_bench(argv[2], size, src)
    elif cmd == "tree":
        plat = argv[5] if len(argv) > 5 and argv[4] == "--platform" else None
        json.dump(render(merged_tree(argv[2], argv[3], plat)), sys.stdout, indent=1,
                  sort_keys=True, ensure_ascii=False)
    elif cmd == "scan":
        json.dump(render(scan(argv[2])), sys.stdout, indent=1, sort_keys=True,
                  ensure_ascii=False)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
