//! The checked-in JSON Schemas are what the Rust types generate, and they accept and refuse
//! what the types accept and refuse.
//!
//! To regenerate after changing a type: `UPDATE_SCHEMAS=1 cargo test -p apptainer-orchestrator-schemas`.

use std::path::PathBuf;

use apptainer_orchestrator_schemas::{generated_schemas, Request};
use serde_json::json;

fn json_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json")
}

#[test]
fn checked_in_schemas_match_the_types() {
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    for (file, generated) in generated_schemas() {
        let path = json_dir().join(file);
        if update {
            std::fs::write(&path, &generated).unwrap();
            continue;
        }
        let checked_in = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} is missing ({e}); run UPDATE_SCHEMAS=1 cargo test -p apptainer-orchestrator-schemas", path.display()));
        assert!(
            checked_in == generated,
            "{} differs from what the types generate; run UPDATE_SCHEMAS=1 cargo test -p apptainer-orchestrator-schemas and commit the result",
            path.display()
        );
    }
}

fn request_validator() -> jsonschema::Validator {
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json_dir().join("request.json")).unwrap())
            .unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

#[test]
fn request_schema_and_types_agree_on_examples() {
    let validator = request_validator();
    let accepted = [
        json!({"op": "start", "container_name": "nb1", "container_image": "jupyter/base-notebook",
               "image_distributor": "docker", "image_os": "jupyter/base-notebook", "image_version": "latest",
               "container_command": ["jupyter lab"], "volume_name": "/srv/homes/nb1",
               "environment": {"A": "1"}, "binds": {"/data": "/mnt"}}),
        json!({"op": "stop", "container_name": "nb1", "v": 1}),
        json!({"op": "restart", "container_name": "nb1"}),
        json!({"op": "getcont", "container_name": "nb1"}),
        json!({"op": "getallcont"}),
        json!({"op": "getallcont", "page": 2, "page_size": 50}),
        json!({"op": "deletecont", "container_name": "nb1"}),
        json!({"op": "deletecontdata", "container_name": "nb1"}),
        json!({"op": "createvolume", "container_name": "nb1", "host_location": "/d", "container_location": "/mnt"}),
        json!({"op": "deletevolume", "container_name": "nb1", "host_location": "/d", "container_location": "/mnt"}),
        json!({"op": "removevolume", "container_name": "nb1", "host_location": "/d", "container_location": "/mnt"}),
    ];
    for example in accepted {
        assert!(validator.is_valid(&example), "schema refuses {example}");
        serde_json::from_value::<Request>(example.clone())
            .unwrap_or_else(|e| panic!("types refuse {example}: {e}"));
    }
    let refused = [
        json!({"op": "launch", "container_name": "nb1"}),
        json!({"op": "stop"}),
        json!({"op": "stop", "container_name": "nb1", "extra": true}),
        json!({"op": "stop", "container_name": "../etc"}),
        json!({"op": "stop", "container_name": 7}),
        json!({"op": "start", "container_name": "nb1"}),
    ];
    for example in refused {
        assert!(!validator.is_valid(&example), "schema accepts {example}");
        assert!(
            serde_json::from_value::<Request>(example.clone()).is_err(),
            "types accept {example}"
        );
    }
}
