#!/usr/bin/env bash
# Install the Debian packages the project needs, only those missing.
#   scripts/deps.sh build   what building and running the tools needs
#   scripts/deps.sh test    the above plus every tool the tests drive
set -euo pipefail
case ${1:-} in -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;; esac
BUILD=(gcc libext2fs-dev libzstd-dev zlib1g-dev libisal-dev pkg-config e2fsprogs fuse3)
TEST=(tar gzip zstd python3 curl libnbd-bin nbdkit qemu-utils docker-registry skopeo umoci
      apache2-utils openssl jq mariadb-server mariadb-client sqlite3 fuse2fs erofs-utils)
case "${1:-build}" in
  build) want=("${BUILD[@]}") ;;
  test) want=("${BUILD[@]}" "${TEST[@]}") ;;
  *) echo "usage: $0 build|test" >&2; exit 2 ;;
esac
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
