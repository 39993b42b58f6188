#!/usr/bin/env bash
# Installs blockvault and what it needs on Debian 12 (as root), idempotently.
#   tools/install.sh          runtime: Python packages and the C extension
#   tools/install.sh --test   also the test tools: pytest, qemu-utils, the Go
#                             toolchain and govmomi (vcsim), restic, borg, zstd,
#                             and sfdisk, sgdisk, mkfs.ext4, mkfs.vfat + mtools,
#                             mkntfs + ntfscp, mkfs.exfat, cryptsetup for the file-level tests,
#                             and Ceph (mon, osd, radosgw) for the S3 tests
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_packages=(gcc python3-dev zlib1g-dev)
if [ "$want_test" = 1 ]; then
  apt_packages+=(qemu-utils strace golang-go golang-github-vmware-govmomi-dev restic borgbackup zstd clang)
  # file-level restore tests: partition tables and filesystems made by the real tools
  apt_packages+=(fdisk gdisk e2fsprogs dosfstools mtools ntfs-3g exfatprogs util-linux cryptsetup-bin)
  # serve and mount (issue 11): nbdkit with its Python plugin, nbdinfo/nbdcopy/nbdfuse, fusermount3,
  # and libnbd's Python binding for the tests
  apt_packages+=(nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd fuse3)
  # S3 stores (issue 12): a real single-node Ceph with radosgw, started by tools/ceph-s3.sh
  apt_packages+=(ceph-mon ceph-osd radosgw ceph-common curl openssl)
fi

missing=()
for pkg in "${apt_packages[@]}"; do
  # python3-dev is satisfied by the interpreter's own headers (pyenv builds ship them).
  if [ "$pkg" = python3-dev ] && python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    continue
  fi
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install: apt packages: ${missing[*]}" >&2
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi

extras=""
[ "$want_test" = 1 ] && extras="[test]"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".${extras}"
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
# An editable install leaves the modules as sources, and where
# PYTHONDONTWRITEBYTECODE is set every blockvault command would compile them
# all again (about 15 ms of each command's start-up); write the bytecode once,
# as pip does for an ordinary install.
python3 -m compileall -q -j 0 chunkstore engine native >/dev/null

if [ "$want_test" = 1 ] && [ -f tools/vcsim/build.sh ]; then
  bash tools/vcsim/build.sh >/dev/null
fi
echo "install: blockvault $(python3 -c 'import importlib.metadata as m; print(m.version("blockvault"))') ready" >&2
