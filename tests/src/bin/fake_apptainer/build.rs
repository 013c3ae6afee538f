//! `build [--sandbox] [--force] [--update] ... TARGET SPEC` (reference section 1).
//!
//! The spec is a definition file (parsed like apptainer's parser: header keys,
//! multi-stage `Bootstrap:` splitting, sections), a local sandbox or fake SIF, or a
//! URI such as `docker://alpine`. Nothing is downloaded and no section runs on the
//! host: `%post`, `%setup` and `%test` are only announced; `%files` is copied into
//! sandboxes. The result is built at a hidden sibling path
//! (`.NAME.fake-build-PID`) and renamed into place at the very end, so a failed or
//! killed build never leaves a half-built TARGET and keeps an old one intact.
//! Meanwhile the build holds a temporary bundle and a helper process, as the real
//! one does (see `bundle.rs`).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, IsTerminal};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::bundle::{Helper, TempBundle};
use crate::cli::{self, Fail, Res};
use crate::controls::{self, Controls};
use crate::image::{ImageMeta, ENV_FILE, SIF_MAGIC, URI_TRANSPORTS};
use crate::sylog;
use crate::sys;

/// Bootstrap agents accepted in a definition header (reference 1.5).
const AGENTS: &[&str] = &[
    "docker",
    "docker-archive",
    "docker-daemon",
    "oci",
    "oci-archive",
    "library",
    "oras",
    "shub",
    "localimage",
    "debootstrap",
    "yum",
    "dnf",
    "zypper",
    "arch",
    "busybox",
    "scratch",
];

const HEADER_KEYS: &[&str] = &[
    "bootstrap",
    "from",
    "includecmd",
    "mirrorurl",
    "updateurl",
    "osversion",
    "include",
    "library",
    "registry",
    "namespace",
    "stage",
    "product",
    "user",
    "regcode",
    "productpgp",
    "registerurl",
    "modules",
    "fingerprints",
    "confurl",
    "setopt",
    "target",
    "frontend",
    "filename",
    "buildargs",
];

const SECTIONS: &[&str] = &[
    "help",
    "setup",
    "files",
    "labels",
    "environment",
    "pre",
    "post",
    "runscript",
    "test",
    "startscript",
    "arguments",
];

const APP_SECTIONS: &[&str] = &[
    "appinstall",
    "applabels",
    "appfiles",
    "appenv",
    "apptest",
    "apphelp",
    "apprun",
    "appstart",
];

/// Top-level directories of a fake sandbox.
const ROOT_DIRS: &[&str] = &[
    "dev", "proc", "sys", "tmp", "home", "root", "etc", "usr", "bin", "opt", "mnt", "srv", "var",
];

/// One stage of a definition file.
#[derive(Default)]
struct Stage {
    header: Vec<(String, String)>,
    sections: BTreeMap<String, String>,
    files: Vec<(String, String)>,
    labels: BTreeMap<String, String>,
}

impl Stage {
    fn header(&self, key: &str) -> Option<&str> {
        self.header
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn section(&self, name: &str) -> Option<&str> {
        self.sections.get(name).map(String::as_str)
    }
}

/// What to build: the final stage and, for a local image source, its metadata.
struct Recipe {
    raw: String,
    /// Built from a definition file (not a URI or a local image).
    from_def: bool,
    stage: Stage,
    base: ImageMeta,
}

pub fn run(args: &[String]) -> Res {
    let p = match cli::parse_with(&cli::BUILD, args, cli::Arity::Exactly(2)) {
        Ok(p) => p,
        Err(ends) => return ends,
    };
    let (target_arg, spec) = (&p.args[0], &p.args[1]);
    let sandbox = p.bool("sandbox");
    let update = p.bool("update");
    let target = sys::absolute(target_arg);
    if update && !sandbox {
        return Err(Fail::Fatal(
            "While checking build target: only sandbox update is supported: --sandbox flag is missing"
                .to_string(),
        ));
    }
    check_target(&target, p.bool("force"), update)?;
    let recipe = load_spec(spec)?;
    if sys::uid() != 0 && !p.bool("fakeroot") && recipe.from_def {
        sylog::verbose("Implying --fakeroot because building from definition file unprivileged");
    }

    let controls = Controls::load();
    sylog::info("Starting build...");
    let _bundle = TempBundle::create().map_err(|e| {
        Fail::Fatal(format!(
            "While performing build: while creating the temporary bundle: {}",
            sys::go_err(&e)
        ))
    })?;
    let _helper = Helper::spawn(&target);
    let target_path = Path::new(&target);
    remove_stale_work(target_path);
    let in_place = update && target_path.is_dir();
    let work = if in_place {
        target_path.to_path_buf()
    } else {
        sibling(target_path, "fake-build")
    };
    let fail = |e: io::Error, what: &Path| {
        Fail::Fatal(format!(
            "While performing build: while creating {}: {}",
            what.display(),
            sys::go_err(&e)
        ))
    };
    start_work(&work, sandbox, in_place).map_err(|e| fail(e, &work))?;

    controls.wait("build");
    if controls.fails("build") {
        if !in_place {
            remove_any(&work);
        }
        return Err(controls::injected_failure("build"));
    }

    let result = assemble(&recipe, &work, sandbox, p.bool("notest"));
    if result.is_err() && !in_place {
        remove_any(&work);
    }
    result?;
    if !in_place {
        place(&work, target_path).map_err(|e| {
            remove_any(&work);
            fail(e, target_path)
        })?;
    }
    sylog::info(&format!("Build complete: {target_arg}"));
    cli::ok()
}

/// The target-exists rules of reference 1.3 (apptainer's `checkBuildTarget`).
fn check_target(target: &str, force: bool, update: bool) -> Result<(), Fail> {
    let fatal = |msg: String| Err(Fail::Fatal(format!("While checking build target: {msg}")));
    let meta = match fs::metadata(target) {
        Ok(m) => m,
        Err(_) if update => {
            return fatal(format!("could not update sandbox {target}: doesn't exist"))
        }
        Err(_) => return Ok(()),
    };
    if update && !meta.is_dir() {
        return fatal(format!(
            "only sandbox update is supported: {target} is not a directory"
        ));
    }
    if meta.is_dir() && !force {
        let non_empty = fs::read_dir(target).is_ok_and(|mut d| d.next().is_some());
        let is_sandbox = [".singularity.d", "dev", "proc", "sys"]
            .iter()
            .all(|d| Path::new(target).join(d).exists());
        if non_empty && !is_sandbox {
            return fatal(format!(
                "{target} is not empty and is not an Apptainer sandbox, check its content first and use --force if you want to overwrite it"
            ));
        }
    }
    if update || force {
        return Ok(());
    }
    let name = sys::basename(target);
    if !io::stdin().is_terminal() {
        return fatal(format!(
            "build target '{name}' already exists. Use --force if you want to overwrite it"
        ));
    }
    let question = if meta.is_dir() || is_fake_sif(Path::new(target)) {
        format!("Build target '{name}' already exists and will be deleted during the build process. Do you want to continue? [y/N] ")
    } else {
        format!("Build target '{name}' may be a definition file or a text/binary file that will be overwritten. Do you still want to overwrite it? [y/N] ")
    };
    sys::stdout(&question);
    let mut answer = String::new();
    let _ = io::stdin().read_line(&mut answer);
    if answer.trim().eq_ignore_ascii_case("y") {
        Ok(())
    } else {
        fatal("stopping build".to_string())
    }
}

// ---------------------------------------------------------------------------
// The build spec

fn load_spec(spec: &str) -> Result<Recipe, Fail> {
    let unable = |msg: String| Fail::Fatal(format!("Unable to build from {spec}: {msg}"));
    if let Some((transport, reference)) = spec.split_once("://") {
        if transport == "library" {
            return Err(Fail::Fatal(
                "Unable to get library client configuration: no default remote with library client in use (see https://apptainer.org/docs/user/latest/endpoint.html#no-default-remote)"
                    .to_string(),
            ));
        }
        if URI_TRANSPORTS.contains(&transport) {
            let raw = format!("bootstrap: {transport}\nfrom: {reference}\n");
            return Ok(from_uri(raw, transport, reference, ImageMeta::default()));
        }
    }
    let path = Path::new(spec);
    if path.is_dir() || is_fake_sif(path) {
        let raw = format!("bootstrap: localimage\nfrom: {spec}\n");
        return Ok(from_uri(raw, "localimage", spec, ImageMeta::read(path)));
    }
    let raw = fs::read_to_string(path).map_err(|e| {
        unable(format!(
            "unable to open file {spec}: open {spec}: {}",
            sys::go_err(&e)
        ))
    })?;
    let stages = parse_definition(&raw)
        .map_err(|e| unable(format!("while parsing definition: {spec}: {e}")))?;
    for stage in &stages {
        match stage.header("bootstrap").unwrap_or_default() {
            "" => return Err(unable("no bootstrap specification found".to_string())),
            agent if !AGENTS.contains(&agent) => {
                return Err(unable(format!("invalid build source {agent}")))
            }
            _ => {}
        }
    }
    let stage = stages.into_iter().last().unwrap_or_default();
    Ok(Recipe {
        raw,
        from_def: true,
        stage,
        base: ImageMeta::default(),
    })
}

fn from_uri(raw: String, agent: &str, from: &str, base: ImageMeta) -> Recipe {
    let stage = Stage {
        header: vec![
            ("bootstrap".to_string(), agent.to_string()),
            ("from".to_string(), from.to_string()),
        ],
        ..Stage::default()
    };
    Recipe {
        raw,
        from_def: false,
        stage,
        base,
    }
}

fn is_fake_sif(path: &Path) -> bool {
    let mut magic = [0u8; SIF_MAGIC.len()];
    fs::File::open(path)
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| magic == SIF_MAGIC.as_bytes())
}

/// apptainer's `parser.All`: one stage per line starting with `Bootstrap:`.
fn parse_definition(raw: &str) -> Result<Vec<Stage>, String> {
    let mut starts = Vec::new();
    let mut pos = 0;
    for line in raw.split_inclusive('\n') {
        if line
            .get(..10)
            .is_some_and(|p| p.eq_ignore_ascii_case("bootstrap:"))
        {
            starts.push(pos);
        }
        pos += line.len();
    }
    let mut chunks = Vec::new();
    let mut previous = 0;
    for start in starts {
        chunks.push(&raw[previous..start]);
        previous = start;
    }
    chunks.push(&raw[previous..]);
    let mut stages = Vec::new();
    for chunk in chunks {
        if let Some(stage) = parse_stage(chunk)? {
            stages.push(stage);
        }
    }
    if stages.is_empty() {
        return Err("no stages found in definition file".to_string());
    }
    Ok(stages)
}

/// One stage; `None` when it holds nothing (an empty definition).
fn parse_stage(text: &str) -> Result<Option<Stage>, String> {
    let mut header = String::new();
    let mut tokens: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.starts_with('%'))
        {
            tokens.push(format!("{}\n", line.trim_start()));
        } else if let Some(current) = tokens.last_mut() {
            current.push_str(line);
            current.push('\n');
        } else {
            header.push_str(line);
            header.push('\n');
        }
    }
    let mut stage = Stage {
        header: parse_header(&header)
            .map_err(|e| format!("failed to parse deffile header: {e}"))?,
        ..Stage::default()
    };
    let mut invalid = Vec::new();
    for token in tokens {
        let (first, body) = token.split_once('\n').unwrap_or((&token, ""));
        let first = first.trim_start_matches('%');
        let name = first
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if name == "files" {
            stage.files.extend(parse_files(body));
        } else if APP_SECTIONS.contains(&name.as_str()) {
            continue;
        } else {
            if !SECTIONS.contains(&name.as_str()) && !invalid.contains(&name) {
                invalid.push(name.clone());
            }
            stage.sections.entry(name).or_default().push_str(body);
        }
    }
    if !invalid.is_empty() {
        invalid.sort();
        return Err(format!(
            "invalid section(s) specified: {}",
            invalid.join(", ")
        ));
    }
    if stage.header.is_empty()
        && stage.files.is_empty()
        && stage.sections.values().all(String::is_empty)
    {
        return Ok(None);
    }
    stage.labels = parse_labels(stage.section("labels").unwrap_or_default());
    Ok(Some(stage))
}

/// `Key: value` header lines, as apptainer's `doHeader` reads them.
fn parse_header(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut header: Vec<(String, String)> = Vec::new();
    let mut insert = |key: String, value: String| match header.iter_mut().find(|(k, _)| *k == key) {
        Some(entry) => entry.1 = value,
        None => header.push((key, value)),
    };
    let (mut key_cont, mut val_cont) = (String::new(), String::new());
    for line in text.trim().split('\n') {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            if !key_cont.is_empty() {
                insert(std::mem::take(&mut key_cont), std::mem::take(&mut val_cont));
            }
            continue;
        }
        let trimmed = line.split('#').next().unwrap_or_default();
        let (key, value) = if val_cont.is_empty() {
            let Some((k, v)) = trimmed.split_once(':') else {
                return Err(format!("header key {trimmed} had no val"));
            };
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        } else {
            (
                std::mem::take(&mut key_cont),
                std::mem::take(&mut val_cont) + trimmed.trim(),
            )
        };
        if let Some(stripped) = value.strip_suffix('\\') {
            key_cont = key;
            val_cont = match stripped.strip_suffix("\\n") {
                Some(s) => format!("{s}\n"),
                None => stripped.to_string(),
            };
            continue;
        }
        let numbered = key
            .strip_prefix("otherurl")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !HEADER_KEYS.contains(&key.as_str()) && !numbered {
            return Err(format!("invalid header keyword found: {key}"));
        }
        insert(key, value);
    }
    Ok(header)
}

/// `%files` lines: `src [dst]`, double quotes group words.
fn parse_files(body: &str) -> Vec<(String, String)> {
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let words = split_quoted(line);
            let src = words.first().cloned().unwrap_or_default();
            let dst = words.get(1).cloned().unwrap_or_default();
            (src, dst)
        })
        .collect()
}

fn split_quoted(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// `%labels` lines: `NAME value`.
fn parse_labels(body: &str) -> BTreeMap<String, String> {
    body.trim()
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| match line.split_once(' ') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => (line.to_string(), String::new()),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Producing the image

/// A hidden sibling of the target: `.NAME.KIND-PID`.
fn sibling(target: &Path, kind: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.{kind}-{}", std::process::id()))
}

/// Removes work paths left by builds whose process is gone.
fn remove_stale_work(target: &Path) {
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

fn remove_any(path: &Path) {
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
fn start_work(work: &Path, sandbox: bool, in_place: bool) -> io::Result<()> {
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
fn assemble(recipe: &Recipe, work: &Path, sandbox: bool, notest: bool) -> Result<(), Fail> {
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
            cli::VERSION.to_string(),
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
fn place(work: &Path, target: &Path) -> io::Result<()> {
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
