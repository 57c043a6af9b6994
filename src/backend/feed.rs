//! [`EventFeed`]: what [`StorageBackend::subscribe_events`](super::StorageBackend::subscribe_events)
//! returns, the change-event payloads other handles of a shared store publish. Owns the feed
//! type and the payload size limit; calls only tokio's channels.

use std::fmt;

use tokio::sync::{broadcast, mpsc};

/// The largest event payload a backend must carry, in bytes. The store's own payloads
/// (session id, node id, sequence numbers, event kind) stay well under it; a wrapper that
/// seals them adds 40 bytes.
pub const MAX_EVENT_PAYLOAD: usize = 3000;

/// A transform a wrapper puts on a feed (the encryption layer opens each payload): `None`
/// drops the payload.
type Map = Box<dyn FnMut(Vec<u8>) -> Option<Vec<u8>> + Send>;

/// The change-event payloads published to a shared store by any handle (this one
/// included), in the order the backend delivers them, from the moment the subscription was
/// made. A feed ends (`recv` returns `None`) when its connection is lost; payloads published
/// until a new [`subscribe_events`](super::StorageBackend::subscribe_events) are not
/// delivered to anyone who was cut off, so a subscriber that needs to know counts them
/// itself (the store numbers its events; a gap is a loss).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> mars_state::Result<()> {
/// use mars_state::{MemoryStorageBackend, StorageBackend};
/// let store = MemoryStorageBackend::new();
/// let mut feed = store.subscribe_events().await?;
/// store.clone().publish_events(vec![b"one".to_vec(), b"two".to_vec()]).await?;
/// assert_eq!(feed.recv().await, Some(b"one".to_vec()));
/// assert_eq!(feed.recv().await, Some(b"two".to_vec()));
/// # Ok(()) }
/// ```
pub struct EventFeed {
    source: Source,
    maps: Vec<Map>,
}

enum Source {
    Channel(mpsc::Receiver<Vec<u8>>),
    Broadcast(broadcast::Receiver<Vec<u8>>),
}

impl EventFeed {
    /// A feed of the payloads sent into `rx`; it ends when every sender is dropped (a
    /// backend drops its sender when the connection the payloads come from is lost).
    pub fn channel(rx: mpsc::Receiver<Vec<u8>>) -> Self {
        EventFeed { source: Source::Channel(rx), maps: Vec::new() }
    }

    /// A feed of the payloads sent on a broadcast channel. A feed that falls so far behind
    /// that the channel drops payloads skips them and goes on (the subscriber sees the gap);
    /// it ends when the sender is dropped.
    pub fn broadcast(rx: broadcast::Receiver<Vec<u8>>) -> Self {
        EventFeed { source: Source::Broadcast(rx), maps: Vec::new() }
    }

    /// This feed with `f` applied to every payload, after the transforms put on it before;
    /// a payload for which `f` returns `None` is dropped. For a wrapper: the encryption
    /// layer opens each payload so.
    pub fn map(mut self, f: impl FnMut(Vec<u8>) -> Option<Vec<u8>> + Send + 'static) -> Self {
        self.maps.push(Box::new(f));
        self
    }

    /// The next payload; `None` once the feed has ended (its connection was lost: subscribe
    /// again to go on).
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        'next: loop {
            let mut payload = match &mut self.source {
                Source::Channel(rx) => rx.recv().await?,
                Source::Broadcast(rx) => match rx.recv().await {
                    Ok(p) => p,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            };
            for map in &mut self.maps {
                match map(payload) {
                    Some(p) => payload = p,
                    None => continue 'next,
                }
            }
            return Some(payload);
        }
    }
}

impl fmt::Debug for EventFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match self.source {
            Source::Channel(_) => "channel",
            Source::Broadcast(_) => "broadcast",
        };
        f.debug_struct("EventFeed")
            .field("source", &source)
            .field("maps", &self.maps.len())
            .finish()
    }
}
