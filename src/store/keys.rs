//! The store's layout: every key name and folder the crate writes, and the class of each
//! key. This file owns the names (no other library code spells `sessions/`, `metadata/...`
//! and the like; docs and tests do) and [`class_of`], the one rule that maps a key's name to its
//! [`KeyClass`]. Backends and middleware ask [`StorageKey::class`] instead of matching strings; the
//! store builds its keys with the functions here. It calls nothing but [`StorageKey`] and the id
//! types.
//!
//! ```text
//! sessions/<session><ext>                 session records            Record
//! checkpoints/<session>/<checkpoint><ext> checkpoint records         Record
//! metadata/store.json                     format descriptor          Plaintext
//! metadata/crypto.json                    encryption descriptor      Plaintext
//! metadata/LOCK                           the file backend's lock    Plaintext
//! metadata/pending/<session>              pending-delete markers     Plaintext
//! metadata/interrupted/<session>          cut-off runs (shared store) Plaintext
//! metadata/index.log                      index journal (appended)   Log
//! metadata/access/<session>.json          access records             Metadata
//! metadata/running                        "a process has it open"    Metadata
//! quarantine/<ms>-<key with / as ~>       copies of damaged records  Metadata
//! metadata/.wal                           the file backend's log (a file, not a key)
//! ```
//!
//! `<ext>` is the record ending of the store's format ([`record_ending`]).

use crate::backend::{KeyClass, StorageKey};
use crate::types::{CheckpointId, SessionId};

/// Folder of session records.
const SESSIONS: &str = "sessions";
/// Folder of checkpoint records, one subfolder per session.
const CHECKPOINTS: &str = "checkpoints";
/// Folder of the store's own files.
pub(crate) const METADATA: &str = "metadata";
/// Folder of copies of damaged records.
const QUARANTINE: &str = "quarantine";
/// The top-level folders of a store, which a directory backend creates at open.
pub(crate) const FOLDERS: [&str; 4] = [SESSIONS, CHECKPOINTS, METADATA, QUARANTINE];

/// The index journal (see `store::index`).
const JOURNAL: &str = "metadata/index.log";
/// The store's format descriptor (`StoreMeta`): version, compression, encryption on/off.
pub(crate) const STORE_META: &str = "metadata/store.json";
/// The encryption layer's descriptor (KDF, key-check records).
pub(crate) const CRYPTO_META: &str = "metadata/crypto.json";
/// Folder of pending-delete markers, one empty file per session being deleted.
const PENDING: &str = "metadata/pending";
/// Folder of the marks of runs cut off by a node that died (shared stores only: a store
/// one process holds keeps them in its index journal).
const INTERRUPTED: &str = "metadata/interrupted";
/// Folder of access records, `<session>.json`.
const ACCESS: &str = "metadata/access";
/// The access records' ending.
const ACCESS_EXT: &str = ".json";
/// Present while a manager has the store open; left behind by a process that died.
const RUNNING: &str = "metadata/running";
/// Present while `copy_store` fills the store; left behind by a copy that did not finish.
const COPYING: &str = "metadata/copying";
/// The file backend's OS lock file, `metadata/LOCK` (inside [`METADATA`]).
pub(crate) const LOCK_FILE: &str = "LOCK";
/// The file backend's write-ahead log, `metadata/.wal`: hidden (a leading dot, which no
/// key can have), so listings never show it and no key can name it.
pub(crate) const WAL_FILE: &str = ".wal";
/// Logs are the keys under `metadata/` with this ending.
const LOG_EXT: &str = ".log";

/// The class of a key, from its name alone (see [`KeyClass`] for what each class asks of
/// a backend). Unknown names under `metadata/` are [`KeyClass::Metadata`], except names
/// ending in `.log`, which are logs; anything under `sessions/` or `checkpoints/` is a
/// record.
pub(crate) fn class_of(key: &str) -> KeyClass {
    let (top, rest) = key.split_once('/').unwrap_or((key, ""));
    match top {
        SESSIONS | CHECKPOINTS => KeyClass::Record,
        METADATA if matches!(key, STORE_META | CRYPTO_META | COPYING) || rest == LOCK_FILE => {
            KeyClass::Plaintext
        }
        METADATA
            if [PENDING, INTERRUPTED]
                .iter()
                .any(|f| key.strip_prefix(f).is_some_and(|r| r.starts_with('/'))) =>
        {
            KeyClass::Plaintext
        }
        METADATA if key.ends_with(LOG_EXT) => KeyClass::Log,
        _ => KeyClass::Metadata,
    }
}

/// The file-name ending of records: `.json`, `.json.gz`, `.json.enc`, `.json.gz.enc`.
pub(crate) fn record_ending(gzip: bool, encrypted: bool) -> &'static str {
    match (gzip, encrypted) {
        (false, false) => ".json",
        (true, false) => ".json.gz",
        (false, true) => ".json.enc",
        (true, true) => ".json.gz.enc",
    }
}

fn key(name: String) -> StorageKey {
    StorageKey::from_valid(name)
}

/// A fixed key of the layout ([`STORE_META`], the journal, ...).
fn fixed(name: &str) -> StorageKey {
    key(name.to_owned())
}

/// `sessions/<sid><ext>`.
pub(crate) fn session(sid: &SessionId, ext: &str) -> StorageKey {
    key(format!("{SESSIONS}/{sid}{ext}"))
}

/// The folder every session record is in.
pub(crate) fn sessions() -> StorageKey {
    fixed(SESSIONS)
}

/// The session a key listed under [`sessions`] is the record of.
pub(crate) fn session_of(key: &StorageKey, ext: &str) -> Option<SessionId> {
    key.file_name().strip_suffix(ext).and_then(|s| SessionId::new(s).ok())
}

/// `checkpoints/<sid>/<cid><ext>`.
pub(crate) fn checkpoint(sid: &SessionId, cid: &CheckpointId, ext: &str) -> StorageKey {
    key(format!("{CHECKPOINTS}/{sid}/{cid}{ext}"))
}

/// The folder of every checkpoint record.
pub(crate) fn checkpoints() -> StorageKey {
    fixed(CHECKPOINTS)
}

/// The folder of one session's checkpoints.
pub(crate) fn checkpoints_of(sid: &SessionId) -> StorageKey {
    key(format!("{CHECKPOINTS}/{sid}"))
}

/// The checkpoint id in a checkpoint record's file name (`<cid><ext>`).
pub(crate) fn checkpoint_id_of(name: &str, ext: &str) -> Option<CheckpointId> {
    name.strip_suffix(ext).and_then(|s| CheckpointId::parse(s).ok())
}

/// The session and checkpoint of a key listed under [`checkpoints`] (exactly
/// `checkpoints/<sid>/<cid><ext>`; anything else is not a checkpoint record).
pub(crate) fn checkpoint_of(key: &StorageKey, ext: &str) -> Option<(SessionId, CheckpointId)> {
    let mut segs = key.segments().skip(1);
    let (Some(s), Some(name), None) = (segs.next(), segs.next(), segs.next()) else { return None };
    Some((SessionId::new(s).ok()?, checkpoint_id_of(name, ext)?))
}

/// `metadata/access/<sid>.json`.
pub(crate) fn access(sid: &SessionId) -> StorageKey {
    key(format!("{ACCESS}/{sid}{ACCESS_EXT}"))
}

/// The folder of access records.
pub(crate) fn access_records() -> StorageKey {
    fixed(ACCESS)
}

/// The session an access record listed under [`access_records`] belongs to.
pub(crate) fn access_of(key: &StorageKey) -> Option<SessionId> {
    key.file_name().strip_suffix(ACCESS_EXT).and_then(|s| SessionId::new(s).ok())
}

/// `metadata/pending/<sid>`.
pub(crate) fn pending(sid: &SessionId) -> StorageKey {
    key(format!("{PENDING}/{sid}"))
}

/// The folder of pending-delete markers.
pub(crate) fn pending_markers() -> StorageKey {
    fixed(PENDING)
}

/// `metadata/interrupted/<sid>`.
pub(crate) fn interrupted(sid: &SessionId) -> StorageKey {
    key(format!("{INTERRUPTED}/{sid}"))
}

/// The folder of interrupted-run marks.
pub(crate) fn interrupted_marks() -> StorageKey {
    fixed(INTERRUPTED)
}

/// The index journal.
pub(crate) fn journal() -> StorageKey {
    fixed(JOURNAL)
}

/// The store's format descriptor.
pub(crate) fn store_meta() -> StorageKey {
    fixed(STORE_META)
}

/// The encryption layer's descriptor.
#[cfg(feature = "encryption")]
pub(crate) fn crypto_meta() -> StorageKey {
    fixed(CRYPTO_META)
}

/// The running marker.
pub(crate) fn running() -> StorageKey {
    fixed(RUNNING)
}

/// The marker of a copy in progress (`copy_store`).
pub(crate) fn copying() -> StorageKey {
    fixed(COPYING)
}

/// Whether `key` is the file backend's lock file (listed, but not part of the store).
pub(crate) fn is_lock(key: &StorageKey) -> bool {
    key.as_str().strip_prefix(METADATA).and_then(|r| r.strip_prefix('/')) == Some(LOCK_FILE)
}

/// The folder of quarantine copies.
pub(crate) fn quarantine() -> StorageKey {
    fixed(QUARANTINE)
}

/// Where a copy of the damaged record at `of`, found at `now_ms`, is kept.
pub(crate) fn quarantine_copy(of: &StorageKey, now_ms: u64) -> StorageKey {
    key(format!("{QUARANTINE}/{now_ms}-{}", of.as_str().replace('/', "~")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_the_class_the_layers_rely_on() {
        let sid = SessionId::new("s1").unwrap();
        let cid = CheckpointId::parse("0192a3b4c5d60001-1a2b3c4d").unwrap();
        let class = |k: &StorageKey| class_of(k.as_str());
        assert_eq!(class(&session(&sid, ".json.gz")), KeyClass::Record);
        assert_eq!(class(&checkpoint(&sid, &cid, ".json")), KeyClass::Record);
        assert_eq!(class_of("checkpoints/s1x"), KeyClass::Record);
        assert_eq!(class_of("sessions/x.log"), KeyClass::Record);
        assert_eq!(class(&store_meta()), KeyClass::Plaintext);
        assert_eq!(class_of(CRYPTO_META), KeyClass::Plaintext);
        assert_eq!(class_of("metadata/LOCK"), KeyClass::Plaintext);
        assert_eq!(class(&pending(&sid)), KeyClass::Plaintext);
        assert_eq!(class_of("metadata/pending"), KeyClass::Metadata);
        assert_eq!(class_of("metadata/pendingx/s1"), KeyClass::Metadata);
        assert_eq!(class(&journal()), KeyClass::Log);
        assert_eq!(class_of("metadata/other.log"), KeyClass::Log);
        assert_eq!(class_of("metadata/pending/s1.log"), KeyClass::Plaintext);
        assert_eq!(class(&access(&sid)), KeyClass::Metadata);
        assert_eq!(class(&running()), KeyClass::Metadata);
        assert_eq!(class(&quarantine_copy(&session(&sid, ".json"), 7)), KeyClass::Metadata);
        assert_eq!(class_of("other/x.log"), KeyClass::Metadata);
    }

    #[test]
    fn listed_names_parse_back() {
        let sid = SessionId::new("s1").unwrap();
        let cid = CheckpointId::parse("0192a3b4c5d60001-1a2b3c4d").unwrap();
        assert_eq!(session_of(&session(&sid, ".json.gz"), ".json.gz"), Some(sid.clone()));
        assert_eq!(
            checkpoint_of(&checkpoint(&sid, &cid, ".json"), ".json"),
            Some((sid.clone(), cid.clone()))
        );
        assert_eq!(access_of(&access(&sid)), Some(sid.clone()));
        assert!(checkpoints_of(&sid).starts_with(&checkpoints()));
        assert_eq!(
            quarantine_copy(&session(&sid, ".json"), 7).as_str(),
            "quarantine/7-sessions~s1.json"
        );
    }
}
