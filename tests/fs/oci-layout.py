#!/usr/bin/env python3
"""Wrap layer tars into an OCI image layout (uncompressed layers), so that
`umoci unpack --image DIR:TAG BUNDLE` can serve as a reference unpacker.

Usage: oci-layout.py OUTDIR TAG LAYER.tar [LAYER.tar ...]
"""

import hashlib
import json
import os
import shutil
import sys


def blob(outdir, data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(outdir, "blobs", "sha256", d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    outdir, tag, layers = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(os.path.join(outdir, "blobs", "sha256"), exist_ok=True)
    descs, diff_ids = [], []
    for layer in layers:
        h = hashlib.sha256()
        with open(layer, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        shutil.copyfile(layer, os.path.join(outdir, "blobs", "sha256", h.hexdigest()))
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest,
                      "size": os.path.getsize(layer)})
        diff_ids.append(digest)
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": []}
    cd, cs = blob(outdir, json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                "layers": descs}
    md, ms = blob(outdir, json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    with open(os.path.join(outdir, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(outdir, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


if __name__ == "__main__":
    main()
