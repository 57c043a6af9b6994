//! `StateManager::verify_store` on stores with planted damage: a flipped byte, a cut
//! record, a garbage record, a record sealed under another key; on file and SQLite stores,
//! plain, gzipped and encrypted. Every damaged key is reported with what it holds, nothing
//! healthy is, and verify writes nothing (no quarantine copy).

use std::sync::Arc;

use mars_state::{
    EncryptionKey, FileStorageBackend, RecordKind, StateManager, StorageBackend, StorageKey,
};
use serde_json::json;

/// Fills a store: three sessions with two checkpoints each. Returns the checkpoint ids of s1.
async fn fill(b: Arc<dyn StorageBackend>, gzip: bool, key: Option<[u8; 32]>) -> Vec<String> {
    let mut builder = StateManager::builder(b);
    if gzip {
        builder = builder.compression(6);
    }
    if let Some(k) = key {
        builder = builder.encryption_key(EncryptionKey::from_bytes(k));
    }
    let m = builder.start().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let s = format!("s{i}");
        m.save_session(&s, &json!({ "step": i, "notes": "x".repeat(200) })).await.unwrap();
        for c in 0..2 {
            let id = m.create_checkpoint(&s, "main", &json!({ "c": c })).await.unwrap();
            if i == 1 {
                ids.push(id.to_string());
            }
        }
    }
    m.shutdown().await.unwrap();
    ids
}

async fn verify_read_only(
    b: Arc<dyn StorageBackend>,
    key: Option<[u8; 32]>,
) -> mars_state::VerifyReport {
    let mut builder = StateManager::builder(b).read_only();
    if let Some(k) = key {
        builder = builder.encryption_key(EncryptionKey::from_bytes(k));
    }
    let m = builder.start().await.unwrap();
    let mut calls = Vec::new();
    let report = m.verify_store(|done, total| calls.push((done, total))).await.unwrap();
    let total = calls.last().map(|c| c.1).unwrap();
    assert_eq!(calls.len() as u64, total, "progress is called once per key");
    assert!(calls.iter().enumerate().all(|(i, c)| c.0 == i as u64 + 1));
    m.shutdown().await.unwrap();
    report
}

/// Plants the damage through the raw backend and checks the report.
async fn planted(open: impl Fn() -> Arc<dyn StorageBackend>, gzip: bool, key: Option<[u8; 32]>) {
    let cps = fill(open(), gzip, key).await;
    let ext = match (gzip, key.is_some()) {
        (false, false) => ".json",
        (true, false) => ".json.gz",
        (false, true) => ".json.enc",
        (true, true) => ".json.gz.enc",
    };
    // Healthy first.
    let clean = verify_read_only(open(), key).await;
    assert!(clean.is_healthy(), "{:?}", clean.damaged);
    assert!(clean.records_checked >= 10, "{clean:?}");
    assert!(clean.bytes_checked > 0);

    let raw = open();
    let k = |s: String| StorageKey::new(s).unwrap();
    // A flipped byte in the middle of s0's record.
    let s0 = k(format!("sessions/s0{ext}"));
    let mut bytes = raw.get(&s0).await.unwrap().unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    raw.put(&s0, bytes).await.unwrap();
    // A checkpoint of s1 cut in half.
    let cp = k(format!("checkpoints/s1/{}{ext}", cps[0]));
    let bytes = raw.get(&cp).await.unwrap().unwrap();
    raw.put(&cp, bytes[..bytes.len() / 2].to_vec()).await.unwrap();
    // Garbage under a valid record name.
    let junk = k(format!("sessions/junk{ext}"));
    raw.put(&junk, b"not a record at all".to_vec()).await.unwrap();
    drop(raw);

    let report = verify_read_only(open(), key).await;
    let mut found: Vec<(String, RecordKind)> =
        report.damaged.iter().map(|d| (d.key.clone(), d.what.clone())).collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected = vec![
        (s0.to_string(), RecordKind::Session { session: "s0".into() }),
        (
            cp.to_string(),
            RecordKind::Checkpoint { session: "s1".into(), checkpoint: cps[0].clone() },
        ),
        (junk.to_string(), RecordKind::Session { session: "junk".into() }),
    ];
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(found, expected, "{:#?}", report.damaged);
    assert!(report.damaged.iter().all(|d| !d.problem.is_empty()));
    // Verify wrote no quarantine copy.
    assert_eq!(report.quarantine_copies, 0);
    let raw = open();
    assert!(raw.list(&k("quarantine".into())).await.unwrap().is_empty());
}

fn file_opener(dir: &std::path::Path) -> impl Fn() -> Arc<dyn StorageBackend> + use<> {
    let dir = dir.to_path_buf();
    move || Arc::new(FileStorageBackend::new(&dir).unwrap()) as Arc<dyn StorageBackend>
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_damage_in_a_plain_file_store() {
    let dir = tempfile::tempdir().unwrap();
    planted(file_opener(dir.path()), false, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_damage_in_a_gzipped_file_store() {
    let dir = tempfile::tempdir().unwrap();
    planted(file_opener(dir.path()), true, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_damage_in_an_encrypted_file_store() {
    let dir = tempfile::tempdir().unwrap();
    planted(file_opener(dir.path()), true, Some([3; 32])).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_damage_in_an_sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    planted(
        move || {
            Arc::new(mars_state::SqliteStorageBackend::open(&path).unwrap())
                as Arc<dyn StorageBackend>
        },
        true,
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_sealed_under_another_key_is_reported() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    fill(file_opener(a.path())(), false, Some([1; 32])).await;
    fill(file_opener(b.path())(), false, Some([2; 32])).await;
    // s2's record of store b, sealed under key 2, over s2's record of store a.
    let name = "sessions/s2.json.enc";
    std::fs::copy(b.path().join(name), a.path().join(name)).unwrap();
    let report = verify_read_only(file_opener(a.path())(), Some([1; 32])).await;
    assert_eq!(report.damaged.len(), 1, "{:#?}", report.damaged);
    assert_eq!(report.damaged[0].key, name);
    assert_eq!(report.damaged[0].what, RecordKind::Session { session: "s2".into() });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_on_a_running_manager_quarantines_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = StateManager::start(FileStorageBackend::new(dir.path()).unwrap()).await.unwrap();
    m.save_session("s0", &json!({ "a": 1 })).await.unwrap();
    m.save_session("s1", &json!({ "a": 2 })).await.unwrap();
    m.shutdown().await.unwrap();
    let s1 = dir.path().join("sessions/s1.json");
    let mut bytes = std::fs::read(&s1).unwrap();
    bytes[40] ^= 1;
    put_file(&s1, bytes);
    let m = StateManager::start(FileStorageBackend::new(dir.path()).unwrap()).await.unwrap();
    let report = m.verify_store(|_, _| {}).await.unwrap();
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].what.to_string(), "session record of s1");
    m.shutdown().await.unwrap();
    assert_eq!(std::fs::read_dir(dir.path().join("quarantine")).unwrap().count(), 0);
}

/// Writes a whole file, replacing it, as outside damage would (`std::fs::write` is banned
/// crate-wide by clippy.toml).
fn put_file(path: impl AsRef<std::path::Path>, bytes: impl AsRef<[u8]>) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes.as_ref()).unwrap();
}
