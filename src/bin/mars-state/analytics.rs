//! `mars-state analytics`: the design document's state analytics, from the index (no state
//! is read). For one session: steps over time, time between steps, checkpoint cadence and
//! reasons, state size growth, pauses and failures. For the whole store: sessions by status
//! and storage growth. `--svg FILE` draws the growth and cadence charts, by hand (a few
//! polylines and bars; no plotting crate).

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Args;
use mars_state::{CheckpointInfo, CheckpointReason, SessionInfo};
use serde::Serialize;

use crate::Global;
use crate::log::reason_name;
use crate::ls::status_name;
use crate::output::{self, CliError, Exit};
use crate::store::Opened;

#[derive(Debug, Args)]
pub(crate) struct AnalyticsArgs {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
    /// One session's analytics (default: the whole store).
    session: Option<String>,
    /// Also draw the growth and cadence charts into this SVG file (written whole, then
    /// renamed into place).
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
}

/// Smallest, median and largest of `v` (sorted here).
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Spread {
    min: u64,
    median: u64,
    max: u64,
}

fn spread(mut v: Vec<u64>) -> Option<Spread> {
    v.sort_unstable();
    Some(Spread { min: *v.first()?, median: v[v.len() / 2], max: *v.last()? })
}

/// One session's analytics.
#[derive(Debug, Serialize)]
pub(crate) struct SessionReport {
    session_id: String,
    status: String,
    status_reason: Option<String>,
    checkpoints: usize,
    reasons: BTreeMap<&'static str, usize>,
    /// (time ms, step) of every checkpoint with a step, oldest first.
    steps: Vec<(u64, u64)>,
    /// Milliseconds per step between consecutive checkpoints with steps.
    ms_per_step: Option<Spread>,
    /// Milliseconds between consecutive checkpoints.
    cadence_ms: Option<Spread>,
    /// (time ms, bytes) of every checkpoint, oldest first.
    sizes: Vec<(u64, u64)>,
    pauses: usize,
    first_at: Option<u64>,
    last_at: Option<u64>,
}

fn session_report(info: &SessionInfo, list: &[CheckpointInfo]) -> SessionReport {
    let mut reasons = BTreeMap::new();
    for c in list {
        *reasons.entry(reason_name(c.reason)).or_default() += 1;
    }
    let steps: Vec<(u64, u64)> =
        list.iter().filter_map(|c| c.step.map(|s| (c.timestamp, s))).collect();
    let per_step: Vec<u64> = steps
        .windows(2)
        .filter(|w| w[1].1 > w[0].1)
        .map(|w| w[1].0.saturating_sub(w[0].0) / (w[1].1 - w[0].1))
        .collect();
    let cadence: Vec<u64> =
        list.windows(2).map(|w| w[1].timestamp.saturating_sub(w[0].timestamp)).collect();
    SessionReport {
        session_id: info.session_id.to_string(),
        status: status_name(info.status, info.interrupted),
        status_reason: info.status_reason.clone(),
        checkpoints: list.len(),
        reasons,
        steps,
        ms_per_step: spread(per_step),
        cadence_ms: spread(cadence),
        sizes: list.iter().map(|c| (c.timestamp, c.size_bytes)).collect(),
        pauses: list.iter().filter(|c| c.reason == CheckpointReason::Pause).count(),
        first_at: list.first().map(|c| c.timestamp),
        last_at: list.last().map(|c| c.timestamp).max(Some(info.updated_at)).filter(|t| *t > 0),
    }
}

/// The whole store's analytics.
#[derive(Debug, Serialize)]
pub(crate) struct StoreReport {
    sessions: usize,
    by_status: BTreeMap<String, usize>,
    failures: Vec<(String, String)>,
    checkpoints: usize,
    total_bytes: u64,
    /// (time ms, bytes written up to then) over every record, oldest first.
    growth: Vec<(u64, u64)>,
}

fn spread_text(s: Option<Spread>) -> String {
    s.map_or_else(
        || "-".to_owned(),
        |s| {
            format!(
                "{} / {} / {}",
                output::duration(s.min),
                output::duration(s.median),
                output::duration(s.max)
            )
        },
    )
}

pub(crate) async fn run(g: &Global, a: AnalyticsArgs) -> Result<ExitCode, CliError> {
    let opened = Opened::read_only(Some(a.store.as_str()), &g.keys).await?;
    let result = gather(&opened, a.session.as_deref()).await;
    opened.close().await?;
    let (sessions, lists) = result?;
    if let Some(sid) = &a.session {
        let info = &sessions[0];
        let r = session_report(info, &lists[0]);
        if let Some(path) = &a.svg {
            write_svg(path, &session_svg(sid, &r))?;
        }
        if g.json {
            output::print_json(&r)?;
            return Ok(ExitCode::SUCCESS);
        }
        let reasons =
            r.reasons.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
        let steps = match (r.steps.first(), r.steps.last()) {
            (Some(f), Some(l)) => {
                format!("{} -> {} ({} with a checkpoint)", f.1, l.1, r.steps.len())
            }
            _ => "-".to_owned(),
        };
        let size = match (r.sizes.first(), r.sizes.last()) {
            (Some(f), Some(l)) => format!("{} -> {}", output::size(f.1), output::size(l.1)),
            _ => "-".to_owned(),
        };
        let status = match &r.status_reason {
            Some(why) => format!("{} ({})", r.status, output::truncate(why, 40)),
            None => r.status.clone(),
        };
        let rows = [
            ("status", status),
            ("first checkpoint", r.first_at.map_or_else(|| "-".to_owned(), output::time)),
            ("last change", r.last_at.map_or_else(|| "-".to_owned(), output::time)),
            ("checkpoints", r.checkpoints.to_string()),
            ("reasons", if reasons.is_empty() { "-".to_owned() } else { reasons }),
            ("steps", steps),
            ("time per step (min/median/max)", spread_text(r.ms_per_step)),
            ("checkpoint cadence (min/median/max)", spread_text(r.cadence_ms)),
            ("checkpoint size", size),
            ("pauses", r.pauses.to_string()),
        ];
        output::print_lines(&format!("session {sid}\n{}", output::key_values(&rows)));
        return Ok(ExitCode::SUCCESS);
    }
    let mut by_status = BTreeMap::new();
    let mut failures = Vec::new();
    let mut events: Vec<(u64, u64)> = Vec::new();
    for (info, list) in sessions.iter().zip(&lists) {
        *by_status.entry(status_name(info.status, false)).or_default() += 1;
        if info.status == mars_state::SessionStatus::Failed {
            failures.push((
                info.session_id.to_string(),
                info.status_reason.clone().unwrap_or_default(),
            ));
        }
        events.extend(list.iter().map(|c| (c.timestamp, c.size_bytes)));
        if info.updated_at > 0 {
            events.push((info.updated_at, info.size_bytes));
        }
    }
    events.sort_unstable();
    let mut total = 0;
    let growth: Vec<(u64, u64)> = events
        .iter()
        .map(|(t, b)| {
            total += b;
            (*t, total)
        })
        .collect();
    let r = StoreReport {
        sessions: sessions.len(),
        by_status,
        failures,
        checkpoints: lists.iter().map(Vec::len).sum(),
        total_bytes: total,
        growth,
    };
    if let Some(path) = &a.svg {
        write_svg(path, &store_svg(&r))?;
    }
    if g.json {
        output::print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows: Vec<(String, String)> = vec![
        ("sessions".into(), r.sessions.to_string()),
        ("checkpoints".into(), r.checkpoints.to_string()),
        ("stored".into(), output::size(r.total_bytes)),
    ];
    rows.extend(r.by_status.iter().map(|(k, v)| (format!("  {k}"), v.to_string())));
    if let (Some(f), Some(l)) = (r.growth.first(), r.growth.last()) {
        rows.push((
            "growth".into(),
            format!("{} from {} to {}", output::size(l.1), output::time(f.0), output::time(l.0)),
        ));
    }
    for (sid, why) in &r.failures {
        rows.push((format!("  failed {}", output::truncate(sid, 24)), output::truncate(why, 40)));
    }
    let rows: Vec<(&str, String)> = rows.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    output::print_lines(&output::key_values(&rows));
    Ok(ExitCode::SUCCESS)
}

/// The sessions (one, or all) and their checkpoints.
async fn gather(
    opened: &Opened,
    session: Option<&str>,
) -> Result<(Vec<SessionInfo>, Vec<Vec<CheckpointInfo>>), CliError> {
    let mut sessions = opened.manager.list_sessions().await.map_err(|e| opened.error(e, None))?;
    if let Some(sid) = session {
        sessions.retain(|s| s.session_id.as_str() == sid);
        if sessions.is_empty() {
            return Err(crate::show::unknown_session(opened, sid));
        }
    }
    let mut lists = Vec::with_capacity(sessions.len());
    for s in &sessions {
        lists.push(crate::show::checkpoints(opened, s.session_id.as_str()).await?);
    }
    Ok((sessions, lists))
}

/// Writes `svg` to `path` whole: a staged file beside it, then a rename, so a reader never
/// sees half a chart (a chart is no durable state: no fsync).
fn write_svg(path: &std::path::Path, svg: &str) -> Result<(), CliError> {
    let mut staged = path.as_os_str().to_owned();
    staged.push(".tmp");
    let fail = |e: std::io::Error| {
        CliError::new(Exit::Failure, format!("cannot write {}: {e}", path.display()))
    };
    let mut file = std::fs::File::create(&staged).map_err(fail)?;
    std::io::Write::write_all(&mut file, svg.as_bytes()).map_err(fail)?;
    drop(file);
    std::fs::rename(&staged, path).map_err(|e| {
        let _ = std::fs::remove_file(&staged);
        fail(e)
    })
}

const W: f64 = 640.0;
const H: f64 = 200.0;
const PAD: f64 = 40.0;

/// A line chart of `points` (x, y) in a 640x200 panel at vertical offset `top`.
fn line_chart(title: &str, points: &[(u64, u64)], top: f64, y_label: &str) -> String {
    let mut out = format!(
        "<g transform=\"translate(0,{top})\"><text x=\"{PAD}\" y=\"16\" font-size=\"13\">{}</text>\
         <line x1=\"{PAD}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/>\
         <line x1=\"{PAD}\" y1=\"24\" x2=\"{PAD}\" y2=\"{}\" stroke=\"#999\"/>",
        escape(title),
        H - PAD / 2.0,
        W - PAD / 2.0,
        H - PAD / 2.0,
        H - PAD / 2.0
    );
    if let (Some(x0), Some(x1)) =
        (points.iter().map(|p| p.0).min(), points.iter().map(|p| p.0).max())
    {
        let ymax = points.iter().map(|p| p.1).max().unwrap_or(1).max(1) as f64;
        let span = (x1 - x0).max(1) as f64;
        let coords: Vec<String> = points
            .iter()
            .map(|(x, y)| {
                let px = PAD + (*x - x0) as f64 / span * (W - 1.5 * PAD);
                let py = (H - PAD / 2.0) - *y as f64 / ymax * (H - PAD / 2.0 - 28.0);
                format!("{px:.1},{py:.1}")
            })
            .collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"#2a6fdb\" stroke-width=\"2\" points=\"{}\"/>\
             <text x=\"{}\" y=\"36\" font-size=\"11\" text-anchor=\"end\">max {}</text>",
            coords.join(" "),
            W - PAD / 2.0,
            escape(&format!("{} {y_label}", ymax as u64))
        ));
    } else {
        out.push_str(&format!("<text x=\"{}\" y=\"100\" font-size=\"12\">no data</text>", W / 2.0));
    }
    out.push_str("</g>");
    out
}

/// A bar chart of `bars` (label, value) in a panel at vertical offset `top`.
fn bar_chart(title: &str, bars: &[(String, u64)], top: f64) -> String {
    let mut out = format!(
        "<g transform=\"translate(0,{top})\"><text x=\"{PAD}\" y=\"16\" font-size=\"13\">{}</text>",
        escape(title)
    );
    let max = bars.iter().map(|b| b.1).max().unwrap_or(1).max(1) as f64;
    let width = (W - 1.5 * PAD) / bars.len().max(1) as f64;
    for (i, (label, v)) in bars.iter().enumerate() {
        let h = *v as f64 / max * (H - PAD - 28.0);
        let x = PAD + i as f64 * width;
        out.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#f0a030\"/>\
             <text x=\"{:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            H - PAD - h,
            (width - 4.0).max(1.0),
            x + width / 2.0,
            H - PAD + 12.0,
            escape(label)
        ));
    }
    out.push_str("</g>");
    out
}

fn svg_doc(panels: &[String]) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" \
         font-family=\"sans-serif\">{}</svg>\n",
        H * panels.len() as f64,
        panels.join("")
    )
}

fn session_svg(sid: &str, r: &SessionReport) -> String {
    let cadence: Vec<(String, u64)> = r
        .sizes
        .windows(2)
        .enumerate()
        .map(|(i, w)| (format!("{}", i + 2), (w[1].0.saturating_sub(w[0].0)) / 1000))
        .collect();
    svg_doc(&[
        line_chart(&format!("{sid}: checkpoint size over time"), &r.sizes, 0.0, "bytes"),
        line_chart(&format!("{sid}: step over time"), &r.steps, H, ""),
        bar_chart(&format!("{sid}: seconds since the previous checkpoint"), &cadence, 2.0 * H),
    ])
}

fn store_svg(r: &StoreReport) -> String {
    let bars: Vec<(String, u64)> =
        r.by_status.iter().map(|(k, v)| (k.clone(), *v as u64)).collect();
    svg_doc(&[
        line_chart("storage written over time", &r.growth, 0.0, "bytes"),
        bar_chart("sessions by status", &bars, H),
    ])
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
