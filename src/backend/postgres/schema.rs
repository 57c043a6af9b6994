//! The PostgreSQL backend's tables: their SQL, the versioned migrations that create them,
//! and the durability settings checked at connect. Owns every statement text the backend
//! sends (built once per schema, [`Sql`]); calls only `tokio_postgres`.
//!
//! Migrations run at connect in one transaction that first takes
//! `pg_advisory_xact_lock(MIGRATION_LOCK, hashtext(schema))`: processes starting together
//! wait for each other there, and each step is applied (and recorded in
//! `mars_state_migrations`) exactly once. A transaction-level lock, so it works behind a
//! transaction-mode pooler and is released by COMMIT or by the connection dying.

use tokio_postgres::Client;

use super::error::Failure;
use crate::error::StateError;

/// The first key of the advisory lock taken while migrating: "mars" in ASCII. The second
/// key is a hash of the schema name, so stores in different schemas do not wait for each
/// other.
const MIGRATION_LOCK: i32 = 0x6d61_7273;

/// The migrations, in order: `MIGRATIONS[i]` brings the schema to version `i + 1`. Append
/// only; a step once released is never edited.
const MIGRATIONS: &[&str] = &[
    // 1: `records` holds every key; `size` is the value's length plus, for a log, its
    // appended pieces (so a listing reads only the index: the primary key INCLUDEs it).
    // `COLLATE "C"` orders keys byte by byte, so a prefix is one index range. `log` holds
    // the pieces appended to a log key since its last put, in `seq` order.
    "CREATE TABLE {s}.mars_state_records (
        key text COLLATE \"C\" NOT NULL,
        value bytea NOT NULL,
        size bigint NOT NULL,
        kind text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT mars_state_records_pkey PRIMARY KEY (key) INCLUDE (size)
    );
    CREATE TABLE {s}.mars_state_log (
        key text COLLATE \"C\" NOT NULL,
        seq bigserial NOT NULL,
        bytes bytea NOT NULL,
        CONSTRAINT mars_state_log_pkey PRIMARY KEY (key, seq)
    );",
    // 2: what the store knows about each session and checkpoint record (`RecordMeta`), in
    // plain columns beside the bytes, for operators and queries; NULL for other keys and
    // for records written before this step (until they are written again). Two partial
    // indexes answer "a session's checkpoints, newest first" and "sessions by status" from
    // the index alone. Adding nullable columns without a default rewrites no rows.
    "ALTER TABLE {s}.mars_state_records
        ADD COLUMN session_id text COLLATE \"C\",
        ADD COLUMN checkpoint_id text COLLATE \"C\",
        ADD COLUMN branch text,
        ADD COLUMN parent text,
        ADD COLUMN step bigint,
        ADD COLUMN reason text,
        ADD COLUMN status text,
        ADD COLUMN saved_at timestamptz;
    CREATE INDEX mars_state_records_checkpoints ON {s}.mars_state_records
        (session_id, saved_at DESC) INCLUDE (checkpoint_id, branch, parent, step, reason, size)
        WHERE checkpoint_id IS NOT NULL;
    CREATE INDEX mars_state_records_sessions ON {s}.mars_state_records
        (status, saved_at DESC) INCLUDE (session_id, step, size)
        WHERE session_id IS NOT NULL AND checkpoint_id IS NULL;",
    // 3: leases and their fencing tokens. A row per lease name, never deleted, so a token
    // never goes back; `expires_at` is set from the server's clock (`clock_timestamp()`)
    // only. A fenced write locks its lease's row `FOR SHARE` in its own transaction, so a
    // grant to another node (an UPDATE of the row) waits for the writes in flight.
    "CREATE TABLE {s}.mars_state_leases (
        name text COLLATE \"C\" NOT NULL,
        node text NOT NULL,
        token bigint NOT NULL CHECK (token > 0),
        expires_at timestamptz NOT NULL,
        CONSTRAINT mars_state_leases_pkey PRIMARY KEY (name)
    );",
    // 4: how a lease's last holder let it go. `released` is set by a release and cleared
    // by every grant and renewal, so an expired row tells a clean handover from a holder
    // that died or hung. `taken_from` is the node the last grant took the lease over from
    // (it expired unreleased), NULL otherwise: written by the grant's own UPDATE from the
    // locked old row, because `RETURNING` sees only the new one. Rows from before this
    // step read as not released. A constant default and a nullable column rewrite no rows.
    "ALTER TABLE {s}.mars_state_leases
        ADD COLUMN released boolean NOT NULL DEFAULT false,
        ADD COLUMN taken_from text;",
];

/// The schema version this build writes and reads.
pub(super) const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Checks `name` is a plain SQL identifier (letters, digits, `_`; not starting with a digit
/// or `pg_`; at most 63 bytes, PostgreSQL's limit) and returns it quoted.
pub(super) fn quoted_schema(name: &str) -> Result<String, StateError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
        && !name.to_ascii_lowercase().starts_with("pg_");
    if !ok {
        return Err(StateError::Config {
            message: format!(
                "PostgreSQL schema name {:?} is not a plain identifier (ASCII letters, digits \
                 and '_', not starting with a digit or 'pg_', at most 63 bytes)",
                name.chars().take(80).collect::<String>()
            ),
        });
    }
    Ok(format!("\"{name}\""))
}

/// Every statement the backend sends, with its schema filled in.
#[derive(Debug)]
pub(super) struct Sql {
    /// The value of a non-log key: `$1` key.
    pub(super) get: String,
    /// The head and pieces of a log key, in order: `$1` key.
    pub(super) get_log: String,
    /// Keys in `[$1, $2)` with their sizes.
    pub(super) list: String,
    /// Upsert of a non-log key: `$1` key, `$2` value, `$3` kind.
    pub(super) put: String,
    /// Upsert of many non-log keys at once: `$1` keys, `$2` values, `$3` kinds (arrays).
    pub(super) put_many: String,
    /// Upsert of a record with its facts: `$1` key, `$2` value, `$3` kind, then
    /// [`RECORD_COLUMNS`] in order (`$4`..`$11`; `saved_at` in ms since the epoch).
    pub(super) put_record: String,
    /// Upsert of many records with their facts: the same parameters, each an array.
    pub(super) put_records: String,
    /// Upsert of a log key, dropping its pieces: same parameters.
    pub(super) put_log: String,
    /// Delete of a non-log key: `$1` key; one row returned if it existed.
    pub(super) delete: String,
    /// Delete of a log key and its pieces: same.
    pub(super) delete_log: String,
    /// Append to a non-log key (concatenated in place): `$1` key, `$2` bytes, `$3` kind.
    pub(super) append: String,
    /// Pieces appended to a log key, a row each in order: `$1` key, `$2` pieces (an array),
    /// `$3` kind.
    pub(super) append_log_many: String,
    /// Append to a log key (a row of its own): same parameters.
    pub(super) append_log: String,
    /// [`Sql::put_record`] under a fence: the same parameters, then `$12` the lease's name
    /// and `$13` the fence's token. Locks the lease's row `FOR SHARE` and writes only if its
    /// token is `$13`; one row: the lease's current token (NULL: no such lease) and how many
    /// rows were written.
    pub(super) put_fenced: String,
    /// The same for a log key (its pieces dropped; no facts written, `$4`..`$11` unused).
    pub(super) put_fenced_log: String,
    /// [`Sql::delete`] under a fence: `$1` key, `$2` the lease's name, `$3` the token; one
    /// row as `put_fenced`'s (rows deleted).
    pub(super) delete_fenced: String,
    /// The same for a log key and its pieces.
    pub(super) delete_fenced_log: String,
    /// [`Sql::put_fenced`] of many non-log keys at once: `$1`..`$11` as
    /// [`Sql::put_records`], `$12` the lease names and `$13` the fences' tokens (arrays, one
    /// entry per row). Locks every lease row named `FOR SHARE`, in name order, and writes
    /// the rows whose token is their fence's; a row per entry, in order: its position (from
    /// 1), its lease's current token (NULL: no such lease) and whether it was written.
    pub(super) put_fenced_many: String,
    /// [`Sql::delete_fenced`] of many non-log keys at once: `$1` keys, `$2` lease names,
    /// `$3` tokens (arrays); answered as `put_fenced_many` (whether a row was deleted).
    pub(super) delete_fenced_many: String,
    /// Grants a lease: `$1` name, `$2` node, `$3` TTL in ms. One row: granted, holder,
    /// token, ms left, and (granted only) the node it was taken over from after that node
    /// let it expire unreleased, else NULL (no row if a concurrent first grant is not yet
    /// visible: ask again).
    pub(super) acquire_lease: String,
    /// Renews a lease still held with its token: `$1` name, `$2` node, `$3` token, `$4` TTL
    /// in ms. One row (ms left) if renewed, none if not.
    pub(super) renew_lease: String,
    /// Renews many leases at once: `$1` names, `$2` nodes, `$3` tokens (arrays, one entry
    /// per lease), `$4` TTL in ms. A row (name, node, token, ms left) per lease renewed.
    pub(super) renew_leases: String,
    /// Expires a lease still held with its token now and marks it released: `$1` name, `$2`
    /// node, `$3` token.
    pub(super) release_lease: String,
    /// A lease as it stands: `$1` name. One row (holder, token, released, ms left or NULL
    /// once expired) if it was ever granted.
    pub(super) read_lease: String,
}

/// Milliseconds left until `{col}`, by the server's clock, never below 0.
fn ms_left(col: &str) -> String {
    format!("greatest(0, floor(extract(epoch FROM ({col} - clock_timestamp())) * 1000))::int8")
}

/// The columns of a record's facts (`RecordMeta`), in the order of their parameters.
pub(super) const RECORD_COLUMNS: [&str; 8] =
    ["session_id", "checkpoint_id", "branch", "parent", "step", "reason", "status", "saved_at"];

impl Sql {
    pub(super) fn new(schema: &str) -> Self {
        let r = format!("{schema}.mars_state_records");
        let l = format!("{schema}.mars_state_log");
        let upsert = format!(
            "INSERT INTO {r} (key, value, size, kind, updated_at) \
             VALUES ($1, $2, octet_length($2), $3, now()) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, size = excluded.size, \
             kind = excluded.kind, updated_at = excluded.updated_at"
        );
        let columns = RECORD_COLUMNS.join(", ");
        let set_columns: String =
            RECORD_COLUMNS.iter().map(|c| format!(", {c} = excluded.{c}")).collect();
        let record_values = "$1, $2, octet_length($2), $3, now(), $4, $5, $6, $7, $8, $9, $10, \
             to_timestamp($11::float8 / 1000)";
        let conflict = "ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
             size = excluded.size, kind = excluded.kind, updated_at = excluded.updated_at";
        let record_upsert = format!(
            "INSERT INTO {r} (key, value, size, kind, updated_at, {columns}) \
             VALUES ({record_values}) {conflict}{set_columns}"
        );
        // Fenced writes: the lease row is locked FOR SHARE (a grant's UPDATE of it waits for
        // this transaction), and the write happens only if its token is the fence's, in the
        // same statement. The answer row says which.
        let le = format!("{schema}.mars_state_leases");
        let lease =
            |name: &str| format!("lease AS (SELECT token FROM {le} WHERE name = {name} FOR SHARE)");
        let held = |token: &str| format!("EXISTS (SELECT FROM lease WHERE token = {token})");
        let answer = |rows: &str| {
            format!("SELECT (SELECT token FROM lease), (SELECT count(*) FROM {rows})::int8")
        };
        let put_fenced = format!(
            "WITH {}, written AS (INSERT INTO {r} (key, value, size, kind, updated_at, {columns}) \
             SELECT {record_values} FROM lease WHERE token = $13 \
             {conflict}{set_columns} RETURNING 1) {}",
            lease("$12"),
            answer("written")
        );
        let put_fenced_log = format!(
            "WITH {}, pieces AS (DELETE FROM {l} WHERE key = $1 AND {}), \
             written AS (INSERT INTO {r} (key, value, size, kind, updated_at) \
             SELECT $1, $2, octet_length($2), $3, now() FROM lease WHERE token = $13 \
             {conflict} RETURNING 1) {}",
            lease("$12"),
            held("$13"),
            answer("written")
        );
        let delete_fenced = format!(
            "WITH {}, gone AS (DELETE FROM {r} WHERE key = $1 AND {} RETURNING 1) {}",
            lease("$2"),
            held("$3"),
            answer("gone")
        );
        let delete_fenced_log = format!(
            "WITH {}, pieces AS (DELETE FROM {l} WHERE key = $1 AND {}), \
             gone AS (DELETE FROM {r} WHERE key = $1 AND {} RETURNING 1) {}",
            lease("$2"),
            held("$3"),
            held("$3"),
            answer("gone")
        );
        // Many fenced writes in one statement. Each entry is checked against its own lease
        // row, as the single statements do: the rows of every lease named are locked FOR
        // SHARE (in name order, the order every such statement takes them in), and an entry
        // is written only if its lease's token is its fence's. The entries whose fence does
        // not hold change nothing; the others are written all the same. The answer has a
        // row per entry, in the arrays' order (`n`), saying which.
        let leases = |names: &str| {
            format!(
                "lease AS (SELECT name, token FROM {le} WHERE name = ANY({names}) \
                 ORDER BY name FOR SHARE)"
            )
        };
        let answers = |rows: &str| {
            format!(
                "SELECT t.n, l.token, w.key IS NOT NULL FROM t \
                 LEFT JOIN lease AS l ON l.name = t.ln LEFT JOIN {rows} AS w ON w.key = t.k \
                 ORDER BY t.n"
            )
        };
        // Written in key order, so two batches writing the same keys lock them in one order.
        let put_fenced_many = format!(
            "WITH t AS (SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], \
             $5::text[], $6::text[], $7::text[], $8::int8[], $9::text[], $10::text[], \
             $11::int8[], $12::text[], $13::int8[]) WITH ORDINALITY \
             AS t (k, v, kd, sid, cid, b, p, st, rs, sts, at, ln, tk, n)), {}, \
             written AS (INSERT INTO {r} (key, value, size, kind, updated_at, {columns}) \
             SELECT t.k, t.v, octet_length(t.v), t.kd, now(), t.sid, t.cid, t.b, t.p, t.st, \
             t.rs, t.sts, to_timestamp(t.at::float8 / 1000) \
             FROM t JOIN lease ON lease.name = t.ln AND lease.token = t.tk ORDER BY t.k \
             {conflict}{set_columns} RETURNING key) {}",
            leases("$12::text[]"),
            answers("written")
        );
        let delete_fenced_many = format!(
            "WITH t AS (SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) \
             WITH ORDINALITY AS t (k, ln, tk, n)), {}, \
             gone AS (DELETE FROM {r} AS r USING t JOIN lease \
             ON lease.name = t.ln AND lease.token = t.tk WHERE r.key = t.k RETURNING r.key) {}",
            leases("$2::text[]"),
            answers("gone")
        );
        // A grant: a new row, or the row taken over when it is free (expired or released) or
        // already `$2`'s. The token stays only when `$2` held it live; any other grant raises
        // it. `taken_from` names the old holder when another node takes the lease over after
        // it expired unreleased; the SET sees the old row, locked and current (ON CONFLICT
        // DO UPDATE locks the latest version), so it cannot be another grant's. Times are
        // the server's (`clock_timestamp()`, read after the row lock is had).
        let until = "clock_timestamp() + $3 * interval '1 millisecond'";
        let acquire_lease = format!(
            "WITH granted AS (INSERT INTO {le} AS l (name, node, token, expires_at) \
             VALUES ($1, $2, 1, {until}) \
             ON CONFLICT (name) DO UPDATE SET \
             token = CASE WHEN l.node = excluded.node AND l.expires_at > clock_timestamp() \
             THEN l.token ELSE l.token + 1 END, \
             taken_from = CASE WHEN l.node <> excluded.node AND NOT l.released \
             AND l.expires_at <= clock_timestamp() THEN l.node END, \
             node = excluded.node, expires_at = {until}, released = false \
             WHERE l.node = excluded.node OR l.expires_at <= clock_timestamp() \
             RETURNING node, token, expires_at, taken_from) \
             SELECT true, node, token, {}, taken_from FROM granted \
             UNION ALL SELECT false, node, token, {}, NULL::text FROM {le} \
             WHERE name = $1 AND NOT EXISTS (SELECT FROM granted)",
            ms_left("expires_at"),
            ms_left("expires_at")
        );
        let renew_lease = format!(
            "UPDATE {le} SET expires_at = clock_timestamp() + $4 * interval '1 millisecond', \
             released = false WHERE name = $1 AND node = $2 AND token = $3 RETURNING {}",
            ms_left("expires_at")
        );
        // Every lease of the arrays that is still its node's at its token, in one UPDATE (one
        // round trip, one transaction); the others match no row and are not returned. The
        // rows are locked first, in name order (the materialized CTE; FOR UPDATE locks rows
        // as the sort hands them out), as a batch's fenced writes lock theirs FOR SHARE, so
        // a renewal and a writer never wait for each other in a cycle; the UPDATE then only
        // touches rows this statement already holds.
        let renew_leases = format!(
            "WITH locked AS MATERIALIZED (SELECT l.name FROM {le} AS l \
             JOIN unnest($1::text[], $2::text[], $3::int8[]) AS r (name, node, token) \
             ON l.name = r.name AND l.node = r.node AND l.token = r.token \
             ORDER BY l.name FOR UPDATE OF l) \
             UPDATE {le} AS l SET expires_at = clock_timestamp() + $4 * interval '1 millisecond', \
             released = false \
             FROM unnest($1::text[], $2::text[], $3::int8[]) AS r (name, node, token) \
             WHERE l.name = r.name AND l.node = r.node AND l.token = r.token \
             AND l.name IN (SELECT name FROM locked) \
             RETURNING l.name, l.node, l.token, {}",
            ms_left("l.expires_at")
        );
        let release_lease = format!(
            "UPDATE {le} SET expires_at = least(expires_at, clock_timestamp()), released = true \
             WHERE name = $1 AND node = $2 AND token = $3"
        );
        // The clock is read once, so "live" and the ms left agree.
        let read_lease = format!(
            "SELECT node, token, released, \
             CASE WHEN left_ms > 0 THEN floor(left_ms)::int8 END \
             FROM {le}, LATERAL (SELECT extract(epoch FROM (expires_at - clock_timestamp())) \
             * 1000 AS left_ms) AS t WHERE name = $1"
        );
        let records_upsert = format!(
            "INSERT INTO {r} (key, value, size, kind, updated_at, {columns}) \
             SELECT k, v, octet_length(v), kd, now(), sid, cid, b, p, st, rs, sts, \
             to_timestamp(at::float8 / 1000) \
             FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::int8[], $9::text[], $10::text[], $11::int8[]) \
             AS t (k, v, kd, sid, cid, b, p, st, rs, sts, at) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, size = excluded.size, \
             kind = excluded.kind, updated_at = excluded.updated_at{set_columns}"
        );
        // Each write is one statement (data-modifying CTEs for the two tables), so the writer
        // can pipeline a batch and the server still runs it in order.
        Sql {
            get: format!("SELECT value FROM {r} WHERE key = $1"),
            get_log: format!(
                "SELECT 0 AS part, 0::bigint AS seq, value FROM {r} WHERE key = $1 \
                 UNION ALL SELECT 1, seq, bytes FROM {l} WHERE key = $1 ORDER BY 1, 2"
            ),
            list: format!("SELECT key, size FROM {r} WHERE key >= $1 AND key < $2"),
            put_log: format!("WITH gone AS (DELETE FROM {l} WHERE key = $1) {upsert}"),
            put_many: format!(
                "INSERT INTO {r} (key, value, size, kind, updated_at) \
                 SELECT k, v, octet_length(v), kd, now() \
                 FROM unnest($1::text[], $2::bytea[], $3::text[]) AS t (k, v, kd) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, size = excluded.size, \
                 kind = excluded.kind, updated_at = excluded.updated_at"
            ),
            put: upsert,
            put_record: record_upsert,
            put_records: records_upsert,
            delete: format!("DELETE FROM {r} WHERE key = $1 RETURNING 1"),
            delete_log: format!(
                "WITH gone AS (DELETE FROM {l} WHERE key = $1) \
                 DELETE FROM {r} WHERE key = $1 RETURNING 1"
            ),
            append: format!(
                "INSERT INTO {r} (key, value, size, kind, updated_at) \
                 VALUES ($1, $2, octet_length($2), $3, now()) \
                 ON CONFLICT (key) DO UPDATE SET value = {r}.value || excluded.value, \
                 size = {r}.size + excluded.size, updated_at = excluded.updated_at \
                 RETURNING 1"
            ),
            // `ORDER BY n`: the rows are inserted, and take their `seq`, in the pieces' order.
            append_log_many: format!(
                "WITH head AS (INSERT INTO {r} (key, value, size, kind, updated_at) \
                 VALUES ($1, ''::bytea, \
                 (SELECT coalesce(sum(octet_length(b)), 0) FROM unnest($2::bytea[]) AS p (b)), \
                 $3, now()) \
                 ON CONFLICT (key) DO UPDATE SET size = {r}.size + excluded.size, \
                 updated_at = excluded.updated_at) \
                 INSERT INTO {l} (key, bytes) \
                 SELECT $1, b FROM unnest($2::bytea[]) WITH ORDINALITY AS p (b, n) ORDER BY n"
            ),
            append_log: format!(
                "WITH head AS (INSERT INTO {r} (key, value, size, kind, updated_at) \
                 VALUES ($1, ''::bytea, octet_length($2), $3, now()) \
                 ON CONFLICT (key) DO UPDATE SET size = {r}.size + excluded.size, \
                 updated_at = excluded.updated_at) \
                 INSERT INTO {l} (key, bytes) VALUES ($1, $2) RETURNING 1"
            ),
            put_fenced,
            put_fenced_log,
            delete_fenced,
            delete_fenced_log,
            put_fenced_many,
            delete_fenced_many,
            acquire_lease,
            renew_lease,
            renew_leases,
            release_lease,
            read_lease,
        }
    }
}

/// The values of `synchronous_commit` under which a COMMIT returns only once its WAL record
/// is flushed to this server's disk (and, for the `remote_*` ones, a synchronous standby's
/// as far as they say). `local` flushes locally too but, with a synchronous standby, does
/// not wait for it; `off` returns before the flush.
const DURABLE_COMMIT: &[&str] = &["on", "remote_write", "remote_apply"];

/// Reads the settings a durable commit depends on, as they apply to this connection (so
/// with any `ALTER ROLE` / `ALTER DATABASE … SET` in effect), and returns each one that
/// breaks durability with how to fix it.
pub(super) async fn durability_problems(client: &Client) -> Result<Vec<String>, Failure> {
    let mut problems = Vec::new();
    let show = |name: &'static str| async move {
        let rows = client.simple_query(&format!("SHOW {name}")).await?;
        let value = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
        Ok::<_, Failure>(value.unwrap_or_default())
    };
    let fsync = show("fsync").await?;
    if fsync != "on" {
        problems.push(format!(
            "fsync = {fsync}: the server does not flush its WAL to disk, so a crash of the \
             machine can lose committed writes (set fsync = on in postgresql.conf and reload)"
        ));
    }
    let full_page_writes = show("full_page_writes").await?;
    if full_page_writes != "on" {
        problems.push(format!(
            "full_page_writes = {full_page_writes}: a power loss can leave torn pages that \
             the WAL cannot repair (set full_page_writes = on in postgresql.conf and reload)"
        ));
    }
    let commit = show("synchronous_commit").await?;
    if !DURABLE_COMMIT.contains(&commit.as_str()) {
        problems.push(format!(
            "synchronous_commit = {commit}: a commit may return before it is on disk (set it \
             to on: ALTER ROLE … / ALTER DATABASE … SET synchronous_commit = on, or in \
             postgresql.conf)"
        ));
    }
    Ok(problems)
}

/// Brings `schema` (quoted) to [`SCHEMA_VERSION`], creating it if needed, in one
/// transaction under the migration lock. A schema of a newer version is a `Config` error.
pub(super) async fn migrate(client: &Client, schema: &str, name: &str) -> Result<(), MigrateError> {
    client.batch_execute("BEGIN").await?;
    let result = migrate_in_transaction(client, schema, name).await;
    match result {
        Ok(()) => {
            client.batch_execute("COMMIT").await?;
            Ok(())
        }
        Err(e) => {
            // Nothing was applied; the connection is discarded by the caller if this fails.
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn migrate_in_transaction(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<(), MigrateError> {
    // Only the simple protocol here (no prepared statements), so this runs behind any
    // pooler; `name` is a checked identifier, safe as a literal.
    //
    // Why a lock: two processes creating the same schema or table at once would fail on
    // each other's catalog rows; applying a step twice would fail the second. Held until
    // COMMIT or ROLLBACK.
    client
        .batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({MIGRATION_LOCK}, hashtext('{name}'));
             CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.mars_state_migrations (
                 version int PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await?;
    let rows = client
        .simple_query(&format!(
            "SELECT coalesce(max(version), 0) FROM {schema}.mars_state_migrations"
        ))
        .await?;
    let current: i32 = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(MigrateError::Newer(StateError::Config {
            message: format!(
                "PostgreSQL schema {name} has mars-state schema version {current}; this build \
                 knows versions up to {SCHEMA_VERSION} (upgrade mars-state)"
            ),
        }));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(usize::try_from(current).unwrap_or(0)) {
        let version = i + 1;
        client
            .batch_execute(&format!(
                "{};
                 INSERT INTO {schema}.mars_state_migrations (version) VALUES ({version});",
                step.replace("{s}", schema)
            ))
            .await?;
        tracing::info!(schema = name, version, "applied mars-state PostgreSQL migration");
    }
    Ok(())
}

/// A read-only open's check of the schema, which writes nothing (no lock, no `CREATE`):
/// the schema's migrations table must be there and at [`SCHEMA_VERSION`]. Anything else is
/// [`MigrateError::Newer`] carrying the [`StateError::Config`] that says what to do.
pub(super) async fn check_version(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<(), MigrateError> {
    let rows = client
        .simple_query(&format!(
            "SELECT coalesce(max(version), 0) FROM {schema}.mars_state_migrations"
        ))
        .await;
    let rows = match rows {
        Ok(rows) => rows,
        // No such table (or no such schema): no store was ever made here.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            return Err(no_schema(name));
        }
        Err(e) => return Err(e.into()),
    };
    let version: i32 = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or(-1);
    let message = match version {
        v if v == SCHEMA_VERSION => return Ok(()),
        v if v < 0 => return Err(no_schema(name)),
        v if v > SCHEMA_VERSION => format!(
            "PostgreSQL schema {name} has mars-state schema version {v}; this build knows \
             versions up to {SCHEMA_VERSION} (upgrade mars-state)"
        ),
        v => format!(
            "PostgreSQL schema {name} has mars-state schema version {v}, older than this \
             build's {SCHEMA_VERSION}: a read-only open does not migrate it (open it once \
             for writing, which does)"
        ),
    };
    Err(MigrateError::Newer(StateError::Config { message }))
}

fn no_schema(name: &str) -> MigrateError {
    MigrateError::Newer(StateError::Config {
        message: format!(
            "no mars-state store in this database (schema {name} has no mars-state tables; a \
             read-only open creates nothing)"
        ),
    })
}

/// Why migrating (or a read-only open's check) failed.
#[derive(Debug)]
pub(super) enum MigrateError {
    /// The database or connection failed.
    Failed(Failure),
    /// The schema is newer than this build (or, for a read-only open, not usable as it
    /// is): the error says why.
    Newer(StateError),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Failed(Failure::Pg(e))
    }
}
