#!/usr/bin/env bash
# Creates the dedup database of the overlaybd convertor on a MySQL / MariaDB server:
# the database, the two tables of scripts/mysql-schema.sql, and optionally an account with
# exactly the privileges the convertor needs (SELECT, INSERT, DELETE on the two tables).
# Idempotent, and safe on a database created by upstream's sample (tables are kept as they are).
#
# Usage: scripts/mysql-setup.sh [--db NAME] [--user NAME [--user-host HOST]] [-- CLIENT-ARGS...]
#   --db NAME         database name (default: conversioncache, as upstream)
#   --user NAME       also create account NAME@HOST (its password is read from the environment
#                     variable OBD_DEDUP_DB_PASSWORD, so it never shows in the process list)
#   --user-host HOST  host part of the account (default: %; use localhost or 127.0.0.1 to restrict)
#   CLIENT-ARGS       passed to the mariadb/mysql client as is, e.g. --socket=/run/mysqld/mysqld.sock,
#                     -h db.internal -P 3306 -u root -p   (default: the client's own defaults)
#
# Example:
#   OBD_DEDUP_DB_PASSWORD='s3cret' scripts/mysql-setup.sh --user obd -- -u root
#   convertor ... --db-type mysql --db-str 'obd:s3cret@tcp(127.0.0.1:3306)/conversioncache'
set -euo pipefail

db=conversioncache
user=
user_host=%
while [ $# -gt 0 ]; do
    case "$1" in
        --db) db=${2:?--db needs a name}; shift 2 ;;
        --user) user=${2:?--user needs a name}; shift 2 ;;
        --user-host) user_host=${2:?--user-host needs a host}; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        *) echo "mysql-setup.sh: unknown option $1 (client options go after --)" >&2; exit 2 ;;
    esac
done

if command -v mariadb >/dev/null 2>&1; then client=mariadb
elif command -v mysql >/dev/null 2>&1; then client=mysql
else
    echo "mysql-setup.sh: neither the mariadb nor the mysql client is installed (Debian: apt-get install mariadb-client)" >&2
    exit 1
fi

case "$db" in
    *[!A-Za-z0-9_]*|'') echo "mysql-setup.sh: database name '$db' must be letters, digits and _" >&2; exit 2 ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
schema="$here/mysql-schema.sql"
[ -r "$schema" ] || { echo "mysql-setup.sh: cannot read $schema" >&2; exit 1; }

# Quotes a string as an SQL literal: backslashes and single quotes doubled/escaped.
sql_quote() { local s=${1//\\/\\\\}; s=${s//\'/\'\'}; printf "'%s'" "$s"; }

{
    echo "CREATE DATABASE IF NOT EXISTS \`$db\` DEFAULT CHARACTER SET utf8;"
    echo "USE \`$db\`;"
    cat "$schema"
    if [ -n "$user" ]; then
        pw=${OBD_DEDUP_DB_PASSWORD:?--user needs the password in OBD_DEDUP_DB_PASSWORD}
        account="$(sql_quote "$user")@$(sql_quote "$user_host")"
        echo "CREATE USER IF NOT EXISTS $account IDENTIFIED BY $(sql_quote "$pw");"
        echo "ALTER USER $account IDENTIFIED BY $(sql_quote "$pw");"
        echo "GRANT SELECT, INSERT, DELETE ON \`$db\`.overlaybd_layers TO $account;"
        echo "GRANT SELECT, INSERT, DELETE ON \`$db\`.overlaybd_manifests TO $account;"
    fi
} | "$client" "$@" --batch

echo "mysql-setup.sh: database $db ready${user:+, account $user@$user_host can use it}"
if [ -n "$user" ]; then
    echo "  --db-type mysql --db-str '$user:<password>@tcp(<host>:3306)/$db'"
fi
