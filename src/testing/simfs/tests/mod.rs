//! Tests of the file backend over [`SimFs`]: the helpers every test here uses, the
//! power-loss oracle (`oracle.rs`), recovery of a torn journal, faults injected at every
//! step of a save, a delete and a mkdir, and checks of the simulator itself. They call the
//! file backend, the manager and the index journal's replay.

mod oracle;

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::*;
use crate::store::index::Index;
use crate::{CheckpointId, ErrorKind, FileStorageBackend, StateError, StateManager};

/// A simulated file system and the store root in it. The root is a real (empty)
/// directory too, because `FileStorageBackend::with_fs` checks `root.exists()` and
/// would otherwise create it with `std::fs`, outside the seam.
struct Bed {
    _dir: tempfile::TempDir,
    root: PathBuf,
    fs: SimFs,
}

impl Bed {
    fn new() -> Bed {
        let dir = tempfile::Builder::new().prefix("simfs-root").tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let fs = SimFs::new(&root);
        Bed { _dir: dir, root, fs }
    }
}

/// A manager over `fs` writing records directly (the fault tests below count the
/// calls of that protocol).
async fn open(fs: &SimFs, root: &Path, gzip: bool) -> crate::Result<StateManager> {
    open_mode(fs, root, gzip, false).await
}

/// The write-ahead log's preallocated size in these tests, and where it is brought into
/// the record files: small, so that the oracle's workload crosses several generations of
/// the log (each written over the one before, in place) and some batches grow the file
/// past its preallocated part.
const LOG_PREALLOC: u64 = 750;
/// A new log's zero-filled part in these tests: batches fill it ahead (doubling) up to
/// [`LOG_PREALLOC`], then grow it with their frames.
const LOG_PREALLOC_FIRST: u64 = 200;
const LOG_MATERIALIZE_AT: u64 = 700;

/// A manager over `fs`, with or without the write-ahead log.
async fn open_mode(fs: &SimFs, root: &Path, gzip: bool, log: bool) -> crate::Result<StateManager> {
    open_log(fs, root, gzip, log, false).await
}

/// [`open_mode`], and with `broken_reuse_salt` a log that never changes its salt.
async fn open_log(
    fs: &SimFs,
    root: &Path,
    gzip: bool,
    log: bool,
    broken_reuse_salt: bool,
) -> crate::Result<StateManager> {
    let backend = if log {
        FileStorageBackend::with_fs_log_sizes(
            root,
            Arc::new(fs.clone()),
            (LOG_PREALLOC_FIRST, LOG_PREALLOC),
            LOG_MATERIALIZE_AT,
            broken_reuse_salt,
        )?
    } else {
        FileStorageBackend::with_fs(root, Arc::new(fs.clone()), false)?
    };
    let builder = StateManager::builder(backend);
    let builder = if gzip { builder.compression(6) } else { builder };
    builder.start().await
}

/// Loads `sid` through a fresh manager over `fs` (session actors cache what they saved).
async fn load_fresh(fs: &SimFs, root: &Path, sid: &str) -> Option<Value> {
    let m = open(fs, root, false).await.unwrap();
    let v = m.load_session(sid).await.unwrap();
    m.shutdown().await.unwrap();
    v
}

fn payload(sid: &str, seq: u64) -> Value {
    json!({"sid": sid, "seq": seq, "pad": "x".repeat((seq * 37 % 151) as usize)})
}

fn seq_of(v: Option<&Value>) -> Option<u64> {
    v.and_then(|v| v["seq"].as_u64())
}

// ---------------------------------------------------------------------------------
// Recovery of a torn journal tail
// ---------------------------------------------------------------------------------

/// A torn last journal line is allowed (the journal is never fsynced), and replay skips
/// it; but recovery compacts the journal only if the records disagree with the index.
/// When they agree (the torn line was a save of a same-sized state, or a delete that
/// recovery itself finishes), the torn bytes stay, the next append is glued to them,
/// and the start after that finds a damaged journal and re-reads every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_terminates_a_torn_journal_tail() {
    let bed = Bed::new();
    let m = open(&bed.fs, &bed.root, false).await.unwrap();
    m.save_session("f", &json!({"n": 1})).await.unwrap();
    m.save_session("f", &json!({"n": 2})).await.unwrap();
    m.shutdown().await.unwrap();
    // Tear the last line, as a power loss may.
    let path = bed.root.join("metadata/index.log");
    let journal = bed.fs.read(&path).unwrap().unwrap();
    assert!(bed.fs.remove_file(&path).unwrap());
    bed.fs.create_new(&path).unwrap().write_all(&journal[..journal.len() - 10]).unwrap();

    let m = open(&bed.fs, &bed.root, false).await.unwrap();
    assert_eq!(m.load_session("f").await.unwrap(), Some(json!({"n": 2})));
    m.save_session("f", &json!({"n": 3})).await.unwrap();
    m.shutdown().await.unwrap();
    let journal = bed.fs.read(&path).unwrap().unwrap();
    assert!(
        Index::replay(&journal).is_some(),
        "damaged journal:\n{}",
        String::from_utf8_lossy(&journal)
    );
}

// ---------------------------------------------------------------------------------
// Fault points
// ---------------------------------------------------------------------------------

/// The steps of a direct save, in the order `put_blocking` takes them.
const SAVE_POINTS: [Op; 5] = [Op::CreateNew, Op::WriteAll, Op::SyncData, Op::Rename, Op::SyncDir];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_point_of_a_save_fails_cleanly() {
    let mut cases = 0;
    for op in SAVE_POINTS {
        for fault in [Fault::Eio, Fault::Enospc] {
            let case = format!("{op:?}/{fault:?}");
            let bed = Bed::new();
            let (v1, v2, v3) = (payload("f", 1), payload("f", 2), payload("f", 3));
            let m = open(&bed.fs, &bed.root, false).await.unwrap();
            m.save_session("f", &v1).await.unwrap();
            // On ENOSPC the store cleans up and retries once: fail both attempts.
            let (times, kind) = match fault {
                Fault::Eio => (1, ErrorKind::Io),
                Fault::Enospc => (2, ErrorKind::StorageFull),
            };
            bed.fs.fail(op, 1, times, fault);
            let err = m.save_session("f", &v2).await.expect_err(&case);
            assert_eq!(err.kind(), kind, "{case}: {err}");
            assert_eq!(bed.fs.faults_pending(), 0, "{case}: the fault did not fire");
            // A power loss now leaves the previous version.
            assert_eq!(
                load_fresh(&bed.fs.crash(CrashMode::Durable), &bed.root, "f").await,
                Some(v1.clone())
            );
            m.shutdown().await.unwrap();

            let m = open(&bed.fs, &bed.root, false).await.unwrap();
            let got = m.load_session("f").await.unwrap();
            if op == Op::SyncDir {
                // The rename had happened when the directory fsync failed: the new
                // version is visible (and not durable). See the report: the put
                // contract says "after Err the old value is intact".
                assert!(got == Some(v1.clone()) || got == Some(v2.clone()), "{case}: {got:?}");
            } else {
                assert_eq!(got, Some(v1.clone()), "{case}");
            }
            assert_eq!(bed.fs.tree().staged_files(), Vec::<String>::new(), "{case}");
            m.save_session("f", &v3).await.unwrap();
            assert_eq!(m.load_session("f").await.unwrap(), Some(v3.clone()), "{case}");
            m.shutdown().await.unwrap();
            assert_eq!(load_fresh(&bed.fs, &bed.root, "f").await, Some(v3.clone()), "{case}");
            assert_eq!(
                load_fresh(&bed.fs.crash(CrashMode::Durable), &bed.root, "f").await,
                Some(v3),
                "{case}"
            );
            cases += 1;
        }
    }
    println!("save fault points: {cases} cases (5 points x EIO, ENOSPC twice) failed cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_enospc_is_absorbed_by_the_retry() {
    for op in SAVE_POINTS {
        let bed = Bed::new();
        let m = open(&bed.fs, &bed.root, false).await.unwrap();
        m.save_session("f", &payload("f", 1)).await.unwrap();
        bed.fs.fail(op, 1, 1, Fault::Enospc);
        m.save_session("f", &payload("f", 2)).await.unwrap_or_else(|e| panic!("{op:?}: {e}"));
        assert_eq!(bed.fs.faults_pending(), 0, "{op:?}: the fault did not fire");
        m.shutdown().await.unwrap();
        assert_eq!(load_fresh(&bed.fs, &bed.root, "f").await, Some(payload("f", 2)), "{op:?}");
        let image = bed.fs.crash(CrashMode::Durable);
        assert_eq!(load_fresh(&image, &bed.root, "f").await, Some(payload("f", 2)), "{op:?}");
        assert_eq!(bed.fs.tree().staged_files(), Vec::<String>::new(), "{op:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_journal_append_does_not_fail_the_save() {
    // The journal is best effort: open_append, then the second write_all of a save.
    for (op, nth) in [(Op::OpenAppend, 1), (Op::WriteAll, 2)] {
        let bed = Bed::new();
        let m = open(&bed.fs, &bed.root, false).await.unwrap();
        bed.fs.fail(op, nth, 1, Fault::Eio);
        m.save_session("f", &payload("f", 1)).await.unwrap_or_else(|e| panic!("{op:?}: {e}"));
        assert_eq!(bed.fs.faults_pending(), 0, "{op:?}: the fault did not fire");
        m.shutdown().await.unwrap();
        let m = open(&bed.fs.crash(CrashMode::Durable), &bed.root, false).await.unwrap();
        assert_eq!(m.load_session("f").await.unwrap(), Some(payload("f", 1)), "{op:?}");
        assert_eq!(m.list_sessions().await.unwrap().len(), 1, "{op:?}");
        m.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_delete_leaves_no_half_deleted_session() {
    let bed = Bed::new();
    let m = open(&bed.fs, &bed.root, false).await.unwrap();
    m.save_session("f", &payload("f", 1)).await.unwrap();
    let id = m.create_checkpoint("f", "main", &payload("f", 2)).await.unwrap();
    // The first remove_file of the delete is the session record (after the marker).
    bed.fs.fail(Op::RemoveFile, 1, 1, Fault::Eio);
    let err = m.delete_session("f").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    m.shutdown().await.unwrap();
    for fs in [bed.fs.clone(), bed.fs.crash(CrashMode::Durable)] {
        let m = open(&fs, &bed.root, false).await.unwrap();
        // The durable pending-delete marker makes the next start finish the delete.
        assert_eq!(m.load_session("f").await.unwrap(), None);
        assert!(m.list_checkpoints("f").await.unwrap().is_empty());
        assert!(m.restore_checkpoint(&id).await.unwrap().is_none());
        m.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_mkdir_fails_the_checkpoint_cleanly() {
    let bed = Bed::new();
    let m = open(&bed.fs, &bed.root, false).await.unwrap();
    bed.fs.fail(Op::CreateDir, 1, 1, Fault::Eio);
    let err = m.create_checkpoint("n", "main", &payload("n", 1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    let id = m.create_checkpoint("n", "main", &payload("n", 2)).await.unwrap();
    m.shutdown().await.unwrap();
    let m = open(&bed.fs.crash(CrashMode::Durable), &bed.root, false).await.unwrap();
    assert_eq!(m.restore_checkpoint(&id).await.unwrap().map(|c| c.data), Some(payload("n", 2)));
    assert_eq!(m.list_checkpoints("n").await.unwrap().len(), 1);
    m.shutdown().await.unwrap();
    assert!(bed.fs.calls(Op::CreateDir) >= 2);
}

/// Through the write-ahead log: a batch whose write or `fdatasync` fails fails its save,
/// and what it left in the file is zeroed (and synced) before anything else is written
/// there: no crash image, then or after the next batches were written in its place, may
/// bring the failed write back. The log is written in place, so without the zeroing a
/// whole frame of the failed batch would sit right after the last acknowledged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_log_write_is_never_replayed() {
    let mut images = 0;
    for op in [Op::WriteAt, Op::SyncData] {
        let bed = Bed::new();
        let m = open_mode(&bed.fs, &bed.root, false, true).await.unwrap();
        m.save_session("f", &payload("f", 1)).await.unwrap();
        bed.fs.fail(op, 1, 1, Fault::Eio);
        let err = m.save_session("f", &payload("f", 2)).await.expect_err("the save went through");
        assert_eq!(err.kind(), ErrorKind::Io, "{op:?}: {err}");
        assert_eq!(bed.fs.faults_pending(), 0, "{op:?}: the fault did not fire");
        let failed_at = bed.fs.tree();
        // A shorter save of another session, in the failed batch's place.
        m.save_session("g", &json!({"g": 1})).await.unwrap();
        let after = bed.fs.tree();
        for (when, tree) in [("after the failure", &failed_at), ("after the next save", &after)] {
            let modes = [CrashMode::Durable, CrashMode::ProcessKill]
                .into_iter()
                .chain((0..24).map(CrashMode::Random));
            for mode in modes {
                let image = SimFs::from_tree(tree.crash_image(mode));
                let m = open_mode(&image, &bed.root, false, true).await.unwrap();
                let got = m.load_session("f").await.unwrap();
                assert_eq!(got, Some(payload("f", 1)), "{op:?} {when}, {mode:?}");
                m.shutdown().await.unwrap();
                images += 1;
            }
        }
        m.shutdown().await.unwrap();
        assert_eq!(load_fresh(&bed.fs, &bed.root, "g").await, Some(json!({"g": 1})), "{op:?}");
    }
    println!("failed log writes: {images} crash images, none brought a failed write back");
}

// ---------------------------------------------------------------------------------
// Regression: a directory whose creation was not made durable is synced before use
// ---------------------------------------------------------------------------------

/// `FileStorageBackend::ensure_dir` used to sync the parent only when `create_dir`
/// reported that it created the directory. If that sync failed (or the process died
/// before it), the next attempt found the directory existing, skipped the sync, and
/// acknowledged records inside a directory that a power loss removes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_whose_parent_fsync_failed_is_synced_before_use() {
    let bed = Bed::new();
    let m = open(&bed.fs, &bed.root, false).await.unwrap();
    // The first sync_dir of a new session's first checkpoint is checkpoints/ (mkdir).
    bed.fs.fail(Op::SyncDir, 1, 1, Fault::Eio);
    assert!(m.create_checkpoint("n", "main", &payload("n", 1)).await.is_err());
    let id = m.create_checkpoint("n", "main", &payload("n", 2)).await.unwrap();
    m.shutdown().await.unwrap();
    let m = open(&bed.fs.crash(CrashMode::Durable), &bed.root, false).await.unwrap();
    let restored = m.restore_checkpoint(&id).await.unwrap();
    m.shutdown().await.unwrap();
    assert_eq!(restored.map(|c| c.data), Some(payload("n", 2)), "acknowledged checkpoint lost");
}

/// The same bug reached by a process crash between the mkdir and its parent's fsync,
/// then a restart, an acknowledged checkpoint, and a power loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_left_by_a_process_crash_is_synced_before_use() {
    let bed = Bed::new();
    let m = open(&bed.fs, &bed.root, false).await.unwrap();
    bed.fs.record(true);
    m.create_checkpoint("n", "main", &payload("n", 1)).await.unwrap();
    bed.fs.record(false);
    m.shutdown().await.unwrap();
    let dir = bed.root.join("checkpoints/n");
    let after_mkdir =
        bed.fs.take_snapshots().into_iter().find(|t| t.exists(&dir) == (true, false)).unwrap();
    let restarted = SimFs::from_tree(after_mkdir.crash_image(CrashMode::ProcessKill));
    let m = open(&restarted, &bed.root, false).await.unwrap();
    let id = m.create_checkpoint("n", "main", &payload("n", 2)).await.unwrap();
    m.shutdown().await.unwrap();
    let m = open(&restarted.crash(CrashMode::Durable), &bed.root, false).await.unwrap();
    let restored = m.restore_checkpoint(&id).await.unwrap();
    m.shutdown().await.unwrap();
    assert_eq!(restored.map(|c| c.data), Some(payload("n", 2)), "acknowledged checkpoint lost");
}

// ---------------------------------------------------------------------------------
// The model itself
// ---------------------------------------------------------------------------------

#[test]
fn the_model_keeps_only_what_was_synced() {
    let root = Path::new("/r");
    let fs = SimFs::new(root);
    fs.create_dir(&root.join("d")).unwrap();
    let mut f = fs.create_new(&root.join("d/a")).unwrap();
    f.write_all(b"hello").unwrap();
    // Nothing synced: the directory itself is gone after a power loss.
    assert_eq!(fs.crash(CrashMode::Durable).list_dir(root).unwrap().len(), 0);
    assert_eq!(
        fs.crash(CrashMode::ProcessKill).read(&root.join("d/a")).unwrap(),
        Some(b"hello".to_vec())
    );
    fs.sync_dir(root).unwrap();
    fs.sync_dir(&root.join("d")).unwrap();
    // Names durable, data not: an empty file.
    assert_eq!(fs.crash(CrashMode::Durable).read(&root.join("d/a")).unwrap(), Some(Vec::new()));
    f.sync_data().unwrap();
    f.write_all(b" world").unwrap();
    assert_eq!(
        fs.crash(CrashMode::Durable).read(&root.join("d/a")).unwrap(),
        Some(b"hello".to_vec())
    );
    // A torn append keeps a prefix of the unsynced tail, never anything else.
    let torn: BTreeSet<Vec<u8>> = (0..200)
        .map(|s| fs.crash(CrashMode::Random(s)).read(&root.join("d/a")).unwrap().unwrap())
        .collect();
    assert!(torn.len() > 3, "{torn:?}");
    assert!(torn.iter().all(|t| t.len() >= 5 && b"hello world".starts_with(t)));
    // A rename is durable only once its directory is synced.
    fs.rename(&root.join("d/a"), &root.join("d/b")).unwrap();
    let image = fs.crash(CrashMode::Durable);
    assert!(image.read(&root.join("d/a")).unwrap().is_some());
    assert!(image.read(&root.join("d/b")).unwrap().is_none());
    fs.sync_dir(&root.join("d")).unwrap();
    let image = fs.crash(CrashMode::Durable);
    assert!(image.read(&root.join("d/a")).unwrap().is_none());
    assert_eq!(image.read(&root.join("d/b")).unwrap(), Some(b"hello".to_vec()));
    // Faults fire on the Nth call and only as many times as asked.
    fs.fail(Op::RemoveFile, 2, 1, Fault::Enospc);
    assert!(!fs.remove_file(&root.join("d/missing")).unwrap());
    let e = fs.remove_file(&root.join("d/b")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert!(fs.remove_file(&root.join("d/b")).unwrap());
    assert_eq!(fs.faults_pending(), 0);
    assert!(format!("{fs:?}").starts_with("SimFs"));
}
