//! Producing a built image for `cmd/build.rs`: the hidden work path beside the target
//! (`.NAME.fake-build-PID`), the sandbox skeleton, `%files` copied in, the `/.singularity.d`
//! metadata written (`image.rs`), and the rename into place at the very end, so a failed or
//! killed build never leaves a half-built target.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cli::{Fail, VERSION};
use crate::definition::Stage;
use crate::image::{ImageMeta, ENV_FILE};
use crate::sylog;
use crate::sys;

/// Top-level directories of a fake sandbox.
const ROOT_DIRS: &[&str] = &[
    "dev", "proc", "sys", "tmp", "home", "root", "etc", "usr", "bin", "opt", "mnt", "srv", "var",
];

/// What to build: the final stage and, for a local image source, its metadata.
pub struct Recipe {
    pub raw: String,
    /// Built from a definition file (not a URI or a local image).
    pub from_def: bool,
    pub stage: Stage,
    pub base: ImageMeta,
}

/// A hidden sibling of the target: `.NAME.KIND-PID`.
pub fn sibling(target: &Path, kind: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.{kind}-{}", std::process::id()))
}

/// Removes work paths left by builds whose process is gone.
pub fn remove_stale_work(target: &Path) {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let name = name.to_string_lossy();
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let file = entry.file_name().to_string_lossy().into_owned();
        let pid = ["fake-build", "fake-old"].iter().find_map(|kind| {
            file.strip_prefix(&format!(".{name}.{kind}-"))
                .and_then(|p| p.parse::<i64>().ok())
        });
        if pid.is_some_and(|pid| !sys::is_running(pid)) {
            remove_any(&entry.path());
        }
    }
}

pub fn remove_any(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Creates the half-built result: the sandbox skeleton, or a placeholder file.
pub fn start_work(work: &Path, sandbox: bool, in_place: bool) -> io::Result<()> {
    if !sandbox {
        return fs::write(work, "FAKE-APPTAINER-SIF partial\n");
    }
    if !in_place {
        fs::create_dir(work)?;
    }
    for dir in ROOT_DIRS {
        sys::mkdir_p(&work.join(dir), 0o755)?;
    }
    fs::set_permissions(work.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(work.join("root"), fs::Permissions::from_mode(0o700))?;
    sys::mkdir_p(&work.join(".singularity.d"), 0o755)
}

/// Announces the sections, copies `%files` and writes the metadata.
pub fn assemble(recipe: &Recipe, work: &Path, sandbox: bool, notest: bool) -> Result<(), Fail> {
    let stage = &recipe.stage;
    let agent = stage.header("bootstrap").unwrap_or_default();
    if matches!(
        agent,
        "docker" | "docker-archive" | "docker-daemon" | "oci" | "oci-archive"
    ) {
        let digest = sys::hex_digest(&recipe.raw);
        sylog::plain_at_info(&format!(
            "Getting image source signatures\nCopying blob sha256:{digest}\nCopying config sha256:{digest}\nWriting manifest to image destination\n"
        ));
    }
    if sandbox {
        copy_files(work, &stage.files)?;
    }
    let announce = [
        ("post", "Running post scriptlet"),
        ("help", "Adding help info"),
        ("labels", "Adding labels"),
        ("environment", "Adding environment to container"),
        ("runscript", "Adding runscript"),
        ("startscript", "Adding startscript"),
        ("test", "Adding testscript"),
    ];
    for (section, message) in announce {
        if stage.section(section).is_some() {
            sylog::info(message);
        }
    }
    if stage.section("test").is_some() && !notest {
        sylog::info("Running testscript");
    }
    let meta = image_meta(recipe);
    let written = if sandbox {
        sylog::info("Creating sandbox directory...");
        meta.write_sandbox(work)
    } else {
        sylog::info("Creating SIF file...");
        fs::write(work, meta.sif_bytes())
    };
    written.map_err(|e| {
        Fail::Fatal(format!(
            "While performing build: while writing image metadata: {}",
            sys::go_err(&e)
        ))
    })
}

/// The `/.singularity.d` content of the recipe (apptainer's metadata.go layout).
fn image_meta(recipe: &Recipe) -> ImageMeta {
    let stage = &recipe.stage;
    let mut meta = recipe.base.clone();
    meta.deffile = Some(recipe.raw.clone());
    let script = |body: &str| format!("#!/bin/sh\n\n{body}\n");
    match stage.section("runscript") {
        Some(body) => meta.runscript = Some(script(body)),
        None if meta.runscript.is_none() => meta.runscript = Some("#!/bin/sh\n".to_string()),
        None => {}
    }
    match stage.section("startscript") {
        Some(body) => meta.startscript = Some(script(body)),
        None if meta.startscript.is_none() => {
            meta.startscript = Some("#!/bin/sh\n".to_string());
        }
        None => {}
    }
    if let Some(body) = stage.section("test") {
        meta.test = Some(script(body));
    }
    if let Some(body) = stage.section("help") {
        meta.helpfile = Some(format!("{body}\n"));
    }
    let env_body = stage.section("environment");
    if env_body.is_some() || !meta.environment.contains_key(ENV_FILE) {
        meta.environment.insert(
            ENV_FILE.to_string(),
            format!(
                "#!/bin/sh\n#Custom environment shell code should follow\n\n{}\n",
                env_body.unwrap_or_default()
            ),
        );
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut labels = BTreeMap::from([
        ("org.label-schema.build-arch".to_string(), arch.to_string()),
        ("org.label-schema.build-date".to_string(), sys::build_date()),
        (
            "org.label-schema.schema-version".to_string(),
            "1.0".to_string(),
        ),
        (
            "org.label-schema.usage.apptainer.version".to_string(),
            VERSION.to_string(),
        ),
    ]);
    if let Some(agent) = stage.header("bootstrap") {
        labels.insert(
            "org.label-schema.usage.singularity.deffile.bootstrap".to_string(),
            agent.to_string(),
        );
    }
    if let Some(from) = stage.header("from") {
        labels.insert(
            "org.label-schema.usage.singularity.deffile.from".to_string(),
            from.to_string(),
        );
    }
    meta.labels.extend(labels);
    meta.labels.extend(stage.labels.clone());
    meta
}

/// `%files`: copies host paths into the sandbox (`dst` defaults to `src`).
fn copy_files(root: &Path, files: &[(String, String)]) -> Result<(), Fail> {
    for (src, dst) in files {
        let dst = if dst.is_empty() { src } else { dst };
        sylog::info(&format!("Copying {src} to {dst}"));
        let source = Path::new(src);
        let mut target = root.join(dst.trim_start_matches('/'));
        if target.is_dir() {
            if let Some(name) = source.file_name() {
                target = target.join(name);
            }
        }
        let fail = |e: io::Error, op: &str| {
            Fail::Fatal(format!(
                "While performing build: unable to copy files to container fs: while copying [{src}] to {}: {op} {src}: {}",
                target.display(),
                sys::go_err(&e)
            ))
        };
        fs::metadata(source).map_err(|e| fail(e, "stat"))?;
        if let Some(parent) = target.parent() {
            sys::mkdir_p(parent, 0o755).map_err(|e| fail(e, "mkdir"))?;
        }
        copy_tree(source, &target).map_err(|e| fail(e, "copy"))?;
    }
    Ok(())
}

fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    if src.is_dir() {
        sys::mkdir_p(dst, 0o755)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        fs::copy(src, dst).map(|_| ())
    }
}

/// Moves the finished work path to the target, replacing an old target last.
pub fn place(work: &Path, target: &Path) -> io::Result<()> {
    if fs::symlink_metadata(target).is_err() {
        return fs::rename(work, target);
    }
    let aside = sibling(target, "fake-old");
    fs::rename(target, &aside)?;
    if let Err(e) = fs::rename(work, target) {
        let _ = fs::rename(&aside, target);
        return Err(e);
    }
    remove_any(&aside);
    Ok(())
}
