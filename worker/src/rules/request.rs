//! The rules of a whole request that need no disk or apptainer: the allow-lists and size limits
//! that keep every value inside the place it is rendered into, and the syntax of bind paths.
//! Whether a host directory exists and where its symlinks lead is checked by `ops::binds`, which
//! resolves it on the host.

use std::path::{Component, Path};

use schemas::{PageRequest, Request, StartRequest, VolumeRequest, PROTOCOL_VERSION};

use super::script::{check_env_name, check_env_value, check_script_line};
use super::{shorten, Refusal};

/// Bootstrap agents a request may name. All of them take `From: <image>:<tag>`; agents that
/// read host paths (`localimage`, `docker-archive`, `oci`, ...) are left out on purpose.
pub const ALLOWED_DISTRIBUTORS: &[&str] = &["docker", "library", "oras", "shub"];

pub const MAX_REFERENCE_LEN: usize = 255;
pub const MAX_COMMAND_LINES: usize = 1000;
pub const MAX_LINE_LEN: usize = 4096;
pub const MAX_ENVIRONMENT: usize = 256;
pub const MAX_BINDS: usize = 64;
/// Longest host or container path (Linux's `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Largest `getallcont` page.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Container directories that must never be replaced by a bind.
const PROTECTED_CONTAINER_PATHS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var",
    "/.singularity.d",
];

/// Container trees that no bind may reach into at any depth: kernel file systems and
/// apptainer's own metadata (its environment scripts and start script live there).
const PROTECTED_CONTAINER_TREES: &[&str] = &["/dev", "/proc", "/sys", "/.singularity.d"];

/// Returns the first problem found.
pub fn check(request: &Request) -> Result<(), Refusal> {
    if let Some(v) = request.version() {
        if v != PROTOCOL_VERSION {
            return Err(Refusal::bad_request(format!(
                "protocol version {v} is not supported; this worker speaks version {PROTOCOL_VERSION}"
            )));
        }
    }
    match request {
        Request::Start(start) => check_start(start),
        Request::Getallcont(page) => check_page(page),
        Request::Createvolume(volume) => check_volume(volume, true),
        // A bind recorded under older rules must stay removable: only the syntax is checked.
        Request::Deletevolume(volume) => check_volume(volume, false),
        Request::Stop(_)
        | Request::Restart(_)
        | Request::Getcont(_)
        | Request::Deletecont(_)
        | Request::Deletecontdata(_) => Ok(()),
    }
}

fn check_start(req: &StartRequest) -> Result<(), Refusal> {
    if !ALLOWED_DISTRIBUTORS.contains(&req.image_distributor.as_str()) {
        return Err(Refusal::bad_request(format!(
            "image_distributor {:?} is not allowed; use one of {}",
            shorten(&req.image_distributor),
            ALLOWED_DISTRIBUTORS.join(", ")
        )));
    }
    check_reference("container_image", &req.container_image, |c| {
        c.is_ascii_alphanumeric() || "._/:@+-".contains(c)
    })?;
    check_reference("image_os", &req.image_os, |c| {
        c.is_ascii_alphanumeric() || "._/:@+-".contains(c)
    })?;
    check_reference("image_version", &req.image_version, |c| {
        c.is_ascii_alphanumeric() || "._@:+-".contains(c)
    })?;
    if req.container_command.len() > MAX_COMMAND_LINES {
        return Err(Refusal::bad_request(format!(
            "container_command has {} lines; at most {MAX_COMMAND_LINES} are accepted",
            req.container_command.len()
        )));
    }
    for line in &req.container_command {
        if line.len() > MAX_LINE_LEN {
            return Err(Refusal::bad_request(format!(
                "a container_command line has {} bytes; at most {MAX_LINE_LEN} are accepted",
                line.len()
            )));
        }
        check_script_line(line)?;
    }
    if req.environment.len() > MAX_ENVIRONMENT {
        return Err(Refusal::bad_request(format!(
            "environment has {} variables; at most {MAX_ENVIRONMENT} are accepted",
            req.environment.len()
        )));
    }
    for (name, value) in &req.environment {
        check_env_name(name)?;
        if value.len() > MAX_LINE_LEN {
            return Err(Refusal::bad_request(format!(
                "the environment value of {name} has {} bytes; at most {MAX_LINE_LEN} are accepted",
                value.len()
            )));
        }
        check_env_value(name, value)?;
    }
    if let Some(volume) = &req.volume_name {
        check_host_path("volume_name", volume)?;
    }
    if req.binds.len() > MAX_BINDS {
        return Err(Refusal::bad_request(format!(
            "binds has {} entries; at most {MAX_BINDS} are accepted",
            req.binds.len()
        )));
    }
    for (host, container) in &req.binds {
        check_host_path("a host directory in binds", host)?;
        check_container_location_in("binds", container)?;
    }
    Ok(())
}

fn check_page(req: &PageRequest) -> Result<(), Refusal> {
    if req.page == Some(0) {
        return Err(Refusal::bad_request("page counts from 1"));
    }
    if req
        .page_size
        .is_some_and(|size| size == 0 || size > MAX_PAGE_SIZE)
    {
        return Err(Refusal::bad_request(format!(
            "page_size must be 1 to {MAX_PAGE_SIZE}"
        )));
    }
    Ok(())
}

fn check_volume(req: &VolumeRequest, creating: bool) -> Result<(), Refusal> {
    check_host_path("host_location", &req.host_location)?;
    if creating {
        check_container_location(&req.container_location)
    } else {
        check_path_syntax("container_location", &req.container_location)
    }
}

fn check_reference(
    field: &str,
    value: &str,
    allowed: impl Fn(char) -> bool,
) -> Result<(), Refusal> {
    if value.is_empty() || value.len() > MAX_REFERENCE_LEN {
        return Err(Refusal::bad_request(format!(
            "{field} must be 1 to {MAX_REFERENCE_LEN} characters"
        )));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(Refusal::bad_request(format!(
            "{field} {:?} contains {bad:?}, which an image reference cannot hold",
            shorten(value)
        )));
    }
    Ok(())
}

/// A host directory as a request names it: absolute, and nothing apptainer's `--bind` parser
/// reads as structure. The operations check the same rule again on the path once symlinks are
/// resolved, since a symlink's target can hold any character.
pub fn check_host_path(field: &str, location: &str) -> Result<(), Refusal> {
    check_path_syntax(field, location)
}

/// A container directory for a new bind: absolute, normalised, and not a system directory (403).
pub fn check_container_location(location: &str) -> Result<(), Refusal> {
    check_container_location_in("container_location", location)
}

fn check_container_location_in(field: &str, location: &str) -> Result<(), Refusal> {
    check_path_syntax(field, location)?;
    let normalised = Path::new(location)
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !normalised || location.contains("//") || (location.len() > 1 && location.ends_with('/')) {
        return Err(Refusal::bad_request(format!(
            "{field}: container location {:?} must be a normalised absolute path (no '.', '..', '//' or trailing '/')",
            shorten(location)
        )));
    }
    let in_protected_tree = PROTECTED_CONTAINER_TREES
        .iter()
        .any(|tree| Path::new(location).starts_with(tree));
    if in_protected_tree || PROTECTED_CONTAINER_PATHS.contains(&location) {
        return Err(Refusal::forbidden(format!(
            "{field}: container location {location} is a system directory of the container and cannot be a bind target (refused: {}, and anything under {})",
            PROTECTED_CONTAINER_PATHS.join(" "),
            PROTECTED_CONTAINER_TREES.join(" ")
        )));
    }
    Ok(())
}

/// Absolute, at most [`MAX_PATH_LEN`] bytes, and free of what separates or escapes apptainer
/// bind specifications (`:` `,` `\`) and of control characters.
pub fn check_path_syntax(field: &str, location: &str) -> Result<(), Refusal> {
    if location.len() > MAX_PATH_LEN {
        return Err(Refusal::bad_request(format!(
            "{field} has {} bytes; at most {MAX_PATH_LEN} are accepted",
            location.len()
        )));
    }
    if !location.starts_with('/') {
        return Err(Refusal::bad_request(format!(
            "{field} {:?} must be an absolute path",
            shorten(location)
        )));
    }
    if location.contains([':', ',', '\\']) || location.chars().any(char::is_control) {
        return Err(Refusal::bad_request(format!(
            "{field} {:?} may not contain ':', ',', '\\' or control characters (they separate or escape apptainer bind specifications)",
            shorten(location)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::ErrorCode;
    use serde_json::json;

    fn start(overrides: serde_json::Value) -> Request {
        let mut body = json!({"op": "start", "container_name": "nb1", "container_image": "jupyter/base-notebook",
            "image_distributor": "docker", "image_os": "jupyter/base-notebook", "image_version": "latest"});
        for (k, v) in overrides.as_object().unwrap() {
            body[k] = v.clone();
        }
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn a_plain_start_passes() {
        assert_eq!(
            check(&start(json!({
                "container_command": ["jupyter lab --port 8888"],
                "volume_name": "/srv/homes/nb1",
                "binds": {"/srv/shared": "/mnt/shared"},
                "environment": {"TZ": "UTC"}
            }))),
            Ok(())
        );
    }

    #[test]
    fn values_that_would_escape_their_place_in_the_definition_file_are_refused() {
        let cases = [
            json!({"image_distributor": "localimage"}),
            json!({"image_os": "ubuntu\n%post\nrm -rf /"}),
            json!({"image_version": "latest bad"}),
            json!({"image_version": "latest\\"}),
            json!({"container_command": ["ok", "%post"]}),
            json!({"container_command": ["\u{2028}%post"]}),
            json!({"environment": {"A B": "x"}}),
            json!({"environment": {"A": "x\ny"}}),
            json!({"v": 2}),
        ];
        for case in cases {
            let refused = check(&start(case.clone())).expect_err(&case.to_string());
            assert_eq!(refused.code, ErrorCode::BadRequest, "{case}");
        }
    }

    #[test]
    fn bind_specifications_are_checked_at_intake() {
        let bad = [
            json!({"volume_name": "relative/dir"}),
            json!({"volume_name": "/srv/a,/etc"}),
            json!({"binds": {"/srv/a\\": "/mnt"}}),
            json!({"binds": {"/srv/a": "/mnt/../etc"}}),
            json!({"binds": {"/srv/a": "/mnt:ro"}}),
            json!({"binds": {"/srv/a": "/mnt\t"}}),
        ];
        for case in bad {
            assert_eq!(
                check(&start(case.clone())).map_err(|e| e.code),
                Err(ErrorCode::BadRequest),
                "{case}"
            );
        }
        for system in ["/etc", "/proc/sys", "/.singularity.d/env", "/"] {
            let refused = check(&start(json!({"binds": {"/srv/a": system}}))).unwrap_err();
            assert_eq!(refused.code, ErrorCode::Forbidden, "{system}");
            assert!(refused.message.contains("binds"), "{}", refused.message);
        }
        assert!(check(&start(json!({"binds": {"/srv/a": "/etc/jupyter"}}))).is_ok());
    }

    #[test]
    fn pages_are_bounded() {
        let page = |v: serde_json::Value| -> Request { serde_json::from_value(v).unwrap() };
        assert!(check(&page(json!({"op": "getallcont", "page": 0}))).is_err());
        assert!(check(&page(json!({"op": "getallcont", "page_size": 1001}))).is_err());
        assert!(check(&page(
            json!({"op": "getallcont", "page": 3, "page_size": 10})
        ))
        .is_ok());
    }

    #[test]
    fn a_long_refused_value_is_not_echoed_whole() {
        let long = "x ".repeat(10_000);
        let refused = check(&start(json!({ "image_os": long }))).unwrap_err();
        assert!(refused.message.len() < 300, "{}", refused.message);
    }
}
