//! The hostile corpus (`tests/hostile/*.json`): every attack goes through the real broker to a
//! real worker, gets the expected 4xx status and code with a message naming the problem, and
//! changes nothing: not the data directory, not the records, not fake-apptainer's instances,
//! and no apptainer command runs. The worker still answers afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use orchestrator_producer::Publish;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::helpers::{
    assert_valid_reply, named, spawn_worker, start_request, TestWorker, REPLY_TIMEOUT,
};

/// One attack, as stored in `tests/hostile/`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Attack {
    description: String,
    /// The body: a string is sent as its bytes, anything else as its JSON text.
    #[serde(default)]
    body: Option<Value>,
    /// The body as base64, for bytes that are not UTF-8.
    #[serde(default)]
    body_base64: Option<String>,
    /// The body built from parts, for sizes and depths too large to store.
    #[serde(default)]
    generate: Option<Vec<Part>>,
    expect_status: u16,
    expect_code: String,
    /// A piece of text the error message must contain (the field or the rule it names).
    #[serde(default)]
    message_mentions: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, untagged)]
enum Part {
    Text {
        text: String,
    },
    /// `repeat` `times` times; `{i}` in it becomes the repetition's index.
    Repeat {
        repeat: String,
        times: usize,
    },
}

/// Places the corpus refers to; `{volumes}` and `{data}` in a body become these paths.
struct Places {
    volumes: PathBuf,
    data: PathBuf,
}

impl Attack {
    fn body(&self, places: &Places) -> Vec<u8> {
        let substitute = |text: &str| {
            text.replace("{volumes}", &places.volumes.display().to_string())
                .replace("{data}", &places.data.display().to_string())
        };
        match (&self.body, &self.body_base64, &self.generate) {
            (Some(Value::String(text)), None, None) => substitute(text).into_bytes(),
            (Some(value), None, None) => substitute(&value.to_string()).into_bytes(),
            (None, Some(encoded), None) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .expect("body_base64 is base64"),
            (None, None, Some(parts)) => {
                let mut body = String::new();
                for part in parts {
                    match part {
                        Part::Text { text } => body.push_str(text),
                        Part::Repeat { repeat, times } => {
                            for i in 0..*times {
                                body.push_str(&repeat.replace("{i}", &i.to_string()));
                            }
                        }
                    }
                }
                body.into_bytes()
            }
            _ => panic!("an attack has exactly one of body, body_base64 and generate"),
        }
    }
}

fn corpus() -> Vec<(String, Attack)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("hostile");
    let mut attacks: Vec<(String, Attack)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let attack = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not an attack: {e}", path.display()));
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                attack,
            )
        })
        .collect();
    attacks.sort_by(|a, b| a.0.cmp(&b.0));
    attacks
}

/// Every entry under `root` (symlinks not followed): kind, size, modification time and link
/// target. The state database is left out: a refused operation records its reply there; the
/// records it holds are compared through `getallcont` instead.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut entries = BTreeMap::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(root).unwrap().to_path_buf();
            if relative.to_string_lossy().starts_with("state.sqlite") {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let description = if meta.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                pending.push(path.clone());
                "dir".to_owned()
            } else {
                format!(
                    "file {} bytes, modified {:?}",
                    meta.len(),
                    meta.modified().unwrap()
                )
            };
            entries.insert(relative, description);
        }
    }
    entries
}

/// What an attack must not change.
#[derive(Debug, PartialEq)]
struct Observed {
    data_tree: BTreeMap<PathBuf, String>,
    outside_tree: BTreeMap<PathBuf, String>,
    records: Value,
    instances: Vec<String>,
    apptainer_calls: Vec<Vec<String>>,
}

async fn observe(worker: &TestWorker, outside: &Path) -> Observed {
    let page = worker
        .call(json!({"op": "getallcont", "page_size": 1000}))
        .await;
    assert_eq!(page.status, 200, "the worker still answers: {page:?}");
    Observed {
        data_tree: tree(&worker.data_dir()),
        outside_tree: tree(outside),
        records: serde_json::to_value(page.result).unwrap(),
        instances: worker.running_instances(),
        apptainer_calls: worker.fake_calls_begun(),
    }
}

/// A running container `victim`, the leftover data of a deleted `gone` whose image has been
/// replaced by a symlink to a directory outside the data directory, and, in the allowed bind
/// root, a symlink to /etc and a symlink whose target holds a ','.
async fn arrange(worker: &TestWorker) -> (Places, PathBuf) {
    for request in [
        start_request("victim"),
        start_request("gone"),
        named("stop", "gone"),
        named("deletecont", "gone"),
    ] {
        let reply = worker.call(request.clone()).await;
        assert!(reply.ok, "{request} failed: {reply:?}");
    }
    let data = worker.data_dir();
    let volumes = data.join("volumes");
    std::os::unix::fs::symlink("/etc", volumes.join("to-etc")).unwrap();
    std::fs::create_dir_all(volumes.join("a,/etc")).unwrap();
    std::os::unix::fs::symlink("a,/etc", volumes.join("sneaky")).unwrap();

    let outside = worker.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("canary"), "must survive").unwrap();
    let image = data.join("images/gone");
    std::fs::rename(&image, worker.dir.path().join("gone-image-moved-aside")).unwrap();
    std::os::unix::fs::symlink(&outside, &image).unwrap();
    (Places { volumes, data }, outside)
}

#[tokio::test]
async fn every_attack_in_the_hostile_corpus_is_refused_and_changes_nothing() {
    let attacks = corpus();
    assert!(attacks.len() >= 50, "the corpus is in tests/hostile/");
    let worker = spawn_worker().await;
    let (places, outside) = arrange(&worker).await;
    let before = observe(&worker, &outside).await;

    let mut failures = Vec::new();
    for (file, attack) in &attacks {
        let body = attack.body(&places);
        let reply = worker
            .client
            .call_raw(&body, Publish::default(), REPLY_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("no reply to {file}: {e}; log:\n{}", worker.log()));
        assert_valid_reply(&reply);
        let code = reply
            .error
            .as_ref()
            .map(|e| serde_json::to_value(e.code).unwrap());
        let message = reply.error.as_ref().map(|e| e.message.clone());
        let mentions_ok = match (&attack.message_mentions, &message) {
            (Some(needle), Some(message)) => message.contains(needle.as_str()),
            (None, Some(message)) => !message.is_empty(),
            _ => false,
        };
        if reply.status != attack.expect_status
            || code != Some(json!(attack.expect_code))
            || !mentions_ok
        {
            failures.push(format!(
                "{file} ({}): expected {} {} mentioning {:?}, got {} {:?} {:?}",
                attack.description,
                attack.expect_status,
                attack.expect_code,
                attack.message_mentions,
                reply.status,
                code,
                message
            ));
        }
        let after = observe(&worker, &outside).await;
        if after != before {
            failures.push(format!(
                "{file} ({}) changed something:\nbefore {before:#?}\nafter {after:#?}",
                attack.description
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        std::fs::read_to_string(outside.join("canary")).unwrap(),
        "must survive"
    );
}
