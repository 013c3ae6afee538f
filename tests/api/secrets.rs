//! The broker password never shows: not when the broker refuses it, not when the URL is
//! malformed or the broker unreachable, and not in `--help` when it comes from the environment.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{fake_bin, worker_bin};

const PASSWORD: &str = "Pw-7f3kQ9-distinctive-secret";
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the worker with `args` and `env` until it exits; returns its stdout and stderr.
fn run_worker(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(worker_bin())
        .args(args)
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--exchange",
            &format!("test.secrets.{}", uuid::Uuid::new_v4()),
        ])
        .args(["--node", "secrets-node"])
        .env_remove("AMQP_URL")
        // A working apptainer, so the worker gets as far as the broker.
        .env("APPTAINER_BIN", fake_bin())
        .envs(env.iter().copied())
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes while the process runs, so a full pipe cannot stall it.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the worker did not exit within {EXIT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (out.join().unwrap(), err.join().unwrap())
}

#[test]
fn a_refused_password_is_not_in_the_worker_s_output() {
    let url = format!("amqp://guest:{PASSWORD}@127.0.0.1:5672/%2f");

    let (stdout, stderr) = run_worker(&["--amqp-url", &url], &[]);

    assert!(
        stderr.contains("guest:***@127.0.0.1"),
        "the error names the broker, password redacted: {stderr}"
    );
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "{stderr}"
    );
}

#[test]
fn a_password_from_the_environment_is_not_in_errors_for_unreachable_or_malformed_urls() {
    for url in [
        format!("amqp://guest:{PASSWORD}@127.0.0.1:1/%2f"),
        format!("amqp://guest:{PASSWORD}@127.0.0.1:notaport/%2f"),
        format!("amqps://guest:{PASSWORD}@127.0.0.1:5672/%2f"),
    ] {
        let (stdout, stderr) = run_worker(&[], &[("AMQP_URL", &url)]);

        assert!(stderr.contains("***"), "{url}: {stderr}");
        assert!(
            !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
            "{url}: {stderr}"
        );
    }
}

#[test]
fn help_does_not_show_the_password_from_the_environment() {
    let url = format!("amqp://guest:{PASSWORD}@mq.example:5672/%2f");

    let (stdout, stderr) = run_worker(&["--help"], &[("AMQP_URL", &url)]);

    assert!(stdout.contains("--amqp-url"), "{stdout}");
    assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD));
    assert!(!stdout.contains("mq.example"), "{stdout}");
}
