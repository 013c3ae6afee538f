//! `getcont`: one container's record, as the store has it. Runs in the container's lane, so it
//! sees every request published before it.

use schemas::{Op, ReplyResult};

use super::{record, registered, OpContext, OpError, Outcome};
use crate::store::Change;

pub async fn execute(ctx: &OpContext, name: &str) -> Result<Outcome, OpError> {
    let row = registered(ctx, name).await?;
    let result = ReplyResult::Container(record(&row));
    Ok(Outcome::new(Op::Getcont, Some(result), Change::Nothing))
}
