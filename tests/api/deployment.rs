//! The deployment SECURITY.md documents can start: a broker user with exactly the permissions
//! written there passes `--check`. The permissions are read from SECURITY.md itself, so the
//! document cannot drift from what is tested.

use std::path::Path;
use std::process::Command;

use crate::helpers::{fake_bin, worker_bin};

/// The line of SECURITY.md that grants the worker's user its permissions; the next line holds
/// the three regular expressions.
const GRANT: &str = "rabbitmqctl set_permissions -p apptainer orchestrator \\";

/// The configure, write and read expressions SECURITY.md gives the worker's user.
fn documented_worker_permissions() -> [String; 3] {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../SECURITY.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines().skip_while(|l| l.trim() != GRANT);
    assert!(lines.next().is_some(), "SECURITY.md has no line {GRANT:?}");
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

/// A vhost and a user of the test's own; both are deleted when it is dropped, even when the
/// test fails. Deleting the vhost deletes the queues declared in it.
struct BrokerTenant {
    vhost: String,
    user: String,
}

impl Drop for BrokerTenant {
    fn drop(&mut self) {
        for args in [["delete_user", &self.user], ["delete_vhost", &self.vhost]] {
            let _ = Command::new("rabbitmqctl").arg("-q").args(args).output();
        }
    }
}

#[test]
fn the_worker_user_of_security_md_passes_the_check_with_exactly_those_permissions() {
    // Arrange: SECURITY.md's set-up, in a vhost of the test's own instead of `apptainer`.
    let [configure, write, read] = documented_worker_permissions();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tenant = BrokerTenant {
        vhost: format!("orch-test-{id}"),
        user: format!("orch-test-{id}"),
    };
    let password = uuid::Uuid::new_v4().simple().to_string();
    rabbitmqctl(&["add_vhost", &tenant.vhost]);
    rabbitmqctl(&["add_user", &tenant.user, &password]);
    rabbitmqctl(&[
        "set_permissions",
        "-p",
        &tenant.vhost,
        &tenant.user,
        &configure,
        &write,
        &read,
    ]);
    let dir = tempfile::tempdir().unwrap();

    // Act: the documented queue names (the defaults), as the unit runs it.
    let output = Command::new(worker_bin())
        .arg("--check")
        .env(
            "AMQP_URL",
            format!(
                "amqp://{}:{password}@127.0.0.1:5672/{}",
                tenant.user, tenant.vhost
            ),
        )
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
