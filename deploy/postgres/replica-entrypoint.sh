#!/usr/bin/env bash
# Entrypoint of the streaming replica: on an empty data directory, clone the primary with
# pg_basebackup (-R writes primary_conninfo and standby.signal, -X stream copies the WAL written
# meanwhile, -S uses the slot the primary's init script created, so the primary keeps every WAL
# segment the replica has not received yet). Then start the official entrypoint, which sees an
# initialised data directory and runs postgres as a hot standby.
set -euo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
: "${PRIMARY_HOST:=postgres-primary}"
: "${PRIMARY_PORT:=5432}"
: "${REPLICATION_USER:=replicator}"
: "${REPLICATION_SLOT:=qm_replica}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    until gosu postgres pg_isready -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -q; do
        echo "replica: waiting for the primary at $PRIMARY_HOST:$PRIMARY_PORT"
        sleep 1
    done
    echo "replica: pg_basebackup from $PRIMARY_HOST (slot $REPLICATION_SLOT)"
    # The password goes in the connection string, so -R writes it into primary_conninfo
    # (postgresql.auto.conf, mode 0600 in the replica's own volume) and restarts reconnect.
    gosu postgres pg_basebackup \
        -d "host=$PRIMARY_HOST port=$PRIMARY_PORT user=$REPLICATION_USER password=$REPLICATION_PASSWORD application_name=qm_replica" \
        -D "$PGDATA" -R -X stream -S "$REPLICATION_SLOT" --checkpoint=fast --progress
fi

exec docker-entrypoint.sh "$@"
