//! Opening a file store read-only, beside the process that holds it
//! ([`FileOptions::read_only`](super::FileOptions::read_only)).
//!
//! This file owns that open: the store must exist, no lock is taken, no directory is made,
//! and the write-ahead log is read once and replayed into the overlay in memory (never
//! into the record files, never cut, never removed). It calls `frame.rs` for the replay,
//! `Core` for the overlay and the file-system seam for one read. The handle's write
//! methods refuse (`FileStorageBackend::refuse` in `mod.rs`), so nothing of this open or
//! of any later call changes a byte of the store.
//!
//! Why this is safe beside a live writer: every record file is replaced by an atomic
//! rename, so a read sees a whole old or a whole new record. The log is written in place,
//! so one read of it may catch the writer anywhere:
//!
//! - in the middle of a batch: a torn last batch, ignored exactly as recovery does;
//! - past the point where it read zeros, a batch written since, seen further on: whole
//!   frames after "damage" that is none. Taken for [`MidLogDamage`](super::frame), it is
//!   read again, a few times, before it is reported as damage;
//! - starting a new generation: the writer does so only once every value of the old one
//!   is durable in its record file, and then writes the new frames over the old ones
//!   from the start. Frames of the generation the header read named may then be missing
//!   after a prefix of them, so the prefix could hold a value older than one the files now
//!   hold. So the header is read again after the frames: if it changed, everything is
//!   read again. If it did not, the writer began no generation while the frames were read
//!   (salts never repeat, and it writes the header before any frame of a generation), so
//!   every frame taken is the one that generation has at that place.
//!
//! A log that is gone or holds no frame of its generation left nothing that the files
//! lack.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::direct::Core;
use super::frame::{self, Format, HEADER_LEN};
use super::fs::Fs;
use super::{FileStorageBackend, Inner};
use crate::backend::StorageKey;
use crate::error::{Result, StateError};
use crate::store::keys::{METADATA, WAL_FILE};
use crate::sync::lock;

impl FileStorageBackend {
    /// The read-only open (see [`FileOptions::read_only`](super::FileOptions::read_only)).
    pub(super) fn open_read_only_with(root: &Path, fs: Arc<dyn Fs>) -> Result<Self> {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir().map_err(|e| StateError::io("resolving", root, e))?.join(root)
        };
        // A missing store is an error, not an empty one: a read-only open creates nothing.
        match std::fs::symlink_metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StateError::Config {
                    message: format!("{} is not a directory, so not a file store", root.display()),
                });
            }
            Err(e) => return Err(StateError::io("opening the store (read-only)", &root, e)),
        }
        let core = Arc::new(Core::new(root, fs));
        core.replay_log_in_memory()?;
        Ok(FileStorageBackend {
            inner: Arc::new(Inner { core, log: None, _lock: None, read_only: true }),
        })
    }
}

/// How many times the log is read before damage that a concurrent write may explain is
/// reported.
const READS: u32 = 8;

impl Core {
    /// Reads the write-ahead log, if there is one, and puts the newest value of every key
    /// of its live generation into the overlay, so reads see writes that are only in the
    /// log. Writes nothing. A torn tail is ignored; damage before whole frames of a later
    /// batch, seen on every read, is [`StateError::Corrupt`] (acknowledged writes cannot be
    /// read back).
    fn replay_log_in_memory(&self) -> Result<()> {
        let path = self.root.join(METADATA).join(WAL_FILE);
        let reading = |e| StateError::io("reading the log", &path, e);
        let mut attempt = 0;
        let replayed = loop {
            attempt += 1;
            let Some(bytes) = self.fs.read(&path).map_err(reading)? else {
                return Ok(());
            };
            let replayed = match frame::replay(&bytes) {
                Ok(r) => r,
                Err(_) if attempt < READS => {
                    // Perhaps a batch the writer wrote while this read passed: read again.
                    std::thread::sleep(std::time::Duration::from_millis(u64::from(attempt)));
                    continue;
                }
                Err(d) => {
                    return Err(StateError::corrupt(
                        format!("{METADATA}/{WAL_FILE}"),
                        format!(
                            "the write-ahead log is damaged at byte {} of {}, and whole frames of a later \
                             batch follow at byte {}: acknowledged writes cannot be read back (the store's \
                             holder will refuse to reopen it too; see its log)",
                            d.at,
                            bytes.len(),
                            d.next_frame
                        ),
                    ));
                }
            };
            if replayed.format == Format::Older {
                // Only a holder of an older version appends to such a log: no generations.
                break replayed;
            }
            let head = HEADER_LEN as usize;
            let again = self.fs.read_head(&path, head).map_err(reading)?;
            if again.as_deref() == Some(&bytes[..head.min(bytes.len())]) || attempt >= READS {
                // The same header (or, after every attempt, the last read: the holder keeps
                // starting generations, so every value it logged is in its record file).
                if again.as_deref() != Some(&bytes[..head.min(bytes.len())]) {
                    break frame::Replayed { frames: Vec::new(), ..replayed };
                }
                break replayed;
            }
        };
        let mut latest: HashMap<StorageKey, Option<Arc<Vec<u8>>>> = HashMap::new();
        for (key, value) in replayed.frames {
            latest.insert(key, value.map(Arc::new));
        }
        lock(&self.overlay).extend(latest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Pins the race a reader beside a live writer can lose now that the log is written in
    //! place: it reads the header of one generation and a prefix of its frames, and the
    //! rest of the file after the writer has started the next generation over it.

    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::backend::{DirEntry, FsFile, StorageBackend};
    use crate::testing::simfs::SimFs;

    /// A file system whose first read of the log returns `first` (what a reader racing the
    /// writer saw), and which is `inner` for everything else.
    #[derive(Debug)]
    struct RacingFs {
        inner: SimFs,
        first: Mutex<Option<Vec<u8>>>,
        reads: Mutex<u32>,
    }

    impl Fs for RacingFs {
        fn create_new(&self, p: &Path) -> std::io::Result<Box<dyn FsFile>> {
            self.inner.create_new(p)
        }
        fn open_append(&self, p: &Path) -> std::io::Result<Box<dyn FsFile>> {
            self.inner.open_append(p)
        }
        fn open_in_place(&self, p: &Path) -> std::io::Result<Box<dyn FsFile>> {
            self.inner.open_in_place(p)
        }
        fn read(&self, p: &Path) -> std::io::Result<Option<Vec<u8>>> {
            if p.ends_with(WAL_FILE) {
                *lock(&self.reads) += 1;
                if let Some(first) = lock(&self.first).take() {
                    return Ok(Some(first));
                }
            }
            self.inner.read(p)
        }
        fn read_head(&self, p: &Path, max: usize) -> std::io::Result<Option<Vec<u8>>> {
            self.inner.read_head(p, max)
        }
        fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            self.inner.rename(from, to)
        }
        fn remove_file(&self, p: &Path) -> std::io::Result<bool> {
            self.inner.remove_file(p)
        }
        fn create_dir(&self, p: &Path) -> std::io::Result<bool> {
            self.inner.create_dir(p)
        }
        fn sync_dir(&self, p: &Path) -> std::io::Result<()> {
            self.inner.sync_dir(p)
        }
        fn list_dir(&self, p: &Path) -> std::io::Result<Vec<DirEntry>> {
            self.inner.list_dir(p)
        }
        fn check_dir(&self, p: &Path) -> std::io::Result<()> {
            self.inner.check_dir(p)
        }
    }

    /// The writer logs `a = 1` then `a = 2`, brings the files up to date and starts the next
    /// generation. A reader that read the old header and the first frame only (the rest
    /// already overwritten) would hold `a = 1` in its overlay, older than what was
    /// acknowledged before it opened, shadowing the record file's `a = 2` for good. It must
    /// notice that the header changed under it and read again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_catches_a_new_generation_reads_the_log_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let fs = SimFs::new(&root);
        let key = StorageKey::new("sessions/a.json").unwrap();
        let wal = root.join(METADATA).join(WAL_FILE);
        let w = FileStorageBackend::with_fs_log_sizes(
            &root,
            Arc::new(fs.clone()),
            (4096, 4096),
            1 << 20,
            false,
        )
        .unwrap();
        w.put(&key, b"1".to_vec()).await.unwrap();
        let after_first = fs.read(&wal).unwrap().unwrap();
        let first_end = frame::replay(&after_first).unwrap().valid_len;
        w.put(&key, b"2".to_vec()).await.unwrap();
        let old = fs.read(&wal).unwrap().unwrap();
        assert_eq!(frame::replay(&old).unwrap().frames.len(), 2);
        // The last handle dropped: records brought up to date, a new generation started.
        drop(w);
        let now = fs.read(&wal).unwrap().unwrap();
        assert_ne!(now[..HEADER_LEN as usize], old[..HEADER_LEN as usize]);
        // What the racing reader saw: the old header and first frame, then zeros where the
        // writer's next batch was going (the second frame already gone).
        let mut seen = old[..first_end].to_vec();
        seen.resize(old.len(), 0);
        assert_eq!(frame::replay(&seen).unwrap().frames.len(), 1);

        let racing = Arc::new(RacingFs {
            inner: fs.clone(),
            first: Mutex::new(Some(seen)),
            reads: Mutex::new(0),
        });
        let r = FileStorageBackend::open_read_only_with(&root, racing.clone()).unwrap();
        assert_eq!(r.get(&key).await.unwrap(), Some(b"2".to_vec()), "a stale value was taken");
        assert_eq!(*lock(&racing.reads), 2, "the log was not read again");

        // Without the race: one read, and the same answer.
        let plain = Arc::new(RacingFs { inner: fs, first: Mutex::new(None), reads: Mutex::new(0) });
        let r = FileStorageBackend::open_read_only_with(&root, plain.clone()).unwrap();
        assert_eq!(r.get(&key).await.unwrap(), Some(b"2".to_vec()));
        assert_eq!(*lock(&plain.reads), 1);
    }
}
