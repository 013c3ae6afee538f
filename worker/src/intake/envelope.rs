//! What the intake reads from a delivery's properties, before its body: where the reply goes,
//! the idempotency key, the deadline and whether progress was asked for. Pure: no broker calls.

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use schemas::PROGRESS_HEADER;

use crate::store::ReplyTarget;

/// What the intake reads from a delivery's properties.
pub(super) struct Envelope {
    pub(super) target: ReplyTarget,
    /// The requester's idempotency key, when it set one.
    pub(super) message_id: Option<String>,
    /// When the request must have run by (unix ms), or why the deadline cannot be read.
    pub(super) deadline_ms: Result<Option<i64>, String>,
    /// Whether the requester asked for progress envelopes (`x-progress: true`).
    pub(super) progress: bool,
    /// Forwarded by placement ([`schemas::PLACED_HEADER`]): its requester already heard
    /// `queued`, when it asked for progress.
    pub(super) placed: bool,
    /// Placed again after the host placing it died ([`schemas::REPLACED_HEADER`]): a copy may
    /// already be known here.
    pub(super) replaced: bool,
}

impl Envelope {
    pub(super) fn read(delivery: &Delivery, default_reply_queue: &str) -> Self {
        let properties = &delivery.properties;
        let target = ReplyTarget {
            reply_to: properties
                .reply_to()
                .as_ref()
                .map(|q| q.as_str().to_owned())
                .filter(|q| !q.is_empty())
                .unwrap_or_else(|| default_reply_queue.to_owned()),
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str().to_owned()),
        };
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned());
        Self {
            target,
            message_id,
            deadline_ms: deadline_ms(properties),
            progress: wants_progress(properties.headers().as_ref()),
            placed: flag(properties.headers().as_ref(), schemas::PLACED_HEADER),
            replaced: flag(properties.headers().as_ref(), schemas::REPLACED_HEADER),
        }
    }

    /// What identifies the message across redeliveries: its `message_id`, else a hash of its
    /// correlation id and body (a correlation id alone may be a counter shared by clients).
    /// Asked only of a redelivered message, so the body is not hashed on the common path.
    pub(super) fn identity(&self, delivery: &Delivery) -> String {
        self.message_id.clone().unwrap_or_else(|| {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::hash::DefaultHasher::new();
            self.target.correlation_id.hash(&mut hasher);
            delivery.data.hash(&mut hasher);
            format!("body-{:016x}", hasher.finish())
        })
    }
}

/// Whether a boolean header between workers is set.
fn flag(headers: Option<&FieldTable>, name: &str) -> bool {
    headers
        .and_then(|h| h.inner().get(name))
        .is_some_and(|v| matches!(v, AMQPValue::Boolean(true)))
}

/// The inbox key of a write request. `message_id` is the idempotency key: one key, one request.
/// Without one, the correlation id is scoped by the request's digest: a redelivery of the same
/// message is still recognised, while two different requests that share a correlation id (a
/// counter some RPC clients restart from 1) are two requests. Without either, every delivery is
/// a request of its own.
pub(super) fn idempotency_key(envelope: &Envelope, digest: &str) -> String {
    match (&envelope.message_id, &envelope.target.correlation_id) {
        (Some(message_id), _) => message_id.clone(),
        (None, Some(correlation_id)) => format!("corr:{correlation_id}:{digest}"),
        (None, None) => format!("anonymous-{}", uuid::Uuid::new_v4()),
    }
}

/// The request's deadline: the AMQP `expiration` counted from its `timestamp` (or from now, when
/// it has none), and the `x-deadline` header (RFC 3339); the earlier of the two. Hostile values
/// never overflow: a `timestamp` past what milliseconds in an `i64` can hold is refused, and an
/// expiration reaching past that end saturates to the latest deadline there is.
fn deadline_ms(properties: &lapin::BasicProperties) -> Result<Option<i64>, String> {
    let mut deadline: Option<i64> = None;
    if let Some(expiration) = properties.expiration() {
        let ttl: i64 = expiration
            .as_str()
            .parse()
            .ok()
            .filter(|ttl: &i64| *ttl >= 0)
            .ok_or_else(|| {
                format!(
                    "the expiration property {:?} is not a number of milliseconds (0 to {}); send a smaller one or none",
                    expiration.as_str(),
                    i64::MAX
                )
            })?;
        let sent = match properties.timestamp() {
            None => crate::store::now_ms(),
            Some(seconds) => i64::try_from(*seconds)
                .ok()
                .and_then(|s| s.checked_mul(1000))
                .ok_or_else(|| {
                    format!(
                        "the timestamp property {seconds} is not a time in seconds since 1970 (at most {}); send the time the request was published, or none",
                        i64::MAX / 1000
                    )
                })?,
        };
        deadline = Some(sent.saturating_add(ttl));
    }
    let header = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-deadline").cloned());
    if let Some(value) = header {
        let text = match value {
            lapin::types::AMQPValue::LongString(s) => s.to_string(),
            lapin::types::AMQPValue::ShortString(s) => s.as_str().to_owned(),
            other => {
                return Err(format!(
                    "the x-deadline header must be an RFC 3339 time string, not {other:?}"
                ))
            }
        };
        let at = humantime::parse_rfc3339_weak(&text)
            .or_else(|_| humantime::parse_rfc3339(&text))
            .map_err(|e| format!("the x-deadline header {text:?} is not an RFC 3339 time: {e}"))?;
        let at_ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        deadline = Some(deadline.map_or(at_ms, |d| d.min(at_ms)));
    }
    Ok(deadline)
}

/// Whether the delivery asked for progress envelopes: header `x-progress` set to boolean
/// `true` (or, for clients that can only send strings, `"true"`).
fn wants_progress(headers: Option<&FieldTable>) -> bool {
    let Some(value) = headers.and_then(|h| h.inner().get(PROGRESS_HEADER)) else {
        return false;
    };
    match value {
        AMQPValue::Boolean(flag) => *flag,
        AMQPValue::LongString(text) => text.as_bytes().eq_ignore_ascii_case(b"true"),
        AMQPValue::ShortString(text) => text.as_str().eq_ignore_ascii_case("true"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldTable, LongString};

    use super::{deadline_ms, wants_progress};

    fn headers(value: AMQPValue) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert(schemas::PROGRESS_HEADER.into(), value);
        table
    }

    fn expiring(timestamp: Option<u64>, expiration: &str) -> lapin::BasicProperties {
        let properties = lapin::BasicProperties::default().with_expiration(expiration.into());
        match timestamp {
            Some(seconds) => properties.with_timestamp(seconds),
            None => properties,
        }
    }

    #[test]
    fn a_timestamp_too_large_to_be_a_time_is_refused_with_a_reason() {
        let refused = deadline_ms(&expiring(Some(u64::MAX), "1000")).unwrap_err();
        assert!(refused.contains("timestamp"), "{refused}");
    }

    #[test]
    fn a_huge_expiration_means_a_deadline_as_late_as_can_be_not_an_overflow() {
        let huge = i64::MAX.to_string();
        assert_eq!(deadline_ms(&expiring(None, &huge)), Ok(Some(i64::MAX)));
        let last_second = (i64::MAX / 1000) as u64;
        assert_eq!(
            deadline_ms(&expiring(Some(last_second), &huge)),
            Ok(Some(i64::MAX))
        );
        let refused = deadline_ms(&expiring(None, "99999999999999999999")).unwrap_err();
        assert!(refused.contains("expiration"), "{refused}");
    }

    #[test]
    fn progress_is_sent_only_to_requests_that_ask_for_it() {
        assert!(wants_progress(Some(&headers(AMQPValue::Boolean(true)))));
        assert!(wants_progress(Some(&headers(AMQPValue::LongString(
            LongString::from("true")
        )))));
        assert!(!wants_progress(Some(&headers(AMQPValue::Boolean(false)))));
        assert!(!wants_progress(Some(&headers(AMQPValue::LongString(
            LongString::from("yes")
        )))));
        assert!(!wants_progress(Some(&FieldTable::default())));
        assert!(!wants_progress(None));
    }
}
