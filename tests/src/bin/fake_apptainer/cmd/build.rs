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

use std::fs;
use std::io::{self, IsTerminal};
use std::path::Path;

use crate::assemble::{
    assemble, place, remove_any, remove_stale_work, sibling, start_work, Recipe,
};
use crate::bundle::{Helper, TempBundle};
use crate::cli::{self, b, bs, v, vs, Cmd, Fail, Flag, Kind, Res};
use crate::controls::{self, Controls};
use crate::definition::{parse_definition, Stage, AGENTS};
use crate::image::{ImageMeta, SIF_MAGIC, URI_TRANSPORTS};
use crate::sylog;
use crate::sys;

pub static BUILD: Cmd = Cmd {
    name: "build",
    usage: "apptainer [global options...] build [local options...] <IMAGE PATH> <BUILD SPEC>",
    short: "Build an Apptainer image",
    flags: &[BUILD_FLAGS],
    interspersed: true,
    subs: &[],
};

static BUILD_FLAGS: &[Flag] = &[
    bs(
        "sandbox",
        's',
        "build image as sandbox format (chroot directory structure)",
    ),
    bs("force", 'F', "overwrite an image file if it exists"),
    bs(
        "fakeroot",
        'f',
        "build with the appearance of running as root",
    ),
    b(
        "fix-perms",
        "ensure owner has rwX permissions on all container content",
    ),
    bs(
        "notest",
        'T',
        "build without running tests in %test section",
    ),
    bs(
        "update",
        'u',
        "run definition over existing container (skips header)",
    ),
    v(
        "section",
        Kind::List,
        "only run specific section(s) of deffile",
    ),
    v(
        "build-arg",
        Kind::List,
        "defines variable=value to replace {{ variable }} entries",
    ),
    v(
        "build-arg-file",
        Kind::Str,
        "specifies a file containing variable=value lines",
    ),
    b(
        "warn-unused-build-args",
        "shows warning instead of fatal message for unused build args",
    ),
    v(
        "arch",
        Kind::Str,
        "architecture for container-based sources",
    ),
    v(
        "arch-variant",
        Kind::Str,
        "architecture variant for container-based sources",
    ),
    b("disable-cache", "do not use cache or create cache"),
    b("no-cleanup", "do NOT clean up bundle after failed build"),
    b("json", "interpret build definition as JSON"),
    v("library", Kind::Str, "container Library URL"),
    bs(
        "encrypt",
        'e',
        "build an image with an encrypted file system",
    ),
    b("passphrase", "prompt for an encryption passphrase"),
    v(
        "pem-path",
        Kind::Str,
        "enter an path to a PEM formatted RSA key",
    ),
    b("nv", "inject host Nvidia libraries during build"),
    b("nvccli", "use nvidia-container-cli for GPU setup"),
    b("rocm", "inject host Rocm libraries during build"),
    vs("bind", 'B', Kind::List, "a user-bind path specification"),
    v("mount", Kind::List, "a mount specification"),
    b(
        "writable-tmpfs",
        "during the %test section, makes the file system accessible as read-write",
    ),
    b("userns", "build without using setuid even if available"),
    b("ignore-subuid", "ignore entries inside /etc/subuid"),
    b("ignore-fakeroot-command", "ignore fakeroot command"),
    v(
        "mksquashfs-args",
        Kind::Str,
        "additional arguments to mksquashfs",
    ),
    v("authfile", Kind::Str, "docker-style authentication file"),
    b("docker-login", "login to a Docker Repository interactively"),
    b("no-https", "use http instead of https"),
    v(
        "tmpdir",
        Kind::Str,
        "specify a temporary directory to use for build",
    ),
    b("reproducible", "build a reproducible image"),
];

pub fn run(args: &[String]) -> Res {
    let p = match cli::parse_with(&BUILD, args, cli::Arity::Exactly(2)) {
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
