//! `deletecontdata`: delete the image a deleted container left behind. Deletes only inside the
//! worker's image directory, checked after resolving symlinks.

use schemas::{ErrorCode, Op, Stage};

use super::start::remove_path;
use super::{Attempt, OpContext, OpError, Outcome};
use crate::store::Change;

pub async fn execute(ctx: &OpContext, name: &str, attempt: Attempt) -> Result<Outcome, OpError> {
    if ctx.store.container(name).await?.is_some() {
        return Err(OpError::new(
            ErrorCode::Unprocessable,
            format!("container {name} is still registered; delete it with deletecont first"),
        ));
    }
    let left = ctx.store.leftover(name).await?.ok_or_else(|| {
        OpError::new(
            ErrorCode::NotFound,
            format!("there is no data of a deleted container {name}"),
        )
    })?;
    let path = std::path::Path::new(&left.image_path);
    let images = std::fs::canonicalize(&ctx.images_dir).map_err(|e| {
        OpError::new(
            ErrorCode::Internal,
            format!(
                "the image directory {} cannot be resolved: {e}",
                ctx.images_dir.display()
            ),
        )
    })?;
    // The recorded path itself must be a direct entry of the image directory, and so must its
    // parent once resolved; and the entry must not be a symlink, which this worker never
    // creates: a link planted in the data directory is refused, not followed nor quietly
    // removed, so the tampering stays visible to the operator.
    let parent_ok = path
        .parent()
        .and_then(|p| std::fs::canonicalize(p).ok())
        .is_some_and(|p| p == images);
    let planted_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !parent_ok || planted_link || path.file_name().is_none_or(|f| f != name) {
        return Err(OpError::new(
            ErrorCode::Unprocessable,
            format!(
                "refusing to delete {}: it is not an image this worker built (it lies outside {} or is a symbolic link); an operator must inspect and remove it by hand",
                left.image_path,
                images.display()
            ),
        ));
    }
    ctx.record_intent(attempt, Stage::DeletingData).await?;
    // remove_path does not follow a symlink at `path` itself: it removes the link.
    remove_path(path).map_err(|e| {
        OpError::new(
            ErrorCode::Internal,
            format!("could not delete {}: {e}", left.image_path),
        )
    })?;
    Ok(Outcome::new(
        Op::Deletecontdata,
        None,
        Change::ForgetLeftover(left.name),
    ))
}
