//! The load generator: a closed loop of `in_flight` tasks sharing one [`Client`], each taking
//! tickets until the ticket count or the time limit runs out, and the statistics of a run.
//!
//! A ticket is a short script of requests run one after another (one `getcont`, or a
//! `createvolume` then its `deletevolume`), so that a pair never interleaves with itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orchestrator_producer::{Client, Publish};

/// How long one reply may take before the request counts as failed.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// One request of a ticket: its body and the status its reply must have.
#[derive(Clone)]
pub struct Step {
    pub body: Vec<u8>,
    pub expect: u16,
}

/// How much load to apply.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub in_flight: usize,
    pub tickets: usize,
    pub time_limit: Duration,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub requests: usize,
    pub wall: Duration,
    /// One per successful request, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Failed requests, with the first few reasons.
    pub failures: usize,
    pub failure_reasons: Vec<String>,
}

impl Sample {
    /// Merges another run measured under the same conditions (rounds of an alternation).
    pub fn merge(&mut self, other: Sample) {
        self.requests += other.requests;
        self.wall += other.wall;
        self.latencies_us.extend(other.latencies_us);
        self.failures += other.failures;
        for reason in other.failure_reasons {
            if self.failure_reasons.len() < 5 {
                self.failure_reasons.push(reason);
            }
        }
    }

    pub fn throughput(&self) -> f64 {
        let secs = self.wall.as_secs_f64();
        if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        }
    }

    /// The `q` quantile (0..=1) of the latencies in milliseconds, nearest rank; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latencies_us, q)
    }
}

pub fn quantile_ms(latencies_us: &[u64], q: f64) -> f64 {
    if latencies_us.is_empty() {
        return 0.0;
    }
    let mut sorted = latencies_us.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

/// Runs `script(task, ticket)` tickets from `bounds.in_flight` tasks at once.
pub async fn run<S>(client: &Arc<Client>, bounds: Bounds, script: S) -> Sample
where
    S: Fn(usize, usize) -> Vec<Step> + Send + Sync + 'static,
{
    let script = Arc::new(script);
    let next_ticket = Arc::new(AtomicUsize::new(0));
    let sample = Arc::new(Mutex::new(Sample::default()));
    let started = Instant::now();
    let deadline = started + bounds.time_limit;
    let mut tasks = Vec::with_capacity(bounds.in_flight);
    for task in 0..bounds.in_flight {
        let (client, script, next_ticket, sample) = (
            Arc::clone(client),
            Arc::clone(&script),
            Arc::clone(&next_ticket),
            Arc::clone(&sample),
        );
        tasks.push(tokio::spawn(async move {
            let mut local = Sample::default();
            loop {
                let ticket = next_ticket.fetch_add(1, Ordering::Relaxed);
                if ticket >= bounds.tickets || Instant::now() >= deadline {
                    break;
                }
                for step in script(task, ticket) {
                    let sent = Instant::now();
                    let outcome = client
                        .call_raw(&step.body, Publish::default(), REPLY_TIMEOUT)
                        .await;
                    local.requests += 1;
                    match outcome {
                        Ok(reply) if reply.status == step.expect => {
                            local.latencies_us.push(sent.elapsed().as_micros() as u64)
                        }
                        Ok(reply) => local.fail(format!(
                            "expected status {}, got {} ({:?})",
                            step.expect,
                            reply.status,
                            reply.error.map(|e| e.message)
                        )),
                        Err(e) => local.fail(e.to_string()),
                    }
                }
            }
            sample
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .merge(local);
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            let mut sample = sample.lock().unwrap_or_else(|p| p.into_inner());
            sample.failures += 1;
            sample
                .failure_reasons
                .push(format!("a load task failed: {e}"));
        }
    }
    let mut sample = std::mem::take(&mut *sample.lock().unwrap_or_else(|p| p.into_inner()));
    sample.wall = started.elapsed();
    sample
}

impl Sample {
    fn fail(&mut self, reason: String) {
        self.failures += 1;
        if self.failure_reasons.len() < 5 {
            self.failure_reasons.push(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let latencies: Vec<u64> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(quantile_ms(&latencies, 0.5), 50.0);
        assert_eq!(quantile_ms(&latencies, 0.99), 99.0);
        assert_eq!(quantile_ms(&latencies, 1.0), 100.0);
        assert_eq!(quantile_ms(&[], 0.5), 0.0);
    }
}
