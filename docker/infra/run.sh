#!/bin/sh
# Entry point of the infra image: runs one service in the foreground.
#   quantpipe-infra postgres|redis|prometheus|alertmanager|pushgateway [extra args]
# Secrets come from the environment (POSTGRES_PASSWORD, REDISCLI_AUTH) and never reach a
# command line.
set -eu
service="${1:?usage: quantpipe-infra postgres|redis|prometheus|alertmanager|pushgateway}"
shift
case "$service" in
  postgres)
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
    user="${POSTGRES_USER:-airflow}"; db="${POSTGRES_DB:-airflow}"
    data=/var/lib/postgresql/data/pgdata
    bin=/usr/lib/postgresql/15/bin
    if [ ! -s "$data/PG_VERSION" ]; then
      install -d -o postgres -g postgres -m 0700 "$data"
      pwfile="$(mktemp)"; printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"; chown postgres "$pwfile"
      su postgres -s /bin/sh -c "$bin/initdb -D $data -U $user --pwfile=$pwfile --auth-local=trust --auth-host=scram-sha-256" >/dev/null
      rm -f "$pwfile"
      echo "host all all 0.0.0.0/0 scram-sha-256" >> "$data/pg_hba.conf"
      su postgres -s /bin/sh -c "$bin/pg_ctl -D $data -o '-c listen_addresses=' -w start" >/dev/null
      su postgres -s /bin/sh -c "$bin/createdb -U $user $db"
      su postgres -s /bin/sh -c "$bin/pg_ctl -D $data -m fast -w stop" >/dev/null
    fi
    exec setpriv --reuid=postgres --regid=postgres --init-groups \
      "$bin/postgres" -D "$data" -c listen_addresses='*' "$@"
    ;;
  redis)
    : "${REDISCLI_AUTH:?set REDISCLI_AUTH}"
    conf=/run/redis.conf
    (umask 077; printf 'requirepass %s\nsave ""\nappendonly no\nbind 0.0.0.0\nprotected-mode no\n' \
      "$REDISCLI_AUTH" > "$conf"); chown redis "$conf"
    exec setpriv --reuid=redis --regid=redis --init-groups redis-server "$conf" "$@"
    ;;
  prometheus)
    exec setpriv --reuid=prometheus --regid=prometheus --init-groups prometheus --config.file=/etc/prometheus/prometheus.yml --storage.tsdb.path=/prometheus \
      --web.enable-lifecycle "$@"
    ;;
  alertmanager)
    exec setpriv --reuid=prometheus --regid=prometheus --init-groups prometheus-alertmanager --config.file=/etc/alertmanager/alertmanager.yml \
      --storage.path=/alertmanager --cluster.listen-address= "$@"
    ;;
  pushgateway)
    exec setpriv --reuid=prometheus --regid=prometheus --init-groups prometheus-pushgateway "$@"
    ;;
  *)
    echo "unknown service: $service" >&2; exit 2 ;;
esac
