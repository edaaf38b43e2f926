#!/usr/bin/env bash
# Install the real servers the integration tests start: Ceph (monitor, OSD, radosgw) as the S3
# store and PostgreSQL. Idempotent: does nothing when every binary is already there.
# Called by `make test` before pytest; CI runs it as root on a fresh Debian machine.
set -euo pipefail

need_pkgs=()
for bin in ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool; do
  if ! command -v "$bin" >/dev/null 2>&1; then
    need_pkgs+=(ceph-mon ceph-osd radosgw)
    break
  fi
done

# Debian keeps PostgreSQL's server binaries off PATH, under /usr/lib/postgresql/<major>/bin.
pg_bindir() {
  local d
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return 0
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}
if ! pg_bindir >/dev/null; then
  need_pkgs+=(postgresql)
fi

if ((${#need_pkgs[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-test-servers: missing ${need_pkgs[*]}; run this script as root (it uses apt-get)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  aptlog=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"; } >"$aptlog" 2>&1; then
    tail -n 20 "$aptlog" >&2
    echo "install-test-servers: apt-get install ${need_pkgs[*]} failed (log above)" >&2
    rm -f "$aptlog"
    exit 1
  fi
  rm -f "$aptlog"
fi

# Tests call `initdb` / `pg_ctl` by name, so make them reachable on PATH.
pgdir=$(pg_bindir) || { echo "install-test-servers: PostgreSQL binaries still missing" >&2; exit 1; }
if ! command -v initdb >/dev/null 2>&1 || ! command -v pg_ctl >/dev/null 2>&1; then
  for b in initdb pg_ctl postgres psql; do
    [[ -x "$pgdir/$b" ]] && ln -sf "$pgdir/$b" "/usr/local/bin/$b"
  done
  pgdir=/usr/local/bin
fi

for bin in ceph-mon ceph-osd radosgw radosgw-admin initdb pg_ctl; do
  command -v "$bin" >/dev/null 2>&1 || { echo "install-test-servers: $bin not found after install" >&2; exit 1; }
done
if ((${#need_pkgs[@]})); then action="installed ${need_pkgs[*]}"; else action="already present"; fi
echo "install-test-servers: $action; ceph $(ceph-mon --version 2>/dev/null | awk '{print $3}'), postgres $(pg_ctl --version | awk '{print $3}')"
