//! Replies for people: one line per result, a table for `getallcont`.

use std::fmt::Write;

use schemas::{ContainerPage, ContainerRecord, Op, Reply, ReplyResult};

/// The text printed on stdout for a successful reply (each line ends with a newline).
pub fn render(reply: &Reply) -> String {
    let name = reply.container_name.as_deref().unwrap_or("");
    match &reply.result {
        Some(ReplyResult::Container(record)) => format!("{}\n", container_line(record)),
        Some(ReplyResult::Page(page)) => table(page),
        Some(ReplyResult::Binds(binds)) => {
            format!("{}: binds {}\n", binds.container_name, binds_text(&binds.binds))
        }
        None => match reply.op {
            Some(Op::Deletecont) => format!(
                "{name}: deleted; its image stays on disk until `orchestrator deletecontdata {name}`\n"
            ),
            Some(Op::Deletecontdata) => format!("{name}: data deleted\n"),
            _ => format!("{name}: done ({})\n", reply.status),
        },
    }
}

fn container_line(record: &ContainerRecord) -> String {
    let mut line = format!("{}: ", record.container_name);
    if record.container_active {
        line.push_str("running");
        if !record.container_ip.is_empty() {
            let _ = write!(line, " at {}", record.container_ip);
        }
    } else {
        line.push_str("stopped");
    }
    let _ = write!(
        line,
        ", image {} ({} {}:{})",
        record.container_image, record.image_distributor, record.image_os, record.image_version
    );
    if let Some(volume) = &record.volume_name {
        let _ = write!(line, ", home {volume}");
    }
    if !record.binds.is_empty() {
        let _ = write!(line, ", binds {}", binds_text(&record.binds));
    }
    line
}

fn binds_text(binds: &std::collections::BTreeMap<String, String>) -> String {
    if binds.is_empty() {
        return "none".to_owned();
    }
    binds
        .iter()
        .map(|(host, container)| format!("{host}:{container}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Containers as aligned columns, then the data deleted containers left, then the page.
fn table(page: &ContainerPage) -> String {
    let fleet = page.containers.iter().any(|r| r.node.is_some());
    let mut rows = vec![vec!["NAME", "STATE", "IP", "IMAGE", "BINDS"]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>()];
    if fleet {
        rows[0].push("NODE".to_owned());
    }
    for record in &page.containers {
        let mut row = vec![
            record.container_name.clone(),
            if record.container_active {
                "running"
            } else {
                "stopped"
            }
            .to_owned(),
            if record.container_ip.is_empty() {
                "-".to_owned()
            } else {
                record.container_ip.clone()
            },
            record.container_image.clone(),
            record.binds.len().to_string(),
        ];
        if fleet {
            row.push(record.node.clone().unwrap_or_else(|| "-".to_owned()));
        }
        rows.push(row);
    }
    let mut text = String::new();
    if page.containers.is_empty() {
        text.push_str("no containers on this page\n");
    } else {
        text.push_str(&columns(&rows));
    }
    for data in &page.data {
        let on = data
            .node
            .as_deref()
            .map_or_else(String::new, |node| format!(" on host {node}"));
        let _ = writeln!(
            text,
            "data left by deleted container {} (image {}){on}; remove it with `orchestrator deletecontdata {}`",
            data.container_name, data.container_image, data.container_name
        );
    }
    let noun = if page.total == 1 {
        "container"
    } else {
        "containers"
    };
    let _ = write!(
        text,
        "page {} ({} per page), {} {noun} in all",
        page.page, page.page_size, page.total
    );
    if page.data_total > 0 {
        let _ = write!(
            text,
            ", and data of {} deleted container{} after them",
            page.data_total,
            if page.data_total == 1 { "" } else { "s" }
        );
    }
    let _ = writeln!(text);
    text
}

/// Rows as aligned columns, separated by two spaces, one line each.
pub fn columns(rows: &[Vec<String>]) -> String {
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..count)
        .map(|i| {
            rows.iter()
                .map(|row| row.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(text, "{}", cells.join("  ").trim_end());
    }
    text
}
