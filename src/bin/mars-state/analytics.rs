//! `mars-state analytics`: not written yet.

use std::process::ExitCode;

use clap::Args;

use crate::Global;
use crate::output::{CliError, Exit};

#[derive(Debug, Args)]
pub(crate) struct AnalyticsArgs {
    /// The store: a path or a URL (`-`, or left out: MARS_STATE_URL).
    #[arg(value_name = "STORE")]
    store: String,
    /// One session's analytics (default: the whole store).
    session: Option<String>,
    /// Also draw the growth and cadence charts into this SVG file.
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
}

pub(crate) async fn run(_g: &Global, _a: AnalyticsArgs) -> Result<ExitCode, CliError> {
    Err(CliError::new(Exit::Failure, "analytics is not implemented yet"))
}
