//! `compose.yaml` at the repository's root: valid against the Compose specification's schema
//! (a copy in `tests/reference/`, so the check needs nothing outside the repository), and
//! wired as the README says. Docker itself does not run here.

use std::path::Path;

use serde_json::Value;

use crate::helpers::worker_bin;

fn repository_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repository_file("compose.yaml")).unwrap();
    serde_norway::from_str(&text).expect("compose.yaml is YAML")
}

fn compose_errors(document: &Value) -> Vec<String> {
    let schema_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/compose-spec.json");
    let mut schema: Value =
        serde_json::from_str(&std::fs::read_to_string(schema_path).unwrap()).unwrap();
    // The specification names its draft by an id the validator does not know
    // ("https://json-schema.org/draft-07/schema", without the usual '#') and would try to fetch:
    // drop it and name the draft outright, so the check stays offline.
    schema.as_object_mut().unwrap().remove("$schema");
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft7)
        .build(&schema)
        .unwrap();
    validator
        .iter_errors(document)
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn compose_yaml_follows_the_compose_specification() {
    let document = compose();

    assert_eq!(compose_errors(&document), Vec::<String>::new());

    // The check is not vacuous: a misspelt key is refused.
    let mut broken = document.clone();
    broken["services"]["worker"]["enviroment"] = serde_json::json!({"A": "b"});
    assert!(!compose_errors(&broken).is_empty());
}

#[test]
fn the_broker_is_checked_healthy_and_keeps_its_data_before_the_worker_starts() {
    let document = compose();
    let rabbitmq = &document["services"]["rabbitmq"];
    let worker = &document["services"]["worker"];

    assert!(rabbitmq["healthcheck"]["test"].is_array());
    assert!(rabbitmq["volumes"][0]
        .as_str()
        .unwrap()
        .ends_with(":/var/lib/rabbitmq"));
    assert_eq!(
        worker["depends_on"]["rabbitmq"]["condition"],
        "service_healthy"
    );
    assert_eq!(worker["build"]["dockerfile"], "Dockerfile");
    let data_dir = worker["environment"]["ORCHESTRATOR_DATA_DIR"]
        .as_str()
        .unwrap();
    let data_volume = worker["volumes"][0].as_str().unwrap();
    assert!(
        data_volume.ends_with(&format!(":{data_dir}")),
        "{data_volume}"
    );
    for volume in ["rabbitmq-data", "worker-data"] {
        assert!(
            document["volumes"].get(volume).is_some(),
            "{volume} is declared"
        );
    }
}

#[test]
fn every_setting_the_worker_service_passes_is_one_the_worker_reads() {
    let help = std::process::Command::new(worker_bin())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let environment = compose()["services"]["worker"]["environment"].clone();

    for key in environment.as_object().unwrap().keys() {
        if key == "RUST_LOG" {
            continue;
        }
        assert!(
            help.contains(&format!("[env: {key}")),
            "the worker does not read {key}"
        );
    }
}

#[test]
fn the_worker_is_healthy_only_when_its_readyz_says_ready() {
    let worker = &compose()["services"]["worker"];
    let test: Vec<&str> = worker["healthcheck"]["test"]
        .as_array()
        .expect("the worker has a health check")
        .iter()
        .map(|part| part.as_str().unwrap())
        .collect();
    let address = worker["environment"]["ORCHESTRATOR_HTTP_ADDR"]
        .as_str()
        .expect("the worker's HTTP listener is on for the health check");
    assert!(
        test.iter()
            .any(|part| *part == format!("http://{address}/readyz")),
        "the health check asks /readyz on the worker's listener: {test:?}"
    );
    assert!(
        std::fs::read_to_string(repository_file("Dockerfile"))
            .unwrap()
            .lines()
            .all(|line| !line.contains("purge") || !line.contains("curl")),
        "the image keeps curl for the health check"
    );
}

#[test]
fn the_worker_image_installs_apptainer_from_its_release_packages() {
    let dockerfile = std::fs::read_to_string(repository_file("Dockerfile")).unwrap();

    assert!(dockerfile.contains("github.com/apptainer/apptainer/releases/download/"));
    assert!(dockerfile.contains("apt-get install -y --no-install-recommends /tmp/apptainer.deb"));
    assert!(dockerfile.contains("ENTRYPOINT [\"orchestrator-worker\"]"));
}
