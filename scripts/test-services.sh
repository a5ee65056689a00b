#!/usr/bin/env bash
# Start (installing first if need be) what the test suite talks to: PostgreSQL,
# MariaDB and Redis on 127.0.0.1, each with a database called `test`.  Fails loudly
# if one cannot be had: the suite never skips a backend.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_UPDATED=""
apt_install() {
    if [ -z "$APT_UPDATED" ]; then $SUDO apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
}
wait_for() {  # wait_for NAME CMD...
    local name=$1; shift
    for _ in $(seq 1 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
    echo "test-services: $name did not come up ($*)" >&2; exit 1
}

# PostgreSQL
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    command -v pg_ctlcluster >/dev/null || apt_install postgresql postgresql-client
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for PostgreSQL pg_isready -h 127.0.0.1 -p 5432
fi
if ! psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
    # A fresh Debian cluster: trust local TCP connections for the test role.
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    if ! grep -q "lightmail-tests" "$hba"; then
        $SUDO sed -i '1i host all all 127.0.0.1/32 trust # lightmail-tests' "$hba"
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    fi
    $SUDO -u postgres psql -qc "select 1" >/dev/null 2>&1 || true
    su postgres -c "createdb test" 2>/dev/null || true
    psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null \
        || { echo "test-services: cannot reach PostgreSQL database 'test' as postgres" >&2; exit 1; }
fi

# MariaDB
if ! mysqladmin -uroot -h127.0.0.1 status >/dev/null 2>&1; then
    command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || apt_install mariadb-server
    $SUDO start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_for MariaDB mysqladmin -uroot -h127.0.0.1 status
fi
mysql -uroot -h127.0.0.1 -e 'CREATE DATABASE IF NOT EXISTS test CHARACTER SET utf8mb4' \
    || { echo "test-services: cannot create MariaDB database 'test' as root" >&2; exit 1; }

# Redis (used by later features; started so the suite sees the documented machine)
if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
    command -v redis-server >/dev/null || apt_install redis-server
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for Redis redis-cli -h 127.0.0.1 ping
fi
echo "test-services: PostgreSQL, MariaDB and Redis are up"
