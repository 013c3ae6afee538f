//! Not a request: what the reconciler asks of a container whose instance died outside the
//! orchestrator. Runs in the container's lane like any request, so it never races one.

use std::path::PathBuf;

use super::binds::instance_binds;
use super::{OpContext, OpError};

/// Records a dead instance as stopped or, when `restore` is set, starts it again with its stored
/// binds. Does nothing if the container is no longer recorded as running or its instance is
/// back (a request in the lane before this job changed things).
pub async fn converge_dead_instance(
    ctx: &OpContext,
    name: &str,
    restore: bool,
) -> Result<(), OpError> {
    let Some(mut row) = ctx.store.container(name).await? else {
        return Ok(());
    };
    if !row.active || ctx.runtime.instance(name).await?.is_some() {
        return Ok(());
    }
    row.active = false;
    row.ip.clear();
    if restore {
        let started = async {
            let binds = instance_binds(ctx, row.volume_name.as_deref(), &row.binds)?;
            ctx.runtime
                .start_instance(&PathBuf::from(&row.image_path), name, &binds)
                .await?;
            Ok::<_, OpError>(
                ctx.runtime
                    .instance(name)
                    .await?
                    .map(|i| i.ip)
                    .unwrap_or_default(),
            )
        }
        .await;
        match started {
            Ok(ip) => {
                tracing::warn!(
                    container = name,
                    "its instance had died; restarted it (restore policy)"
                );
                row.active = true;
                row.ip = ip;
            }
            Err(e) => tracing::error!(container = name, error = %e,
                "its instance had died and could not be restarted; recorded as stopped"),
        }
    } else {
        tracing::warn!(
            container = name,
            "its instance had died; recorded as stopped"
        );
    }
    ctx.store.put_container(row).await?;
    Ok(())
}
