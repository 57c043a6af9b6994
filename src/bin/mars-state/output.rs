//! What the tool prints: 80-column tables, `--json` documents, times and sizes, and errors
//! that name the store, the session and what to do, each with its exit code.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use mars_state::{ErrorKind, StateError};
use serde::Serialize;

/// Width of human output: an 80-column terminal.
pub(crate) const WIDTH: usize = 80;

/// The exit codes (`main::EXIT_CODES` documents them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// 1: damage found, or the session or checkpoint asked for does not exist.
    Damage,
    /// 2: bad arguments.
    Usage,
    /// 3: the store cannot be opened.
    Open,
    /// 4: the key is missing or wrong.
    Key,
    /// 5: another process holds the store.
    InUse,
    /// 6: anything else.
    Failure,
}

impl Exit {
    pub(crate) fn code(self) -> u8 {
        match self {
            Exit::Damage => 1,
            Exit::Usage => 2,
            Exit::Open => 3,
            Exit::Key => 4,
            Exit::InUse => 5,
            Exit::Failure => 6,
        }
    }
}

/// A failure of a command: what happened (naming the store and session) and what to do.
#[derive(Debug)]
pub(crate) struct CliError {
    exit: Exit,
    message: String,
    hint: Option<String>,
}

impl CliError {
    pub(crate) fn new(exit: Exit, message: impl Into<String>) -> Self {
        CliError { exit, message: message.into(), hint: None }
    }

    /// Adds what the user can do about it.
    pub(crate) fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// A [`StateError`] met on the store `url` (and `session`, if one was asked for).
    pub(crate) fn from_state(e: StateError, url: &str, session: Option<&str>) -> Self {
        let store = crate::store::redact(url);
        let on = match session {
            Some(s) => format!("store {store}, session {s}"),
            None => format!("store {store}"),
        };
        match e.kind() {
            ErrorKind::Locked => {
                let path = match &e {
                    StateError::Locked { path } => path.clone(),
                    _ => PathBuf::new(),
                };
                let holder = lock_holder(&path).map_or_else(
                    || "another process".to_owned(),
                    |(pid, cmd)| format!("process {pid} ({cmd})"),
                );
                CliError::new(Exit::InUse, format!("{on}: the store is in use by {holder}"))
                    .hint("a file or SQLite store has one writer at a time: stop that process (or wait for it to shut down) and run the command again")
            }
            ErrorKind::OwnedElsewhere => CliError::new(Exit::InUse, format!("{on}: {e}"))
                .hint("another node is writing this session; try again when it is done"),
            ErrorKind::WrongKey => CliError::new(Exit::Key, format!("{on}: {e}")).hint(
                "give the store's key with --key-file PATH or --passphrase-file PATH (or \
                 MARS_STATE_KEY / MARS_STATE_PASSPHRASE)",
            ),
            ErrorKind::Corrupt => CliError::new(Exit::Damage, format!("{on}: {e}"))
                .hint("the record is damaged; `mars-state verify` lists every damaged record"),
            ErrorKind::NotFound => CliError::new(Exit::Damage, format!("{on}: {e}")),
            ErrorKind::InvalidId => CliError::new(Exit::Usage, format!("{on}: {e}")),
            ErrorKind::Config => CliError::new(Exit::Open, format!("{on}: {e}")),
            ErrorKind::AccessDenied => CliError::new(Exit::Failure, format!("{on}: {e}")),
            _ => CliError::new(Exit::Failure, format!("{on}: {e}")),
        }
    }

    /// For an error met opening a store without a key: a plain store given none is fine, so
    /// a configuration error that mentions encryption means the store wants a key.
    pub(crate) fn when_no_key(self) -> Self {
        if self.exit == Exit::Open && self.message.contains("encrypt") {
            return CliError { exit: Exit::Key, ..self }.hint(
                "the store is encrypted: give its key with --key-file PATH or \
                 --passphrase-file PATH (or MARS_STATE_KEY / MARS_STATE_PASSPHRASE)",
            );
        }
        self
    }

    /// Prints the error to stderr and returns its exit code.
    pub(crate) fn report(&self) -> ExitCode {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "mars-state: error: {}", self.message);
        if let Some(hint) = &self.hint {
            let _ = writeln!(err, "  hint: {hint}");
        }
        ExitCode::from(self.exit.code())
    }
}

/// The process holding the OS lock on `path` (or on `path-lock`, the SQLite backend's lock
/// file), from `/proc/locks`: its id and command line. `None` where that cannot be told.
fn lock_holder(path: &Path) -> Option<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut candidates = vec![path.to_path_buf()];
    let mut with_lock = path.as_os_str().to_owned();
    with_lock.push("-lock");
    candidates.push(PathBuf::from(with_lock));
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    for candidate in candidates {
        let Ok(meta) = std::fs::metadata(&candidate) else { continue };
        let (dev, ino) = (meta.dev(), meta.ino());
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let want = format!("{major:02x}:{minor:02x}:{ino}");
        for line in locks.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked waiters have "->".
            if fields.get(1) == Some(&"->") {
                continue;
            }
            if fields.get(5) == Some(&want.as_str())
                && let Some(pid) = fields.get(4).and_then(|p| p.parse::<u32>().ok())
            {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .ok()
                    .map(|b| {
                        b.split(|c| *c == 0)
                            .filter(|a| !a.is_empty())
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| "command unknown".to_owned());
                return Some((pid, truncate(&cmd, 60)));
            }
        }
    }
    None
}

/// Prints `value` as pretty JSON on stdout.
pub(crate) fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot print JSON: {e}")))?;
    print_lines(&text);
    Ok(())
}

/// Prints `text` and a newline on stdout; a closed stdout (`| head`) ends quietly.
pub(crate) fn print_lines(text: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").is_err() {
        std::process::exit(0);
    }
}

/// A table of `header` and `rows` that fits 80 columns: no borders, a rule under the
/// header, columns in `right` aligned right (numbers).
pub(crate) fn table(header: &[&str], rows: Vec<Vec<String>>, right: &[usize]) -> String {
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_content_arrangement(ContentArrangement::Dynamic);
    t.set_width(WIDTH as u16);
    t.set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    for &i in right {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    let text = t.to_string();
    // comfy-table pads every line to the table's width; trailing blanks are noise.
    let mut lines: Vec<String> = text.lines().map(|l| l.trim_end().to_owned()).collect();
    // Strip the one-column left margin the preset leaves, keeping columns aligned.
    if lines.iter().all(|l| l.is_empty() || l.starts_with(' ')) {
        for l in &mut lines {
            if !l.is_empty() {
                l.remove(0);
            }
        }
    }
    lines.join("\n")
}

/// A two-column table of names and values.
pub(crate) fn key_values(rows: &[(&str, String)]) -> String {
    table(&["", ""], rows.iter().map(|(k, v)| vec![(*k).to_owned(), v.clone()]).collect(), &[])
        .lines()
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Now, in milliseconds since the Unix epoch (0 on a clock before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `ms` since the Unix epoch as `YYYY-MM-DD HH:MM:SS` (UTC); `-` for 0.
pub(crate) fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".to_owned();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `ms` since the Unix epoch as `YYYY-MM-DD HH:MM` (UTC), for narrow columns.
pub(crate) fn time_short(ms: u64) -> String {
    let t = time(ms);
    if ms == 0 { t } else { t[..16].to_owned() }
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A byte count for people: `512 B`, `1.5 KiB`, `3.2 MiB`.
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A duration in milliseconds for people: `850 ms`, `12.0 s`, `3.5 min`, `2.1 h`, `4.0 d`.
pub(crate) fn duration(ms: u64) -> String {
    let s = ms as f64 / 1000.0;
    if ms < 1000 {
        format!("{ms} ms")
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86_400.0)
    }
}

/// `s` cut to `max` characters, ending in `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A progress bar on stderr drawn with `template` (indicatif's), only where stderr is a
/// terminal (never in a pipe or a log: there it is hidden and costs nothing).
pub(crate) fn progress_bar(template: &str) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_calendar_dates() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1), "1970-01-01 00:00:00");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(time(1_798_761_599_000), "2026-12-31 23:59:59");
        assert_eq!(time_short(1_798_761_599_000), "2026-12-31 23:59");
    }

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_000), "12.0 s");
        assert_eq!(duration(600_000), "10.0 min");
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
