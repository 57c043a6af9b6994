//! Encryption at rest through the manager: no plaintext anywhere on disk (records, index,
//! access records), a wrong key or passphrase refused once at start, damaged, swapped and
//! planted records refused, settings that do not match the store refused untouched, and
//! key rotation that keeps every record readable, also when the process is killed midway.
//!
//! The store is on the backend `MARS_STATE_TEST_BACKEND` picks (`tests/common/backend.rs`;
//! a file store by default): records are damaged and read back through that backend, and
//! "no plaintext on disk" looks at every file in the store's directory, whatever the
//! backend keeps there. The tests of `EncryptedFileStorageBackend` are file-backend only.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::backend::{FileWrites, open_backend};
use common::{backend_defaults, file_backend_only, files, on_file_backend, snapshot};
use mars_state::{
    Access, AccessControlLayer, EncryptedFileStorageBackend, EncryptionKey, EncryptionLayer,
    ErrorKind, MemoryStorageBackend, Principal, StateManager, StateManagerBuilder, StorageKey,
};
use serde_json::json;

const MARKER: &str = "TOP-SECRET-MARKER";

fn key(n: u8) -> EncryptionKey {
    EncryptionKey::from_bytes([n; 32])
}

fn builder(dir: &Path, k: u8, gzip: bool) -> StateManagerBuilder {
    let b = StateManager::builder(backend_defaults(dir)).encryption_key(key(k));
    if gzip { b.compression(6) } else { b }
}

fn record_files(dir: &Path) -> Vec<std::path::PathBuf> {
    files(dir).into_keys().filter(|p| p.to_string_lossy().ends_with(".enc")).collect()
}

/// The value at `key` of the closed store named by `dir`, read through its backend.
async fn stored(dir: &Path, key: &str) -> Vec<u8> {
    let key = StorageKey::new(key).unwrap();
    backend_defaults(dir).get(&key).await.unwrap().unwrap_or_else(|| panic!("{key} is missing"))
}

/// Replaces the value at `key` of the closed store named by `dir` through its backend, as
/// damage from outside would.
async fn plant(dir: &Path, key: &str, bytes: &[u8]) {
    let key = StorageKey::new(key).unwrap();
    backend_defaults(dir).put(&key, bytes.to_vec()).await.unwrap();
}

/// Every key of the closed store named by `dir` with its value, read through its backend.
async fn store_contents(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let b = backend_defaults(dir);
    let mut out = std::collections::BTreeMap::new();
    for top in ["sessions", "checkpoints", "metadata", "quarantine"] {
        for meta in b.list(&StorageKey::new(top).unwrap()).await.unwrap() {
            let value = b.get(&meta.key).await.unwrap().unwrap();
            out.insert(meta.key.to_string(), value);
        }
    }
    out
}

async fn no_plaintext(gzip: bool) {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(dir.path(), 1, gzip).start().await.unwrap();
    let alice = m.for_principal(Principal::new("alice").unwrap());
    for i in 0..5 {
        let state = json!({"secret": format!("{MARKER}-{i}"), "pad": MARKER.repeat(50)});
        alice.save_session(format!("s{i}"), &state).await.unwrap();
        alice.create_checkpoint(format!("s{i}"), "branch-with-a-name", &state).await.unwrap();
    }
    assert_eq!(m.load_session("s3").await.unwrap().unwrap()["secret"], format!("{MARKER}-3"));
    // Before and after a clean shutdown (the journal is rewritten then).
    for pass in 0..2 {
        for (path, bytes) in files(dir.path()) {
            for needle in [MARKER.as_bytes(), b"branch-with-a-name", b"alice"] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "pass {pass}: {} contains {:?} in plaintext",
                    path.display(),
                    String::from_utf8_lossy(needle)
                );
            }
        }
        if pass == 0 {
            m.shutdown().await.unwrap();
        }
    }
    if on_file_backend() {
        assert!(record_files(dir.path()).len() >= 10, "records are named .enc");
    }
    // Reopens and reads back.
    let m = builder(dir.path(), 1, gzip).start().await.unwrap();
    assert_eq!(m.load_session("s4").await.unwrap().unwrap()["secret"], format!("{MARKER}-4"));
    assert_eq!(m.list_checkpoints("s2").await.unwrap()[0].branch_id.as_str(), "branch-with-a-name");
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_on_disk() {
    no_plaintext(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_on_disk_compressed() {
    no_plaintext(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_or_passphrase_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(dir.path(), 1, false).start().await.unwrap();
    m.save_session("s", &json!(1)).await.unwrap();
    m.shutdown().await.unwrap();
    let err = builder(dir.path(), 2, false).start().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongKey, "{err}");

    let pdir = tempfile::tempdir().unwrap();
    let m = StateManager::builder(backend_defaults(pdir.path()))
        .encryption_passphrase("correct horse battery staple")
        .start()
        .await
        .unwrap();
    m.save_session("s", &json!(1)).await.unwrap();
    m.shutdown().await.unwrap();
    let open = |p: &'static str| {
        StateManager::builder(backend_defaults(pdir.path())).encryption_passphrase(p).start()
    };
    let err = open("wrong horse").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongKey);
    assert!(!err.to_string().contains("wrong horse"), "the passphrase is not echoed: {err}");
    let m = open("correct horse battery staple").await.unwrap();
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!(1)));
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_do_not_match_the_store_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let m = StateManager::start(backend_defaults(dir.path())).await.unwrap();
    m.save_session("s", &json!(1)).await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);
    // On the file backend every file in the directory; on another, every stored value (its
    // files change when it is merely opened: SQLite makes its -wal and -shm files).
    let contents_before = store_contents(dir.path()).await;
    let before = on_file_backend().then(|| snapshot(dir.path()));
    let err = builder(dir.path(), 1, false).start().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    if let Some(before) = &before {
        assert!(
            common::diff(before, &snapshot(dir.path())).iter().all(|d| d.contains("LOCK")),
            "nothing written"
        );
    }
    assert_eq!(store_contents(dir.path()).await, contents_before, "nothing written");

    let edir = tempfile::tempdir().unwrap();
    let m = builder(edir.path(), 1, false).start().await.unwrap();
    m.save_session("s", &json!(1)).await.unwrap();
    m.shutdown().await.unwrap();
    let err = StateManager::start(backend_defaults(edir.path())).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::WrongKey,
        "an encrypted store does not open without its key: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_swapped_and_planted_records_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(dir.path(), 1, false).start().await.unwrap();
    m.save_session("a", &json!({"who": "a"})).await.unwrap();
    m.save_session("b", &json!({"who": "b"})).await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);
    // Read and replaced through the store's backend while no manager has it open (on the
    // file backend: the record files).
    let a = "sessions/a.json.enc";
    let good_a = stored(dir.path(), a).await;
    let good_b = stored(dir.path(), "sessions/b.json.enc").await;
    let mut flipped = good_a.clone();
    flipped[good_a.len() / 2] ^= 0x01;
    let plaintext =
        br#"{"mars_state":1,"crc32":"00000000","kind":"session","session_id":"a","saved_at":1,"data":{"who":"evil"}}"#;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("flipped byte", flipped),
        ("truncated", good_a[..good_a.len() - 5].to_vec()),
        ("swapped with b", good_b.clone()),
        ("plaintext planted", plaintext.to_vec()),
    ];
    for (name, bytes) in cases {
        plant(dir.path(), a, &bytes).await;
        let m = builder(dir.path(), 1, false).start().await.unwrap();
        let r = m.load_session("a").await;
        assert_eq!(
            r.as_ref().map_err(|e| e.kind()).unwrap_err(),
            ErrorKind::Corrupt,
            "{name}: {r:?}"
        );
        assert_eq!(
            m.load_session("b").await.unwrap(),
            Some(json!({"who": "b"})),
            "{name}: b is unaffected"
        );
        m.shutdown().await.unwrap();
        drop(m);
        let contents = store_contents(dir.path()).await;
        assert!(
            contents.iter().any(|(k, v)| k.starts_with("quarantine/") && *v == bytes),
            "{name}: the damaged bytes are kept in quarantine/"
        );
        assert_eq!(contents[a], bytes, "{name}: the record itself stays in place");
    }
    plant(dir.path(), a, &good_a).await;
}

async fn fill(m: &StateManager, n: usize) {
    for i in 0..n {
        m.save_session(format!("s{i}"), &json!({"i": i, "m": MARKER})).await.unwrap();
        m.create_checkpoint(format!("s{i}"), "main", &json!({"cp": i})).await.unwrap();
    }
}

async fn check_all(m: &StateManager, n: usize) {
    for i in 0..n {
        assert_eq!(
            m.load_session(format!("s{i}")).await.unwrap(),
            Some(json!({"i": i, "m": MARKER})),
            "s{i}"
        );
        let cps = m.list_checkpoints(format!("s{i}")).await.unwrap();
        assert_eq!(m.restore_checkpoint(&cps[0].id).await.unwrap().unwrap().data, json!({"cp": i}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_every_record_readable() {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(dir.path(), 1, true).start().await.unwrap();
    fill(&m, 20).await;
    let rewritten = m.rotate_key(key(2)).await.unwrap();
    assert!(rewritten >= 40, "{rewritten}");
    check_all(&m, 20).await;
    m.shutdown().await.unwrap();
    // Only the new key now.
    let m = builder(dir.path(), 2, true).start().await.unwrap();
    check_all(&m, 20).await;
    m.shutdown().await.unwrap();
    assert_eq!(builder(dir.path(), 1, true).start().await.unwrap_err().kind(), ErrorKind::WrongKey);
}

/// Regression: a rotation cut off before it recorded the new key could not be resumed the
/// documented way (new key, old key as previous): the open said `WrongKey`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_cut_off_before_recording_the_new_key_resumes_the_documented_way() {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(dir.path(), 1, false).start().await.unwrap();
    fill(&m, 5).await;
    m.shutdown().await.unwrap();
    // The state a rotation to key 2 leaves when killed before its first write.
    let m = builder(dir.path(), 2, false).previous_encryption_key(key(1)).start().await.unwrap();
    check_all(&m, 5).await;
    m.finish_key_rotation().await.unwrap();
    m.shutdown().await.unwrap();
    let m = builder(dir.path(), 2, false).start().await.unwrap();
    check_all(&m, 5).await;
    m.shutdown().await.unwrap();
    assert_eq!(
        builder(dir.path(), 1, false).start().await.unwrap_err().kind(),
        ErrorKind::WrongKey
    );
    // A wrong key with a wrong previous key is still refused.
    let err =
        builder(dir.path(), 3, false).previous_encryption_key(key(4)).start().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongKey);
}

const CHILD: &str = "MARS_ROTATION_CHILD";

/// The child: opens the store with key 1 and rotates to key 2 until it is killed.
#[test]
fn rotation_child() {
    let Ok(dir) = std::env::var(CHILD) else { return };
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let m = builder(Path::new(&dir), 1, false).start().await.unwrap();
        println!("rotating");
        m.rotate_key(key(2)).await.unwrap();
        println!("rotated");
        std::thread::sleep(Duration::from_secs(60));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_killed_midway_resumes_and_loses_nothing() {
    let mut killed_midway = 0;
    for (round, delay_ms) in [5u64, 15, 30, 60].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let m = builder(dir.path(), 1, false).start().await.unwrap();
        fill(&m, 60).await;
        m.shutdown().await.unwrap();
        drop(m);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["rotation_child", "--exact", "--nocapture"])
            .env(CHILD, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("rotating") {
            line.clear();
            if std::io::BufRead::read_line(&mut out, &mut line).unwrap() == 0 {
                panic!("child exited before rotating");
            }
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        let finished = rest.contains("rotated");
        killed_midway += usize::from(!finished);
        // Reopen with the new key and the old one as previous: everything reads.
        let backend =
            open_backend(dir.path(), FileWrites::Defaults, Duration::from_secs(2)).unwrap();
        let m = StateManager::builder(backend)
            .encryption_key(key(2))
            .previous_encryption_key(key(1))
            .start()
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        check_all(&m, 60).await;
        m.finish_key_rotation().await.unwrap();
        m.shutdown().await.unwrap();
        let m = builder(dir.path(), 2, false).start().await.unwrap();
        check_all(&m, 60).await;
        m.shutdown().await.unwrap();
    }
    println!(
        "rotation killed midway in {killed_midway} of 4 rounds; every record read back each time"
    );
    assert!(killed_midway > 0, "no round killed the rotation midway; the test proved nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_works_encrypted_too() {
    let m = StateManager::builder(MemoryStorageBackend::new())
        .encryption_passphrase("pw")
        .start()
        .await
        .unwrap();
    m.save_session("s", &json!(1)).await.unwrap();
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!(1)));
    m.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Regressions of issue 10 (defects 3 and 8).
// ---------------------------------------------------------------------------------------

fn principal(name: &str) -> Principal {
    Principal::new(name).unwrap()
}

/// Defect 3: a session with an owner but no state (its first update was rejected by the
/// closure) is not in the index; rotation must still re-encrypt its access record, or the
/// store no longer opens with the new key alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_covers_access_records_of_sessions_without_state() {
    let dir = tempfile::tempdir().unwrap();
    let m = builder(dir.path(), 1, false).start().await.unwrap();
    let alice = m.for_principal(principal("alice"));
    let r = alice
        .transactional_update("s", |_: Option<u64>| Err::<u64, _>(std::io::Error::other("not yet")))
        .await;
    assert_eq!(r.unwrap_err().kind(), ErrorKind::UpdateRejected);
    alice.grant_access("s", principal("bob"), Access::Read).await.unwrap();
    m.save_session("other", &json!({"x": 1})).await.unwrap();
    m.rotate_key(key(2)).await.unwrap();
    m.shutdown().await.unwrap();

    let m = builder(dir.path(), 2, false)
        .start()
        .await
        .unwrap_or_else(|e| panic!("reopen with the new key: {e}"));
    let record = m.access_record("s").await.unwrap().expect("alice still owns s");
    assert_eq!(record.owner, principal("alice"));
    assert_eq!(record.grants.get(&principal("bob")), Some(&Access::Read));
    let carol = m.for_principal(principal("carol"));
    assert_eq!(carol.save_session("s", &1).await.unwrap_err().kind(), ErrorKind::AccessDenied);
    m.for_principal(principal("alice")).save_session("s", &json!(2)).await.unwrap();
    assert_eq!(m.load_session("other").await.unwrap(), Some(json!({"x": 1})));
    m.shutdown().await.unwrap();
}

/// Defect 3: one unreadable access record does not make the store unopenable; its session
/// is left to administrators (fail closed), with or without a state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_access_record_leaves_its_session_to_administrators() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        builder(dir.path(), 1, false)
            .access_control(AccessControlLayer::new().admin(principal("ops")))
            .start()
    };
    let m = open().await.unwrap();
    let alice = m.for_principal(principal("alice"));
    alice.save_session("damaged", &json!({"a": 1})).await.unwrap();
    alice.save_session("fine", &json!({"f": 1})).await.unwrap();
    // Owned, no state: its first update was rejected.
    let r = alice
        .transactional_update("empty", |_: Option<u64>| Err::<u64, _>(std::io::Error::other("no")))
        .await;
    assert_eq!(r.unwrap_err().kind(), ErrorKind::UpdateRejected);
    m.shutdown().await.unwrap();
    drop(m);
    for sid in ["damaged", "empty"] {
        let key = format!("metadata/access/{sid}.json");
        let mut bytes = stored(dir.path(), &key).await;
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        plant(dir.path(), &key, &bytes).await;
    }

    let m = open()
        .await
        .unwrap_or_else(|e| panic!("one damaged access record made the store unopenable: {e}"));
    let alice = m.for_principal(principal("alice"));
    assert_eq!(alice.load_session("fine").await.unwrap(), Some(json!({"f": 1})));
    alice.save_session("fine", &json!({"f": 2})).await.unwrap();
    for sid in ["damaged", "empty"] {
        for who in ["alice", "mallory"] {
            let h = m.for_principal(principal(who));
            assert_eq!(
                h.load_session(sid).await.unwrap_err().kind(),
                ErrorKind::AccessDenied,
                "{who} loads {sid}"
            );
            assert_eq!(
                h.save_session(sid, &0).await.unwrap_err().kind(),
                ErrorKind::AccessDenied,
                "{who} saves {sid}"
            );
        }
    }
    let ops = m.for_principal(principal("ops"));
    assert_eq!(ops.load_session("damaged").await.unwrap(), Some(json!({"a": 1})));
    m.shutdown().await.unwrap();
}

/// Defect 8: the documented `EncryptedFileStorageBackend` handed to the builder gives the
/// same encrypted store as `FileStorageBackend` + `encryption_key`, rotation included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_file_backend_is_a_fully_encrypted_store() {
    if !file_backend_only(
        "encrypted_file_backend_is_a_fully_encrypted_store",
        "tests EncryptedFileStorageBackend, a file store",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend = EncryptedFileStorageBackend::open_path(dir.path(), key(1)).await.unwrap();
    let m = StateManager::builder(backend).start().await.unwrap();
    fill(&m, 3).await;
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("metadata/store.json")).unwrap())
            .unwrap();
    assert_eq!(meta["encrypted"], true, "store.json: {meta}");
    assert!(m.rotate_key(key(2)).await.unwrap() >= 6);
    check_all(&m, 3).await;
    m.shutdown().await.unwrap();
    assert!(dir.path().join("sessions/s0.json.enc").exists(), "records are named .enc");

    // Reopened the other way, with the new key.
    let m = builder(dir.path(), 2, false).start().await.unwrap();
    check_all(&m, 3).await;
    m.save_session("s3", &json!({"i": 3, "m": MARKER})).await.unwrap();
    m.shutdown().await.unwrap();
    // And the documented way again.
    let backend = EncryptedFileStorageBackend::open_path(dir.path(), key(2)).await.unwrap();
    let m = StateManager::builder(backend).start().await.unwrap();
    check_all(&m, 3).await;
    assert_eq!(m.load_session("s3").await.unwrap(), Some(json!({"i": 3, "m": MARKER})));
    m.finish_key_rotation().await.unwrap();
    m.shutdown().await.unwrap();
    assert_eq!(
        builder(dir.path(), 1, false).start().await.unwrap_err().kind(),
        ErrorKind::WrongKey
    );
}

/// Defect 8: an `EncryptedFileStorageBackend` given an `encryption_key` as well would be
/// encrypted twice; that is refused, touching nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_file_backend_refuses_a_second_key() {
    if !file_backend_only(
        "encrypted_file_backend_refuses_a_second_key",
        "tests EncryptedFileStorageBackend, a file store",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend = EncryptedFileStorageBackend::open_path(dir.path(), key(1)).await.unwrap();
    let err = StateManager::builder(backend).encryption_key(key(2)).start().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("encrypt"), "{err}");
    assert!(!dir.path().join("metadata/store.json").exists(), "nothing was created");
}

/// An encryption layer put over a store created without encryption (by
/// `EncryptionLayer::wrap`, or `EncryptedFileStorageBackend` on a file store) is refused
/// before it writes its key metadata: a store with `metadata/store.json` and no
/// `metadata/crypto.json` would otherwise be read as an encrypted store of an earlier
/// version, its plaintext records unreadable and new ones sealed among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encryption_layer_over_a_plaintext_store_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let m = StateManager::start(backend_defaults(dir.path())).await.unwrap();
    m.save_session("s", &json!({"m": MARKER})).await.unwrap();
    m.shutdown().await.unwrap();
    drop(m);
    let contents_before = store_contents(dir.path()).await;

    let err = EncryptionLayer::new(key(1)).wrap(backend_defaults(dir.path())).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("without encryption"), "{err}");
    if on_file_backend() {
        let err = EncryptedFileStorageBackend::open_path(dir.path(), key(1)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    }
    assert_eq!(store_contents(dir.path()).await, contents_before, "nothing written");

    // Still the plaintext store it was.
    let m = StateManager::start(backend_defaults(dir.path())).await.unwrap();
    assert_eq!(m.load_session("s").await.unwrap(), Some(json!({"m": MARKER})));
    m.shutdown().await.unwrap();
}

/// `EncryptionLayer::wrap` over one of the crate's backends other than the file backend
/// (here SQLite) makes the same encrypted store as the builder's `encryption_key`: the
/// manager recognises the layer, so rotation works and either way opens the store.
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encryption_layer_over_sqlite_is_an_encrypted_store() {
    use mars_state::SqliteStorageBackend;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let backend = EncryptionLayer::new(key(1))
        .wrap(SqliteStorageBackend::open(&path).unwrap())
        .await
        .unwrap();
    let m = StateManager::start(backend).await.unwrap();
    fill(&m, 3).await;
    assert!(m.rotate_key(key(2)).await.unwrap() >= 3, "rotation re-encrypted the records");
    check_all(&m, 3).await;
    m.shutdown().await.unwrap();
    drop(m);

    let reopen =
        || SqliteStorageBackend::options().lock_wait(Duration::from_secs(5)).open(&path).unwrap();
    let m = StateManager::builder(reopen()).encryption_key(key(2)).start().await.unwrap();
    check_all(&m, 3).await;
    m.shutdown().await.unwrap();
    drop(m);
    let err = StateManager::start(reopen()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongKey, "{err}");
}
