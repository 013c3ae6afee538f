//! `createvolume`: add a bind to a container. On a running container it succeeds with a
//! warning: the bind takes effect at the next restart, as with the earlier server.

use schemas::{BindsResult, ErrorCode, Op, ReplyResult, VolumeRequest};

use super::binds::{check_in_image, resolve_host_dir};
use super::{registered, OpContext, OpError, Outcome};
use crate::rules::request::check_container_location;
use crate::store::Change;

pub async fn execute(ctx: &OpContext, req: &VolumeRequest) -> Result<Outcome, OpError> {
    let name = req.container_name.as_str();
    let mut row = registered(ctx, name).await?;
    let host = req.host_location.as_str();
    resolve_host_dir(ctx, "host_location", host)?;
    check_container_location(&req.container_location)?;
    if row.binds.contains_key(host) || row.volume_name.as_deref() == Some(host) {
        return Err(OpError::new(
            ErrorCode::Conflict,
            format!("host directory {host} already has a bind in container {name}; remove it with deletevolume first"),
        ));
    }
    let image = std::path::Path::new(&row.image_path);
    check_in_image(ctx, name, image, &req.container_location).await?;
    row.binds
        .insert(host.to_owned(), req.container_location.clone());
    let mut outcome = Outcome::new(
        Op::Createvolume,
        Some(ReplyResult::Binds(BindsResult {
            container_name: name.to_owned(),
            binds: row.binds.clone(),
        })),
        Change::Nothing,
    );
    if row.active {
        outcome.warnings.push(format!(
            "container {name} is running: the bind takes effect at its next restart"
        ));
    }
    outcome.change = Change::Put(row);
    Ok(outcome)
}
