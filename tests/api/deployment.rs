//! The deployment SECURITY.md documents can start: a broker user with exactly the worker's
//! permissions written there passes `--check`, and runs a container's whole life for a user with
//! exactly the backend's, who cannot reach a host's queue by name. The permissions are read from
//! SECURITY.md itself, so the document cannot drift from what is tested.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use orchestrator_harness::{Binaries, WorkerProcess, WorkerSetup};
use schemas::{DEFAULT_EXCHANGE, DEFAULT_REPLY_QUEUE};

use crate::cli::{assert_exit, cli_bin, stdout};
use crate::helpers::{confirm_channel, fake_bin, worker_bin};

/// The line of SECURITY.md that grants the worker's user its permissions; the next line holds
/// the three regular expressions.
const GRANT: &str = "rabbitmqctl set_permissions -p apptainer orchestrator \\";

/// The same for the backend's user.
const BACKEND_GRANT: &str = "rabbitmqctl set_permissions -p apptainer backend \\";

/// The configure, write and read expressions SECURITY.md gives the worker's user.
fn documented_worker_permissions() -> [String; 3] {
    documented_permissions(GRANT)
}

/// The configure, write and read expressions on the line after `grant` in SECURITY.md.
fn documented_permissions(grant: &str) -> [String; 3] {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../SECURITY.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines().skip_while(|l| l.trim() != grant);
    assert!(lines.next().is_some(), "SECURITY.md has no line {grant:?}");
    let arguments = lines.next().expect("the permissions follow the grant");
    let quoted: Vec<String> = arguments
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    quoted
        .try_into()
        .unwrap_or_else(|q| panic!("three quoted expressions expected, found {q:?}"))
}

fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A vhost of the test's own and its users; all are deleted when it is dropped, even when the
/// test fails. Deleting the vhost deletes the queues and exchanges declared in it.
struct BrokerTenant {
    vhost: String,
    users: Vec<String>,
}

impl BrokerTenant {
    fn new() -> Self {
        let vhost = format!("orch-test-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &vhost]);
        Self {
            vhost,
            users: Vec::new(),
        }
    }

    /// Adds a user with exactly `permissions` (configure, write, read) in this vhost; returns
    /// its AMQP URL.
    fn user(&mut self, role: &str, permissions: &[String; 3]) -> String {
        let user = format!("{}-{role}", self.vhost);
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", &user, &password]);
        self.users.push(user.clone());
        let [configure, write, read] = permissions;
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &self.vhost,
            &user,
            configure,
            write,
            read,
        ]);
        format!("amqp://{user}:{password}@127.0.0.1:5672/{}", self.vhost)
    }
}

impl Drop for BrokerTenant {
    fn drop(&mut self) {
        for user in &self.users {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "delete_user", user])
                .output();
        }
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.vhost])
            .output();
    }
}

#[test]
fn the_worker_user_of_security_md_passes_the_check_with_exactly_those_permissions() {
    // Arrange: SECURITY.md's set-up, in a vhost of the test's own instead of `apptainer`.
    let mut tenant = BrokerTenant::new();
    let worker_url = tenant.user("orchestrator", &documented_worker_permissions());
    let dir = tempfile::tempdir().unwrap();

    // Act: the documented names (the defaults), as the unit runs it.
    let output = Command::new(worker_bin())
        .arg("--check")
        .env("AMQP_URL", worker_url)
        .env_remove("ORCHESTRATOR_EXCHANGE")
        .env_remove("ORCHESTRATOR_REPLY_QUEUE")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("APPTAINER_BIN", fake_bin())
        .env("APPTAINER_CONFIGDIR", dir.path().join("apptainer"))
        .output()
        .unwrap();

    // Assert
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("ok      broker:"), "{text}");
}

/// A worker whose fake instances are stopped when the test ends, however it ends.
struct Running(WorkerProcess);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.kill();
        self.0.stop_instances();
    }
}

/// `orchestrator ARGS` as the backend's user, on the documented (default) exchange.
async fn backend_cli(url: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(cli_bin())
        .args(args)
        .env("AMQP_URL", url)
        .env_remove("ORCHESTRATOR_EXCHANGE")
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_backend_user_of_security_md_runs_a_container_through_a_worker_with_the_worker_permissions(
) {
    // Arrange: both users of SECURITY.md, each with exactly its expressions, and a worker on
    // the documented names as the worker's user.
    let mut tenant = BrokerTenant::new();
    let worker_url = tenant.user("orchestrator", &documented_worker_permissions());
    let backend_url = tenant.user("backend", &documented_permissions(BACKEND_GRANT));
    let dir = tempfile::tempdir().unwrap();
    let setup = WorkerSetup::new(
        &worker_url,
        dir.path(),
        DEFAULT_EXCHANGE,
        "host-a",
        DEFAULT_REPLY_QUEUE,
    );
    let binaries = Binaries {
        worker: worker_bin().into(),
        fake: fake_bin().into(),
    };
    let mut worker = Running(WorkerProcess::start(&binaries, setup).unwrap());
    if let Err(e) = worker
        .0
        .wait_until_consuming(Duration::from_secs(30), Duration::from_millis(100))
        .await
    {
        panic!(
            "the worker did not consume ({e:?}); its log:\n{}",
            worker.0.log()
        );
    }

    // Act and assert: a container's whole life, placement and unbinding included.
    let life: [&[&str]; 5] = [
        &["start", "nb1", "--image", "jupyter/base-notebook"],
        &["getcont", "nb1"],
        &["stop", "nb1"],
        &["deletecont", "nb1"],
        &["deletecontdata", "nb1"],
    ];
    for args in life {
        let output = backend_cli(&backend_url, args).await;
        assert_exit(&output, 0, &format!("{args:?} as the backend"));
    }
    let gone = backend_cli(&backend_url, &["getcont", "nb1"]).await;
    assert_exit(&gone, 1, "getcont after deletecontdata");
    assert_eq!(stdout(&gone), "");

    // Assert: the backend cannot put a request into a host's queue by name.
    let (_connection, channel) = confirm_channel(&backend_url).await;
    let published = async {
        channel
            .basic_publish(
                "".into(),
                worker.0.setup.host_queue().as_str().into(),
                BasicPublishOptions::default(),
                br#"{"op":"getcont","container_name":"nb1"}"#,
                BasicProperties::default(),
            )
            .await?
            .await
    }
    .await;
    let refused = published.expect_err("publishing to the default exchange is refused");
    assert!(refused.to_string().contains("ACCESS_REFUSED"), "{refused}");
}
