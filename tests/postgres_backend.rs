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
//! - `non_durable_database_is_refused`: a database of its own with `ALTER DATABASE … SET
//!   synchronous_commit = off` fails the connect with `Config`; `best_effort()` connects.
//! - `terminated_connections_during_saves`: `pg_terminate_backend` of the backend's
//!   connections every 15 ms while tasks put and append: every call returns `Ok` or a typed
//!   error (`Unavailable` or `Timeout`); afterwards every acknowledged put is there, no put
//!   answered `Unavailable` is, no append is there twice, and every acknowledged append is
//!   there unless an append reported that its log lost a tail.
//! - `sigkill_client_while_saving`: a child process saves and checkpoints in a loop,
//!   printing an ack after each `Ok`, and is SIGKILLed at a random moment, 50 rounds
//!   (`MARS_PG_CLIENT_ROUNDS`); after each kill every acked write is there, byte for byte,
//!   nothing is corrupt, and the index agrees with the rows (`common::oracle`, counts
//!   printed).
//! - `crash_private_cluster`: the same child, but a private cluster (`initdb`, its own port)
//!   is stopped with `pg_ctl stop -m immediate` under it; after a restart every acked write
//!   is there, 20 rounds (`MARS_PG_CRASH_ROUNDS`).

mod common;
mod pg_common;

use std::time::Duration;

use mars_state::middleware::crypto::EncryptionLayer;
use mars_state::{
    EncryptionKey, ErrorKind, PostgresStorageBackend, StateManager, StorageBackend, StorageKey,
};
use pg_common::{Schema, bounded, test_url};

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
    let key = StorageKey::new("metadata/bytes.log").unwrap();
    let every: Vec<u8> = (0..=255u8).collect();
    bounded("append", b.append(&key, every.clone())).await.unwrap();
    bounded("append", b.append(&key, vec![0, 0xff, 0xfe, 0])).await.unwrap();
    let mut want = every;
    want.extend([0, 0xff, 0xfe, 0]);
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(want));
    let listed = bounded("list", b.list(&StorageKey::new("metadata").unwrap())).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, 260, "the size of an appended value is not its byte count");
    assert!(bounded("delete", b.delete(&key)).await.unwrap());
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), None);
    bounded("append", b.append(&key, b"new".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(b"new".to_vec()));
    for i in 0..100u8 {
        bounded("append", b.append(&key, vec![i])).await.unwrap();
    }
    let got = bounded("get", b.get(&key)).await.unwrap().unwrap();
    assert_eq!(got.len(), 103);
    assert_eq!(&got[3..], (0..100u8).collect::<Vec<_>>().as_slice(), "appends out of order");
    bounded("put", b.put(&key, b"compacted".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&key)).await.unwrap(), Some(b"compacted".to_vec()));
    let listed = bounded("list", b.list(&StorageKey::new("metadata").unwrap())).await.unwrap();
    assert_eq!(listed[0].size, 9);
    // An append to a key of another class concatenates in place.
    let rec = StorageKey::new("sessions/x.json").unwrap();
    bounded("append", b.append(&rec, b"ab".to_vec())).await.unwrap();
    bounded("append", b.append(&rec, b"cd".to_vec())).await.unwrap();
    assert_eq!(bounded("get", b.get(&rec)).await.unwrap(), Some(b"abcd".to_vec()));
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
    assert_eq!(rows, vec![("1".to_owned(), "1".to_owned())], "each version exactly once");
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
