//! Read-only opens beside a running manager: `FileOptions::read_only`,
//! `SqliteOptions::read_only`, `backend::open_read_only` and
//! `StateManagerBuilder::read_only`. A manager holds the store and keeps saving; a
//! read-only open sees every save acknowledged before it (also the ones only in the file
//! backend's write-ahead log), changes no byte and no mtime of any file of the store, and
//! refuses every write with `ErrorKind::ReadOnly`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use mars_state::{
    EncryptionKey, ErrorKind, FileStorageBackend, StateManager, StorageBackend, StorageKey, backend,
};
use serde_json::{Value, json};

/// Every file under `dir`: its bytes and its mtime.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                stack.push(e.path());
                // A directory's own mtime changes when an entry is added or removed in it.
                out.insert(e.path().join("."), (Vec::new(), meta.modified().unwrap()));
            } else {
                out.insert(e.path(), (std::fs::read(e.path()).unwrap(), meta.modified().unwrap()));
            }
        }
    }
    out
}

/// Asserts every write method of `b` is refused with `ErrorKind::ReadOnly`.
async fn every_write_is_refused(b: &dyn StorageBackend) {
    let key = StorageKey::new("sessions/planted.json").unwrap();
    let log = StorageKey::new("metadata/index.log").unwrap();
    let kinds = [
        b.put(&key, b"{}".to_vec()).await.unwrap_err().kind(),
        b.put_record(&key, b"{}".to_vec(), &Default::default()).await.unwrap_err().kind(),
        b.delete(&StorageKey::new("sessions/s0.json").unwrap()).await.unwrap_err().kind(),
        b.append(&log, b"x\n".to_vec()).await.unwrap_err().kind(),
        b.sweep().await.unwrap_err().kind(),
    ];
    assert!(kinds.iter().all(|k| *k == ErrorKind::ReadOnly), "{kinds:?}");
}

/// A manager over `dir` that saves `n` sessions with a checkpoint each (acknowledged),
/// staying open.
async fn writer(dir: &Path, n: usize, key: Option<[u8; 32]>, gzip: bool) -> StateManager {
    let mut b = StateManager::builder(FileStorageBackend::new(dir).unwrap());
    if let Some(k) = key {
        b = b.encryption_key(EncryptionKey::from_bytes(k));
    }
    if gzip {
        b = b.compression(6);
    }
    let m = b.start().await.unwrap();
    for i in 0..n {
        m.save_session(format!("s{i}"), &json!({ "step": i, "v": "first" })).await.unwrap();
        m.create_checkpoint(format!("s{i}"), "main", &json!({ "step": i })).await.unwrap();
        m.save_session(format!("s{i}"), &json!({ "step": i, "v": "second" })).await.unwrap();
    }
    m
}

async fn reader_over(dir: &Path, key: Option<[u8; 32]>) -> StateManager {
    let b = FileStorageBackend::options().read_only(true).open(dir).unwrap();
    let mut builder = StateManager::builder(b).read_only();
    if let Some(k) = key {
        builder = builder.encryption_key(EncryptionKey::from_bytes(k));
    }
    builder.start().await.unwrap()
}

/// The whole check on one file store: open beside the holder, read everything, try every
/// write, and compare the store's files before and after.
async fn beside_a_running_manager(key: Option<[u8; 32]>, gzip: bool) {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(dir.path(), 5, key, gzip).await;
    // Everything acknowledged is still only in the log (it is far below 8 MiB).
    let wal = dir.path().join("metadata/.wal");
    assert!(std::fs::metadata(&wal).unwrap().len() > 0, "the saves are in the write-ahead log");
    let before = snapshot(dir.path());

    let raw = FileStorageBackend::options().read_only(true).open(dir.path()).unwrap();
    assert!(raw.is_read_only());
    every_write_is_refused(&raw).await;
    let r = reader_over(dir.path(), key).await;
    let listed = r.list_sessions().await.unwrap();
    assert_eq!(listed.len(), 5);
    for i in 0..5 {
        let s: Option<Value> = r.load_session(format!("s{i}")).await.unwrap();
        assert_eq!(s, Some(json!({ "step": i, "v": "second" })), "s{i}");
        let cps = r.list_checkpoints(format!("s{i}")).await.unwrap();
        assert_eq!(cps.len(), 1);
        let cp = r.restore_checkpoint(&cps[0].id).await.unwrap().unwrap();
        assert_eq!(cp.data, json!({ "step": i }));
    }
    // Writes through the manager are refused, and nothing changes.
    let e = r.save_session("s0", &json!({ "planted": true })).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
    let e = r.delete_session("s1").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
    let e = r.create_checkpoint("s2", "main", &json!({})).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
    assert!(r.vacuum_storage().await.is_err());
    if key.is_some() {
        let e = r.rotate_key(mars_state::EncryptionKey::from_bytes([9; 32])).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
    }
    r.shutdown().await.unwrap();
    drop(r);
    drop(raw);
    assert_eq!(snapshot(dir.path()), before, "a read-only open changed the store");

    // The holder was not disturbed: it goes on saving, and a new read-only open sees that.
    w.save_session("s0", &json!({ "v": "third" })).await.unwrap();
    let r = reader_over(dir.path(), key).await;
    let s: Option<Value> = r.load_session("s0").await.unwrap();
    assert_eq!(s, Some(json!({ "v": "third" })));
    r.shutdown().await.unwrap();
    w.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_store_is_read_beside_its_holder_and_left_untouched() {
    beside_a_running_manager(None, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzipped_store_is_read_beside_its_holder_and_left_untouched() {
    beside_a_running_manager(None, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_gzipped_store_is_read_beside_its_holder_and_left_untouched() {
    beside_a_running_manager(Some([7; 32]), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_run_while_the_holder_keeps_saving() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(dir.path(), 3, None, false).await;
    let saving = {
        let w = w.clone();
        tokio::spawn(async move {
            for step in 0..200u64 {
                w.save_session("busy", &json!({ "step": step })).await.unwrap();
            }
        })
    };
    // Each open sees at least every save acknowledged before it.
    for _ in 0..5 {
        let acked: Option<Value> = w.load_session("busy").await.unwrap();
        let r = reader_over(dir.path(), None).await;
        let seen: Option<Value> = r.load_session("busy").await.unwrap();
        let step = |v: &Option<Value>| v.as_ref().and_then(|v| v["step"].as_u64());
        assert!(step(&seen) >= step(&acked), "saw {seen:?} after {acked:?} was acknowledged");
        assert!(r.list_sessions().await.unwrap().len() >= 3);
        r.shutdown().await.unwrap();
    }
    saving.await.unwrap();
    w.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_run_while_the_holder_brings_its_files_up_to_date() {
    // States of 256 KiB: the log passes 8 MiB every 32 saves, so the holder writes the
    // record files and starts the log's next generation several times while the readers
    // open and read, writing its frames over the older generation's in place. A reader
    // that took a prefix of an old generation's frames (read before the holder overwrote
    // the rest) would see a session older than one acknowledged before it opened.
    let dir = tempfile::tempdir().unwrap();
    let w = writer(dir.path(), 1, None, false).await;
    let big = "x".repeat(256 << 10);
    let saving = {
        let w = w.clone();
        tokio::spawn(async move {
            for step in 0..120u64 {
                let s = format!("big-{}", step % 4);
                w.save_session(&s, &json!({ "step": step, "pad": big })).await.unwrap();
            }
        })
    };
    let mut opens = 0;
    while !saving.is_finished() {
        let acked: Vec<Option<u64>> = {
            let mut v = Vec::new();
            for i in 0..4 {
                let s: Option<Value> = w.load_session(format!("big-{i}")).await.unwrap();
                v.push(s.and_then(|s| s["step"].as_u64()));
            }
            v
        };
        let r = reader_over(dir.path(), None).await;
        for (i, acked) in acked.iter().enumerate() {
            let s: Option<Value> = r.load_session(format!("big-{i}")).await.unwrap();
            let seen = s.and_then(|s| s["step"].as_u64());
            assert!(seen >= *acked, "big-{i}: saw {seen:?} after {acked:?} was acknowledged");
        }
        r.shutdown().await.unwrap();
        opens += 1;
    }
    saving.await.unwrap();
    assert!(opens > 0);
    w.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_is_ignored_as_a_reader_would() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(dir.path(), 2, None, false).await;
    // A copy of the store as a crash in the middle of a batch would leave it: the log
    // with half a frame after its whole ones, written in place over the preallocated zeros.
    let copy = tempfile::tempdir().unwrap();
    for (path, (bytes, _)) in snapshot(dir.path()) {
        if path.is_dir() {
            continue;
        }
        let to = copy.path().join(path.strip_prefix(dir.path()).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        put_file(&to, bytes);
    }
    w.shutdown().await.unwrap();
    let wal = copy.path().join("metadata/.wal");
    let mut log = std::fs::read(&wal).unwrap();
    let end = common::wal::frames_end(&log);
    let first = common::wal::live_frames(&log)[0];
    let half = log[first.0..first.0 + (first.1 - first.0) / 2].to_vec();
    log[end..end + half.len()].copy_from_slice(&half);
    put_file(&wal, &log);
    let before = snapshot(copy.path());
    let r = reader_over(copy.path(), None).await;
    for i in 0..2 {
        let s: Option<Value> = r.load_session(format!("s{i}")).await.unwrap();
        assert_eq!(s, Some(json!({ "step": i, "v": "second" })));
    }
    r.shutdown().await.unwrap();
    drop(r);
    assert_eq!(snapshot(copy.path()), before);
    assert_eq!(std::fs::read(&wal).unwrap(), log, "the log was changed");
}

#[tokio::test]
async fn a_missing_store_is_an_error_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    assert!(FileStorageBackend::options().read_only(true).open(&missing).is_err());
    assert!(!missing.exists());
    // An empty directory is no store: the read-only manager creates no descriptor in it.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let b = FileStorageBackend::options().read_only(true).open(&empty).unwrap();
    let e = StateManager::builder(b).read_only().start().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_read_only_names_a_file_store_by_path_or_url() {
    let dir = tempfile::tempdir().unwrap();
    let w = writer(dir.path(), 1, None, false).await;
    for url in [dir.path().display().to_string(), format!("file://{}", dir.path().display())] {
        let b = backend::open_read_only(&url).await.unwrap();
        every_write_is_refused(b.as_ref()).await;
        let r = StateManager::builder(b).read_only().start().await.unwrap();
        assert_eq!(r.list_sessions().await.unwrap().len(), 1);
        r.shutdown().await.unwrap();
    }
    assert!(backend::open_read_only("memory:").await.is_err());
    w.shutdown().await.unwrap();
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqlite_store_is_read_beside_its_holder() {
    use mars_state::SqliteStorageBackend;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let w = StateManager::builder(SqliteStorageBackend::open(&path).unwrap())
        .compression(6)
        .start()
        .await
        .unwrap();
    for i in 0..3 {
        w.save_session(format!("s{i}"), &json!({ "step": i })).await.unwrap();
        w.create_checkpoint(format!("s{i}"), "main", &json!({ "cp": i })).await.unwrap();
    }
    let db_before = std::fs::read(&path).unwrap();
    let wal_before = std::fs::read(dir.path().join("state.db-wal")).unwrap();
    let url = format!("sqlite://{}", path.display());
    let b = backend::open_read_only(&url).await.unwrap();
    every_write_is_refused(b.as_ref()).await;
    let r = StateManager::builder(b).read_only().start().await.unwrap();
    for i in 0..3 {
        let s: Option<Value> = r.load_session(format!("s{i}")).await.unwrap();
        assert_eq!(s, Some(json!({ "step": i })));
        assert_eq!(r.list_checkpoints(format!("s{i}")).await.unwrap().len(), 1);
    }
    let e = r.save_session("s0", &json!({})).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    r.shutdown().await.unwrap();
    drop(r);
    assert_eq!(std::fs::read(&path).unwrap(), db_before);
    assert_eq!(std::fs::read(dir.path().join("state.db-wal")).unwrap(), wal_before);
    // The holder goes on.
    w.save_session("s0", &json!({ "step": 99 })).await.unwrap();
    w.shutdown().await.unwrap();
}

/// Writes a whole file, replacing it, as outside damage would (`std::fs::write` is banned
/// crate-wide by clippy.toml).
fn put_file(path: impl AsRef<std::path::Path>, bytes: impl AsRef<[u8]>) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes.as_ref()).unwrap();
}
