//! Checks of request fields that need no disk or apptainer: the allow-lists that keep every
//! value inside the place it is rendered into. Paths are checked by the operations, which
//! resolve them on the host.

use schemas::{Request, StartRequest, PROTOCOL_VERSION};

use crate::runtime::definition::{check_env_name, check_env_value, check_script_line};

/// Bootstrap agents a request may name. All of them take `From: <image>:<tag>`; agents that
/// read host paths (`localimage`, `docker-archive`, `oci`, ...) are left out on purpose.
pub const ALLOWED_DISTRIBUTORS: &[&str] = &["docker", "library", "oras", "shub"];

const MAX_REFERENCE_LEN: usize = 255;
const MAX_COMMAND_LINES: usize = 1000;
const MAX_LINE_LEN: usize = 4096;
const MAX_ENVIRONMENT: usize = 256;
const MAX_BINDS: usize = 64;

/// Returns the first problem found, as a sentence for the reply.
pub fn check(request: &Request) -> Result<(), String> {
    if let Some(v) = request.version() {
        if v != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {v} is not supported; this worker speaks version {PROTOCOL_VERSION}"
            ));
        }
    }
    match request {
        Request::Start(start) => check_start(start),
        _ => Ok(()),
    }
}

fn check_start(req: &StartRequest) -> Result<(), String> {
    if !ALLOWED_DISTRIBUTORS.contains(&req.image_distributor.as_str()) {
        return Err(format!(
            "image_distributor {:?} is not allowed; use one of {}",
            req.image_distributor,
            ALLOWED_DISTRIBUTORS.join(", ")
        ));
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
        return Err(format!(
            "container_command has {} lines; at most {MAX_COMMAND_LINES} are accepted",
            req.container_command.len()
        ));
    }
    for line in &req.container_command {
        if line.len() > MAX_LINE_LEN {
            return Err(format!(
                "a container_command line is longer than {MAX_LINE_LEN} bytes"
            ));
        }
        check_script_line(line)?;
    }
    if req.environment.len() > MAX_ENVIRONMENT {
        return Err(format!(
            "environment has {} variables; at most {MAX_ENVIRONMENT} are accepted",
            req.environment.len()
        ));
    }
    for (name, value) in &req.environment {
        check_env_name(name)?;
        if value.len() > MAX_LINE_LEN {
            return Err(format!(
                "the environment value of {name} is longer than {MAX_LINE_LEN} bytes"
            ));
        }
        check_env_value(name, value)?;
    }
    if req.binds.len() > MAX_BINDS {
        return Err(format!(
            "binds has {} entries; at most {MAX_BINDS} are accepted",
            req.binds.len()
        ));
    }
    Ok(())
}

fn check_reference(field: &str, value: &str, allowed: impl Fn(char) -> bool) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_REFERENCE_LEN {
        return Err(format!(
            "{field} must be 1 to {MAX_REFERENCE_LEN} characters"
        ));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "{field} {value:?} contains {bad:?}, which an image reference cannot hold"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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
            check(&start(
                json!({"container_command": ["jupyter lab --port 8888"]})
            )),
            Ok(())
        );
    }

    #[test]
    fn values_that_would_escape_their_place_in_the_definition_file_are_refused() {
        let cases = [
            json!({"image_distributor": "localimage"}),
            json!({"image_os": "ubuntu\n%post\nrm -rf /"}),
            json!({"image_version": "latest bad"}),
            json!({"container_command": ["ok", "%post"]}),
            json!({"environment": {"A B": "x"}}),
            json!({"environment": {"A": "x\ny"}}),
            json!({"v": 2}),
        ];
        for case in cases {
            assert!(
                check(&start(case.clone())).is_err(),
                "{case} should be refused"
            );
        }
    }
}
