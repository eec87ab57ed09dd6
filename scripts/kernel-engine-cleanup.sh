#!/usr/bin/env bash
# Take down what a kernel-engine run (--engine kernel, convertor obdconv) killed with
# SIGKILL left behind: its FUSE mount (TMPDIR/overlaybd-kernel-*/disk), the loop device
# on it and the ext4 mounted from that (.../root). Such a run's process can stay
# stuck (a zombie with a thread in state D) writing through the loop device to the FUSE
# server that died with it; aborting the FUSE connection ends it.
#
# Runs of versions with the watchdog (obdkernel::watchdog) do this by themselves within
# a second; this is for older versions and for a kill that took the watchdog too (a
# whole cgroup killed).
#
# The FUSE mount of a dead server is never touched (a stat of it would hang too): its
# connection is found in /proc/self/mountinfo and aborted through fusectl first.
#
# usage: scripts/kernel-engine-cleanup.sh [DIR...]   (as root)
#   DIR  an overlaybd-kernel-* directory; without one, every such directory in
#        ${TMPDIR:-/tmp}, and only while no convertor, overlaybd-create or
#        overlaybd-apply is running (their directories are in use).
set -euo pipefail
case "${1:-}" in
  -h | --help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
esac
[ "$(id -u)" = 0 ] || { echo "kernel-engine-cleanup: run it as root" >&2; exit 1; }
dirs=("$@")
if [ ${#dirs[@]} = 0 ]; then
  live=$(ps -eo stat=,comm= | awk '$1 !~ /^Z/ && ($2 == "convertor" || $2 == "overlaybd-creat" || $2 == "overlaybd-apply")' | wc -l)
  if [ "$live" -gt 0 ]; then
    echo "kernel-engine-cleanup: a convertor/overlaybd-create/overlaybd-apply is running; name the directories to clean" >&2
    exit 1
  fi
  shopt -s nullglob
  dirs=("${TMPDIR:-/tmp}"/overlaybd-kernel-*)
fi
[ ${#dirs[@]} -gt 0 ] || { echo "kernel-engine-cleanup: nothing to clean"; exit 0; }
mountpoint -q /sys/fs/fuse/connections || mount -t fusectl none /sys/fs/fuse/connections
for d in "${dirs[@]}"; do
  d=$(realpath -s "$d")
  case "$(basename "$d")" in
    overlaybd-kernel-*) ;;
    *) echo "kernel-engine-cleanup: $d: not an overlaybd-kernel-* directory" >&2; exit 1 ;;
  esac
  # The FUSE connection of DIR/disk (mountinfo field 3 is MAJOR:MINOR; fusectl names
  # a connection by the minor of its anonymous device).
  conn=$(awk -v m="$d/disk" '$5 == m {split($3, n, ":"); print n[2]}' /proc/self/mountinfo)
  if [ -n "$conn" ] && [ -e "/sys/fs/fuse/connections/$conn/abort" ]; then
    echo 1 > "/sys/fs/fuse/connections/$conn/abort"
    echo "$d/disk: FUSE connection $conn aborted"
  fi
  if awk -v m="$d/root" '$5 == m {f = 1} END {exit !f}' /proc/self/mountinfo; then
    umount -l "$d/root" && echo "$d/root: unmounted"
  fi
  # Loop devices on DIR/disk/disk (losetup lists backing files from sysfs).
  losetup -nO NAME,BACK-FILE | awk -v f="$d/disk/disk" '$2 == f {print $1}' | while read -r dev; do
    losetup -d "$dev" && echo "$dev: detached"
  done
  if [ -n "$conn" ]; then
    umount -l "$d/disk" && echo "$d/disk: unmounted"
  fi
  rm -rf "$d"
  echo "$d: removed"
done
