//! `copy_store` and `backend::open`:
//!
//! - `copy_between_backends_keeps_everything_{plain,gzip,encrypted}`: a store with
//!   sessions, checkpoints on two branches, a paused session and an access grant, copied
//!   from files to memory (and SQLite, with the feature) and back, opens with every state,
//!   checkpoint, status and grant the source had.
//! - `interrupted_copy_resumes_without_duplicates`: a copy cut off midway (the destination
//!   refuses puts after N) leaves a marker a manager refuses; run again it finishes,
//!   skipping what was there, and the result equals a copy made in one go.
//! - `copy_into_another_store_is_refused`: a non-empty destination that is not an
//!   interrupted copy is refused with `Config` and left unchanged.
//! - `open_names_every_backend`: bare paths, `file://`, `sqlite://` and `memory:` URLs open
//!   the right store; malformed URLs and unknown schemes are `Config` errors that never
//!   echo a password.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use mars_state::{
    Access, AccessControlLayer, CheckpointId, EncryptionKey, ErrorKind, FileStorageBackend,
    MemoryStorageBackend, ObjectMeta, Principal, StateManager, StateManagerBuilder, StorageBackend,
    StorageKey, SweepReport, backend, copy_store,
};
use serde_json::{Value, json};

fn p(s: &str) -> Principal {
    Principal::new(s).unwrap()
}

const FOLDERS: [&str; 4] = ["sessions", "checkpoints", "metadata", "quarantine"];

/// Every key and value of a store, but the file backend's lock file.
async fn dump(b: &dyn StorageBackend) -> BTreeMap<String, Vec<u8>> {
    let mut all = BTreeMap::new();
    for f in FOLDERS {
        for ObjectMeta { key, .. } in b.list(&StorageKey::new(f).unwrap()).await.unwrap() {
            if key.as_str() == "metadata/LOCK" {
                continue;
            }
            all.insert(key.to_string(), b.get(&key).await.unwrap().unwrap());
        }
    }
    all
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Plain,
    Gzip,
    Encrypted,
}

fn builder(b: impl StorageBackend, mode: Mode) -> StateManagerBuilder {
    let builder =
        StateManager::builder(b).access_control(AccessControlLayer::new().admin(p("root")));
    match mode {
        Mode::Plain => builder,
        Mode::Gzip => builder.compression(6),
        Mode::Encrypted => builder.encryption_key(EncryptionKey::from_bytes([9; 32])),
    }
}

/// Fills a store as alice; returns the checkpoint ids it made (two per session, on two
/// branches, the second from the paused session's pause).
async fn populate(m: &StateManager) -> Vec<CheckpointId> {
    let m = m.for_principal(p("alice"));
    let mut cids = Vec::new();
    for i in 0..5u64 {
        let sid = format!("s{i}");
        let first = json!({ "step": i, "pad": "x".repeat(100 * i as usize) });
        m.save_session(&sid, &first).await.unwrap();
        cids.push(m.create_checkpoint(&sid, "main", &first).await.unwrap());
        let second = json!({ "step": i + 10 });
        m.save_session(&sid, &second).await.unwrap();
        cids.push(m.create_checkpoint(&sid, "alt", &second).await.unwrap());
    }
    m.pause_session("s1", &json!({ "step": 11 }), "waiting for a human").await.unwrap();
    m.grant_access("s2", p("bob"), Access::Read).await.unwrap();
    cids
}

async fn check(m: &StateManager, cids: &[CheckpointId]) {
    let m = m.for_principal(p("alice"));
    for i in 0..5u64 {
        let sid = format!("s{i}");
        let state: Option<Value> = m.load_session(&sid).await.unwrap();
        assert_eq!(state, Some(json!({ "step": i + 10 })), "{sid}");
        let listed = m.list_checkpoints(&sid).await.unwrap();
        let expected = if i == 1 { 3 } else { 2 };
        assert_eq!(listed.len(), expected, "{sid}: {listed:?}");
    }
    for (n, cid) in cids.iter().enumerate() {
        let (i, second) = ((n / 2) as u64, n % 2 == 1);
        let restored = m.restore_checkpoint(cid).await.unwrap().expect("checkpoint copied");
        assert_eq!(restored.session_id.as_str(), format!("s{i}"));
        assert_eq!(restored.branch_id.as_str(), if second { "alt" } else { "main" });
        let step = if second { i + 10 } else { i };
        assert_eq!(restored.data["step"], json!(step), "{cid}");
    }
    let sessions = m.list_sessions().await.unwrap();
    let s1 = sessions.iter().find(|s| s.session_id.as_str() == "s1").unwrap();
    assert_eq!(s1.status, mars_state::SessionStatus::Paused);
    let record = m.access_record("s2").await.unwrap().unwrap();
    assert_eq!(record.owner, p("alice"));
    assert_eq!(record.grants.get(&p("bob")), Some(&Access::Read), "{record:?}");
    let denied = m.for_principal(p("mallory")).load_session("s2").await;
    assert_eq!(denied.unwrap_err().kind(), ErrorKind::AccessDenied);
}

async fn copy_between_backends_keeps_everything(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(FileStorageBackend::new(dir.path()).unwrap(), mode).start().await.unwrap();
    let cids = populate(&m).await;
    m.shutdown().await.unwrap();
    drop(m);

    let source = FileStorageBackend::new(dir.path()).unwrap();
    let before = dump(&source).await;
    let memory = MemoryStorageBackend::new();
    let report = copy_store(&source, &memory).await.unwrap();
    assert_eq!(report.copied, before.len(), "{report:?}");
    assert_eq!(dump(&memory).await, before, "the copy differs from the source");
    assert_eq!(dump(&source).await, before, "the source changed");
    drop(source);

    // Through SQLite when built with it, and back to files.
    #[cfg(feature = "sqlite")]
    let memory = {
        let db = tempfile::tempdir().unwrap();
        let sqlite = mars_state::SqliteStorageBackend::open(db.path().join("s.db")).unwrap();
        copy_store(&memory, &sqlite).await.unwrap();
        let back = MemoryStorageBackend::new();
        copy_store(&sqlite, &back).await.unwrap();
        back
    };
    let dir2 = tempfile::tempdir().unwrap();
    let files = FileStorageBackend::new(dir2.path()).unwrap();
    copy_store(&memory, &files).await.unwrap();
    assert_eq!(dump(&files).await, before, "the round trip lost or changed keys");

    let m = builder(files, mode).start().await.unwrap();
    check(&m, &cids).await;
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn copy_between_backends_keeps_everything_plain() {
    copy_between_backends_keeps_everything(Mode::Plain).await;
}

#[tokio::test]
async fn copy_between_backends_keeps_everything_gzip() {
    copy_between_backends_keeps_everything(Mode::Gzip).await;
}

#[tokio::test]
async fn copy_between_backends_keeps_everything_encrypted() {
    copy_between_backends_keeps_everything(Mode::Encrypted).await;
}

/// A destination that accepts `allowed` puts, then fails every put.
#[derive(Debug)]
struct Cutoff {
    inner: MemoryStorageBackend,
    allowed: usize,
    puts: AtomicUsize,
}

#[async_trait]
impl StorageBackend for Cutoff {
    async fn get(&self, key: &StorageKey) -> mars_state::Result<Option<Vec<u8>>> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &StorageKey, value: Vec<u8>) -> mars_state::Result<()> {
        if self.puts.fetch_add(1, Ordering::SeqCst) >= self.allowed {
            return Err(mars_state::StateError::Unavailable { reason: "cut off".into() });
        }
        self.inner.put(key, value).await
    }
    async fn delete(&self, key: &StorageKey) -> mars_state::Result<bool> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &StorageKey) -> mars_state::Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn append(&self, key: &StorageKey, bytes: Vec<u8>) -> mars_state::Result<()> {
        self.inner.append(key, bytes).await
    }
    async fn sweep(&self) -> mars_state::Result<SweepReport> {
        self.inner.sweep().await
    }
}

#[tokio::test]
async fn interrupted_copy_resumes_without_duplicates() {
    let source = MemoryStorageBackend::new();
    let m = builder(source.clone(), Mode::Plain).start().await.unwrap();
    let cids = populate(&m).await;
    m.shutdown().await.unwrap();
    drop(m);
    let before = dump(&source).await;
    assert!(before.len() > 12, "too small a store to cut: {}", before.len());

    let dest = Arc::new(Cutoff {
        inner: MemoryStorageBackend::new(),
        allowed: 8,
        puts: AtomicUsize::new(0),
    });
    let err = copy_store(&source, dest.as_ref()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let partial = dump(&dest.inner).await;
    assert!(partial.contains_key("metadata/copying"), "no marker: {:?}", partial.keys());
    assert!(partial.len() < before.len(), "the cut did not cut");

    // A manager refuses the half copy.
    let refused = StateManager::start(dest.inner.clone()).await.map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    assert!(refused.to_string().contains("copy"), "{refused}");
    // A reader too (read-only, it would show a store with records missing as if whole),
    // and refusing it wrote nothing.
    let refused = StateManager::builder(dest.inner.clone()).read_only().start().await;
    let refused = refused.map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    assert!(refused.to_string().contains("copy"), "{refused}");
    assert_eq!(dump(&dest.inner).await, partial, "refusing the half copy changed it");

    // Nor can the half copy be the source of another copy (it would lose its marker there
    // and open as a whole store); the would-be destination is left as it was.
    let onward = MemoryStorageBackend::new();
    let err = copy_store(&dest.inner, &onward).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(dump(&onward).await.is_empty(), "a refused copy wrote to its destination");

    // A source key written by the first run and since removed from the source is removed.
    dest.inner.put(&StorageKey::new("sessions/gone.json").unwrap(), b"{}".to_vec()).await.unwrap();
    let resumed = Cutoff { inner: dest.inner.clone(), allowed: usize::MAX, puts: 0.into() };
    let report = copy_store(&source, &resumed).await.unwrap();
    assert!(report.already_there > 0, "nothing was skipped: {report:?}");
    assert_eq!(report.removed, 1, "{report:?}");
    assert_eq!(report.copied + report.already_there, before.len(), "{report:?}");
    assert_eq!(dump(&dest.inner).await, before);

    let m = builder(dest.inner.clone(), Mode::Plain).start().await.unwrap();
    check(&m, &cids).await;
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn copy_into_another_store_is_refused() {
    let (a, b) = (MemoryStorageBackend::new(), MemoryStorageBackend::new());
    for (store, n) in [(&a, 1), (&b, 2)] {
        let m = StateManager::start(store.clone()).await.unwrap();
        m.save_session("s", &json!({ "n": n })).await.unwrap();
        m.shutdown().await.unwrap();
    }
    let before = dump(&b).await;
    let err = copy_store(&a, &b).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("not empty"), "{err}");
    assert_eq!(dump(&b).await, before, "a refused copy changed the destination");
}

#[tokio::test]
async fn open_names_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a b");
    let saved = |url: String| async move {
        let m = StateManager::builder(backend::open(&url).await.unwrap()).start().await.unwrap();
        m.save_session("s", &json!({ "url": url })).await.unwrap();
        m.shutdown().await.unwrap();
    };
    saved(path.display().to_string()).await;
    let escaped = path.display().to_string().replace(' ', "%20");
    // The same directory through a file URL: the save is there.
    let m = StateManager::builder(backend::open(&format!("file://{escaped}")).await.unwrap())
        .start()
        .await
        .unwrap();
    let state: Option<Value> = m.load_session("s").await.unwrap();
    assert_eq!(state, Some(json!({ "url": path.display().to_string() })));
    m.shutdown().await.unwrap();
    drop(m);
    assert!(path.join("sessions").is_dir(), "the file store is not where the path says");

    let memory = backend::open("memory:").await.unwrap();
    let m = StateManager::builder(memory).start().await.unwrap();
    m.save_session("s", &json!(1)).await.unwrap();
    m.shutdown().await.unwrap();

    #[cfg(feature = "sqlite")]
    {
        let db = dir.path().join("s.db");
        saved(format!("sqlite://{}", db.display())).await;
        assert!(db.is_file(), "no database at {}", db.display());
    }
    #[cfg(not(feature = "sqlite"))]
    {
        let err = backend::open("sqlite:///tmp/x.db").await.map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("feature `sqlite`"), "{err}");
    }

    for bad in ["", "ftp://host/x", "memory:/x", "file:///a%zz", "file:///a?x=1", "s3://b/k"] {
        let err = backend::open(bad).await.map(|_| ()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{bad:?}: {err}");
    }
    let err = backend::open("nosuch://app:hunter2@db/x").await.map(|_| ()).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "the password leaked: {err}");
}
