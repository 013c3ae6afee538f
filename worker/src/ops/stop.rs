//! `stop`: stop a running container's instance. An instance that is already gone counts as
//! stopped, so a re-run after a crash converges.

use schemas::{ErrorCode, Op, ReplyResult, Stage};

use super::{record, registered, Attempt, OpContext, OpError, Outcome};
use crate::runtime::Stopped;
use crate::store::Change;

pub async fn execute(ctx: &OpContext, name: &str, attempt: Attempt) -> Result<Outcome, OpError> {
    let mut row = registered(ctx, name).await?;
    if !row.active {
        return Err(OpError::new(
            ErrorCode::Conflict,
            format!("container {name} is already stopped"),
        ));
    }
    ctx.record_intent(attempt, Stage::StoppingInstance).await?;
    let stopped = ctx.runtime.stop_instance(name).await?;
    if stopped == Stopped::WasNotRunning {
        tracing::info!(
            container = name,
            "the instance was already gone; recorded as stopped"
        );
    }
    row.active = false;
    row.ip.clear();
    let result = ReplyResult::Container(record(&row));
    Ok(Outcome::new(Op::Stop, Some(result), Change::Put(row)))
}
