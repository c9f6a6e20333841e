//! `concord status` for a person: the node, its peers, bindings and what waits, from the
//! status JSON the API serves.

use super::*;

pub(super) fn print_status(status: &Json, out: &mut dyn Write) -> Result<()> {
    let text = |key: &str| status[key].as_str().unwrap_or("?").to_owned();
    writeln!(out, "node     {} ({})", text("node"), text("name"))?;
    writeln!(out, "writer   {}", text("writer"))?;
    writeln!(out, "cluster  {}", text("cluster"))?;
    writeln!(out, "listen   {}", text("listen"))?;
    writeln!(out, "records  {}", status["records"])?;
    writeln!(out, "scope    {}", standing(status))?;
    print_peers(status, out)?;
    let engine = &status["engine"];
    writeln!(
        out,
        "changes  sent {}, received {}, applied {}, duplicates {}",
        engine["changes_sent"],
        engine["changes_received"],
        engine["changes_applied"],
        engine["duplicates"]
    )?;
    print_grants(status, out)?;
    for (key, what) in [
        ("degraded", "degraded (writes refused with 507)"),
        ("overloaded", "overloaded (writes refused with 503)"),
    ] {
        if let Some(reason) = status[key].as_str() {
            writeln!(out, "warning  {what}: {reason}")?;
        }
    }
    print_bindings(status, out)
}

/// A text field of a status object, `?` where it is missing.
fn field(value: &Json, key: &str) -> String {
    value[key].as_str().unwrap_or("?").to_owned()
}

/// A node's standing in the status: its grant, none (it reads and writes all), or revoked.
fn standing(node: &Json) -> String {
    if node["revoked"] == Json::Bool(true) {
        "revoked".to_owned()
    } else if node["grant"].is_null() {
        "reads and writes all".to_owned()
    } else {
        format!(
            "grant read {} write {}",
            node["grant"]["read"], node["grant"]["write"]
        )
    }
}

/// Connected and unreachable peers, and warnings about those that disagree with this node.
fn print_peers(status: &Json, out: &mut dyn Write) -> Result<()> {
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    let unreachable = status["unreachable"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    writeln!(
        out,
        "peers    {} connected, {} unreachable",
        peers.len(),
        unreachable.len()
    )?;
    for peer in &peers {
        let lag = peer["lag"]
            .as_u64()
            .map_or("not known yet".to_owned(), |lag| format!("{lag} changes"));
        writeln!(
            out,
            "  {} ({}) at {}: {}, lag {lag}, policies {}, {}",
            field(peer, "name"),
            field(peer, "node"),
            field(peer, "address"),
            field(peer, "state"),
            field(peer, "policies"),
            standing(peer),
        )?;
    }
    for peer in &unreachable {
        let node = peer["node"]
            .as_str()
            .map_or(String::new(), |node| format!(" (node {node})"));
        writeln!(
            out,
            "  unreachable {}{node}: {} ({} attempts failed in a row)",
            field(peer, "address"),
            field(peer, "error"),
            peer["failures"]
        )?;
    }
    for peer in peers.iter().filter(|peer| peer["policies"] == "differ") {
        writeln!(
            out,
            "warning  {}'s conflict policies differ from this node's: the same records resolve \
             to different values there (compare [[policies]] in concord.toml)",
            field(peer, "name")
        )?;
    }
    for peer in peers
        .iter()
        .filter(|peer| peer["changes_ahead"].as_u64().unwrap_or(0) > 0)
    {
        writeln!(
            out,
            "warning  {} sent {} changes stamped ahead of this node's clock by more than \
             node.clock_ahead_max_ms: the two clocks disagree (check NTP on both)",
            field(peer, "name"),
            peer["changes_ahead"]
        )?;
    }
    Ok(())
}

/// The grants, revocations and removals in force.
fn print_grants(status: &Json, out: &mut dyn Write) -> Result<()> {
    let this_node = field(status, "node");
    for grant in status["grants"].as_array().cloned().unwrap_or_default() {
        let node = field(&grant, "node");
        let whose = if node == this_node {
            " (this node)"
        } else {
            ""
        };
        if grant["revoked"] == Json::Bool(true) {
            writeln!(out, "revoked  {node}{whose}")?;
        } else if grant["removed"] == Json::Bool(true) {
            writeln!(out, "removed  {node}{whose}")?;
        } else {
            writeln!(
                out,
                "grant    {node}{whose}: read {}, write {}",
                grant["read"], grant["write"]
            )?;
        }
    }
    Ok(())
}

fn print_bindings(status: &Json, out: &mut dyn Write) -> Result<()> {
    for binding in status["bindings"].as_array().cloned().unwrap_or_default() {
        let text = |key: &str| field(&binding, key);
        writeln!(
            out,
            "binding  {} ({} {} {}, {}): {}; captured {}, written {}, applied {}, quarantined {}",
            text("name"),
            text("adapter"),
            text("table"),
            text("direction"),
            text("collection"),
            text("state"),
            binding["rows_captured"],
            binding["records_written"],
            binding["rows_applied"],
            binding["quarantined"]
        )?;
    }
    Ok(())
}
