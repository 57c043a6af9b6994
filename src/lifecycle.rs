//! The former home of the policies and events, now in [`crate::config`] and
//! [`crate::events`]: these crate-internal paths keep working until every user has moved.

#[allow(unused_imports)]
pub(crate) use crate::config::{CheckpointPolicy, MigrationFn, Migrations};
#[allow(unused_imports)]
pub(crate) use crate::events::{Envelope, EventKind, StateEvent, Watch, WatchError};
#[allow(unused_imports)]
pub(crate) use crate::types::{MigrationReport, Recovery, SkippedCheckpoint};
