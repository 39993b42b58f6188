#!/usr/bin/env bash
# Build blockvault's vCenter simulator (tools/vcsim) into .cache/bin/vcsim.
#
# Offline: Go and govmomi 0.24.2 come from Debian (golang-go,
# golang-github-vmware-govmomi-dev; the package is the library only, without
# the upstream vcsim program) and the build runs in GOPATH mode against
# /usr/share/gocode with the module proxy off. Installs the packages when they
# are missing (needs root and Debian's package archive). Idempotent: a second
# run only rebuilds what changed (GOCACHE is .cache/go-build). Prints the
# binary's absolute path on stdout; everything else goes to stderr.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

have_packages() {
  command -v go >/dev/null 2>&1 &&
    dpkg-query -W -f='${Status}' golang-github-vmware-govmomi-dev 2>/dev/null | grep -q 'install ok installed'
}

if ! have_packages; then
  echo "build.sh: installing golang-go and golang-github-vmware-govmomi-dev" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null >&2
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 \
    golang-go golang-github-vmware-govmomi-dev </dev/null >&2
  hash -r
fi

mkdir -p .cache/bin .cache/go-build
# -p 2: the machines have two cores shared with other work.
env CGO_ENABLED=0 GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS= \
  GOCACHE="$root/.cache/go-build" \
  go build -p 2 -trimpath -o .cache/bin/vcsim ./tools/vcsim </dev/null >&2

echo "$root/.cache/bin/vcsim"
