//! `restart`: start a stopped container again, from its image, with its stored binds.

use schemas::{ErrorCode, Op, ReplyResult, Stage};

use super::binds::instance_binds;
use super::{record, registered, Attempt, OpContext, OpError, Outcome};
use crate::store::Change;

pub async fn execute(ctx: &OpContext, name: &str, attempt: Attempt) -> Result<Outcome, OpError> {
    let mut row = registered(ctx, name).await?;
    if row.active {
        return Err(OpError::new(
            ErrorCode::Conflict,
            format!("container {name} is already running; stop it first"),
        ));
    }
    let binds = instance_binds(ctx, row.volume_name.as_deref(), &row.binds)?;
    let image = std::path::PathBuf::from(&row.image_path);
    let mut warnings = Vec::new();
    match ctx.runtime.instance(name).await? {
        Some(running) if running.image == row.image_path => {
            // Started by an interrupted run of this request, or outside the orchestrator.
            if !attempt.is_resumed() {
                warnings.push(format!(
                    "an instance of {name} was already running; it was adopted, not started again"
                ));
            }
        }
        Some(running) => {
            return Err(OpError::new(
                ErrorCode::Conflict,
                format!(
                    "an apptainer instance named {name} is running another image ({}); stop it first",
                    running.image
                ),
            ));
        }
        None => {
            ctx.record_intent(attempt, Stage::StartingInstance).await?;
            ctx.runtime.start_instance(&image, name, &binds).await?;
        }
    }
    row.active = true;
    row.ip = match ctx.runtime.instance(name).await {
        Ok(Some(running)) => running.ip,
        _ => String::new(),
    };
    let mut outcome = Outcome::new(
        Op::Restart,
        Some(ReplyResult::Container(record(&row))),
        Change::Put(row),
    );
    outcome.warnings = warnings;
    Ok(outcome)
}
