//! Images made by the fake: a sandbox directory with `.singularity.d/` metadata
//! (reference 1.5), or a "SIF" file holding the same metadata as JSON after a
//! magic line. Also opening images for `exec`/`instance start` (missing image:
//! the 2.5 FATAL text; `docker://` and the like become a fake cached SIF). The
//! `inspect` command that shows the metadata is `cmd/inspect.rs`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::cli::Fail;
use crate::ident::Ident;
use crate::json::J;
use crate::sylog;
use crate::sys;

/// First line of a non-sandbox image written by the fake.
pub const SIF_MAGIC: &str = "FAKE-APPTAINER-SIF 1\n";

/// Path of the environment file made from `%environment`.
pub const ENV_FILE: &str = "/.singularity.d/env/90-environment.sh";

/// The metadata of an image, as the files of `/.singularity.d` hold it.
#[derive(Default, Clone)]
pub struct ImageMeta {
    pub deffile: Option<String>,
    pub runscript: Option<String>,
    pub startscript: Option<String>,
    pub test: Option<String>,
    pub helpfile: Option<String>,
    /// Environment file path (in the container) to content, sorted.
    pub environment: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

impl ImageMeta {
    /// Reads a sandbox's `.singularity.d` or a fake SIF; anything else has no metadata.
    pub fn read(path: &Path) -> ImageMeta {
        if path.is_dir() {
            read_sandbox(path)
        } else {
            read_sif(path).unwrap_or_default()
        }
    }

    /// Writes the metadata files into the sandbox at `root`.
    pub fn write_sandbox(&self, root: &Path) -> std::io::Result<()> {
        let dot = root.join(".singularity.d");
        sys::mkdir_p(&dot.join("env"), 0o755)?;
        sys::mkdir_p(&dot.join("actions"), 0o755)?;
        sys::mkdir_p(&dot.join("libs"), 0o755)?;
        let files = [
            ("Singularity", &self.deffile, 0o644),
            ("runscript", &self.runscript, 0o755),
            ("startscript", &self.startscript, 0o755),
            ("test", &self.test, 0o755),
            ("runscript.help", &self.helpfile, 0o644),
        ];
        for (name, content, mode) in files {
            if let Some(content) = content {
                write_mode(&dot.join(name), content, mode)?;
            }
        }
        for (path, content) in &self.environment {
            let rel = path.trim_start_matches('/');
            write_mode(&root.join(rel), content, 0o755)?;
        }
        let labels = J::map(&self.labels).indented();
        write_mode(&dot.join("labels.json"), &labels, 0o644)
    }

    /// The content of a fake SIF file.
    pub fn sif_bytes(&self) -> String {
        let opt = |v: &Option<String>| J::s(v.clone().unwrap_or_default());
        let body = J::o(vec![
            ("deffile", opt(&self.deffile)),
            ("runscript", opt(&self.runscript)),
            ("startscript", opt(&self.startscript)),
            ("test", opt(&self.test)),
            ("helpfile", opt(&self.helpfile)),
            ("environment", J::map(&self.environment)),
            ("labels", J::map(&self.labels)),
        ]);
        format!("{SIF_MAGIC}{}\n", body.indented())
    }

    /// The first command line of the startscript or runscript: what would run.
    pub fn first_command(script: Option<&str>) -> Option<String> {
        script?
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
    }
}

fn write_mode(path: &Path, content: &str, mode: u32) -> std::io::Result<()> {
    fs::write(path, content)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn read_sandbox(root: &Path) -> ImageMeta {
    let dot = root.join(".singularity.d");
    let read = |name: &str| fs::read_to_string(dot.join(name)).ok();
    let mut environment = BTreeMap::new();
    if let Ok(entries) = fs::read_dir(dot.join("env")) {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(content) = fs::read_to_string(entry.path()) {
                environment.insert(format!("/.singularity.d/env/{name}"), content);
            }
        }
    }
    let labels = read("labels.json")
        .and_then(|text| serde_json::from_str::<BTreeMap<String, serde_json::Value>>(&text).ok())
        .map(|m| {
            m.into_iter()
                .map(|(k, v)| {
                    let v = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    (k, v)
                })
                .collect()
        })
        .unwrap_or_default();
    ImageMeta {
        deffile: read("Singularity"),
        runscript: read("runscript"),
        startscript: read("startscript"),
        test: read("test"),
        helpfile: read("runscript.help"),
        environment,
        labels,
    }
}

fn read_sif(path: &Path) -> Option<ImageMeta> {
    let text = fs::read_to_string(path).ok()?;
    let body = text.strip_prefix(SIF_MAGIC)?;
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    let text_of = |key: &str| {
        value
            .get(key)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let map_of = |key: &str| -> BTreeMap<String, String> {
        value
            .get(key)
            .and_then(|v| v.as_object())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    Some(ImageMeta {
        deffile: text_of("deffile"),
        runscript: text_of("runscript"),
        startscript: text_of("startscript"),
        test: text_of("test"),
        helpfile: text_of("helpfile"),
        environment: map_of("environment"),
        labels: map_of("labels"),
    })
}

// ---------------------------------------------------------------------------
// Opening images for exec and instance start

/// URI transports: accepted as a build spec, and pulled into the cache by `exec`/`instance
/// start`.
pub const URI_TRANSPORTS: &[&str] = &[
    "docker",
    "docker-archive",
    "docker-daemon",
    "oci",
    "oci-archive",
    "oras",
    "shub",
    "http",
    "https",
];

/// The FATAL of a missing image (reference 2.5).
pub fn missing_image(abs: &str) -> Fail {
    Fail::Fatal(format!(
        "While checking container encryption: could not open image {abs}: failed to retrieve path for {abs}: lstat {abs}: no such file or directory"
    ))
}

/// Resolves the image argument of `exec`/`instance start` to an absolute path.
pub fn open(arg: &str, ident: &Ident) -> Result<String, Fail> {
    if let Some((transport, reference)) = arg.split_once("://") {
        if transport == "library" {
            return Err(Fail::Fatal(format!(
                "Unable to handle {arg} uri: no default remote with library client in use (see https://apptainer.org/docs/user/latest/endpoint.html#no-default-remote)"
            )));
        }
        if URI_TRANSPORTS.contains(&transport) {
            return pull_to_cache(arg, transport, reference, ident);
        }
        if transport != "instance" {
            return Err(Fail::Fatal(format!(
                "Unsupported transport type: {transport}"
            )));
        }
    }
    let abs = sys::absolute(arg);
    if fs::symlink_metadata(&abs).is_err() {
        return Err(missing_image(&abs));
    }
    Ok(abs)
}

/// A remote image becomes a fake SIF under `<cache>/oci-tmp/<digest>`, like the
/// cache path real apptainer records as the instance image.
fn pull_to_cache(
    uri: &str,
    transport: &str,
    reference: &str,
    ident: &Ident,
) -> Result<String, Fail> {
    let dir = ident.cache_dir().join("oci-tmp");
    let path = dir.join(sys::hex_digest(uri));
    if path.exists() {
        sylog::info("Using cached SIF image");
    } else {
        sylog::info("Converting OCI blobs to SIF format");
        let meta = ImageMeta {
            deffile: Some(format!("bootstrap: {transport}\nfrom: {reference}\n")),
            runscript: Some("#!/bin/sh\n".to_string()),
            startscript: Some("#!/bin/sh\n".to_string()),
            ..ImageMeta::default()
        };
        sys::mkdir_p(&dir, 0o755)
            .and_then(|()| sys::write_atomic(&path, meta.sif_bytes().as_bytes(), 0o755))
            .map_err(|e| {
                Fail::Fatal(format!(
                    "Unable to handle {uri} uri: while creating cache entry {}: {}",
                    path.display(),
                    sys::go_err(&e)
                ))
            })?;
    }
    Ok(path.to_string_lossy().into_owned())
}
