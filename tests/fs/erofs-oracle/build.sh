#!/usr/bin/env bash
# Build the erofs-utils oracle (driver.c) against erofs-utils at the commit
# upstream overlaybd builds (eec6f7a2), configured as overlaybd does.
#   usage: build.sh EROFS_UTILS_SOURCE_DIR OUT_BINARY
# Needs autoconf, automake, libtool, zlib headers. Then:
#   EROFS_ORACLE=OUT_BINARY cargo test --release -p overlaybd-fs --test erofs_oracle -- --ignored
set -euo pipefail
DRIVER=$(realpath "$(dirname "$0")/driver.c")
OUT=$(realpath -m "$2")
cd "$1"
if [ ! -f lib/.libs/liberofs.a ]; then
  ./autogen.sh >/dev/null
  ./configure --disable-lz4 --disable-lzma --without-libzstd --without-uuid \
    --disable-multithreading --without-selinux --disable-fuse >/dev/null
  make -C lib >/dev/null
fi
cc -O2 -include config.h -I include -o "$OUT" "$DRIVER" lib/.libs/liberofs.a -lz
