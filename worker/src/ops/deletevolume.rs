//! `deletevolume` (alias `removevolume`): remove a bind from a stopped container.

use schemas::{BindsResult, ErrorCode, Op, ReplyResult, VolumeRequest};

use super::{registered, OpContext, OpError, Outcome};
use crate::store::Change;

pub async fn execute(ctx: &OpContext, req: &VolumeRequest) -> Result<Outcome, OpError> {
    let name = req.container_name.as_str();
    let mut row = registered(ctx, name).await?;
    if row.active {
        return Err(OpError::new(
            ErrorCode::Unprocessable,
            format!("container {name} is running; stop it before removing a bind"),
        ));
    }
    let host = req.host_location.as_str();
    if row.binds.get(host) != Some(&req.container_location) {
        return Err(OpError::new(
            ErrorCode::NotFound,
            format!(
                "container {name} has no bind {host} -> {}",
                req.container_location
            ),
        ));
    }
    row.binds.remove(host);
    let result = ReplyResult::Binds(BindsResult {
        container_name: name.to_owned(),
        binds: row.binds.clone(),
    });
    Ok(Outcome::new(
        Op::Deletevolume,
        Some(result),
        Change::Put(row),
    ))
}
