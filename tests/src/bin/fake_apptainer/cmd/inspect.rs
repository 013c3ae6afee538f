//! `inspect [--json] [-l] [-d] [-r] [-s] [-t] [-e] [-H] [--all] IMAGE` (reference 5.2): the
//! metadata of a sandbox or fake SIF (`image.rs`), as sections or JSON.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::cli::{self, b, bs, v, Cmd, Fail, Flag, Kind, Res};
use crate::image::ImageMeta;
use crate::json::J;
use crate::sys;

pub static INSPECT: Cmd = Cmd {
    name: "inspect",
    usage: "apptainer [global options...] inspect [inspect options...] <image path>",
    short: "Show metadata for an image",
    flags: &[INSPECT_FLAGS],
    interspersed: true,
    subs: &[],
};

static INSPECT_FLAGS: &[Flag] = &[
    bs(
        "labels",
        'l',
        "show the labels associated with the image (default)",
    ),
    bs(
        "deffile",
        'd',
        "show the Apptainer recipe file that was used to generate the image",
    ),
    bs("runscript", 'r', "show the runscript for the image"),
    bs("startscript", 's', "show the startscript for the image"),
    bs("test", 't', "show the test script for the image"),
    bs(
        "environment",
        'e',
        "show the environment settings for the image",
    ),
    bs(
        "helpfile",
        'H',
        "inspect the runscript helpfile, if it exists",
    ),
    bs("json", 'j', "print structured json instead of sections"),
    b("list-apps", "list all apps in a container"),
    v("app", Kind::Str, "inspect a specific app"),
    b("all", "show all available data (imply --json option)"),
];

/// `inspect [--json] [-l] [-d] [-r] [-s] [-t] [-e] [-H] [--all] IMAGE`
pub fn inspect(args: &[String]) -> Res {
    let p = match cli::parse_with(&INSPECT, args, cli::Arity::Exactly(1)) {
        Ok(p) => p,
        Err(ends) => return ends,
    };
    let arg = &p.args[0];
    let abs = sys::absolute(arg);
    if fs::symlink_metadata(&abs).is_err() {
        return Err(Fail::Fatal(format!(
            "Failed to open image {arg}: failed to retrieve path for {arg}: lstat {abs}: no such file or directory"
        )));
    }
    let meta = ImageMeta::read(Path::new(&abs));
    if p.bool("list-apps") {
        return cli::ok();
    }
    let all = p.bool("all");
    let want = |flag: &str| all || p.bool(flag);
    let selectors = [
        "labels",
        "deffile",
        "runscript",
        "startscript",
        "test",
        "environment",
        "helpfile",
    ];
    let labels = want("labels") || !selectors.iter().any(|s| p.bool(s));
    let empty_to_none = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    let pick = |flag: &str, v: &Option<String>| if want(flag) { empty_to_none(v) } else { None };
    let runscript = pick("runscript", &meta.runscript);
    let test = pick("test", &meta.test);
    let helpfile = pick("helpfile", &meta.helpfile);
    let deffile = pick("deffile", &meta.deffile);
    let startscript = pick("startscript", &meta.startscript);
    let environment = if want("environment") {
        meta.environment.clone()
    } else {
        BTreeMap::new()
    };
    let label_map = if labels {
        meta.labels.clone()
    } else {
        BTreeMap::new()
    };

    let mut out = String::new();
    if all || p.bool("json") {
        // Key order of the Go struct; empty fields are omitted.
        let mut attributes: Vec<(&str, J)> = Vec::new();
        if !environment.is_empty() {
            attributes.push(("environment", J::map(&environment)));
        }
        if !label_map.is_empty() {
            attributes.push(("labels", J::map(&label_map)));
        }
        for (key, value) in [
            ("runscript", &runscript),
            ("test", &test),
            ("helpfile", &helpfile),
            ("deffile", &deffile),
            ("startscript", &startscript),
        ] {
            if let Some(v) = value {
                attributes.push((key, J::s(v)));
            }
        }
        let doc = J::o(vec![
            ("data", J::o(vec![("attributes", J::o(attributes))])),
            ("type", J::s("container")),
        ]);
        out.push_str(&doc.indented());
        out.push('\n');
    } else {
        for v in [&deffile, &runscript, &startscript, &test, &helpfile]
            .into_iter()
            .flatten()
        {
            out.push_str(v);
            if !v.ends_with('\n') {
                out.push('\n');
            }
        }
        for (path, content) in &environment {
            out.push_str(&format!("=== {path} ===\n{content}\n\n"));
        }
        for (k, v) in &label_map {
            out.push_str(&format!("{k}: {v}\n"));
        }
    }
    sys::stdout(&out);
    cli::ok()
}
