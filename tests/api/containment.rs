//! What a container may see of the host and of itself: instances are started contained and
//! writable, and fake-apptainer refuses what real apptainer refuses to the same caller.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use crate::helpers::{fake_bin, spawn_worker, start_request};

#[tokio::test]
async fn a_started_instance_is_contained_and_has_a_writable_sandbox() {
    let worker = spawn_worker().await;

    let reply = worker.call(start_request("boxed")).await;

    assert_eq!(reply.status, 201, "{reply:?}");
    let start = worker
        .fake_calls()
        .into_iter()
        .find(|c| c.subcommand() == "instance start" && c.concerns("boxed"))
        .expect("the worker ran instance start");
    for flag in ["--containall", "--writable"] {
        assert!(
            start.argv.iter().any(|a| a == flag),
            "instance start without {flag}: {:?}",
            start.argv
        );
    }
    assert_eq!(start.exit, 0, "{start:?}");
}

/// Runs fake-apptainer with `args` and its state in `dir`, as root or as `nobody`.
fn fake(dir: &std::path::Path, as_nobody: bool, args: &[&str]) -> Output {
    let mut command = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            fake_bin(),
        ]);
        c
    } else {
        Command::new(fake_bin())
    };
    command
        .args(args)
        .env("APPTAINER_CONFIGDIR", dir.join("apptainer"))
        .env("HOME", dir)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// A scratch directory every user may write, with a sandbox image in it.
fn scratch_with_sandbox() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("fake-network-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let built = fake(
        dir.path(),
        true,
        &["build", "--sandbox", "img", "docker://alpine"],
    );
    assert!(built.status.success(), "{built:?}");
    dir
}

#[test]
fn fake_apptainer_refuses_a_bridge_network_to_a_non_root_caller_with_apptainers_words() {
    let dir = scratch_with_sandbox();

    let refused = fake(
        dir.path(),
        true,
        &["instance", "start", "--network", "bridge", "img", "n1"],
    );
    let none = fake(
        dir.path(),
        true,
        &[
            "instance",
            "start",
            "--net",
            "--network",
            "none",
            "img",
            "n2",
        ],
    );
    let stopped = fake(dir.path(), true, &["instance", "stop", "--all"]);

    assert_eq!(refused.status.code(), Some(255), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("FATAL:   container creation failed: network requires root or a suid installation with /etc/subuid --fakeroot; non-root users can only use --network=none unless permitted by the administrator"),
        "{stderr}"
    );
    assert!(
        stderr.contains("FATAL:   while executing starter: failed to start instance:"),
        "{stderr}"
    );
    assert!(none.status.success(), "--network none is allowed: {none:?}");
    assert!(stopped.status.success(), "{stopped:?}");
}

#[test]
fn fake_apptainer_still_gives_root_a_bridge_address() {
    let dir = scratch_with_sandbox();

    let started = fake(
        dir.path(),
        false,
        &["instance", "start", "--network", "bridge", "img", "n1"],
    );
    let listed = fake(dir.path(), false, &["instance", "list", "--json", "n1"]);
    let _ = fake(dir.path(), false, &["instance", "stop", "--all"]);

    assert!(started.status.success(), "{started:?}");
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let ip = list["instances"][0]["ip"].as_str().unwrap_or_default();
    assert!(ip.starts_with("10.22."), "{list}");
}

#[test]
fn fake_apptainer_refuses_writable_on_a_sif_and_accepts_it_on_a_sandbox() {
    let dir = scratch_with_sandbox();
    let sif = fake(dir.path(), false, &["build", "img.sif", "docker://alpine"]);
    assert!(sif.status.success(), "{sif:?}");

    let on_sif = fake(
        dir.path(),
        false,
        &["instance", "start", "--writable", "img.sif", "s1"],
    );
    let on_sandbox = fake(
        dir.path(),
        false,
        &["instance", "start", "--writable", "img", "s2"],
    );
    let _ = fake(dir.path(), false, &["instance", "stop", "--all"]);

    assert_eq!(on_sif.status.code(), Some(255), "{on_sif:?}");
    let stderr = String::from_utf8_lossy(&on_sif.stderr);
    let sif_path = dir.path().join("img.sif");
    assert!(
        stderr.contains(&format!(
            "no SIF writable overlay partition found in {}",
            sif_path.display()
        )),
        "{stderr}"
    );
    assert!(on_sandbox.status.success(), "{on_sandbox:?}");
}
