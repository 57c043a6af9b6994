//! The PostgreSQL backend (feature `postgres`) against a real server: the conformance suite
//! over `PostgresStorageBackend` and `Encrypted<PostgresStorageBackend>`, and what a store on
//! it must keep. Every test works in a schema (or database) of its own with a random name and
//! drops it at the end, also when it fails. The server is `MARS_STATE_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); a test FAILS if it cannot be reached.
//!
//! - `manager_state_survives_reconnect_{plain,gzip}`: sessions, checkpoints, listings,
//!   restores and deletes made through a `StateManager` are there after shutdown and
//!   reconnect.
//! - `appends_keep_every_byte`: appends of arbitrary bytes concatenate in order, `list`
//!   reports the size in bytes, a delete or a put replaces every appended piece.
//! - conformance over three fixtures: plain, `Encrypted`, and `prepared_statements(false)`.
//! - `ten_processes_migrate_at_once`: ten processes (this binary re-executed) connect to one
//!   new schema at the same moment; all succeed and each migration is recorded once.
//! - `bad_schema_name_is_config`, `newer_schema_is_config`: typed `Config` errors.
//! - `record_facts_are_plain_columns_{plain,encrypted}`: after steps, checkpoints and a
//!   pause through a `StateManager`, each record's row holds its session, checkpoint,
//!   parent, step, reason, status and save time in plain columns (the branch too, unless
//!   encrypted); the pause reason is in no column; a session's newest checkpoint is an
//!   index-only scan.
//! - `non_durable_database_is_refused`: a database of its own with `ALTER DATABASE … SET
//!   synchronous_commit = off` fails the connect with `Config`; `best_effort()` connects.
//! - `terminated_connections_during_saves`: `pg_terminate_backend` of the backend's
//!   connections every 15 ms while tasks put and append: every call returns `Ok` or a typed
//!   error (`Unavailable` or `Timeout`); afterwards every acknowledged put is there, no put
//!   answered `Unavailable` is, no append is there twice, and every acknowledged append is
//!   there unless an append reported that its log lost a tail.
//! - `takeover_waits_for_an_in_flight_fenced_write`: a grant of a lease to another node
//!   waits (on the lease row, locked `FOR SHARE`) for the old holder's fenced write in
//!   flight, which commits under the old token; the old holder's next write is `Fenced`.
//! - `a_batch_of_fenced_writes_answers_each_by_its_own_fence_{prepared,unprepared}`: 40
//!   fenced puts and 10 fenced deletes queued at once commit in one transaction; each is
//!   applied or refused (`Fenced`, with the lease's name, its token and the current one) by
//!   its own fence, a refused one changes nothing, and the others are written.
//! - `sigkill_client_while_saving`: a child process saves and checkpoints in a loop,
//!   printing an ack after each `Ok`, and is SIGKILLed at a random moment, 50 rounds
//!   (`MARS_PG_CLIENT_ROUNDS`); after each kill every acked write is there, byte for byte,
//!   nothing is corrupt, and the index agrees with the rows (`common::oracle`, counts
//!   printed).
//! - `crash_private_cluster`: the same child, but a private cluster (`initdb`, its own port)
//!   is stopped with `pg_ctl stop -m immediate` under it; after a restart every acked write
//!   is there, 20 rounds (`MARS_PG_CRASH_ROUNDS`).

mod common;
mod nodes_common;
mod pg_common;

use std::time::Duration;

use mars_state::middleware::crypto::EncryptionLayer;
use mars_state::{
    CheckpointPolicy, EncryptionKey, ErrorKind, PostgresStorageBackend, StateManager,
    StorageBackend, StorageKey,
};
use pg_common::{Schema, bounded, test_url};
use serde_json::json;

/// A fresh schema of its own, dropped with the guard.
async fn fresh() -> (PostgresStorageBackend, Schema) {
    let schema = Schema::new();
    let backend = PostgresStorageBackend::options()
        .schema(schema.name())
        .pool_size(4)
        .connect(&test_url())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {}: {e}", test_url()));
    (backend, schema)
}

fn layer() -> EncryptionLayer {
    EncryptionLayer::new(EncryptionKey::from_bytes([7; 32]))
}

mars_state::conformance_tests! {
    postgres => fresh().await,
    encrypted_postgres => {
        let (backend, schema) = fresh().await;
        (layer().wrap(backend).await.unwrap(), schema)
    },
    unprepared_postgres => {
        let schema = Schema::new();
        let backend = PostgresStorageBackend::options()
            .schema(schema.name())
            .prepared_statements(false)
            .connect(&test_url())
            .await
            .unwrap();
        (backend, schema)
    },
}

// Several nodes on one schema: the behaviours of `tests/nodes.rs` over PostgreSQL.
nodes_common::node_tests!(nodes, || async {
    let (backend, schema) = super::fresh().await;
    (std::sync::Arc::new(backend) as std::sync::Arc<dyn mars_state::StorageBackend>, schema)
});

async fn open_manager(schema: &str, compression: Option<u32>) -> StateManager {
    let backend = PostgresStorageBackend::options().schema(schema).connect(&test_url()).await;
    let mut builder = StateManager::builder(backend.unwrap());
    if let Some(level) = compression {
        builder = builder.compression(level);
    }
    bounded("start", builder.start()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_state_survives_reconnect_plain() {
    manager_state_survives_reconnect(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_state_survives_reconnect_gzip() {
    manager_state_survives_reconnect(Some(6)).await;
}

async fn manager_state_survives_reconnect(compression: Option<u32>) {
    let schema = Schema::new();
    common::oracle::state_survives_reopen(|| open_manager(schema.name(), compression)).await;
}

#[tokio::test]
async fn appends_keep_every_byte() {
    let (b, _schema) = fresh().await;
    common::backend::appends_keep_every_byte(&b).await;
}

#[tokio::test]
async fn bad_schema_name_is_config() {
    for name in ["", "a-b", "1abc", "pg_mine", "x\"; DROP TABLE y; --", &"a".repeat(64)] {
        let err = PostgresStorageBackend::options()
            .schema(name)
            .connect(&test_url())
            .await
            .expect_err("connected with an invalid schema name");
        assert_eq!(err.kind(), ErrorKind::Config, "{name:?}: {err}");
    }
    let err = PostgresStorageBackend::connect("postgres://user:secret@[bad").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(!err.to_string().contains("secret"), "the error repeats the URL: {err}");
}

#[tokio::test]
async fn newer_schema_is_config() {
    let (b, schema) = fresh().await;
    drop(b);
    pg_common::admin_sql(&format!(
        "INSERT INTO \"{}\".mars_state_migrations (version) VALUES (999)",
        schema.name()
    ))
    .await;
    let err = PostgresStorageBackend::options()
        .schema(schema.name())
        .connect(&test_url())
        .await
        .expect_err("connected to a schema of a newer version");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("999"), "{err}");
}

#[tokio::test]
async fn non_durable_database_is_refused() {
    let db = pg_common::Database::new().await;
    pg_common::admin_sql(&format!("ALTER DATABASE \"{}\" SET synchronous_commit = off", db.name()))
        .await;
    let err = PostgresStorageBackend::connect(&db.url())
        .await
        .expect_err("connected to a database with synchronous_commit = off");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("synchronous_commit"), "{err}");
    let backend = PostgresStorageBackend::options().best_effort().connect(&db.url()).await;
    let backend = backend.expect("best_effort() did not connect");
    let key = StorageKey::new("sessions/a.json").unwrap();
    bounded("put", backend.put(&key, b"1".to_vec())).await.unwrap();
    assert_eq!(bounded("get", backend.get(&key)).await.unwrap(), Some(b"1".to_vec()));
    drop(backend);
}

#[test]
fn ten_processes_migrate_at_once() {
    if let Some(schema) = std::env::var_os(pg_common::MIGRATE_CHILD_ENV) {
        return pg_common::migrate_child(&schema.to_string_lossy());
    }
    let schema = Schema::new();
    let start_at = std::time::SystemTime::now() + Duration::from_millis(1500);
    let children: Vec<_> = (0..10)
        .map(|_| {
            pg_common::spawn_migrate_child("ten_processes_migrate_at_once", schema.name(), start_at)
        })
        .collect();
    let mut ok = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "a child failed: {text}");
        assert!(text.contains("connected"), "a child did not connect: {text}");
        ok += 1;
    }
    let rows = pg_common::admin_query_sync(&format!(
        "SELECT version, count(*) FROM \"{}\".mars_state_migrations GROUP BY version ORDER BY 1",
        schema.name()
    ));
    println!("{ok} processes connected; migrations table: {rows:?}");
    // Versions 1 to 4: records, record facts, leases, lease releases.
    let expected: Vec<(String, String)> =
        (1..=4).map(|v| (v.to_string(), "1".to_owned())).collect();
    assert_eq!(rows, expected, "each version exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_during_saves() {
    pg_common::terminated_connections_during_saves().await;
}

#[test]
fn sigkill_client_while_saving() {
    if std::env::var_os(pg_common::CRASH_CHILD_ENV).is_some() {
        return;
    }
    pg_common::sigkill_client_while_saving();
}

#[test]
fn crash_private_cluster() {
    if std::env::var_os(pg_common::CRASH_CHILD_ENV).is_some() {
        return;
    }
    pg_common::crash_private_cluster();
}

/// The saver of the crash tests: a no-op unless the parent set the child variable.
#[test]
fn crash_child() {
    pg_common::crash_child();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_facts_are_plain_columns_plain() {
    record_facts_are_plain_columns(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_facts_are_plain_columns_encrypted() {
    record_facts_are_plain_columns(true).await;
}

async fn record_facts_are_plain_columns(encrypted: bool) {
    let schema = Schema::new();
    let url = test_url();
    let options = PostgresStorageBackend::options().schema(schema.name());
    let backend = bounded("connect", options.connect(&url)).await.unwrap();
    let mut builder =
        StateManager::builder(backend).checkpoint_policy(CheckpointPolicy::every_steps(2));
    if encrypted {
        builder = builder.encryption_key(EncryptionKey::from_bytes([7; 32]));
    }
    let m = bounded("start", builder.start()).await.unwrap();
    for step in 1..=4 {
        m.record_step("s1", step, &json!({"step": step})).await.unwrap();
    }
    let pause = m.pause_session("s1", &json!({"step": 4}), "SECRET-PAUSE-REASON").await.unwrap();
    let checkpoints = m.list_checkpoints("s1").await.unwrap();
    bounded("shutdown", m.shutdown()).await.unwrap();
    assert_eq!(checkpoints.len(), 3, "{checkpoints:?}");
    let (first, second) = (&checkpoints[0].id, &checkpoints[1].id);

    let name = schema.name().to_owned();
    let rows = tokio::task::spawn_blocking(move || {
        pg_common::admin_query_sync(&format!(
            "SELECT key, concat_ws('|', session_id, coalesce(checkpoint_id, '-'), \
             coalesce(branch, '-'), coalesce(parent, '-'), coalesce(step::text, '-'), \
             coalesce(reason, '-'), coalesce(status, '-'), \
             (saved_at > now() - interval '5 minutes')::text) \
             FROM \"{name}\".mars_state_records WHERE kind = 'record' ORDER BY saved_at, key"
        ))
    })
    .await
    .unwrap();
    let branch = if encrypted { "-" } else { "main" };
    let ext = if encrypted { ".json.enc" } else { ".json" };
    let expected = vec![
        (format!("checkpoints/s1/{first}{ext}"), format!("s1|{first}|{branch}|-|2|steps|-|true")),
        (
            format!("checkpoints/s1/{second}{ext}"),
            format!("s1|{second}|{branch}|{first}|4|steps|-|true"),
        ),
        (
            format!("checkpoints/s1/{pause}{ext}"),
            format!("s1|{pause}|{branch}|{second}|4|pause|-|true"),
        ),
        (format!("sessions/s1{ext}"), "s1|-|-|-|4|-|paused|true".to_owned()),
    ];
    let mut sorted = rows.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected_sorted = expected.clone();
    expected_sorted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(sorted, expected_sorted, "the records' columns");
    assert!(
        !rows.iter().any(|(_, facts)| facts.contains("SECRET")),
        "the pause reason is in a column: {rows:?}"
    );

    // A session's newest checkpoint comes from the index alone.
    let name = schema.name().to_owned();
    let plan = tokio::task::spawn_blocking(move || {
        pg_common::admin_query_sync(&format!(
            "SET enable_seqscan = off; SET enable_bitmapscan = off; \
             EXPLAIN SELECT checkpoint_id, step, reason FROM \"{name}\".mars_state_records \
             WHERE session_id = 's1' AND checkpoint_id IS NOT NULL \
             ORDER BY saved_at DESC LIMIT 1"
        ))
    })
    .await
    .unwrap();
    assert!(
        plan.iter()
            .any(|(line, _)| line.contains("Index Only Scan using mars_state_records_checkpoints")),
        "{plan:?}"
    );
}

/// Every lease row of the test's schema is an ordinary row: the statements of a test's own
/// connection, run while a backend's calls wait.
async fn admin_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&test_url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at {}: {e}", test_url()));
    tokio::spawn(conn);
    client
}

/// Waits until a statement of another session waits for a lock and contains `text` (no
/// quote in it); panics with `otherwise` if `done` says the statement's call returned.
async fn wait_for_lock_wait(
    admin: &tokio_postgres::Client,
    text: &str,
    done: impl Fn() -> bool,
    otherwise: &str,
) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND strpos(query, '{text}') > 0 AND pid <> pg_backend_pid()"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = admin.query_one(&sql, &[]).await.unwrap().get(0);
        if n > 0 {
            return;
        }
        assert!(!done(), "{otherwise}");
        assert!(std::time::Instant::now() < deadline, "no statement waits with {text:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A takeover waits for the old holder's fenced write in flight: the write (held inside
/// its transaction, after its fence check, by a lock on the record's row) commits under the
/// old token even though the lease expired meanwhile; the grant to the new node is answered
/// only after that commit, with the next token; the old holder's next write is refused and
/// changes nothing. Without the `FOR SHARE` of the lease row, the grant would return at
/// once and the old write would land after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_waits_for_an_in_flight_fenced_write() {
    use mars_state::{Acquired, RecordMeta};
    let (a, schema) = fresh().await;
    let b = PostgresStorageBackend::options()
        .schema(schema.name())
        .pool_size(2)
        .connect(&test_url())
        .await
        .unwrap();
    let key = StorageKey::new("sessions/s1.json").unwrap();
    let meta = RecordMeta::default();
    let ttl = Duration::from_millis(800);
    let Acquired::Granted(lease) =
        bounded("acquire", a.acquire_lease("s1", "node-a", ttl)).await.unwrap()
    else {
        panic!("a new lease is free")
    };
    let fence = lease.fence();
    bounded("put", a.put_fenced(&key, b"first".to_vec(), &meta, &fence)).await.unwrap();

    // Hold the record's row: node-a's next fenced write locks the lease row FOR SHARE, then
    // waits here for the row, inside its transaction.
    let mut admin = admin_client().await;
    let hold = admin.transaction().await.unwrap();
    let records = format!("\"{}\".mars_state_records", schema.name());
    hold.execute(
        &format!("SELECT 1 FROM {records} WHERE key = 'sessions/s1.json' FOR UPDATE"),
        &[],
    )
    .await
    .unwrap();
    let write = {
        let (a, key, meta, fence) = (a.clone(), key.clone(), meta.clone(), fence.clone());
        tokio::spawn(async move { a.put_fenced(&key, b"in flight".to_vec(), &meta, &fence).await })
    };
    let watcher = admin_client().await;
    // Statements of this schema only (other tests run beside this one).
    let (s, records_t, leases_t) = (schema.name(), "mars_state_records", "mars_state_leases AS l");
    let held_up = "the fenced write was not held up by the row lock";
    wait_for_lock_wait(&watcher, &format!("{s}\".{records_t}"), || write.is_finished(), held_up)
        .await;

    // The lease expires meanwhile (by the server's clock); node-b asks for it.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let take = {
        let b = b.clone();
        tokio::spawn(async move { b.acquire_lease("s1", "node-b", Duration::from_secs(30)).await })
    };
    let no_wait = "the grant did not wait for the fenced write in flight";
    wait_for_lock_wait(&watcher, &format!("{s}\".{leases_t}"), || take.is_finished(), no_wait)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!take.is_finished(), "{no_wait}");
    assert!(!write.is_finished());

    hold.rollback().await.unwrap();
    bounded("write", write).await.unwrap().expect("the in-flight write under its fence");
    let taken = bounded("take", take).await.unwrap().unwrap();
    let Acquired::Granted(new) = taken else { panic!("node-b was not granted: {taken:?}") };
    assert_eq!(new.token, lease.token + 1);
    assert_eq!(bounded("get", b.get(&key)).await.unwrap().as_deref(), Some(&b"in flight"[..]));

    let late = bounded("late put", a.put_fenced(&key, b"late".to_vec(), &meta, &fence)).await;
    assert_eq!(late.unwrap_err().kind(), ErrorKind::Fenced);
    assert_eq!(bounded("get", b.get(&key)).await.unwrap().as_deref(), Some(&b"in flight"[..]));
    drop(watcher);
}

/// A renewal of many leases locks their rows in name order, as the fenced writes of a
/// batch lock theirs: a writer that holds lease `a` `FOR SHARE` and then takes `b` while a
/// renewal of `[b, a]` waits for `a` is not deadlocked. The rows are made `b` first, so a
/// renewal locking in the order it meets rows (the table's, or the array's) would hold `b`
/// while it waits for `a`, and the server would abort one of the two after its deadlock
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_and_a_writer_lock_leases_in_the_same_order() {
    use mars_state::Acquired;
    let (a, schema) = fresh().await;
    let ttl = Duration::from_secs(30);
    let mut leases = Vec::new();
    for name in ["b", "a"] {
        let Acquired::Granted(lease) =
            bounded("acquire", a.acquire_lease(name, "node-a", ttl)).await.unwrap()
        else {
            panic!("a new lease is free")
        };
        leases.push(lease);
    }
    let leases_table = format!("\"{}\".mars_state_leases", schema.name());
    let mut admin = admin_client().await;
    let writer = admin.transaction().await.unwrap();
    let share =
        |name: &str| format!("SELECT 1 FROM {leases_table} WHERE name = '{name}' FOR SHARE");
    writer.execute(&share("a"), &[]).await.unwrap();
    let renewal = {
        let a = a.clone();
        tokio::spawn(async move { a.renew_leases(&leases, ttl).await })
    };
    let watcher = admin_client().await;
    let leases_t = format!("{}\".mars_state_leases AS l", schema.name());
    let no_wait = "the renewal did not wait for the writer's share lock";
    wait_for_lock_wait(&watcher, &leases_t, || renewal.is_finished(), no_wait).await;
    // The writer's next lease: free, since the renewal waits for `a` before it takes `b`.
    // Were it held, the writer would wait in a cycle; it gives up after half a second, before
    // the server's deadlock check (`deadlock_timeout`, 1 s) would abort the renewal (which
    // the backend retries, hiding the cycle but for the second it cost).
    writer.execute("SET LOCAL lock_timeout = '500ms'", &[]).await.unwrap();
    bounded("share b", writer.execute(&share("b"), &[])).await.expect("the writer's second lease");
    writer.commit().await.unwrap();
    let renewed = bounded("renew", renewal).await.unwrap().expect("the renewal");
    assert!(renewed.iter().all(Option::is_some), "{renewed:?}");
    drop(watcher);
}

/// The connection a node LISTENs on is terminated on the server (`pg_terminate_backend`),
/// and the node subscribes again only later: another node's events made meanwhile are lost
/// to it, its watches say exactly how many before that node's next event, and then see
/// every event again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_listen_connection_is_reconnected_and_what_was_missed_is_counted() {
    use mars_state::EventKind;
    use nodes_common::{Freezer, next_events, node};
    use std::sync::Arc;

    let (backend, schema) = fresh().await;
    let store: Arc<dyn StorageBackend> = Arc::new(backend);
    let freezer = Freezer::new(store.clone());
    let frozen: Arc<dyn StorageBackend> = Arc::new(freezer.clone());
    let a = node(&store, "node-a", Duration::ZERO).await;
    let c = node(&frozen, "node-c", Duration::ZERO).await;
    let mut one = c.watch("s1").await.unwrap();
    a.save_session("s1", &json!({"step": 0})).await.unwrap();
    assert_eq!(next_events(&mut one, 1).await[0].kind, EventKind::Saved);
    // Both nodes' LISTEN connections end; node c may connect again only once thawed.
    freezer.freeze();
    let listen = format!("LISTEN \"mars_state_events:{}\"", schema.name());
    let killed = tokio::task::spawn_blocking(move || {
        pg_common::admin_query_sync(&format!(
            "SELECT pid, pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
             WHERE datname = current_database() AND query = '{}'",
            listen.replace('\'', "''")
        ))
    })
    .await
    .unwrap();
    assert_eq!(killed.len(), 2, "one LISTEN connection per node: {killed:?}");
    assert!(killed.iter().all(|(_, done)| done == "t"), "terminated: {killed:?}");
    for step in 1..=3 {
        a.save_session("s1", &json!({"step": step})).await.unwrap();
    }
    freezer.thaw();
    let (first, after) = nodes_common::save_until_delivered(&a, &mut one, 30).await;
    let missed = nodes_common::account_for(&mut one, Some(first), 3 + after).await;
    assert!(missed >= 1, "the saves made while node c was cut off were not all delivered");
    a.create_checkpoint("s1", "main", &json!({"step": 99})).await.unwrap();
    assert!(matches!(next_events(&mut one, 1).await[0].kind, EventKind::Checkpointed { .. }));
    a.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_of_fenced_writes_answers_each_by_its_own_fence_prepared() {
    let (backend, schema) = fresh().await;
    a_batch_of_fenced_writes_answers_each_by_its_own_fence(backend, &schema).await;
}

#[tokio::test]
async fn a_batch_of_fenced_writes_answers_each_by_its_own_fence_unprepared() {
    let schema = Schema::new();
    let backend = PostgresStorageBackend::options()
        .schema(schema.name())
        .prepared_statements(false)
        .connect(&test_url())
        .await
        .unwrap();
    a_batch_of_fenced_writes_answers_each_by_its_own_fence(backend, &schema).await;
}

/// 40 fenced puts and 10 fenced deletes are queued at once through one backend (on a
/// current-thread runtime, so every one is queued before a writer runs) and commit in one
/// transaction (the rows written share one `xmin`). Each is checked against its own lease:
/// those under a live fence are applied (a delete says whether its key existed); those under
/// a stale fence (a lease released and granted to another node since, a lease never
/// granted, a token ahead of the lease's) are answered `Fenced` with the lease's name, the
/// write's token and the lease's current token, and change nothing, while the rest of the
/// batch is written.
async fn a_batch_of_fenced_writes_answers_each_by_its_own_fence(
    b: PostgresStorageBackend,
    schema: &Schema,
) {
    use mars_state::{Acquired, Fence, Lease, RecordMeta, StateError};
    use std::collections::HashMap;

    let ttl = Duration::from_secs(60);
    let mut leases: Vec<Lease> = Vec::new();
    for i in 0..7 {
        let granted = bounded("acquire", b.acquire_lease(&format!("l{i}"), "node-a", ttl)).await;
        let Ok(Acquired::Granted(lease)) = granted else { panic!("l{i} is free: {granted:?}") };
        leases.push(lease);
    }
    // l6: released by node-a and granted to node-b; node-a's fence is stale.
    bounded("release", b.release_lease(&leases[6])).await.unwrap();
    let taken = bounded("take", b.acquire_lease("l6", "node-b", ttl)).await.unwrap();
    let Acquired::Granted(taken) = taken else { panic!("l6 was released: {taken:?}") };
    assert_eq!(taken.token, leases[6].token + 1);

    // The fence of write `i`, and the lease's current token when the fence is stale.
    let fence = |i: usize| -> (Fence, Option<u64>) {
        match i % 10 {
            6 => (leases[6].fence(), Some(taken.token)),
            7 => (Fence::new("l-never", 1), Some(0)),
            8 => (Fence::new("l1", leases[1].token + 5), Some(leases[1].token)),
            9 => (leases[5].fence(), None),
            n => (leases[n].fence(), None),
        }
    };
    let put_key = |i: usize| StorageKey::new(format!("sessions/p{i}.json")).unwrap();
    let delete_key = |j: usize| StorageKey::new(format!("checkpoints/s/c{j}.json")).unwrap();
    // What is there before: the first 10 put keys and the first 8 delete keys.
    for i in 0..10 {
        bounded("put", b.put(&put_key(i), b"before".to_vec())).await.unwrap();
    }
    for j in 0..8 {
        bounded("put", b.put(&delete_key(j), b"before".to_vec())).await.unwrap();
    }
    // Deletes: j % 4 == 0 or 1 live (j 8 and 9: keys that do not exist), 2 stale (l6),
    // 3 never granted.
    let delete_fence = |j: usize| -> (Fence, Option<u64>) {
        match j % 4 {
            2 => (leases[6].fence(), Some(taken.token)),
            3 => (Fence::new("l-never", 1), Some(0)),
            n => (leases[n].fence(), None),
        }
    };

    let meta = |i: usize| {
        let mut meta = RecordMeta::default();
        meta.session = format!("p{i}");
        meta.step = Some(i as u64);
        meta.saved_at_ms = 1_700_000_000_000 + i as u64;
        meta
    };
    let puts = futures_util::future::join_all((0..40).map(|i| {
        let (b, key, meta, (fence, _)) = (&b, put_key(i), meta(i), fence(i));
        async move { b.put_fenced(&key, format!("value {i}").into_bytes(), &meta, &fence).await }
    }));
    let deletes = futures_util::future::join_all((0..10).map(|j| {
        let (b, key, (fence, _)) = (&b, delete_key(j), delete_fence(j));
        async move { b.delete_fenced(&key, &fence).await }
    }));
    let (put_answers, delete_answers) =
        bounded("batch", futures_util::future::join(puts, deletes)).await;

    let refused =
        |answer: Result<(), StateError>, fence: &Fence, current: u64, what: &str| match answer {
            Err(StateError::Fenced { name, token, current: now }) => {
                assert_eq!((name.as_str(), token, now), (fence.name.as_str(), fence.token, current))
            }
            other => panic!("{what}: expected Fenced at {current}, got {other:?}"),
        };
    for (i, answer) in put_answers.into_iter().enumerate() {
        match fence(i) {
            (_, None) => answer.unwrap_or_else(|e| panic!("put {i} under a live fence: {e}")),
            (f, Some(current)) => refused(answer, &f, current, &format!("put {i}")),
        }
    }
    for (j, answer) in delete_answers.into_iter().enumerate() {
        match delete_fence(j) {
            (_, None) => {
                let existed =
                    answer.unwrap_or_else(|e| panic!("delete {j} under a live fence: {e}"));
                assert_eq!(existed, j < 8, "delete {j}: whether its key existed");
            }
            (f, Some(current)) => refused(answer.map(drop), &f, current, &format!("delete {j}")),
        }
    }

    // The rows as they stand: value, step column, writing transaction.
    let admin = admin_client().await;
    let records = format!("\"{}\".mars_state_records", schema.name());
    let rows = admin
        .query(&format!("SELECT key, value, step, xmin::text FROM {records}"), &[])
        .await
        .unwrap();
    let stored: HashMap<String, (Vec<u8>, Option<i64>, String)> =
        rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3)))).collect();
    let mut batch_xids = std::collections::BTreeSet::new();
    for i in 0..40 {
        let key = put_key(i).as_str().to_owned();
        let row = stored.get(&key);
        match (fence(i).1, row) {
            (None, Some((value, step, xid))) => {
                assert_eq!(value, format!("value {i}").as_bytes(), "{key}");
                assert_eq!(*step, Some(i as i64), "{key}: its facts are written with it");
                batch_xids.insert(xid.clone());
            }
            (Some(_), Some((value, step, _))) if i < 10 => {
                assert_eq!((value.as_slice(), *step), (&b"before"[..], None), "{key} refused")
            }
            (Some(_), None) if i >= 10 => {}
            (expected, row) => panic!("{key}: stale fence {expected:?}, row {row:?}"),
        }
    }
    assert_eq!(batch_xids.len(), 1, "the fenced puts did not commit in one batch: {batch_xids:?}");
    for j in 0..10 {
        let key = delete_key(j).as_str().to_owned();
        let row = stored.get(&key);
        match delete_fence(j).1 {
            None => assert!(row.is_none(), "{key} is deleted"),
            Some(_) => assert_eq!(row.map(|r| r.0.as_slice()), Some(&b"before"[..]), "{key}"),
        }
    }
    // 28 puts applied, 3 refused over rows that were there, 4 deletes refused.
    assert_eq!(stored.len(), 28 + 3 + 4, "no other row written: {:?}", stored.keys());
}

/// A read-only open creates and migrates nothing: on a schema that is not there it is
/// refused (`Config`, "no mars-state store") and the schema stays absent; on a store's
/// schema it opens; on a schema of an older version it is refused and the version stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_creates_and_migrates_nothing() {
    let schema = Schema::new();
    let read_only =
        || PostgresStorageBackend::options().schema(schema.name()).read_only(true).pool_size(2);
    let refused = read_only().connect(&test_url()).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    assert!(refused.to_string().contains("no mars-state store"), "{refused}");
    let count = |sql: String| async move {
        tokio::task::spawn_blocking(move || pg_common::admin_query_sync(&sql)).await.unwrap()
    };
    let namespaces =
        format!("SELECT count(*) FROM pg_namespace WHERE nspname = '{}'", schema.name());
    assert_eq!(count(namespaces.clone()).await[0].0, "0", "the read-only open made the schema");

    let options = PostgresStorageBackend::options().schema(schema.name());
    let writer = options.connect(&test_url()).await.unwrap();
    let key = StorageKey::new("sessions/s1.json").unwrap();
    writer.put(&key, b"{}".to_vec()).await.unwrap();
    let reader = read_only().connect(&test_url()).await.unwrap();
    assert_eq!(reader.get(&key).await.unwrap().as_deref(), Some(&b"{}"[..]));
    drop(reader);

    let versions = format!("\"{}\".mars_state_migrations", schema.name());
    pg_common::admin_sql(&format!(
        "DELETE FROM {versions} WHERE version = (SELECT max(version) FROM {versions})"
    ))
    .await;
    let before = count(format!("SELECT count(*) FROM {versions}")).await;
    let refused = read_only().connect(&test_url()).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    assert!(refused.to_string().contains("older"), "{refused}");
    assert_eq!(count(format!("SELECT count(*) FROM {versions}")).await, before, "it migrated");
    drop(writer);
}
