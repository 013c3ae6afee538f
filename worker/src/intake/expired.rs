//! The consumer of `<exchange>.expired`, which every host takes from: requests whose deadline
//! (per-message TTL, AMQP `expiration`) passed while they waited in a queue (a host that is
//! gone, a start waiting for room) are dead-lettered there by the broker and answered here
//! `504 deadline_exceeded`; they never run. Admin messages that expire are dropped.

use std::time::Instant;

use lapin::types::AMQPValue;
use lapin::Consumer;
use schemas::ErrorCode;
use tokio_util::sync::CancellationToken;

use super::consume::next_request;
use super::envelope::Envelope;
use super::{decode, Intake, Refused};
use crate::rules::Refusal;

impl Intake {
    /// Answers every expired request from `consumer` until its stream ends (`true`) or `stop`
    /// is cancelled (`false`).
    pub(super) async fn answer_expired(
        &self,
        mut consumer: Consumer,
        stop: &CancellationToken,
    ) -> bool {
        loop {
            let delivery = match next_request(&mut consumer, stop).await {
                Ok(delivery) => delivery,
                Err(ended) => return ended,
            };
            let envelope = Envelope::read(&delivery, &self.default_reply_queue);
            let (op, container_name) = decode::claimed(&delivery.data);
            let queue = expired_in(&delivery.properties).unwrap_or_else(|| "a queue".into());
            tracing::info!(%queue, "a request expired before any host could run it; answering 504");
            let refused = Refused {
                refusal: Refusal::new(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "the request's deadline passed while it waited in {queue}, so it was not \
                         run; if that is a host's queue, the host is down (see `orchestrator \
                         fleet hosts`): send the request again with a later deadline"
                    ),
                ),
                op,
                container_name,
            };
            self.refuse(delivery, envelope.target, refused, Instant::now());
        }
    }
}

/// The queue a dead-lettered message expired in, from its `x-death` header.
fn expired_in(properties: &lapin::BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("queue")? {
        AMQPValue::LongString(queue) => Some(queue.to_string()),
        AMQPValue::ShortString(queue) => Some(queue.as_str().to_owned()),
        _ => None,
    }
}
