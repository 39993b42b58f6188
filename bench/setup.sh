#!/bin/sh
# Installs what `python -m bench` needs besides blockvault itself: the peers
# (restic, borgbackup), the no-dedup baseline (tar, zstd) and matplotlib for
# the plots.  Idempotent: installs only what is missing, so it is cheap to
# call from CI on every run.
#
#   sh bench/setup.sh            # uses python3 (or $PYTHON) for matplotlib
set -eu

PYTHON="${PYTHON:-python3}"
APT="apt-get -o DPkg::Lock::Timeout=600"

missing=""
for pkg in restic borgbackup zstd tar; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done

if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        SUDO=sudo
    else
        SUDO=
    fi
    echo "bench/setup.sh: installing Debian packages:$missing"
    $SUDO $APT update
    DEBIAN_FRONTEND=noninteractive $SUDO $APT install -y --no-install-recommends $missing
fi

# The bench runs under whatever Python runs the project (often not Debian's
# python3, so python3-matplotlib would not be importable): use pip for it.
for mod in numpy zstandard xxhash matplotlib; do
    if ! "$PYTHON" -c "import $mod" 2>/dev/null; then
        echo "bench/setup.sh: pip installing $mod"
        "$PYTHON" -m pip install --quiet "$mod"
    fi
done

echo "bench/setup.sh: ready ($(restic version | cut -d' ' -f1-2), $(borg --version), $(zstd --version | sed -n 's/.*\(v[0-9.]*\).*/zstd \1/p'))"
