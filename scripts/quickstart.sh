#!/usr/bin/env bash
# Install the overlaybd tools and run the main job on the embedded default:
# convert a sample OCI image (built offline by tests/images/build.py) held in a
# local OCI layout into an overlaybd image in the same layout — no registry.
#   PREFIX (default ~/.local) is where the binaries go; SAMPLE (default
#   /tmp/overlaybd-sample) is the OCI layout directory.
set -euo pipefail
case ${1:-} in
  -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
  "") ;;
  *) echo "usage: scripts/quickstart.sh   (no arguments; PREFIX and SAMPLE in the environment; --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-$HOME/.local}
SAMPLE=${SAMPLE:-/tmp/overlaybd-sample}
scripts/deps.sh build
command -v python3 >/dev/null || { echo "python3 is needed for the sample image" >&2; exit 1; }
# One target directory for the three installs (cargo install otherwise builds
# each in a fresh temporary one, the shared dependencies three times over);
# the repository's own, so that binaries already built are reused.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo install --quiet --locked --path tools --root "$PREFIX"
cargo install --quiet --locked --path tools/convertor --root "$PREFIX"
cargo install --quiet --locked --path crates/fuse --root "$PREFIX"
ON_PATH=0
case ":$PATH:" in *":$PREFIX/bin:"* | *":$PREFIX/bin/:"*) ON_PATH=1 ;; esac
export PATH="$PREFIX/bin:$PATH"
rm -rf "$SAMPLE"
python3 tests/images/build.py sample "$SAMPLE"
convertor -r "oci:$SAMPLE" -i latest -o latest_obd
echo
echo "converted image 'latest_obd' in $SAMPLE:"
python3 - "$SAMPLE" <<'PY'
import json, sys, os
d = sys.argv[1]
idx = json.load(open(os.path.join(d, "index.json")))
for m in idx["manifests"]:
    if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "latest_obd":
        man = json.load(open(os.path.join(d, "blobs", *m["digest"].split(":"))))
        for l in man["layers"]:
            print(f'  {l["digest"]}  {l["size"]:>9} bytes  {l["mediaType"]}')
PY
echo "inspect a layer stack with: overlaybd-nbd serve <layer blobs...> (see README)"
echo "or mount it: mkdir -p /tmp/obd && overlaybd-fuse mount --fs oci:$SAMPLE:latest_obd /tmp/obd"
if [ "$ON_PATH" = 0 ]; then
    echo "note: $PREFIX/bin is not on your PATH; to run the tools by name:"
    echo "  export PATH=\"$PREFIX/bin:\$PATH\""
fi
