//! `orchestrator replies`: reads the replies waiting in a reply queue (the worker's default one
//! unless told otherwise), where `--no-wait` without `--reply-to` has them sent, and prints each
//! envelope as it arrived, one a line. A printed reply is acknowledged, so it is printed once.

use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::{Connection, ConnectionProperties};

use super::args::RepliesArgs;
use super::{Common, Exit, Failure};

/// How often an empty queue is asked again while `--timeout` runs.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Prints up to `--count` waiting replies. With `--timeout`, waits that long for the first one
/// when none is waiting (exit 3 if none comes); without it, an empty queue is not an error.
pub async fn print(common: &Common, args: &RepliesArgs) -> Result<Exit, Failure> {
    let broker_failure = |e: lapin::Error| {
        Failure::unavailable(format!(
            "could not read {} at {} ({e}); does the queue exist (the worker declares it), and are --amqp-url and its credentials right?",
            args.reply_queue,
            schemas::redact_url(common.amqp_url())
        ))
    };
    let connection = Connection::connect(common.amqp_url(), ConnectionProperties::default())
        .await
        .map_err(broker_failure)?;
    let channel = connection.create_channel().await.map_err(broker_failure)?;
    let deadline = common.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut printed = 0;
    while printed < args.count {
        let message = channel
            .basic_get(args.reply_queue.as_str().into(), BasicGetOptions::default())
            .await
            .map_err(broker_failure)?;
        let Some(message) = message else {
            match deadline {
                Some(deadline) if printed == 0 && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(POLL_EVERY).await;
                    continue;
                }
                _ => break,
            }
        };
        println!(
            "{}",
            String::from_utf8_lossy(&message.delivery.data).trim_end()
        );
        message
            .delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(broker_failure)?;
        printed += 1;
    }
    let _ = connection.close(200, "replies read".into()).await;
    if printed > 0 {
        return Ok(Exit::Success);
    }
    match common.timeout {
        Some(timeout) => Err(Failure::unavailable(format!(
            "no reply arrived in {} within {}s",
            args.reply_queue,
            timeout.as_secs_f64()
        ))),
        None => {
            eprintln!("no replies waiting in {}", args.reply_queue);
            Ok(Exit::Success)
        }
    }
}
