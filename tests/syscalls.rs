//! Syscall-level reliability tests (issue 5, items 7 and 8): a saving child process runs
//! under `strace`, and the parent checks what the kernel was asked to do, kills the child
//! just before chosen system calls, and makes chosen system calls fail.
//!
//! The child is this test binary re-executed as `child_saver` with `MARS_SYSCALL_CHILD=<store
//! dir>` and `MARS_SYSCALL_MODE`. It runs a current-thread tokio runtime with a single
//! blocking thread, so every file operation of the store happens on one thread. It reports
//! on its own duplicate of stdout, one `write` per line, retrying a line whose `write` failed
//! (so injected errors hit the store, not the report). Lines that start with `ack`, `ready`,
//! `result`, `load`, `cleanup`, `deleted` or `closed` are *markers*: in the trace they are the
//! moments the child tells the world something is done.
//!
//! - `audit_every_staged_rename_is_synced_before_and_its_directory_after` (item 7, audit):
//!   the whole life of a saving child (store creation, 42 saves and checkpoints over four
//!   sessions, a checkpoint cleanup, a session delete, shutdown) runs under
//!   `strace -f -e trace=openat,write,…,rename,unlink,mkdir…`, for each record format
//!   (plain, gzip, and with the `encryption` feature gzip+encrypted, each writing records
//!   directly, and plain through the write-ahead log). The parent
//!   parses the trace (following `<unfinished …>` / `<… resumed>` pairs and the fd → path map
//!   of every `openat`) and checks that every `rename` of a staged file (`.tmp-` in its
//!   name) is preceded by a successful `fdatasync`/`fsync` of that file and followed by a
//!   successful `fsync` of the target's directory before the next marker; that every
//!   `unlink` of a record and every `mkdir` is followed by an `fsync` of its parent directory
//!   before the next marker (and, for a `mkdir`, before anything is renamed into it); that
//!   every write to the write-ahead log is followed by a successful sync of the log before
//!   the next marker, is a `pwrite64` in place (the log is preallocated and reused, never
//!   appended to) and that the log's creation is followed by an `fsync` of `metadata/`
//!   before the next marker; that the log is started again in place (a header written at
//!   offset 0) at least twice; and that no rename touches anything but a staged file. The checker is
//!   then run on copies of the trace with the `fdatasync` lines removed, and with the
//!   directory `fsync` lines removed: both must be reported (the harness can fail). It also
//!   checks that a staged file lives in its target's directory and is not written after its
//!   last sync.
//! - `sigkill_just_before_the_nth_syscall_passes_the_oracle` (item 7, crash-point sweep):
//!   for `openat`, `write`, `fdatasync`, `fsync` and `rename` (and `pwrite64`, the log's
//!   writes in place, through the write-ahead log), N = 1..30, and each record
//!   format (plain, gzip, gzip+encrypted with the `encryption` feature, and plain through the
//!   write-ahead log): a fresh store,
//!   a child that saves 8 records, then `strace -f -p <child>` attaches with
//!   `-e inject=SYSCALL:signal=SIGKILL:when=N`, then the child saves 34 more (acking each).
//!   Injection counts per syscall and per thread from the attach, so N counts the calls of
//!   the save path only (strace may attach only if ptrace is allowed; otherwise the test falls
//!   back to tracing from exec, where N counts from process start, and says so). After the
//!   kill the parent opens the store with a fresh `StateManager` and checks the crash oracle
//!   it shares with `tests/crash.rs` (`common::oracle`):
//!   **lost** (an acked save or checkpoint not stored), **corrupt** (a load or restore fails
//!   or returns a value that no save wrote), **missing** (index and files disagree), staged
//!   files left after the reopen. It prints which step each kill landed on.
//!   `the_crash_oracle_catches_lost_and_corrupt_records` proves the oracle can fail: a
//!   deleted record, a flipped byte and a deleted checkpoint file are reported.
//! - `injected_io_errors_fail_the_save_cleanly` (item 8): the child saves v1, then under
//!   `-e inject=SYSCALL:error=ERRNO:when=K` (K over every such call of one save, counted in a
//!   dry run) attempts v2, loads, saves v3, checkpoints v4, shuts down. Cases: `fdatasync` and
//!   `fsync` EIO, `write` ENOSPC (once, and twice in a row so the store's one retry fails
//!   too) and EIO, `openat` ENOSPC, `rename` EIO. Each case: the child does not panic; a
//!   failed save reports `Io` (EIO) or `StorageFull` (ENOSPC) and the old version loads; a
//!   save that reports `Ok` has, in the trace, a successful rename of its record with a
//!   successful data sync before and directory sync after (no false `Ok`); no `fsync` is
//!   retried on a descriptor whose `fsync` failed; the next save and checkpoint succeed; no
//!   staged file remains; a fresh manager reads v3 and the checkpoint. (strace counts calls
//!   per thread: where K falls on save v3's call instead, v3 is held to v2's rules, and the
//!   fresh manager reads v2.) That includes a
//!   failed *directory* fsync, which comes after the rename: the store renames the previous
//!   version back; `a_failed_directory_fsync_leaves_the_previous_version` pins it.
//! - `an_eio_from_the_log_fdatasync_fails_the_save_and_leaves_the_previous_value`: the
//!   same child through the write-ahead log, `EIO` on the log's `fdatasync`; once going on
//!   (v3, checkpoint, shutdown, reopen) and once aborting right after the failed save (the
//!   reopen must not replay it).
//!
//! These tests need `strace`, which a Rust toolchain does not bring, and the two that inject
//! errors after the set-up need strace to attach to a running child (`ptrace` of a process
//! it did not start: root, `CAP_SYS_PTRACE` or `kernel.yama.ptrace_scope` 0). Where that is
//! missing they do not pass quietly: each writes one `NOT RUN` line saying why, or, with
//! `MARS_STATE_REQUIRE_SYSTEM_TESTS=1` (set by `.ci/run`, which installs strace and runs as
//! root), fails. See `common::not_run`. A test never installs anything.
//!
//! Run alone: `cargo test --test syscalls -- --nocapture` (about 25 s in debug on 2 cores).
//! `MARS_SWEEP_MAX_N` changes the sweep's largest N; `MARS_SWEEP_TRACING=launch` forces the
//! trace-from-exec fallback.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use common::oracle::{Acked, Counts, Workload, read_lines, verify_reopened};
use common::{encrypt, staged_files};
use mars_state::{FileStorageBackend, StateManager};
use serde_json::{Value, json};

const CHILD_ENV: &str = "MARS_SYSCALL_CHILD";
const MODE_ENV: &str = "MARS_SYSCALL_MODE";
const FORMAT_ENV: &str = "MARS_SYSCALL_FORMAT";
/// The system calls every trace records.
const TRACED: &str = "trace=openat,write,pwrite64,fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,\
                      mkdir,mkdirat,statx,newfstatat";
/// What the child stats in a loop until the parent says go; seeing it in the trace proves
/// the child's threads are traced.
const PROBE: &str = "/nonexistent-mars-syscalls-probe";
const MARKERS: [&str; 7] = ["ack ", "ready", "result ", "load ", "cleanup ", "deleted ", "closed"];
/// Operations before the parent attaches, and after. The workload's operations
/// (`common::oracle::op_of`) make every third a checkpoint and let the sessions take turns,
/// so sessions 0 and 1 get their first checkpoint (and directory) after the attach.
const SETUP_OPS: u64 = 8;
const WORKLOAD_OPS: u64 = 34;
const CHILD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long strace gets to attach to a ready child.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(20);

// ----------------------------------------------------------------------------------------
// The workload (shared by child and parent; checked by `common::oracle`)

fn session_name(s: u64) -> String {
    format!("sys-s{s}")
}

/// The value operation `seq` writes for session `s`: 200 to 3,000 bytes (small, so the
/// sweep's many runs stay fast).
fn payload(s: u64, seq: u64) -> Value {
    let mut x =
        (seq + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (s + 7).wrapping_mul(0xD1B5_4A32_D192_ED03);
    x ^= x >> 29;
    let len = 200 + (x % 2800) as usize;
    let pad: String = (0..len)
        .map(|i| (b'a' + ((x >> (i % 50)) as u8).wrapping_add(i as u8) % 26) as char)
        .collect();
    json!({ "s": s, "seq": seq, "pad": pad })
}

const WORKLOAD: Workload = Workload { session_name, payload };

/// How records are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Plain,
    Gzip,
    /// Gzip, then encrypted (needs the `encryption` feature).
    GzipEncrypted,
    /// Plain, through the file backend's write-ahead log (its default).
    PlainLog,
}

impl Format {
    /// The formats the traced tests cover.
    fn all() -> Vec<Format> {
        let mut v = vec![Format::Plain, Format::Gzip];
        if cfg!(feature = "encryption") {
            v.push(Format::GzipEncrypted);
        }
        v.push(Format::PlainLog);
        v
    }

    fn name(self) -> &'static str {
        match self {
            Format::Plain => "plain",
            Format::Gzip => "gzip",
            Format::GzipEncrypted => "gzip+encrypted",
            Format::PlainLog => "plain+log",
        }
    }

    fn from_env() -> Format {
        let name = std::env::var(FORMAT_ENV).unwrap_or_default();
        Format::all().into_iter().find(|f| f.name() == name).unwrap_or(Format::Plain)
    }

    /// The file-name ending of its records.
    fn ext(self) -> &'static str {
        match self {
            Format::Plain | Format::PlainLog => ".json",
            Format::Gzip => ".json.gz",
            Format::GzipEncrypted => ".json.gz.enc",
        }
    }
}

async fn open(dir: &Path, format: Format) -> mars_state::Result<StateManager> {
    // The fault cases (`Format::Plain`) follow the direct-write protocol (stage, sync,
    // rename, sync the directory); the audit, the crash-point sweep and the failed log
    // sync also run through the write-ahead log.
    let log = format == Format::PlainLog;
    let backend = FileStorageBackend::options().write_ahead_log(log).open(dir)?;
    let mut b = StateManager::builder(backend).janitor_interval(Duration::from_secs(3600));
    if matches!(format, Format::Gzip | Format::GzipEncrypted) {
        b = b.compression(6);
    }
    if format == Format::GzipEncrypted {
        b = encrypt(b);
    }
    b.start().await
}

// ----------------------------------------------------------------------------------------
// The child

/// One `write` per line on a duplicate of stdout; a failed write (an injected error) is
/// retried, so the report always gets out and the failure lands on the store's next call.
struct Reporter(File);

impl Reporter {
    fn new() -> Self {
        let mut r = Reporter(File::from(std::io::stdout().as_fd().try_clone_to_owned().unwrap()));
        // libtest has printed "test child_saver ... " without a newline.
        r.raw(b"\n");
        r
    }

    fn raw(&mut self, mut bytes: &[u8]) {
        let mut failures = 0;
        while !bytes.is_empty() {
            match self.0.write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) => {
                    failures += 1;
                    assert!(failures < 1000, "the report channel keeps failing: {e}");
                }
            }
        }
    }

    fn say(&mut self, line: &str) {
        self.raw(format!("{line}\n").as_bytes());
    }
}

/// Stats `PROBE` every 2 ms until stdin says `go`.
fn wait_for_go() {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        let _ = tx.send(line);
    });
    loop {
        let _ = std::fs::symlink_metadata(PROBE);
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok(line) => {
                assert_eq!(line.trim(), "go", "unexpected instruction from the parent");
                return;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("stdin closed before go: {e}"),
        }
    }
}

#[test]
fn child_saver() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let dir = PathBuf::from(dir);
    let mode = std::env::var(MODE_ENV).unwrap();
    let format = Format::from_env();
    // One blocking thread: all file I/O of the store on one thread, in order.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .max_blocking_threads(1)
        .build()
        .unwrap();
    let mut out = Reporter::new();
    let m = rt.block_on(open(&dir, format)).unwrap();
    if let Some(then) = mode.strip_prefix("errors") {
        errors_child(&rt, &m, &mut out, then == "-then-abort");
        return;
    }
    rt.block_on(async {
        for seq in 1..=SETUP_OPS {
            out.say(&WORKLOAD.apply(&m, seq).await);
        }
    });
    out.say("ready");
    wait_for_go();
    rt.block_on(async {
        for seq in SETUP_OPS + 1..=SETUP_OPS + WORKLOAD_OPS {
            out.say(&WORKLOAD.apply(&m, seq).await);
        }
        if mode == "audit" {
            let n = m.cleanup_checkpoints(session_name(0), 1).await.unwrap();
            out.say(&format!("cleanup {n}"));
            let existed = m.delete_session(session_name(3)).await.unwrap();
            out.say(&format!("deleted {existed}"));
        }
        m.shutdown().await.unwrap();
        out.say("closed");
    });
    // Skip libtest's closing lines: an injected write error would make them panic.
    std::process::exit(0);
}

fn value(s: &str, v: u64) -> Value {
    json!({ "session": s, "v": v, "pad": "x".repeat(1000 + 10 * v as usize) })
}

fn outcome<T>(r: &mars_state::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("err {:?} {e}", e.kind()),
    }
}

fn loaded(r: &mars_state::Result<Option<Value>>) -> String {
    match r {
        Ok(Some(v)) => format!("v{}", v["v"]),
        Ok(None) => "none".into(),
        Err(e) => format!("err {:?} {e}", e.kind()),
    }
}

/// `abort`: die right after the load that follows the failed save, running no destructor
/// (what a save that failed leaves for the next open).
fn errors_child(rt: &tokio::runtime::Runtime, m: &StateManager, out: &mut Reporter, abort: bool) {
    rt.block_on(async {
        m.save_session("a", &value("a", 1)).await.unwrap();
        m.save_session("b", &value("b", 1)).await.unwrap();
    });
    out.say("ready");
    wait_for_go();
    rt.block_on(async {
        let r = m.save_session("a", &value("a", 2)).await;
        out.say(&format!("result v2 {}", outcome(&r)));
        out.say(&format!("load a {}", loaded(&m.load_session("a").await)));
        if abort {
            std::process::abort();
        }
        let r = m.save_session("a", &value("a", 3)).await;
        out.say(&format!("result v3 {}", outcome(&r)));
        let r = m.create_checkpoint("a", "main", &value("a", 4)).await;
        out.say(&format!(
            "result v4 {}",
            r.as_ref().map(|id| format!("ok {id}")).unwrap_or_else(|_| outcome(&r))
        ));
        out.say(&format!("load a {}", loaded(&m.load_session("a").await)));
        let r = m.shutdown().await;
        out.say(&format!("closed {}", outcome(&r)));
    });
    std::process::exit(0);
}

// ----------------------------------------------------------------------------------------
// Running a traced child

fn strace_works() -> bool {
    Command::new("strace").arg("-V").output().map(|o| o.status.success()).unwrap_or(false)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracing {
    /// strace attaches to the ready child: injection counts start after the setup.
    Attach,
    /// strace runs the child from exec: counts include process start.
    Launch,
}

fn child_command(program: &str, dir: &Path, mode: &str, format: Format) -> Command {
    let mut c = Command::new(program);
    c.env(CHILD_ENV, dir)
        .env(MODE_ENV, mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.env(FORMAT_ENV, format.name());
    c
}

fn child_args() -> [&'static str; 4] {
    ["--exact", "child_saver", "--nocapture", "--test-threads=1"]
}

fn strace_args(log: &Path, inject: Option<&str>) -> Vec<String> {
    let mut a =
        vec!["-f".to_owned(), "-s".into(), "48".into(), "-o".into(), log.display().to_string()];
    a.extend(["-e".to_owned(), TRACED.to_owned()]);
    if let Some(i) = inject {
        a.extend(["-e".to_owned(), format!("inject={i}")]);
    }
    a
}

fn collect(r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(r).read_to_string(&mut s);
        s
    })
}

/// What one traced child run produced.
struct Run {
    lines: Vec<String>,
    status: ExitStatus,
    stderr: String,
    trace: String,
    /// The child's open descriptors when strace attached (empty when it traced from exec).
    fds: HashMap<i64, (String, bool)>,
}

impl Run {
    fn calls(&self) -> Vec<Call> {
        parse_trace(&self.trace, &self.fds)
    }

    fn killed(&self) -> bool {
        self.status.signal() == Some(libc::SIGKILL)
    }
}

/// The open descriptors of process `pid`: number → (path, is a directory).
fn open_fds(pid: u32) -> HashMap<i64, (String, bool)> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return out };
    for e in rd.flatten() {
        let (Ok(n), Ok(target)) =
            (e.file_name().to_string_lossy().parse::<i64>(), std::fs::read_link(e.path()))
        else {
            continue;
        };
        out.insert(n, (target.display().to_string(), target.is_dir()));
    }
    out
}

fn wait_timeout(c: &mut Child, until: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Each thread of `pid`: (thread id, state, tracer pid).
fn tracer_pids(pid: u32) -> Vec<(String, String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        out.push((
            t.file_name().to_string_lossy().into_owned(),
            field("State:"),
            field("TracerPid:"),
        ));
    }
    out
}

/// Whether every thread of `pid` is traced by `tracer`.
fn all_threads_traced(pid: u32, tracer: u32) -> bool {
    let threads = tracer_pids(pid);
    !threads.is_empty() && threads.iter().all(|(_, _, t)| *t == tracer.to_string())
}

/// Runs the child in `mode` on `dir` under strace (`inject` is strace's `-e inject=`
/// value): waits for `ready`, makes sure the child is traced, says `go`, and waits for the
/// end. `Err` if strace could not attach.
fn traced_run(
    tracing: Tracing,
    dir: &Path,
    mode: &str,
    format: Format,
    inject: Option<&str>,
) -> Result<Run, String> {
    let exe = std::env::current_exe().unwrap();
    let log = dir.with_extension("strace.log");
    let _ = std::fs::remove_file(&log);
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let mut child = match tracing {
        Tracing::Launch => {
            let mut c = child_command("strace", dir, mode, format);
            c.args(strace_args(&log, inject)).arg("--").arg(&exe).args(child_args());
            c.spawn().unwrap()
        }
        Tracing::Attach => {
            let mut c = child_command(exe.to_str().unwrap(), dir, mode, format);
            c.args(child_args());
            c.spawn().unwrap()
        }
    };
    let mut strace: Option<Child> = None;
    let rx = read_lines(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    let mut stdin: Option<ChildStdin> = child.stdin.take();
    let mut lines = Vec::new();
    let mut ready = false;
    let mut fds = HashMap::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let is_ready = line == "ready";
        lines.push(line);
        if is_ready {
            ready = true;
            break;
        }
    }
    if ready {
        if tracing == Tracing::Attach {
            let mut s = Command::new("strace")
                .args(strace_args(&log, inject))
                .args(["-p", &child.id().to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let attach_deadline = Instant::now() + ATTACH_TIMEOUT;
            loop {
                let probed = std::fs::read_to_string(&log).is_ok_and(|t| t.contains(PROBE));
                if probed && all_threads_traced(child.id(), s.id()) {
                    break;
                }
                if let Some(status) = s.try_wait().unwrap() {
                    let mut err = String::new();
                    let _ = s.stderr.take().unwrap().read_to_string(&mut err);
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("strace -p could not attach ({status}): {}", err.trim()));
                }
                if Instant::now() > attach_deadline {
                    let tracers = tracer_pids(child.id());
                    let _ = s.kill();
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = s.wait();
                    return Err(format!(
                        "strace -p (pid {}) did not attach within {ATTACH_TIMEOUT:?}: probe seen in its log: \
                         {probed}; TracerPid of each thread: {tracers:?}",
                        s.id()
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            strace = Some(s);
            fds = open_fds(child.id());
        }
        let _ = stdin.as_mut().unwrap().write_all(b"go\n");
        let _ = stdin.as_mut().unwrap().flush();
    }
    drop(stdin.take());
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        lines.push(line);
    }
    let status = match wait_timeout(&mut child, deadline) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            if let Some(s) = strace.as_mut() {
                let _ = s.kill();
            }
            panic!(
                "the child ({mode}, inject {inject:?}) did not finish within {CHILD_TIMEOUT:?}; output {lines:?}"
            );
        }
    };
    if let Some(mut s) = strace
        && wait_timeout(&mut s, Instant::now() + Duration::from_secs(10)).is_none()
    {
        let _ = s.kill();
        let _ = s.wait();
    }
    let stderr = stderr.join().unwrap();
    let trace = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    Ok(Run { lines, status, stderr, trace, fds })
}

/// A fresh directory for one store (tmpfs when available: kills and injected errors do not
/// depend on the medium, and it keeps the sweep fast).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new().prefix("mars-syscalls-").tempdir_in(shm);
    b.unwrap_or_else(|_| tempfile::Builder::new().prefix("mars-syscalls-").tempdir().unwrap())
}

/// A fresh scratch directory (see `scratch`) and the store's directory inside it.
fn scratch_store() -> (tempfile::TempDir, PathBuf) {
    let tmp = scratch();
    let dir = tmp.path().join("store");
    (tmp, dir)
}

/// Runs tests of this file one at a time: each keeps both cores busy with strace.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// How every test here but `child_saver` starts: `None` in a re-executed child (which only
/// runs `child_saver`) and where strace is missing (after `common::not_run`), else with
/// this file's tests serialized (the guard keeps the others out until it drops).
fn parent_only(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if std::env::var_os(CHILD_ENV).is_some() {
        return None;
    }
    if !strace_works() {
        common::not_run(
            &format!("syscalls::{test}"),
            "`strace -V` fails: strace is not installed (Debian/Ubuntu package `strace`)",
        );
        return None;
    }
    Some(serial())
}

/// The run of a test that needs strace to attach to a running child. The kernel refuses an
/// ordinary user the `ptrace` of a process that is not its tracer's descendant under Yama
/// `ptrace_scope` 1 or more (Ubuntu's default): that is reported with `common::not_run` and
/// gives `None`; any other failure to attach fails the test.
fn attached(test: &str, run: Result<Run, String>) -> Option<Run> {
    match run {
        Ok(run) => Some(run),
        Err(e) if e.contains("Operation not permitted") => {
            common::not_run(
                &format!("syscalls::{test}"),
                &format!(
                    "strace may not attach to a running child here ({e}); that needs root, CAP_SYS_PTRACE or \
                     kernel.yama.ptrace_scope = 0"
                ),
            );
            None
        }
        Err(e) => panic!("{test}: strace could not attach to the running child: {e}"),
    }
}

// ----------------------------------------------------------------------------------------
// Parsing strace output

#[derive(Debug, Clone)]
struct Call {
    /// Line where the call started and where it completed (the same unless it was split
    /// into `<unfinished ...>` and `<... resumed>`).
    start: usize,
    end: usize,
    name: String,
    /// Quoted string arguments (paths, the start of a write's buffer).
    strings: Vec<String>,
    /// The first argument as a number (a file descriptor), if it is one.
    fd: Option<i64>,
    /// The path the fd argument was opened on, and whether it was a directory.
    fd_path: Option<(String, bool)>,
    /// `None` for `?` (the call never returned: killed) or an unfinished call.
    ret: Option<i64>,
    errno: Option<String>,
    injected: bool,
    /// A report line of the child, for a `write` of one.
    marker: Option<String>,
    /// An `openat` with `O_DIRECTORY`.
    o_directory: bool,
    /// The last argument as a number (a `pwrite64`'s offset), if it is one.
    last_arg: Option<i64>,
}

impl Call {
    fn is_sync(&self) -> bool {
        self.name == "fsync" || self.name == "fdatasync"
    }
    fn ok(&self) -> bool {
        self.ret.is_some_and(|r| r >= 0)
    }
    fn is_rename(&self) -> bool {
        self.name.starts_with("rename")
    }
    fn is_unlink(&self) -> bool {
        self.name.starts_with("unlink")
    }
    fn is_mkdir(&self) -> bool {
        self.name.starts_with("mkdir")
    }
    fn path(&self) -> Option<&str> {
        self.strings.first().map(String::as_str)
    }
}

fn quoted(args: &str) -> Vec<String> {
    let b = args.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            let mut s = String::new();
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                if b[j] == b'\\' && j + 1 < b.len() {
                    s.push(b[j] as char);
                    j += 1;
                }
                s.push(b[j] as char);
                j += 1;
            }
            out.push(s);
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

fn marker_of(buf: &str) -> Option<String> {
    let text = buf.replace("\\n", "\n");
    let text = text.trim_start_matches('\n');
    MARKERS.iter().any(|m| text.starts_with(m)).then(|| text.trim_end().to_owned())
}

/// Parses an `strace -f` log; `fds` holds the descriptors open before the trace began.
fn parse_trace(text: &str, fds: &HashMap<i64, (String, bool)>) -> Vec<Call> {
    let mut pending: HashMap<u32, (usize, String)> = HashMap::new();
    let mut fds = fds.clone();
    let mut calls = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, raw) in lines.iter().enumerate() {
        let Some((tid, rest)) = raw.trim_end().split_once(' ') else { continue };
        let Ok(tid) = tid.parse::<u32>() else { continue };
        let rest = rest.trim_start();
        if rest.starts_with("+++") || rest.starts_with("---") {
            continue;
        }
        let (start, text) = if let Some(r) = rest.strip_prefix("<... ") {
            let Some((_, after)) = r.split_once(" resumed>") else { continue };
            match pending.remove(&tid) {
                Some((s, head)) => (s, format!("{head}{after}")),
                None => continue,
            }
        } else if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(tid, (i, head.trim_end().to_owned()));
            continue;
        } else {
            (i, rest.to_owned())
        };
        if let Some(call) = parse_call(start, i, &text, &mut fds) {
            calls.push(call);
        }
    }
    // Calls cut short by a kill.
    let mut rest: Vec<_> = pending.into_values().collect();
    rest.sort();
    for (s, head) in rest {
        if let Some(call) = parse_call(s, lines.len(), &format!("{head}) = ?"), &mut fds) {
            calls.push(call);
        }
    }
    calls
}

fn parse_call(
    start: usize,
    end: usize,
    text: &str,
    fds: &mut HashMap<i64, (String, bool)>,
) -> Option<Call> {
    let open = text.find('(')?;
    let name = text[..open].to_owned();
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    // strace pads the result to a column: `fsync(5)        = 0`.
    let eq = text.rfind(" = ")?;
    let args = text[..eq].trim_end().strip_suffix(')')?.get(open + 1..)?;
    let result = text[eq + 3..].trim();
    let mut words = result.split_whitespace();
    let ret = words.next().and_then(|r| r.parse::<i64>().ok());
    let errno = if ret == Some(-1) { words.next().map(str::to_owned) } else { None };
    let strings = quoted(args);
    let first = args.split(',').next().unwrap_or("").trim();
    let fd = first.parse::<i64>().ok();
    let fd_path = fd.and_then(|f| fds.get(&f).cloned());
    if name == "openat"
        && let (Some(r), Some(p)) = (ret, strings.first())
        && r >= 0
    {
        fds.insert(r, (p.clone(), args.contains("O_DIRECTORY")));
    }
    let marker = if name == "write" { strings.first().and_then(|b| marker_of(b)) } else { None };
    Some(Call {
        start,
        end,
        name,
        strings,
        fd,
        fd_path,
        ret,
        errno,
        injected: result.contains("(INJECTED)"),
        marker,
        o_directory: has_o_directory(args),
        last_arg: args.rsplit(',').next().and_then(|a| a.trim().parse::<i64>().ok()),
    })
}

fn has_o_directory(args: &str) -> bool {
    args.contains("O_DIRECTORY")
}

fn parent_dir(p: &str) -> &str {
    Path::new(p).parent().and_then(Path::to_str).unwrap_or("")
}

fn base_name(p: &str) -> &str {
    Path::new(p).file_name().and_then(|n| n.to_str()).unwrap_or("")
}

fn is_staged(p: &str) -> bool {
    base_name(p).contains(".tmp-")
}

/// Where a call's target lies: for sorting kills and failures into the steps of a save.
fn class_of(c: &Call) -> String {
    if c.marker.is_some() {
        return format!("{} of a report line", c.name);
    }
    let (path, is_dir) = match (&c.fd_path, c.path()) {
        (Some((p, d)), _) => (p.as_str(), *d),
        (None, Some(p)) if c.fd.is_none() => (p, c.o_directory),
        _ => return format!("{} on an untracked descriptor", c.name),
    };
    let what = if is_staged(path) {
        "staged file"
    } else if is_dir {
        "directory"
    } else if path.ends_with("index.log") {
        "index journal"
    } else if path.contains("/metadata/") {
        "metadata"
    } else if path.contains("/sessions/") || path.contains("/checkpoints/") {
        "record"
    } else {
        "other"
    };
    format!("{} {what}", c.name)
}

// ----------------------------------------------------------------------------------------
// The audit

#[derive(Default, Debug)]
struct Audit {
    renames: usize,
    /// Writes to the write-ahead log.
    log_writes: usize,
    /// Of those, writes at offset 0: a new generation's header (the log is written in
    /// place, from its start, once the record files are up to date).
    log_generations: usize,
    unlinks: usize,
    mkdirs: usize,
    markers: usize,
    violations: Vec<String>,
}

/// Checks the durability rules over the calls made on paths under `root`.
fn audit(calls: &[Call], root: &str) -> Audit {
    let mut a = Audit::default();
    let prefix = format!("{root}/");
    let under = |p: &str| p == root || p.starts_with(&prefix);
    let markers: Vec<&Call> = calls.iter().filter(|c| c.marker.is_some() && c.ok()).collect();
    a.markers = markers.len();
    let next_marker =
        |after: usize| markers.iter().filter(|m| m.start > after).map(|m| m.start).min();
    // A report of a failure acknowledges nothing: what a failed save left unsynced is not
    // a broken promise (whether its effects are visible is checked by the caller).
    let acknowledges = |after: usize| {
        markers.iter().filter(|m| m.start > after).min_by_key(|m| m.start).is_some_and(|m| {
            let text = m.marker.as_deref().unwrap_or_default();
            !text.contains(" err ")
        })
    };
    // A successful fsync of directory `dir` that starts after line `after` and ends before
    // the next marker (or the end of the trace when there is none).
    let dir_synced = |dir: &str, after: usize| {
        let limit = next_marker(after).unwrap_or(usize::MAX);
        calls.iter().any(|c| {
            c.name == "fsync"
                && c.ok()
                && c.start > after
                && c.end < limit
                && c.fd_path.as_ref().is_some_and(|(p, _)| p == dir)
        })
    };
    for (i, c) in calls.iter().enumerate() {
        if c.is_rename() && c.ok() {
            let (Some(from), Some(to)) = (c.strings.first(), c.strings.get(1)) else { continue };
            if !under(from) && !under(to) {
                continue;
            }
            a.renames += 1;
            if !is_staged(from) {
                a.violations.push(format!(
                    "line {}: rename of a file that is not staged: {from} -> {to}",
                    c.start
                ));
                continue;
            }
            if parent_dir(from) != parent_dir(to) {
                a.violations.push(format!(
                    "line {}: {from} is not staged in the directory of {to}",
                    c.start
                ));
            }
            // The store's backup of the previous version (a hard link, `.NAME.tmp-prev-…`),
            // renamed back after a failed directory fsync: it holds the old, long-synced data
            // and makes no new version visible (a retry that follows is audited on its own).
            if from.contains(".tmp-prev-") {
                continue;
            }
            let on_staged = |x: &Call| x.fd_path.as_ref().is_some_and(|(p, _)| p == from);
            let last_sync = calls[..i]
                .iter()
                .rfind(|s| s.is_sync() && s.ok() && s.end < c.start && on_staged(s));
            match last_sync {
                None => {
                    a.violations.push(format!(
                        "line {}: {to} renamed into place without a sync of {from}",
                        c.start
                    ));
                }
                Some(sync) => {
                    let written_after = calls[..i].iter().any(|w| {
                        (w.name == "write" || w.name == "pwrite64")
                            && w.start > sync.end
                            && on_staged(w)
                    });
                    if written_after {
                        a.violations.push(format!(
                            "line {}: {from} was written after its last sync",
                            c.start
                        ));
                    }
                }
            }
            if next_marker(c.end).is_none() {
                a.violations
                    .push(format!("line {}: no report follows the rename of {to}", c.start));
            }
            if acknowledges(c.end) && !dir_synced(parent_dir(to), c.end) {
                a.violations.push(format!(
                    "line {}: the directory of {to} is not fsynced between the rename and the next report",
                    c.start
                ));
            }
        } else if c.is_unlink() && c.ok() {
            let Some(p) = c.path() else { continue };
            if !under(p) || is_staged(p) {
                continue;
            }
            a.unlinks += 1;
            if acknowledges(c.end) && !dir_synced(parent_dir(p), c.end) {
                a.violations.push(format!(
                    "line {}: unlink of {p} not followed by an fsync of its directory",
                    c.start
                ));
            }
        } else if (c.name == "write" || c.name == "pwrite64")
            && c.ok()
            && c.fd_path.as_ref().is_some_and(|(p, _)| p.ends_with("/metadata/.wal"))
        {
            // A frame in the write-ahead log acknowledges nothing until a sync of the log
            // that starts after it has succeeded.
            a.log_writes += 1;
            let log = c.fd_path.as_ref().map(|(p, _)| p.as_str()).unwrap_or_default();
            if c.name == "write" {
                // The log is preallocated and written in place (`pwrite64` at an offset),
                // never appended to.
                a.violations.push(format!("line {}: an append to the log", c.start));
            }
            if c.last_arg == Some(0) {
                a.log_generations += 1;
            }
            let limit = next_marker(c.end).unwrap_or(usize::MAX);
            let synced = calls.iter().any(|s| {
                s.is_sync()
                    && s.ok()
                    && s.start > c.end
                    && s.end < limit
                    && s.fd_path.as_ref().is_some_and(|(p, _)| p == log)
            });
            if acknowledges(c.end) && !synced {
                a.violations.push(format!(
                    "line {}: a write to the log is not synced before the next report",
                    c.start
                ));
            }
        } else if c.name == "openat"
            && c.ok()
            && c.path().is_some_and(|p| under(p) && p.ends_with("/metadata/.wal"))
            && !calls[..i].iter().any(|o| o.name == "openat" && o.path() == c.path())
        {
            // The log's first opening in a fresh store creates it: its name must be durable
            // in `metadata/` before anything written to it is acknowledged.
            let p = c.path().unwrap_or_default();
            if acknowledges(c.end) && !dir_synced(parent_dir(p), c.end) {
                a.violations.push(format!(
                    "line {}: the new log {p} is not made durable in its directory before the next report",
                    c.start
                ));
            }
        } else if c.is_mkdir() && c.ok() {
            let Some(p) = c.path() else { continue };
            if !under(p) {
                continue;
            }
            a.mkdirs += 1;
            let parent = parent_dir(p);
            let first_use = calls[i..]
                .iter()
                .filter(|r| r.is_rename() && r.strings.get(1).is_some_and(|t| parent_dir(t) == p))
                .map(|r| r.start)
                .min()
                .unwrap_or(usize::MAX);
            let synced = calls.iter().any(|s| {
                s.name == "fsync"
                    && s.ok()
                    && s.start > c.end
                    && s.end < first_use
                    && s.end < next_marker(c.end).unwrap_or(usize::MAX)
                    && s.fd_path.as_ref().is_some_and(|(q, _)| q == parent)
            });
            if !synced && acknowledges(c.end) {
                a.violations.push(format!(
                    "line {}: new directory {p} not fsynced into {parent} before use",
                    c.start
                ));
            }
        }
        // No fsync is retried on a descriptor whose fsync failed (its dirty pages may have
        // been dropped: a retry can report success for lost data).
        if c.is_sync() && c.ret == Some(-1) {
            let fd = c.fd;
            for later in &calls[i + 1..] {
                if later.name == "openat" && later.ret == fd {
                    break;
                }
                if later.is_sync() && later.fd == fd {
                    a.violations.push(format!(
                        "line {}: {} retried on fd {fd:?} after it failed at line {}",
                        later.start, later.name, c.start
                    ));
                    break;
                }
            }
        }
    }
    a
}

// ----------------------------------------------------------------------------------------
// The oracle after a kill

/// Reopens the store after a run and checks it against what was acked (`common::oracle`).
async fn check_store(dir: &Path, format: Format, a: &mut Acked, counts: &mut Counts, label: &str) {
    if !staged_files(dir).is_empty() {
        counts.killed_mid_write += 1;
    }
    let m = open(dir, format).await.unwrap_or_else(|e| panic!("{label}: reopening failed: {e}"));
    verify_reopened(&m, dir, format.ext(), a, label, counts).await;
    m.shutdown().await.unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

// ----------------------------------------------------------------------------------------
// The tests

#[test]
fn audit_every_staged_rename_is_synced_before_and_its_directory_after() {
    let Some(_one) =
        parent_only("audit_every_staged_rename_is_synced_before_and_its_directory_after")
    else {
        return;
    };
    for format in Format::all() {
        let (_tmp, dir) = scratch_store();
        let run = traced_run(Tracing::Launch, &dir, "audit", format, None).unwrap();
        assert!(run.status.success(), "the audited child failed ({}):\n{}", run.status, run.stderr);
        assert!(
            run.lines.iter().any(|l| l == "closed"),
            "the child did not finish: {:?}",
            run.lines
        );
        let root = dir.to_str().unwrap();
        let calls = run.calls();
        let a = audit(&calls, root);
        let count = |n: &str| {
            calls
                .iter()
                .filter(|c| c.name == n && c.strings.iter().any(|s| s.starts_with(root)))
                .count()
        };
        println!(
            "syscall audit ({}): {} staged renames, {} log writes ({} in place at offset 0: generations), {} record \
             unlinks, {} mkdirs, {} reports checked ({} fdatasync, {} fsync, {} openat in the store); violations: {}",
            format.name(),
            a.renames,
            a.log_writes,
            a.log_generations,
            a.unlinks,
            a.mkdirs,
            a.markers,
            calls.iter().filter(|c| c.name == "fdatasync" && c.fd_path.is_some()).count(),
            calls.iter().filter(|c| c.name == "fsync" && c.fd_path.is_some()).count(),
            count("openat"),
            a.violations.len()
        );
        assert!(
            a.violations.is_empty(),
            "durability rule violations:\n{}",
            a.violations.join("\n")
        );
        let acks = run.lines.iter().filter(|l| l.starts_with("ack ")).count() as u64;
        assert_eq!(acks, SETUP_OPS + WORKLOAD_OPS);
        let log = format == Format::PlainLog;
        if log {
            // Every save and checkpoint appends a frame; the records reach their files when
            // the log is replayed into them at shutdown (staged renames, audited as above).
            assert!(
                a.log_writes as u64 >= acks,
                "too few log writes seen ({}): is the trace complete?",
                a.log_writes
            );
            assert!(a.renames > 0, "the log was never brought into the record files");
            // A generation begins before the first frame and again once the record files are
            // brought up to date at shutdown.
            assert!(a.log_generations >= 2, "the log was not restarted in place: {a:?}");
        } else {
            // Every save and checkpoint renames once; so do the store metadata, the
            // pending-delete marker and the journal snapshot at shutdown.
            assert!(
                a.renames as u64 > acks,
                "too few renames seen ({}): is the trace complete?",
                a.renames
            );
        }
        assert!(
            a.unlinks >= 2 && a.mkdirs >= 4,
            "too few unlinks ({}) or mkdirs ({})",
            a.unlinks,
            a.mkdirs
        );

        // The checker must catch a missing file sync and a missing directory sync.
        let no_fdatasync: String = run
            .trace
            .lines()
            .filter(|l| !l.contains("fdatasync("))
            .map(|l| format!("{l}\n"))
            .collect();
        let broken = audit(&parse_trace(&no_fdatasync, &run.fds), root);
        // The store syncs files with fdatasync, so every fsync is a directory's.
        let no_dir_fsync: String = run
            .trace
            .lines()
            .filter(|l| !l.contains(" fsync(") && !l.contains("<... fsync resumed>"))
            .map(|l| format!("{l}\n"))
            .collect();
        let broken_dir = audit(&parse_trace(&no_dir_fsync, &run.fds), root);
        println!(
            "syscall audit broken variants ({}): without fdatasync {} violations, without directory fsync {} \
             violations",
            format.name(),
            broken.violations.len(),
            broken_dir.violations.len()
        );
        let synced_writes = if log { a.renames + a.log_writes } else { a.renames };
        assert!(
            broken.violations.len() >= synced_writes,
            "the audit missed renames or log writes without a sync"
        );
        assert!(
            broken_dir.violations.len() >= a.renames,
            "the audit missed renames without a directory sync"
        );
    }
}

#[test]
fn sigkill_just_before_the_nth_syscall_passes_the_oracle() {
    let Some(_one) = parent_only("sigkill_just_before_the_nth_syscall_passes_the_oracle") else {
        return;
    };
    let max_n: u32 =
        std::env::var("MARS_SWEEP_MAX_N").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let rt = runtime();
    let started = Instant::now();
    let mut tracing = match std::env::var("MARS_SWEEP_TRACING").as_deref() {
        Ok("launch") => Tracing::Launch,
        _ => Tracing::Attach,
    };
    let mut counts = Counts::default();
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    let mut formats_seen = Vec::new();
    // `pwrite64`: the write-ahead log's frames and headers, written in place (log only).
    for (syscall, format) in ["openat", "write", "pwrite64", "fdatasync", "fsync", "rename"]
        .into_iter()
        .flat_map(|s| Format::all().into_iter().map(move |f| (s, f)))
        .filter(|&(s, f)| s != "pwrite64" || f == Format::PlainLog)
    {
        if !formats_seen.contains(&format.name()) {
            formats_seen.push(format.name());
        }
        let set = if syscall == "rename" { "rename,renameat,renameat2" } else { syscall };
        let mut not_reached = 0;
        for n in 1..=max_n {
            let inject = format!("{set}:signal=SIGKILL:when={n}");
            let label = format!("{syscall} #{n} ({})", format.name());
            // Every attempt gets a fresh store: a child that was not traced still saved.
            let mut attempt = 0;
            let (_tmp, dir, run) = loop {
                let (tmp, dir) = scratch_store();
                match traced_run(tracing, &dir, "workload", format, Some(&inject)) {
                    Ok(r) => break (tmp, dir, r),
                    Err(e) if tracing == Tracing::Attach && attempt < 2 => {
                        println!("crash-point sweep: {label}: {e}; trying again");
                        attempt += 1;
                    }
                    Err(e) if tracing == Tracing::Attach => {
                        println!(
                            "crash-point sweep: {label}: {e}; falling back to tracing from exec (N counts from \
                             process start)"
                        );
                        tracing = Tracing::Launch;
                    }
                    Err(e) => panic!("{label}: {e}"),
                }
            };
            assert!(
                run.killed() || run.status.success(),
                "{label}: the child failed on its own ({}):\n{}",
                run.status,
                run.stderr
            );
            assert!(
                !run.stderr.contains("panicked"),
                "{label}: the child panicked:\n{}",
                run.stderr
            );
            counts.runs += 1;
            let mut a = Acked::new(WORKLOAD);
            counts.acks += a.read(&run.lines, &label);
            if run.killed() {
                counts.killed += 1;
                let calls = run.calls();
                let what = calls
                    .iter()
                    .find(|c| c.ret.is_none() && set.split(',').any(|s| s == c.name))
                    .map(class_of)
                    .unwrap_or_else(|| format!("{syscall} (not in the trace)"));
                *landed.entry(what).or_default() += 1;
            } else {
                not_reached += 1;
            }
            rt.block_on(check_store(&dir, format, &mut a, &mut counts, &label));
        }
        println!(
            "crash-point sweep: {syscall} ({}) N=1..{max_n} done ({not_reached} runs ended before call N), \
             {:.1}s",
            format.name(),
            started.elapsed().as_secs_f64()
        );
    }
    println!(
        "crash-point sweep ({tracing:?}, formats {formats_seen:?}): {} in {:.1}s",
        counts.summary(),
        started.elapsed().as_secs_f64()
    );
    println!("crash-point sweep: where the kills landed: {landed:?}");
    counts.assert_sound();
    assert!(counts.killed >= counts.runs * 9 / 10, "too few runs were killed: {counts:?}");
}

/// The crash oracle can fail: after a clean run, a deleted session record, a flipped byte
/// in another and a deleted checkpoint file must be reported as lost, corrupt and lost.
#[test]
fn the_crash_oracle_catches_lost_and_corrupt_records() {
    let Some(_one) = parent_only("the_crash_oracle_catches_lost_and_corrupt_records") else {
        return;
    };
    let (_tmp, dir) = scratch_store();
    let run = traced_run(Tracing::Launch, &dir, "workload", Format::Plain, None).unwrap();
    assert!(run.status.success(), "{}", run.stderr);
    let mut a = Acked::new(WORKLOAD);
    a.read(&run.lines, "clean run");
    std::fs::remove_file(dir.join("sessions").join(format!("{}.json", session_name(1)))).unwrap();
    let victim = dir.join("sessions").join(format!("{}.json", session_name(2)));
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::OpenOptions::new().write(true).open(&victim).unwrap().write_all(&bytes).unwrap();
    let cp = &a.checkpoints[0];
    let cp_file =
        dir.join("checkpoints").join(session_name(cp.session)).join(format!("{}.json", cp.id));
    std::fs::remove_file(cp_file).unwrap();
    let mut counts = Counts::default();
    runtime().block_on(check_store(&dir, Format::Plain, &mut a, &mut counts, "broken store"));
    println!(
        "crash oracle on a damaged store: lost={} corrupt={} missing={}",
        counts.lost, counts.corrupt, counts.missing
    );
    assert!(counts.lost >= 2 && counts.corrupt >= 1, "the oracle missed damage: {counts:?}");
}

/// Pins a fixed bug: when the directory fsync after the rename fails, the save reports
/// `Err`, and the previous version must load (the store renames it back), not the state
/// the caller was told was not saved. README: "On any error the staged file is removed and
/// the previous version is intact"; `StorageBackend::put`: "after `Err` the old value is
/// intact".
#[test]
fn a_failed_directory_fsync_leaves_the_previous_version() {
    let Some(_one) = parent_only("a_failed_directory_fsync_leaves_the_previous_version") else {
        return;
    };
    let (_tmp, dir) = scratch_store();
    let run =
        traced_run(Tracing::Attach, &dir, "errors", Format::Plain, Some("fsync:error=EIO:when=1"));
    let Some(run) = attached("a_failed_directory_fsync_leaves_the_previous_version", run) else {
        return;
    };
    let o = outcome_of(&run.lines);
    assert!(o.v2.starts_with("err Io "), "{o:?}");
    assert_eq!(
        o.load_after_v2, "v1",
        "the save failed but its new version replaced the old one: {o:?}"
    );
}

/// Issue 10, defect 11: an `EIO` from the `fdatasync` of the write-ahead log (the one sync
/// of a save in log mode) must fail that save, and nothing of it may show: the previous
/// value loads in the same process and after a crash right after the failure (the
/// unsynced frame is cut off the log, or a replay would bring it back), the descriptor
/// whose sync failed is never synced again, and later saves and a checkpoint work and
/// survive a reopen (`LogWriter::append` promises the handle goes on working).
#[test]
fn an_eio_from_the_log_fdatasync_fails_the_save_and_leaves_the_previous_value() {
    const NAME: &str = "an_eio_from_the_log_fdatasync_fails_the_save_and_leaves_the_previous_value";
    let Some(_one) = parent_only(NAME) else { return };
    let rt = runtime();
    for mode in ["errors", "errors-then-abort"] {
        let (_tmp, dir) = scratch_store();
        let run = traced_run(
            Tracing::Attach,
            &dir,
            mode,
            Format::PlainLog,
            Some("fdatasync:error=EIO:when=1"),
        );
        let Some(run) = attached(NAME, run) else { return };
        let o = outcome_of(&run.lines);
        let calls = run.calls();
        // strace counts `when` per thread: a thread that first syncs later (the one that
        // brings the records up to date at shutdown) gets an EIO too. Only the save's is
        // checked here; a failure at shutdown leaves the log for the reopen to replay.
        let failed: Vec<&Call> = calls
            .iter()
            .filter(|c| c.injected && c.errno.is_some() && c.start < v2_line(&calls))
            .collect();
        assert_eq!(
            failed.len(),
            1,
            "{mode}: expected one injected failure in the save: {failed:?}; {o:?}"
        );
        let on = failed[0].fd_path.as_ref().map(|(p, _)| p.as_str()).unwrap_or_default();
        assert!(
            on.ends_with("/metadata/.wal"),
            "{mode}: the EIO hit {on:?}, not the log's fdatasync"
        );
        assert!(
            o.v2.starts_with("err Io "),
            "{mode}: a save whose log sync failed did not fail: {o:?}"
        );
        assert_eq!(o.load_after_v2, "v1", "{mode}: the failed save's value is visible: {o:?}");
        let a = audit(&calls, dir.to_str().unwrap());
        assert!(a.violations.is_empty(), "{mode}: {:#?}", a.violations);
        if mode == "errors" {
            assert!(run.status.success() && !run.stderr.contains("panicked"), "{}", run.stderr);
            assert_eq!(
                (o.v3.as_str(), o.load_end.as_str(), o.closed.as_str()),
                ("ok", "v3", "ok"),
                "{o:?}"
            );
            let id =
                o.v4.strip_prefix("ok ")
                    .unwrap_or_else(|| panic!("the checkpoint after it failed: {o:?}"));
            rt.block_on(async {
                let m = open(&dir, Format::PlainLog).await.unwrap();
                assert_eq!(loaded(&m.load_session("a").await), "v3");
                assert_eq!(loaded(&m.load_session("b").await), "v1");
                let cp = m.restore_checkpoint(&id.parse().unwrap()).await.unwrap();
                assert!(
                    cp.is_some_and(|c| c.data == value("a", 4)),
                    "the checkpoint after the failure is lost"
                );
                m.shutdown().await.unwrap();
            });
        } else {
            assert_eq!(run.status.signal(), Some(libc::SIGABRT), "{mode}: {}", run.stderr);
            assert!(
                dir.join("metadata").join(".wal").exists(),
                "the aborted child left no log to replay"
            );
            rt.block_on(async {
                let m = open(&dir, Format::PlainLog).await.unwrap();
                let a = loaded(&m.load_session("a").await);
                assert_eq!(a, "v1", "the save that failed came back after a crash");
                assert_eq!(loaded(&m.load_session("b").await), "v1");
                m.shutdown().await.unwrap();
            });
        }
        let left = staged_files(&dir);
        assert!(left.is_empty(), "{mode}: staged files left: {left:?}");
    }
}

/// One I/O error case's outcome, as the child reported it.
#[derive(Debug)]
struct ErrOutcome {
    v2: String,
    load_after_v2: String,
    v3: String,
    v4: String,
    load_end: String,
    closed: String,
}

fn outcome_of(lines: &[String]) -> ErrOutcome {
    let find = |prefix: &str, nth: usize| {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(prefix))
            .nth(nth)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("(no {prefix:?} line)"))
    };
    ErrOutcome {
        v2: find("result v2 ", 0),
        load_after_v2: find("load a ", 0),
        v3: find("result v3 ", 0),
        v4: find("result v4 ", 0),
        load_end: find("load a ", 1),
        closed: find("closed ", 0),
    }
}

#[test]
fn injected_io_errors_fail_the_save_cleanly() {
    let Some(_one) = parent_only("injected_io_errors_fail_the_save_cleanly") else { return };
    let rt = runtime();
    let started = Instant::now();

    // Dry run: how many calls of each kind one save makes (from the attach to "result v2").
    let (_tmp, dir) = scratch_store();
    let dry = traced_run(Tracing::Attach, &dir, "errors", Format::Plain, None);
    let Some(dry) = attached("injected_io_errors_fail_the_save_cleanly", dry) else { return };
    assert!(dry.status.success(), "dry run failed:\n{}", dry.stderr);
    let calls = dry.calls();
    let v2_end = calls
        .iter()
        .find(|c| c.marker.as_deref().is_some_and(|m| m.starts_with("result v2")))
        .unwrap()
        .start;
    let per_save = |name: &str| {
        calls.iter().filter(|c| c.name == name && c.marker.is_none() && c.start < v2_end).count()
    };
    let cases: [(&str, &str, bool); 7] = [
        ("fdatasync", "EIO", false),
        ("fsync", "EIO", false),
        ("write", "ENOSPC", false),
        ("write", "ENOSPC", true),
        ("write", "EIO", false),
        ("openat", "ENOSPC", false),
        ("rename", "EIO", false),
    ];
    let mut summary: BTreeMap<String, usize> = BTreeMap::new();
    let mut n_cases = 0;
    let mut failures = Vec::new();
    for (syscall, errno, twice) in cases {
        let calls_in_save = per_save(syscall);
        assert!(calls_in_save >= 1, "the dry run shows no {syscall} in one save");
        for k in 1..=calls_in_save {
            let when = if twice { format!("{k}..{}", k + 1) } else { k.to_string() };
            let set = if syscall == "rename" { "rename,renameat,renameat2" } else { syscall };
            let label = format!("{syscall}={errno} when={when}");
            let (_tmp, dir) = scratch_store();
            let run = traced_run(
                Tracing::Attach,
                &dir,
                "errors",
                Format::Plain,
                Some(&format!("{set}:error={errno}:when={when}")),
            )
            .unwrap();
            n_cases += 1;
            let o = outcome_of(&run.lines);
            let calls = run.calls();
            let failed: Vec<&Call> = calls
                .iter()
                .filter(|c| c.injected && c.marker.is_none() && c.errno.is_some())
                .collect();
            let first_failed =
                failed.first().map(|c| class_of(c)).unwrap_or_else(|| "nothing".into());
            let mut bad = Vec::new();
            if !run.status.success() || run.stderr.contains("panicked") {
                bad.push(format!("the child failed ({}): {}", run.status, run.stderr.trim()));
            }
            let want_kind = if errno == "EIO" { "err Io " } else { "err StorageFull " };
            let new_visible = o.load_after_v2 == "v2";
            if o.v2 == "ok" {
                if !new_visible {
                    bad.push(format!("save v2 said Ok but a load returns {}", o.load_after_v2));
                }
                // No false Ok: a rename of a's record, synced before and after, since "go".
                let record = dir.join("sessions").join("a.json");
                let renamed = calls.iter().any(|c| {
                    c.is_rename()
                        && c.ok()
                        && c.strings.get(1).is_some_and(|t| Path::new(t) == record)
                        && c.start < v2_line(&calls)
                });
                if !renamed {
                    bad.push("save v2 said Ok without renaming a's record into place".into());
                }
            } else if o.v2.starts_with(want_kind) {
                // The old version must load, also after a failure behind the rename (the
                // directory sync): the store puts the previous version back then.
                if o.load_after_v2 != "v1" {
                    bad.push(format!(
                        "save v2 failed at {first_failed} but a load returns {}",
                        o.load_after_v2
                    ));
                }
            } else {
                bad.push(format!("save v2: expected Ok or {want_kind}…, got {}", o.v2));
            }
            // strace counts a syscall's calls per thread, and one save's calls run on more
            // than one thread (the record's I/O on the blocking pool, the journal's small
            // append on the caller's): `when=K` may fall on save v3's call on the thread
            // that made fewer than K such calls in v2. Then v3 must fail (or succeed) as
            // v2 would have, and the checkpoint after it must still succeed.
            let v3_hit = failed.first().is_some_and(|c| c.start > v2_line(&calls))
                && o.v2 == "ok"
                && o.v3.starts_with(want_kind);
            let a_end = if v3_hit { "v2" } else { "v3" };
            if (o.v3 != "ok" && !v3_hit)
                || !o.v4.starts_with("ok ")
                || o.load_end != a_end
                || o.closed != "ok"
            {
                bad.push(format!("the next saves did not work: {o:?}"));
            }
            let a = audit(&calls, dir.to_str().unwrap());
            bad.extend(a.violations);
            let left = staged_files(&dir);
            if !left.is_empty() {
                bad.push(format!("staged files left by the failed save: {left:?}"));
            }
            if let Some(id) = o.v4.strip_prefix("ok ") {
                rt.block_on(async {
                    let m = open(&dir, Format::Plain).await.unwrap();
                    let a_now = m.load_session("a").await.unwrap();
                    let b_now = m.load_session("b").await.unwrap();
                    let cp = m.restore_checkpoint(&id.parse().unwrap()).await.unwrap();
                    if a_now != Some(value("a", if v3_hit { 2 } else { 3 }))
                        || b_now != Some(value("b", 1))
                        || cp.map(|c| c.data) != Some(value("a", 4))
                    {
                        bad.push(format!(
                            "a fresh manager does not read {a_end}, b v1 and the checkpoint"
                        ));
                    }
                    m.shutdown().await.unwrap();
                });
            }
            let key = format!(
                "{}: v2 {}",
                first_failed,
                if o.v2 == "ok" {
                    "ok".to_owned()
                } else {
                    format!(
                        "{} (then loads {})",
                        o.v2.split_whitespace().take(2).collect::<Vec<_>>().join(" "),
                        o.load_after_v2
                    )
                }
            );
            *summary.entry(key).or_default() += 1;
            let short = |r: &str| r.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            println!(
                "io error {label}: injected into {first_failed}; save v2 {}, then loads {}; v3 {}; checkpoint {}",
                short(&o.v2),
                o.load_after_v2,
                short(&o.v3),
                short(&o.v4)
            );
            if !bad.is_empty() {
                failures.push(format!("{label}:\n  {}", bad.join("\n  ")));
            }
        }
    }
    println!(
        "io errors: {n_cases} cases (calls per save: fdatasync {}, fsync {}, write {}, openat {}, rename {}), \
         {} failed checks, {:.1}s; outcomes {summary:#?}",
        per_save("fdatasync"),
        per_save("fsync"),
        per_save("write"),
        per_save("openat"),
        per_save("rename"),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The line of the "result v2" report in a trace.
fn v2_line(calls: &[Call]) -> usize {
    calls
        .iter()
        .find(|c| c.marker.as_deref().is_some_and(|m| m.starts_with("result v2")))
        .map(|c| c.start)
        .unwrap_or(0)
}
