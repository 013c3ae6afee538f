//! `start`: build the container's image from a per-request definition file and start its
//! instance. Re-running an interrupted `start` converges: an image this request already built
//! is not built again, and an instance it already started is adopted, not started twice.

use std::path::Path;

use schemas::{ErrorCode, Op, ReplyResult, Stage, StartRequest};

use super::binds::instance_binds;
use super::{record, Attempt, OpContext, OpError, Outcome};
use crate::runtime::definition::Definition;
use crate::store::{Change, ContainerRow};

pub async fn execute(
    ctx: &OpContext,
    req: &StartRequest,
    attempt: Attempt,
) -> Result<Outcome, OpError> {
    let name = req.container_name.as_str();
    if ctx.store.container(name).await?.is_some() {
        return Err(OpError::new(
            ErrorCode::Conflict,
            format!("container {name} already exists; use restart to start it again, or choose another name"),
        ));
    }
    if ctx.store.leftover(name).await?.is_some() {
        return Err(OpError::new(
            ErrorCode::Conflict,
            format!("the data of a deleted container {name} is still on disk; remove it with deletecontdata, or choose another name"),
        ));
    }
    // Checked now so that a refused bind fails the request before anything is built.
    instance_binds(ctx, req.volume_name.as_deref(), &req.binds)?;
    let image = ctx.image_path(name);
    let image_text = image.display().to_string();

    let row = |ip: String| ContainerRow {
        name: name.to_owned(),
        image: req.container_image.clone(),
        distributor: req.image_distributor.clone(),
        os: req.image_os.clone(),
        version: req.image_version.clone(),
        command: req.container_command.clone(),
        environment: req.environment.clone(),
        volume_name: req.volume_name.clone(),
        binds: req.binds.clone(),
        image_path: image_text.clone(),
        active: true,
        ip,
    };

    if let Some(running) = ctx.runtime.instance(name).await? {
        if attempt.is_resumed() && running.image == image_text {
            // This request started it before the worker was interrupted: adopt it.
            let row = row(running.ip);
            return Ok(started(row));
        }
        return Err(OpError::new(
            ErrorCode::Conflict,
            format!("an apptainer instance named {name} is already running on this host but is not registered here; stop it or choose another name"),
        ));
    }

    let definition = Definition::of_start(req)
        .render_checked()
        .map_err(|e| OpError::new(ErrorCode::Internal, format!("refusing to build: {e}")))?;
    if let Err(error) = build_and_start(ctx, attempt, req, &image, &definition).await {
        return Err(clean_up(ctx, name, &image, error).await);
    }

    let ip = match ctx.runtime.instance(name).await {
        Ok(Some(running)) => running.ip,
        Ok(None) => String::new(),
        Err(e) => {
            tracing::warn!(container = name, error = %e, "started, but could not read its IP");
            String::new()
        }
    };
    Ok(started(row(ip)))
}

/// Undoes what a start that failed, timed out or was given up may have left on the host: the
/// instance (a timed-out `instance start` is killed, but the instance it daemonised may be
/// running) and the image. Nobody owns either: the name is neither registered nor leftover
/// data, and no instance of that name ran before this request began. Returns `error`, told
/// that something may still be running when the clean-up itself failed.
async fn clean_up(ctx: &OpContext, name: &str, image: &Path, error: OpError) -> OpError {
    let image_text = image.display().to_string();
    let stopped = match ctx.runtime.instance(name).await {
        Ok(Some(running)) if running.image == image_text => {
            tracing::warn!(
                container = name,
                "stopping the instance a failed start left running"
            );
            ctx.runtime.stop_instance(name).await.map(|_| ())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = stopped {
        tracing::error!(container = name, error = %e, "could not stop the instance of a failed start");
        return OpError::new(
            error.code,
            format!(
                "{}; an instance {name} may still be running and could not be stopped ({e}): stop it with `apptainer instance stop {name}` on the host",
                error.message
            ),
        );
    }
    if let Err(e) = remove_path(image) {
        tracing::warn!(container = name, error = %e, "could not remove the image of a failed start");
    }
    error
}

/// Cleans up after a `start` the scheduler gave up or did not run again (its deadline passed)
/// after an earlier attempt was interrupted: that attempt may have built the image and started
/// the instance. Does nothing when the name belongs to a registered container or to leftover
/// data, which are not this request's.
pub async fn abandon(ctx: &OpContext, req: &StartRequest, error: OpError) -> OpError {
    let name = req.container_name.as_str();
    match (
        ctx.store.container(name).await,
        ctx.store.leftover(name).await,
    ) {
        (Ok(None), Ok(None)) => clean_up(ctx, name, &ctx.image_path(name), error).await,
        _ => error,
    }
}

fn started(row: ContainerRow) -> Outcome {
    let result = ReplyResult::Container(record(&row));
    Outcome::new(Op::Start, Some(result), Change::Put(row))
}

async fn build_and_start(
    ctx: &OpContext,
    attempt: Attempt,
    req: &StartRequest,
    image: &std::path::Path,
    definition: &str,
) -> Result<(), OpError> {
    let name = req.container_name.as_str();
    // An interrupted earlier run of this request may have finished the build: apptainer keeps
    // the definition file inside the image, so an identical one means the image is ours.
    let built = std::fs::read_to_string(image.join(".singularity.d/Singularity"))
        .is_ok_and(|text| text == definition);
    if !built {
        std::fs::create_dir_all(&ctx.definitions_dir)
            .map_err(|e| internal("create the definitions directory", e))?;
        let def_path = ctx
            .definitions_dir
            .join(format!("{}-{name}.def", attempt.seq));
        std::fs::write(&def_path, definition)
            .map_err(|e| internal("write the definition file", e))?;
        std::fs::create_dir_all(&ctx.images_dir)
            .map_err(|e| internal("create the images directory", e))?;
        ctx.record_intent(attempt, Stage::BuildingImage).await?;
        let build = ctx.runtime.build_sandbox(image, &def_path).await;
        let _ = std::fs::remove_file(&def_path);
        build?;
    }
    // Resolved again after the build, which can take minutes: a symlink changed meanwhile is
    // judged by where it leads now.
    let binds = instance_binds(ctx, req.volume_name.as_deref(), &req.binds)?;
    ctx.record_intent(attempt, Stage::StartingInstance).await?;
    ctx.runtime.start_instance(image, name, &binds).await?;
    Ok(())
}

fn internal(what: &str, error: std::io::Error) -> OpError {
    OpError::new(ErrorCode::Internal, format!("could not {what}: {error}"))
}

/// Removes a file or directory tree; a missing one is fine.
pub(super) fn remove_path(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
