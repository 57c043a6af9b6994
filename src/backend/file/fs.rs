//! The file-system seam under [`FileStorageBackend`](super::FileStorageBackend).
//!
//! This module owns the [`Fs`] and [`FsFile`] traits and [`OsFs`], the real file system;
//! it calls only the standard library, `libc` flags and `rustix`. Every other part of the
//! file backend (and the power-loss simulator, `testing/simfs/`) goes through it.
//!
//! Every file operation the file backend performs goes through [`Fs`], so tests can swap
//! in a file system that records what was synced and build the states a power loss would
//! leave behind. [`OsFs`] is the real one. Nothing here follows a symbolic link.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// A file opened for writing through the seam.
pub(crate) trait FsFile: Send {
    /// Writes all of `buf`.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Flushes the file's data (and the size needed to read it) to stable storage.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, over whatever is there (extending the file if it
    /// ends before). Only for a file opened with [`Fs::open_in_place`]: on a file opened for
    /// appending the system would append instead.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Cuts the file to `len` bytes (to drop a failed append).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// The file's current length.
    fn len(&mut self) -> io::Result<u64>;
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub(crate) struct DirEntry {
    pub(crate) name: String,
    pub(crate) is_dir: bool,
    pub(crate) is_file: bool,
    pub(crate) size: u64,
}

/// The file operations the file backend needs, all relative to absolute paths it built.
pub(crate) trait Fs: Send + Sync + fmt::Debug + 'static {
    /// Creates a new file (failing if it exists), owner-only, for writing.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Opens (creating if needed) a file for appending, owner-only.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Opens (creating if needed) a file for writing in place with
    /// [`FsFile::write_at`], owner-only, neither appending nor cutting it.
    fn open_in_place(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Reads a whole regular file; `Ok(None)` if it does not exist. Refuses symbolic links.
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Reads at most the first `max` bytes of a regular file; `Ok(None)` if it does not
    /// exist. Refuses symbolic links.
    fn read_head(&self, path: &Path, max: usize) -> io::Result<Option<Vec<u8>>>;
    /// Renames `from` over `to` atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file; `Ok(false)` if it did not exist.
    fn remove_file(&self, path: &Path) -> io::Result<bool>;
    /// Creates a directory (owner-only); `Ok(false)` if it already exists as a directory.
    fn create_dir(&self, path: &Path) -> io::Result<bool>;
    /// Flushes a directory's entries (creates, renames, removes) to stable storage.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Lists a directory without following symbolic links (the directory itself must not
    /// be one); a missing directory lists nothing.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>>;
    /// Makes `to` a second name of the file `from` (a hard link). Seams that cannot do
    /// this say `Unsupported`, and writers then do without a backup.
    fn hard_link(&self, _from: &Path, _to: &Path) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Fails unless `path` is a real directory (not a symbolic link to one).
    fn check_dir(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }
    /// Like [`read`](Self::read), but only if the file is at most `max` bytes and its data
    /// can be had without waiting for the disk (it is in the page cache); `Ok(None)`
    /// otherwise, and the caller reads it the blocking way. Seams without such a read say
    /// `Ok(None)` always.
    fn read_cached(&self, _path: &Path, _max: u64) -> io::Result<Option<Option<Vec<u8>>>> {
        Ok(None)
    }
}

fn symlink_refused(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is a symbolic link, which the store never follows", path.display()),
    )
}

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OsFs;

struct OsFile(File);

impl FsFile for OsFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&mut self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

fn not_a_file(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a regular file", path.display()))
}

/// Opens a regular file for reading without following a symbolic link, with its size;
/// `Ok(None)` if it does not exist.
fn open_for_reading(path: &Path) -> io::Result<Option<(File, u64)>> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // O_NOFOLLOW on a symbolic link fails with ELOOP: a planted link is not followed.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(not_a_file(path)),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(not_a_file(path));
    }
    Ok(Some((f, meta.len())))
}

/// Opens `path` with `options`, as every file the store writes is opened: owner-only
/// permissions for a new file, never through a symbolic link, not inherited by children.
fn os_open(path: &Path, options: &mut OpenOptions) -> io::Result<Box<dyn FsFile>> {
    let f = options.mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)?;
    Ok(Box::new(OsFile(f)))
}

impl Fs for OsFs {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        os_open(path, OpenOptions::new().write(true).create_new(true))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        os_open(path, OpenOptions::new().append(true).create(true))
    }

    fn open_in_place(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        os_open(path, OpenOptions::new().write(true).create(true).truncate(false))
    }

    fn read_head(&self, path: &Path, max: usize) -> io::Result<Option<Vec<u8>>> {
        let Some((f, _)) = open_for_reading(path)? else { return Ok(None) };
        let mut buf = Vec::with_capacity(max);
        f.take(max as u64).read_to_end(&mut buf)?;
        Ok(Some(buf))
    }

    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let Some((mut f, len)) = open_for_reading(path)? else { return Ok(None) };
        let mut buf = Vec::with_capacity(len as usize);
        f.read_to_end(&mut buf)?;
        Ok(Some(buf))
    }

    fn read_cached(&self, path: &Path, max: u64) -> io::Result<Option<Option<Vec<u8>>>> {
        use rustix::io::{Errno, ReadWriteFlags, preadv2};
        let Some((f, len)) = open_for_reading(path)? else { return Ok(Some(None)) };
        if len > max {
            return Ok(None);
        }
        // One byte more than the size, to see the end of the file in the same read.
        let mut buf = vec![0u8; len as usize + 1];
        let mut n = 0;
        loop {
            if n == buf.len() {
                return Ok(None); // grew since the stat: not a small read after all
            }
            // RWF_NOWAIT: fail with EAGAIN rather than wait for the disk.
            match preadv2(
                &f,
                &mut [io::IoSliceMut::new(&mut buf[n..])],
                n as u64,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(Errno::INTR) => {}
                // EAGAIN (not cached), EOPNOTSUPP (no such reads here): the blocking way.
                Err(_) => return Ok(None),
            }
        }
        buf.truncate(n);
        Ok(Some(Some(buf)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<bool> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn create_dir(&self, path: &Path) -> io::Result<bool> {
        match std::fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if std::fs::symlink_metadata(path)?.is_dir() {
                    Ok(false)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a directory", path.display()),
                    ))
                }
            }
            Err(e) => Err(e),
        }
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let d = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        d.sync_all()
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::hard_link(from, to)
    }

    fn check_dir(&self, path: &Path) -> io::Result<()> {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Err(symlink_refused(path));
        }
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        // read_dir would follow a symbolic link planted in place of a directory, and the
        // caller might then delete what it lists: refuse links outright.
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => return Err(symlink_refused(path)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        let rd = match std::fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            // symlink_metadata: a symbolic link is reported as neither file nor directory.
            let meta = match std::fs::symlink_metadata(entry.path()) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.push(DirEntry {
                name,
                is_dir: meta.is_dir(),
                is_file: meta.is_file(),
                size: meta.len(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_read_returns_exactly_the_file_or_defers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let fs = OsFs;
        assert_eq!(
            fs.read_cached(&path, 1 << 20).unwrap(),
            Some(None),
            "a missing file is known missing"
        );
        for len in [0usize, 1, 4095, 4096, 4097, 100_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(&data).unwrap();
            // Just written: in the page cache, so read without waiting.
            assert_eq!(
                fs.read_cached(&path, 1 << 20).unwrap(),
                Some(Some(data.clone())),
                "{len} bytes"
            );
            assert_eq!(fs.read(&path).unwrap(), Some(data));
        }
        assert_eq!(
            fs.read_cached(&path, 99_999).unwrap(),
            None,
            "over the limit: the blocking way"
        );
        std::os::unix::fs::symlink(&path, dir.path().join("link")).unwrap();
        assert!(
            fs.read_cached(&dir.path().join("link"), 1 << 20).is_err(),
            "a symbolic link is refused"
        );
        std::fs::create_dir(dir.path().join("d")).unwrap();
        assert!(fs.read_cached(&dir.path().join("d"), 1 << 20).is_err(), "a directory is refused");
    }
}
