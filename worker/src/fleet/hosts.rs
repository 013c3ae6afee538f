//! The table of `orchestrator fleet hosts`, made from a gather: every host known, whether it is
//! alive (its lease held), its capacity and counts (from its answer, or from the last thing it
//! said when it did not answer), and the depth of its host queue.

use std::collections::BTreeSet;

use lapin::Connection;
use schemas::fleet::{FleetHosts, HostView};
use schemas::{NodeId, Topology};

use super::gather::Gathered;
use super::lease::{depth, Lease};

/// Builds the table; `node` is this host (alive by definition: it is answering).
pub async fn table(
    connection: &Connection,
    topology: &Topology,
    node: &str,
    gathered: &Gathered,
) -> FleetHosts {
    let mut warnings = gathered.warnings(topology);
    let nodes: BTreeSet<&String> = gathered
        .known
        .keys()
        .chain(gathered.answers.keys())
        .chain(gathered.leases.keys())
        .collect();
    let mut hosts = Vec::with_capacity(nodes.len());
    for host in nodes {
        let Ok(id) = NodeId::parse(host) else {
            continue;
        };
        let queue_depth = match depth(connection, &topology.host_queue(&id)).await {
            Ok(depth) => depth,
            Err(e) => {
                warnings.push(format!("the depth of host {host}'s queue is unknown: {e}"));
                None
            }
        };
        let answer = gathered.answers.get(host);
        let status = answer.map(|a| &a.host).or_else(|| gathered.known.get(host));
        hosts.push(HostView {
            node: host.clone(),
            alive: host == node || gathered.leases.get(host) == Some(&Lease::Held),
            capacity: status.and_then(|s| s.capacity),
            running: status.map_or(0, |s| s.running),
            held: status.map_or(0, |s| s.held),
            queue_depth,
            at_ms: status.map_or(0, |s| s.at_ms),
            answered: answer.is_some(),
        });
    }
    FleetHosts {
        hosts,
        warnings,
        node: node.to_owned(),
    }
}
