#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and Mosquitto answer on their standard local ports: start them if
# installed, install them with apt-get (Debian) if not. Idempotent; used by `make test`.
set -uo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && exec 3>&- 3<&-; }
wait_port() { for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 0.5; done; return 1; }
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
apt_updated=""
apt_install() {
  [ -n "$apt_updated" ] || { $SUDO apt-get update -qq && apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# --- PostgreSQL --------------------------------------------------------------------------------
if ! port_open 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "installing PostgreSQL"; apt_install postgresql
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  # Tests connect as postgres over loopback without a password, as on the CI machine.
  if ! grep -q "vpp-test-trust" "$hba"; then
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust # vpp-test-trust\nhost all all ::1/128 trust # vpp-test-trust' "$hba"
  fi
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null \
    || $SUDO pg_ctlcluster "$ver" main start
  wait_port 5432 || { echo "PostgreSQL did not start" >&2; exit 1; }
fi
psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" \
  | grep -q 1 || psql -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE test" >/dev/null

# --- Redis ---------------------------------------------------------------------------------------
if ! port_open 6379; then
  command -v redis-server >/dev/null || { echo "installing Redis"; apt_install redis-server; }
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 || { echo "Redis did not start" >&2; exit 1; }
fi

# --- Mosquitto -----------------------------------------------------------------------------------
if ! port_open 1883; then
  command -v mosquitto >/dev/null || { echo "installing Mosquitto"; apt_install mosquitto mosquitto-clients; }
  conf=/tmp/vpp-mosquitto-dev.conf
  printf 'listener 1883 127.0.0.1\nallow_anonymous true\nmax_queued_messages 200000\n' > "$conf"
  mosquitto -d -c "$conf"
  wait_port 1883 || { echo "Mosquitto did not start" >&2; exit 1; }
fi
# The broker-security tests start their own Mosquitto with the dynamic-security plugin.
[ -e /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so ] || ls /usr/lib/*/mosquitto_dynamic_security.so >/dev/null 2>&1 \
  || apt_install mosquitto

# --- Chromium (the dashboard's browser tests drive Debian's headless chromium) -----------------
if [ ! -x /usr/bin/chromium ]; then
  echo "installing Chromium"
  $SUDO apt-get update -qq && apt_updated=1
  apt_install chromium || echo "warning: chromium not installed; browser tests will skip" >&2
fi

echo "services: PostgreSQL :5432, Redis :6379, Mosquitto :1883 reachable"
