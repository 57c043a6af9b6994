//! Change events between the processes of one schema: `pg_notify` to publish, `LISTEN` on a
//! dedicated connection to subscribe. Owns the channel name, the payload encoding (base64:
//! a notification is text, a payload any bytes) and the listening connection's task; calls
//! the pool (publishing) and `tokio_postgres::connect` (listening).
//!
//! The channel is per database and derived from the schema, so processes of one schema hear
//! each other and no one else. A notification is sent when its transaction commits (here
//! the one statement's own), and the server delivers the notifications of one session in the
//! order they were sent; it holds at most 8,000 bytes, which a base64 payload of
//! [`MAX_EVENT_PAYLOAD`] bytes fits. A subscription is its own connection, outside the pool
//! (a pooled connection's messages are dropped by the pool), with TCP keepalives so a silent
//! network loss ends it too; when it ends, for any reason, the feed ends and the subscriber
//! subscribes again.

use std::pin::pin;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, NoTls};
use tracing::debug;

use super::Shared;
use super::real_time;
use crate::backend::{EventFeed, MAX_EVENT_PAYLOAD};
use crate::error::{Result, StateError};

/// How many received payloads wait for the subscriber before the connection stops being
/// read (the server then buffers them, up to its queue's 8 GB).
const FEED_BUFFER: usize = 1024;

/// The channel of `schema`'s events: `mars_state_events:<schema>`, or, for a schema whose
/// name would make it longer than an identifier's 63 bytes, its first bytes and a CRC-32 of
/// the whole name.
pub(super) fn channel(schema: &str) -> String {
    let full = format!("mars_state_events:{schema}");
    if full.len() <= 63 {
        return full;
    }
    let mut end = 63 - 9;
    while !full.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}:{:08x}", &full[..end], crc32fast::hash(schema.as_bytes()))
}

/// Sends `payloads` as notifications, in their order, in one statement.
pub(super) async fn publish(shared: &Shared, payloads: Vec<Vec<u8>>) -> Result<()> {
    if payloads.is_empty() {
        return Ok(());
    }
    if let Some(big) = payloads.iter().find(|p| p.len() > MAX_EVENT_PAYLOAD) {
        return Err(StateError::Config {
            message: format!(
                "an event payload of {} bytes is over the limit of {MAX_EVENT_PAYLOAD}",
                big.len()
            ),
        });
    }
    let encoded: Vec<String> = payloads.iter().map(|p| base64::encode(p)).collect();
    // `unnest` yields the array in order, and the notifications of one transaction are
    // delivered in the order they were sent.
    let sql = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p";
    shared
        .read(sql, &[(&shared.events_channel, Type::TEXT), (&encoded, Type::TEXT_ARRAY)])
        .await
        .map(drop)
        .map_err(|f| StateError::unavailable(format!("publishing change events: {}", f.reason())))
}

/// Opens a connection of its own that listens on the schema's channel.
pub(super) async fn subscribe(shared: &Shared) -> Result<EventFeed> {
    let Some(config) = shared.listen.clone() else {
        return Err(StateError::Config {
            message: "this PostgreSQL backend was made from a pool, whose connection settings \
                      it cannot read: it has no connection of its own to LISTEN on (connect \
                      with a URL to carry change events between processes)"
                .into(),
        });
    };
    let sql = format!("LISTEN \"{}\"", shared.events_channel.replace('"', "\"\""));
    let unavailable =
        |why: String| StateError::unavailable(format!("listening for change events: {why}"));
    let setup = async {
        let (client, mut connection) = config.connect(NoTls).await?;
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        // The connection is driven here until LISTEN is answered, then by the task.
        {
            let mut listen = pin!(client.batch_execute(&sql));
            loop {
                tokio::select! {
                    done = &mut listen => { done?; break; }
                    message = messages.next() => match message {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e),
                        None => break,
                    },
                }
            }
        }
        Ok((client, messages))
    };
    let (client, mut messages) = match real_time::within(shared.connect_timeout, setup).await {
        Ok(Ok(set)) => set,
        Ok(Err(e)) => return Err(unavailable(super::error::describe(&e))),
        Err(_) => {
            return Err(unavailable(format!(
                "no connection within {} ms",
                shared.connect_timeout.as_millis()
            )));
        }
    };
    let (tx, rx) = mpsc::channel(FEED_BUFFER);
    tokio::spawn(async move {
        // Held until the feed is dropped or the connection ends: dropping it closes the
        // connection.
        let _client = client;
        loop {
            tokio::select! {
                () = tx.closed() => break,
                message = messages.next() => match message {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        let Some(payload) = base64::decode(n.payload()) else {
                            debug!("ignored a change event that is not base64");
                            continue;
                        };
                        if tx.send(payload).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        debug!(error = %super::error::describe(&e), "the change-event connection failed");
                        break;
                    }
                    None => break,
                },
            }
        }
        // `tx` is dropped: the feed ends.
    });
    Ok(EventFeed::channel(rx))
}

/// The keepalive settings of a listening connection: a connection that only receives
/// notices a silent network loss only by probing.
pub(super) fn listen_config(mut config: tokio_postgres::Config) -> tokio_postgres::Config {
    config.keepalives(true).keepalives_idle(Duration::from_secs(30));
    config
}

/// Standard base64 with padding, the few lines this needs (no dependency for it).
mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(super) fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub(super) fn decode(text: &str) -> Option<Vec<u8>> {
        let text = text.as_bytes();
        if !text.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(text.len() / 4 * 3);
        for chunk in text.chunks(4) {
            let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 {
                return None;
            }
            let mut n = 0u32;
            for &c in &chunk[..4 - pad] {
                let v = ALPHABET.iter().position(|&a| a == c)?;
                n = (n << 6) | v as u32;
            }
            n <<= 6 * pad as u32;
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips() {
            for len in 0..40 {
                let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
                assert_eq!(super::decode(&super::encode(&bytes)), Some(bytes));
            }
            assert_eq!(super::encode(b"foobar"), "Zm9vYmFy");
            assert_eq!(super::encode(b"fo"), "Zm8=");
            assert_eq!(super::decode("Zm8"), None);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn channels_fit_an_identifier_and_differ_by_schema() {
        assert_eq!(super::channel("public"), "mars_state_events:public");
        let long_a = "a".repeat(63);
        let long_b = format!("{}b", "a".repeat(62));
        let (a, b) = (super::channel(&long_a), super::channel(&long_b));
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
    }
}
