#!/usr/bin/env bash
# A throwaway single-node Ceph cluster with an S3 endpoint (radosgw), for the tests and benches.
#
#   tools/ceph-s3.sh up DIR [PORT_BASE]   start mon + one memstore OSD + radosgw, create the S3 user
#   tools/ceph-s3.sh down DIR             stop the daemons by their pid files, remove DIR
#   tools/ceph-s3.sh env DIR              print the BLOCKVAULT_S3_* lines of a running cluster
#
# Every socket is on 127.0.0.1 and every port comes from PORT_BASE (default 17400):
#   mon msgr2 = BASE, mon v1 = BASE+1, S3 = BASE+2 (http), BASE+3 (https, a fresh self-signed
#   certificate for 127.0.0.1 in DIR/tls/cert.pem: the CA file to trust), OSD ports BASE+10..BASE+49.
# So clusters with PORT_BASEs 50 apart run side by side.  Keep DIR short (under /tmp): the
# daemons' admin sockets live in DIR/run and a unix socket path is limited to 107 bytes.
# memstore keeps everything in RAM (about twice the data stored) and nothing survives a stop:
# a cluster is always made fresh.  Needs the Debian packages ceph-mon ceph-osd radosgw
# ceph-common curl openssl (tools/install.sh --test).
# Env: S3_ACCESS_KEY, S3_SECRET_KEY (the user's keys), STORE_GB (memstore size, default 4).
set -euo pipefail

usage() { echo "usage: $0 up DIR [PORT_BASE] | down DIR | env DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
verb=$1 D=$2

stop_cluster() {   # DIR [keep]: stop the daemons, then remove DIR unless "keep"
  local d=$1 keep=${2:-} f pid pids=()
  [ -d "$d" ] || { echo "ceph-s3: nothing at $d"; return 0; }
  for f in "$d"/run/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    [ -n "$pid" ] || continue
    # only a live Ceph daemon (a pid file can outlive its process and the pid be reused)
    if grep -qxE 'ceph-mon|ceph-osd|radosgw' "/proc/$pid/comm" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  done
  if [ "$keep" = keep ]; then echo "ceph-s3: stopped ${#pids[@]} daemon(s), kept $d"; return 0; fi
  case "$d" in /|"") ;; *) rm -rf "$d" ;; esac
  echo "ceph-s3: stopped ${#pids[@]} daemon(s), removed $d"
}

if [ "$verb" = down ]; then stop_cluster "$D"; exit 0; fi
if [ "$verb" = env ]; then cat "$D/s3.env"; exit 0; fi
[ "$verb" = up ] || usage

BASE=${3:-17400}
MON2=$BASE MON1=$((BASE + 1)) RGW=$((BASE + 2)) RGW_TLS=$((BASE + 3))
AK=${S3_ACCESS_KEY:-blockvaulttestkey}
SK=${S3_SECRET_KEY:-blockvaulttestsecret0123456789}
BYTES=$(( ${STORE_GB:-4} * 1024 * 1024 * 1024 ))
for tool in ceph-mon ceph-osd radosgw ceph-authtool monmaptool radosgw-admin ceph curl openssl; do
  command -v "$tool" >/dev/null || { echo "ceph-s3: $tool is not installed; run tools/install.sh --test" >&2; exit 1; }
done
if [ ${#D} -gt 60 ]; then echo "ceph-s3: $D is too long (admin sockets need a short path, e.g. /tmp/bvceph1)" >&2; exit 2; fi
if ls "$D"/run/*.pid >/dev/null 2>&1; then echo "ceph-s3: a cluster may still run in $D; run '$0 down $D' first" >&2; exit 1; fi
start=$(date +%s.%N)
trap 'echo "ceph-s3: start failed (line $LINENO); daemons stopped, logs kept in $D/log (remove with: $0 down $D)" >&2; stop_cluster "$D" keep >/dev/null 2>&1 || true; exit 1' ERR
rm -rf "$D"
mkdir -p "$D"/{mon,osd,run,log,crash,rgw,tls}
openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=127.0.0.1" \
  -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
  -keyout "$D/tls/key.pem" -out "$D/tls/cert.pem" >>"$D/log/setup.log" 2>&1
FSID=$(cat /proc/sys/kernel/random/uuid)
export CEPH_CONF="$D/ceph.conf"

cat > "$CEPH_CONF" <<CONF
[global]
fsid = $FSID
mon initial members = a
mon host = [v2:127.0.0.1:$MON2,v1:127.0.0.1:$MON1]
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
ms bind port min = $((BASE + 10))
ms bind port max = $((BASE + 49))
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $D/keyring
run dir = $D/run
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
log file = $D/log/\$name.log
crash dir = $D/crash
mon data = $D/mon/\$id
osd data = $D/osd/\$id
rgw data = $D/rgw
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
# the disk is shared: warn below 2 % free, stop the mon below 1 % (defaults 30 / 5)
mon data avail warn = 2
mon data avail crit = 1
# radosgw's first start creates its pools one map change after another: 0.1 s per change, not 1 s
paxos propose interval = 0.1

[mon]
mon cluster log file = $D/log/cluster.log

[osd]
osd objectstore = memstore
memstore device bytes = $BYTES

[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$RGW ssl_endpoint=127.0.0.1:$RGW_TLS ssl_certificate=$D/tls/cert.pem ssl_private_key=$D/tls/key.pem
# deleted objects are reclaimed after 60 s, not 2 h
rgw gc obj min wait = 60
rgw gc processor period = 60
CONF

K="$D/keyring"
ceph-authtool --create-keyring "$K" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
ceph-authtool "$K" --gen-key -n client.rgw.a --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw' >/dev/null

monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON2,v1:127.0.0.1:$MON1]" "$D/monmap" >/dev/null
mkdir -p "$D/mon/a" "$D/osd/0"
ceph-mon --mkfs -i a --monmap "$D/monmap" --keyring "$K" >>"$D/log/setup.log" 2>&1
ceph-mon -i a >>"$D/log/setup.log" 2>&1
timeout 60 ceph -s >/dev/null        # returns once the mon has quorum

OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
timeout 60 ceph osd new "$OSD_UUID" >/dev/null
ceph-osd -i 0 --mkfs --osd-uuid "$OSD_UUID" >>"$D/log/setup.log" 2>&1
ceph-osd -i 0 >>"$D/log/setup.log" 2>&1
up=0
for _ in $(seq 1 120); do
  if timeout 20 ceph osd dump 2>/dev/null | grep -q '^osd.0 up'; then up=1; break; fi
  sleep 0.5
done
[ $up = 1 ] || { echo "ceph-s3: osd.0 did not come up; see $D/log/osd.0.log" >&2; false; }

radosgw -n client.rgw.a >>"$D/log/setup.log" 2>&1
up=0
for _ in $(seq 1 240); do
  if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$RGW/"; then up=1; break; fi
  sleep 0.25
done
[ $up = 1 ] || { echo "ceph-s3: radosgw did not answer on 127.0.0.1:$RGW; see $D/log/client.rgw.a.log" >&2; false; }
timeout 60 radosgw-admin -n client.admin user create --uid=blockvault --display-name="blockvault tests" \
  --access-key="$AK" --secret-key="$SK" >/dev/null
cat > "$D/s3.env" <<ENV
BLOCKVAULT_S3_ENDPOINT=http://127.0.0.1:$RGW
BLOCKVAULT_S3_ACCESS_KEY_ID=$AK
BLOCKVAULT_S3_SECRET_ACCESS_KEY=$SK
BLOCKVAULT_S3_REGION=us-east-1
ENV
echo "https://127.0.0.1:$RGW_TLS" > "$D/tls/endpoint"
chmod 600 "$D/s3.env"
trap - ERR
awk -v a="$(date +%s.%N)" -v b="$start" -v e="http://127.0.0.1:$RGW" \
  'BEGIN{printf "ceph-s3: S3 endpoint %s ready in %.1f s (keys in %s)\n", e, a-b, "'"$D"'/s3.env"}'
