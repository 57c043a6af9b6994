//! Disk full for real (issue 5, item 9): a store on a 2 MiB tmpfs, filled nearly to the
//! brim by another file, must refuse a save that does not fit with `StorageFull`, keep the
//! previous version, leave no staged file, keep serving small writes that fit, and save
//! again once space is freed.
//!
//! The test re-executes this binary inside a private mount namespace (so the mount is
//! invisible to the rest of the system and disappears with the process): as root with
//! `unshare --mount --propagation private`, as an ordinary user (or when that fails) inside
//! an unprivileged user namespace as well, `unshare --user --map-root-user --mount
//! --propagation private`, where the user may mount a tmpfs. The child mounts
//! `tmpfs -o size=2m` on a fresh directory, checks with `statfs` that it is a tmpfs of that
//! size, and runs the scenario there:
//!
//! 1. a store on the tmpfs; session `s` saved (v1, about 10 KB) plus a checkpoint;
//! 2. a filler file written in 64 KiB blocks until `ENOSPC`, then shortened to leave 64 KiB
//!    free;
//! 3. a save of about 512 KB to `s` fails with `ErrorKind::StorageFull` (after the store's
//!    own cleanup and retry), as does a checkpoint of the same size; `s` still loads v1, in
//!    this manager and in a fresh one; no `.tmp-` file is left anywhere in the store;
//! 4. a small save (2 KB) to another session succeeds: a full disk does not wedge the store;
//! 5. the filler is deleted; the big save succeeds and loads back, also after a restart.
//!
//! It needs `unshare` and `mount` (util-linux) and either root or unprivileged user
//! namespaces. Where neither way gives a private tmpfs (user namespaces disabled by the
//! kernel or a security module, no util-linux), the test does not pass quietly: it writes
//! one `NOT RUN` line saying why, or, with `MARS_STATE_REQUIRE_SYSTEM_TESTS=1` (set by
//! `.ci/run`), fails. See `common::not_run`.
//!
//! Run alone: `cargo test --test disk_full -- --nocapture`.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::staged_files;
use mars_state::{ErrorKind, FileStorageBackend, StateManager};
use serde_json::{Value, json};

const CHILD_ENV: &str = "MARS_DISK_FULL_CHILD";
const TMPFS_SIZE: &str = "2m";
const TMPFS_BYTES: u64 = 2 * 1024 * 1024;
/// `TMPFS_MAGIC` from `<linux/magic.h>`: `statfs`'s `f_type` of a tmpfs.
const TMPFS_MAGIC: u64 = 0x0102_1994;
/// What the child prints once its tmpfs is mounted: without it, the namespace or the mount
/// was refused and the machine cannot run this test.
const MOUNTED: &str = "disk full: private tmpfs mounted";
/// The child's exit code when `mount` fails (or cannot be run).
const NO_MOUNT: i32 = 77;
/// `unshare`'s exit code when it cannot create the namespace (or run the child).
const UNSHARE_FAILED: i32 = 1;
/// Space left free after filling.
const SLACK: u64 = 64 * 1024;

fn big(tag: &str, len: usize) -> Value {
    // Incompressible-looking text is irrelevant here (no compression), but keep it varied.
    let pad: String = (0..len).map(|i| (b'a' + (i * 7 % 26) as u8) as char).collect();
    json!({ "tag": tag, "pad": pad })
}

fn free_bytes(dir: &Path) -> u64 {
    let st = rustix::fs::statvfs(dir).unwrap();
    st.f_bavail * st.f_frsize
}

/// Writes `path` in 64 KiB blocks until the file system is full; returns its size.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; 64 * 1024];
    let mut len = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => len += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    len
}

async fn start(store: &Path, log: bool) -> StateManager {
    StateManager::builder(FileStorageBackend::options().write_ahead_log(log).open(store).unwrap())
        .janitor_interval(std::time::Duration::from_secs(3600))
        .start()
        .await
        .unwrap()
}

async fn scenario(mount: &Path, log: bool) {
    let store = mount.join("store");
    let filler = mount.join("filler");
    let v1 = big("v1", 10_000);
    let m = start(&store, log).await;
    m.save_session("s", &v1).await.unwrap();
    let cp = m.create_checkpoint("s", "main", &v1).await.unwrap();

    let filled = fill(&filler);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(filled.saturating_sub(SLACK))
        .unwrap();
    println!(
        "disk full (log: {log}): tmpfs of {TMPFS_SIZE}, filler {} bytes, {} bytes free",
        filled - SLACK,
        free_bytes(mount)
    );

    let huge = big("v2", 512 * 1024);
    let t = Instant::now();
    let err = m.save_session("s", &huge).await.expect_err("a 512 KB save fitted in 64 KiB");
    println!("disk full: the 512 KB save failed in {:?}: {err}", t.elapsed());
    assert_eq!(err.kind(), ErrorKind::StorageFull, "{err:?}");
    let err = m
        .create_checkpoint("s", "main", &huge)
        .await
        .expect_err("a 512 KB checkpoint fitted in 64 KiB");
    assert_eq!(err.kind(), ErrorKind::StorageFull, "{err:?}");
    assert_eq!(
        m.load_session("s").await.unwrap(),
        Some(v1.clone()),
        "the previous version is gone"
    );
    assert_eq!(m.list_checkpoints("s").await.unwrap().len(), 1);
    let left = staged_files(&store);
    assert!(left.is_empty(), "staged files left behind: {left:?}");

    // Still usable for what fits.
    let small = big("small", 2_000);
    m.save_session("t", &small).await.expect("a 2 KB save with 64 KiB free");
    m.shutdown().await.unwrap();

    // A fresh manager sees the previous version too.
    let m = start(&store, log).await;
    assert_eq!(m.load_session("s").await.unwrap(), Some(v1.clone()));
    assert_eq!(m.load_session("t").await.unwrap(), Some(small));
    assert_eq!(m.restore_checkpoint(&cp).await.unwrap().map(|c| c.data), Some(v1));

    std::fs::remove_file(&filler).unwrap();
    println!("disk full: filler removed, {} bytes free", free_bytes(mount));
    m.save_session("s", &huge).await.expect("saving after space was freed");
    let id =
        m.create_checkpoint("s", "main", &huge).await.expect("checkpoint after space was freed");
    assert_eq!(m.load_session("s").await.unwrap(), Some(huge.clone()));
    m.shutdown().await.unwrap();
    let m = start(&store, log).await;
    assert_eq!(m.load_session("s").await.unwrap(), Some(huge.clone()));
    assert_eq!(m.restore_checkpoint(&id).await.unwrap().map(|c| c.data), Some(huge));
    m.shutdown().await.unwrap();
    assert!(staged_files(&store).is_empty());
    println!(
        "disk full (log: {log}): StorageFull reported, previous version intact, no staged file, saves work after \
         freeing"
    );
    std::fs::remove_dir_all(&store).unwrap();
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false)
}

/// Mounts the tmpfs on `mount` and checks it is one, of the asked size; `false` if `mount`
/// is refused (the child then exits with `NO_MOUNT` and the parent reports the test as not
/// run).
fn mount_tmpfs(mount: &Path) -> bool {
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE},mode=0700"), "tmpfs"])
        .arg(mount)
        .status();
    if !status.as_ref().is_ok_and(|s| s.success()) {
        let why = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        eprintln!("disk full: `mount -t tmpfs` failed: {why}");
        return false;
    }
    println!("{MOUNTED} on {}", mount.display());
    // Pins that the scenario below really runs on a small tmpfs, not on the disk the
    // temporary directory lives on (where the filler would take gigabytes).
    let fs = rustix::fs::statfs(mount).unwrap();
    assert_eq!(
        u64::try_from(fs.f_type).ok(),
        Some(TMPFS_MAGIC),
        "{} is not a tmpfs: {fs:?}",
        mount.display()
    );
    let vfs = rustix::fs::statvfs(mount).unwrap();
    let (blocks, frsize) = (vfs.f_blocks, vfs.f_frsize);
    assert_eq!(
        blocks * frsize,
        TMPFS_BYTES,
        "the tmpfs is not {TMPFS_SIZE}: {blocks} blocks of {frsize} bytes"
    );
    true
}

/// The `unshare` options that give the child a private mount namespace in which it may
/// mount, best first: root needs only the mount namespace; anyone else (and root where
/// that is refused, e.g. without `CAP_SYS_ADMIN` in a container) also needs a user
/// namespace in which it is root.
fn namespaces() -> Vec<&'static [&'static str]> {
    let mount: &[&str] = &["--mount", "--propagation", "private"];
    let user: &[&str] = &["--user", "--map-root-user", "--mount", "--propagation", "private"];
    if is_root() { vec![mount, user] } else { vec![user] }
}

const TEST: &str = "a_full_disk_fails_the_save_cleanly_and_saves_work_again_after_freeing";

#[test]
fn a_full_disk_fails_the_save_cleanly_and_saves_work_again_after_freeing() {
    if std::env::var_os(CHILD_ENV).is_some() {
        // Inside the private mount namespace.
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("tmpfs");
        std::fs::create_dir(&mount).unwrap();
        if !mount_tmpfs(&mount) {
            drop(dir);
            std::process::exit(NO_MOUNT);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Written directly, then through the write-ahead log (which, on a disk too full to
        // replay it into the record files, serves it from memory and keeps it).
        rt.block_on(scenario(&mount, false));
        rt.block_on(scenario(&mount, true));
        let _ = Command::new("umount").arg(&mount).status();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let mut refused = Vec::new();
    for flags in namespaces() {
        let way = format!("unshare {}", flags.join(" "));
        let out = match Command::new("unshare")
            .args(flags)
            .arg("--")
            .arg(&exe)
            .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                refused.push(format!("`unshare` (util-linux) cannot be run: {e}"));
                break;
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stdout.contains(MOUNTED) && matches!(out.status.code(), Some(UNSHARE_FAILED | NO_MOUNT))
        {
            // The namespace or the mount was refused: the scenario never started.
            let said: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            refused.push(format!(
                "`{way}` then `mount -t tmpfs`: {} ({})",
                out.status,
                said.join("; ")
            ));
            continue;
        }
        // The child's first line shares libtest's "test … … " line.
        for line in stdout.lines().filter_map(|l| l.find("disk full:").map(|i| &l[i..])) {
            println!("{line}");
        }
        assert!(
            out.status.success(),
            "the child in the private mount namespace (`{way}`) failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        for log in [false, true] {
            let end = format!("(log: {log}): StorageFull reported");
            assert!(
                stdout.contains(&end),
                "the scenario (log: {log}) did not run to the end:\n{stdout}\n{stderr}"
            );
        }
        println!("disk full: done in {:.1}s (`{way}`)", started.elapsed().as_secs_f64());
        return;
    }
    common::not_run(
        &format!("disk_full::{TEST}"),
        &format!(
            "no private tmpfs: {}; it needs root, or unprivileged user namespaces (`unshare --user --map-root-user \
             --mount true` must work), and util-linux",
            refused.join("; ")
        ),
    );
}
