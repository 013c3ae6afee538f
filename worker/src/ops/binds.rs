//! Where a bind's host side is checked: a host directory resolved on the host (it exists, it is
//! a directory, its symlinks lead inside an allowed root) and a bind's container side in the
//! image. The syntax of both is a rule (`rules::request`), checked again here after resolving.

use std::path::{Path, PathBuf};

use schemas::ErrorCode;

use super::{OpContext, OpError};
use crate::rules::request::{check_container_location, check_host_path, check_path_syntax};
use crate::runtime::Bind;

/// Checks a host directory against the bind policy: absolute, free of the characters that
/// separate apptainer bind specs, existing, and inside an allowed root once symlinks are
/// resolved. Returns the resolved path, which is what apptainer is given; it is held to the
/// same syntax, since a symlink's target can hold a `,` that would split the bind in two.
pub(super) fn resolve_host_dir(
    ctx: &OpContext,
    field: &str,
    location: &str,
) -> Result<PathBuf, OpError> {
    check_host_path(field, location)?;
    let resolved = std::fs::canonicalize(location).map_err(|_| {
        OpError::bad_request(format!(
            "{field} {location} does not exist on the host; create the directory first"
        ))
    })?;
    if !resolved.is_dir() {
        return Err(OpError::bad_request(format!(
            "{field} {location} is not a directory"
        )));
    }
    if !ctx.bind_roots.iter().any(|root| resolved.starts_with(root)) {
        let roots: Vec<String> = ctx
            .bind_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        return Err(OpError::new(
            ErrorCode::Forbidden,
            format!(
                "{field} {location} is outside the directories binds may come from ({}); the operator sets them with --allowed-bind-roots",
                roots.join(":")
            ),
        ));
    }
    let resolved_text = resolved.to_str().ok_or_else(|| {
        OpError::bad_request(format!(
            "{field} {location} resolves to a path that is not UTF-8"
        ))
    })?;
    check_path_syntax(
        &format!("{field} {location}, once resolved,"),
        resolved_text,
    )?;
    Ok(resolved)
}

/// All binds of a container for `instance start`: the home volume, then the other binds, each
/// host directory resolved again now (a symlink may have changed since it was recorded).
pub(super) fn instance_binds(
    ctx: &OpContext,
    volume_name: Option<&str>,
    binds: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<Bind>, OpError> {
    let mut all = Vec::with_capacity(binds.len() + 1);
    if let Some(volume) = volume_name {
        let host = resolve_host_dir(ctx, "volume_name", volume)?;
        all.push(Bind {
            host: host.display().to_string(),
            container: ctx.home_mount.clone(),
        });
    }
    for (host, container) in binds {
        check_container_location(container)?;
        let host = resolve_host_dir(ctx, "a host directory in binds", host)?;
        all.push(Bind {
            host: host.display().to_string(),
            container: container.clone(),
        });
    }
    Ok(all)
}

/// Checks that a bind's container location is a directory in the container's image: the
/// in-image check of the runtime (`runtime::sandbox`), asked here only.
pub(super) async fn check_in_image(
    ctx: &OpContext,
    name: &str,
    image: &Path,
    container_location: &str,
) -> Result<(), OpError> {
    if !ctx
        .runtime
        .is_dir_in_image(image, container_location)
        .await?
    {
        return Err(OpError::bad_request(format!(
            "container location {container_location} does not exist in the image of {name}"
        )));
    }
    Ok(())
}
