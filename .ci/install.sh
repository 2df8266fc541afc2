#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for pgward's build and tests.
# Safe to run again: it installs only what is missing. Used by .ci/run and
# by the Vagrantfile's provisioner.
set -euo pipefail

need=()
have_pg() { ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null 2>&1; }
have_pg || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || need+=(postgresql-contrib)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v pgbouncer >/dev/null 2>&1 || need+=(pgbouncer)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)  # verifies deploy/systemd/pgward.service
# Real drivers other than pgx and psql (agent/drivers_test.go): psycopg 3 for
# Debian's python3, PgJDBC with a JDK to compile the probe (about 115 MB to
# download, 270 MB installed, under a minute).
/usr/bin/python3 -c 'import psycopg' >/dev/null 2>&1 || need+=(python3-psycopg)
command -v javac >/dev/null 2>&1 || need+=(default-jdk-headless)
test -f /usr/share/java/postgresql.jar || need+=(libpostgresql-jdbc-java)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian starts a cluster on install; the tests use private servers, so stop it.
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true; done
  fi
  systemctl stop prometheus pgbouncer 2>/dev/null || true
fi
command -v go >/dev/null 2>&1 || { echo "Go is not installed (https://go.dev/dl)" >&2; exit 1; }
go version
