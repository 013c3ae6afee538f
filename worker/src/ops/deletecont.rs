//! `deletecont`: unregister a stopped container. Its image stays on disk as "data" until
//! `deletecontdata`, as the earlier server kept it.

use schemas::{ErrorCode, Op};

use super::{registered, OpContext, OpError, Outcome};
use crate::store::{Change, LeftoverRow};

pub async fn execute(ctx: &OpContext, name: &str) -> Result<Outcome, OpError> {
    let row = registered(ctx, name).await?;
    if row.active {
        return Err(OpError::new(
            ErrorCode::Unprocessable,
            format!("container {name} is running; stop it before deleting it"),
        ));
    }
    let left = LeftoverRow {
        name: row.name,
        image: row.image,
        image_path: row.image_path,
    };
    Ok(Outcome::new(Op::Deletecont, None, Change::Unregister(left)))
}
