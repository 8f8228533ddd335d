#!/usr/bin/env bash
# Runs once, when the official postgres image initialises an empty primary data directory
# (/docker-entrypoint-initdb.d): a replication role, the replica's physical slot, and a
# pg_hba.conf line that lets the role stream WAL from the compose network.
set -euo pipefail

: "${REPLICATION_USER:=replicator}"
: "${REPLICATION_SLOT:=qm_replica}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v user="$REPLICATION_USER" -v password="$REPLICATION_PASSWORD" -v slot="$REPLICATION_SLOT" <<'SQL'
CREATE ROLE :"user" WITH REPLICATION LOGIN PASSWORD :'password';
SELECT pg_create_physical_replication_slot(:'slot');
SQL

echo "host replication ${REPLICATION_USER} all scram-sha-256" >> "$PGDATA/pg_hba.conf"
