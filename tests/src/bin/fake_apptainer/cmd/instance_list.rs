//! `instance list [--json|--logs] [GLOB]` (reference section 4): the live instances as a
//! byte-exact JSON document or a Go tabwriter table. Test control: `GARBAGE_LIST`.

use crate::cli::{self, bs, vs, Cmd, Fail, Flag, Kind, Res};
use crate::controls::Controls;
use crate::ident::Ident;
use crate::instance_state::{find, Instance};
use crate::json::J;
use crate::sys;

pub static INSTANCE_LIST: Cmd = Cmd {
    name: "list",
    usage: "apptainer [global options...] instance list [list options...] [<instance name glob>]",
    short: "List all running and named Apptainer instances",
    flags: &[INSTANCE_LIST_FLAGS],
    interspersed: true,
    subs: &[],
};

static INSTANCE_LIST_FLAGS: &[Flag] = &[
    vs(
        "user",
        'u',
        Kind::Str,
        "if running as root, list instances from \"<username>\"",
    ),
    bs("json", 'j', "print structured json instead of list"),
    bs(
        "logs",
        'l',
        "display location of stdout and sterr log files for instances",
    ),
    bs("all", 'a', "list all instances, including hidden ones"),
];

pub fn list(args: &[String]) -> Res {
    let cmd = &INSTANCE_LIST;
    let p = match cli::parse_with(cmd, args, cli::Arity::Between(0, 1)) {
        Ok(p) => p,
        Err(ends) => return ends,
    };
    let (json, logs) = (p.bool("json"), p.bool("logs"));
    if json && logs {
        return Err(Fail::Fatal("more than one flags have been set".to_string()));
    }
    let ident = Ident::load();
    let user = p.str("user").filter(|u| !u.is_empty());
    if user.is_some() && ident.uid != 0 {
        return Err(Fail::Fatal(
            "Only root user can list user's instances".to_string(),
        ));
    }
    let controls = Controls::load();
    controls.gate("instance-list")?;
    if json && controls.garbage_list() {
        sys::stdout("fake-apptainer garbage: {\"instances\": [ not json\n");
        return cli::ok();
    }
    let pattern = p.args.first().map(String::as_str).unwrap_or("*");
    let found = find(&ident.state_dir_of(user.unwrap_or(&ident.user)), pattern).map_err(|_| {
        Fail::Fatal(
            "Could not list instances: could not retrieve instance list: syntax error in pattern"
                .to_string(),
        )
    })?;
    let out = if json {
        let doc = J::o(vec![(
            "instances",
            J::Arr(found.iter().map(Instance::list_json).collect()),
        )]);
        format!("{}\n", doc.indented())
    } else if logs {
        let mut rows = vec![cells(&["INSTANCE NAME", "PID", "LOGS"])];
        for i in &found {
            rows.push(vec![i.name.clone(), i.pid.to_string(), i.log_err.clone()]);
            rows.push(vec![String::new(), String::new(), i.log_out.clone()]);
        }
        tabwrite(&rows)
    } else {
        let mut rows = vec![cells(&["INSTANCE NAME", "PID", "IP", "IMAGE"])];
        for i in &found {
            rows.push(vec![
                i.name.clone(),
                i.pid.to_string(),
                i.ip.clone(),
                i.image.clone(),
            ]);
        }
        tabwrite(&rows)
    };
    sys::stdout(&out);
    cli::ok()
}

fn cells(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| t.to_string()).collect()
}

/// Go's `tabwriter.NewWriter(w, 0, 8, 4, ' ', 0)`: each column as wide as its
/// widest cell plus 4; the last cell of a line is not padded (reference 4.4).
fn tabwrite(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(row.len().saturating_sub(1)) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] + 4 - cell.chars().count();
                out.push_str(&" ".repeat(pad));
            }
        }
        out.push('\n');
    }
    out
}
