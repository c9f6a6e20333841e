//! The record commands, one function each, every one over [`Records`]: the same on a stopped
//! node (its data dir opened) and on a running one (its API).

use super::args::AuditArgs;
use super::records::Records;
use super::*;

pub(super) fn audit(records: &dyn Records, filter: &AuditArgs, out: &mut dyn Write) -> Result<()> {
    let filter = concord::node::AuditFilter {
        collection: filter
            .collection
            .as_deref()
            .map(Collection::new)
            .transpose()?,
        record: filter
            .record
            .as_deref()
            .map(RecordId::parse_user)
            .transpose()?,
        source: filter.source.clone(),
        node: filter.node.clone(),
        since: filter
            .since
            .as_deref()
            .map(concord::node::parse_time)
            .transpose()?,
        until: filter
            .until
            .as_deref()
            .map(concord::node::parse_time)
            .transpose()?,
        limit: filter.limit,
    };
    let (entries, truncated) = records.audit(&filter)?;
    for entry in entries {
        writeln!(out, "{entry}")?;
    }
    if truncated {
        eprintln!("(more changes matched: narrow the filter, or continue with --since)");
    }
    Ok(())
}

pub(super) fn conflicts(
    records: &dyn Records,
    collection: Option<&str>,
    limit: usize,
    out: &mut dyn Write,
) -> Result<()> {
    let collection = collection.map(Collection::new).transpose()?;
    let report = records.conflicts(collection.as_ref(), limit)?;
    for record in report["records"].as_array().cloned().unwrap_or_default() {
        for field in record["fields"].as_array().cloned().unwrap_or_default() {
            let mut line = field;
            line["record"] = record["record"].clone();
            writeln!(out, "{line}")?;
        }
    }
    if report["truncated"].as_bool().unwrap_or(false) {
        eprintln!("(more records conflict: name a collection, or raise --limit)");
    }
    Ok(())
}

pub(super) fn resolve(
    records: &dyn Records,
    id: &str,
    field: &str,
    pick: Option<usize>,
    value: Option<String>,
    out: &mut dyn Write,
) -> Result<()> {
    let id = RecordId::parse_user(id)?;
    let settlement = match (pick, value) {
        (Some(index), _) => concord::node::Settlement::Pick(index),
        (None, Some(text)) => concord::node::Settlement::Value(
            serde_json::from_str(&text).unwrap_or(Json::String(text)),
        ),
        (None, None) => bail!("give --pick N or --value JSON"),
    };
    let value = records.resolve(&id, field, &settlement)?;
    writeln!(out, "{id} {field} = {value}")?;
    Ok(())
}

/// What the cluster CA signs for a node: `concord grant`, `revoke` and `node remove`.
pub(super) enum Signing {
    Grant {
        read: Vec<concord::scope::Scope>,
        write: Vec<concord::scope::Scope>,
    },
    Revoke,
    Remove,
}

/// One `--read` or `--write` list of scopes.
pub(super) fn parse_scopes(list: &[String]) -> Result<Vec<concord::scope::Scope>> {
    list.iter().map(|text| parse_scope(text)).collect()
}

/// Finds the node named `node`, has the CA at `ca` sign what `signing` says for it, and
/// stores that on the node reached through `records`.
pub(super) fn sign(
    records: &dyn Records,
    node: &str,
    ca: &Path,
    signing: Signing,
    out: &mut dyn Write,
) -> Result<()> {
    let authority = concord::scope::Authority::open(ca)?;
    let issued = u64::try_from(concord::node::now_ms()).unwrap_or(0);
    let id = records.node_named(node)?;
    match signing {
        Signing::Grant { read, write } => {
            records.add_signed(&authority.grant(id, read, write, issued)?)?;
            writeln!(out, "granted node {id}")?;
        }
        Signing::Revoke => {
            let cut_off = records.writers_of(id)?;
            records.add_signed(&authority.revoke(id, cut_off.clone(), issued)?)?;
            let cut_off: Vec<String> = cut_off
                .iter()
                .map(|(writer, place)| format!("{writer}:{place}"))
                .collect();
            let counted = if cut_off.is_empty() {
                "none".to_owned()
            } else {
                cut_off.join(", ")
            };
            writeln!(out, "revoked node {id}; its changes count up to {counted}")?;
        }
        Signing::Remove => {
            records.add_signed(&authority.remove(id, issued)?)?;
            writeln!(
                out,
                "removed node {id}: it holds nothing back from reclamation, and its \
                 connections are refused"
            )?;
        }
    }
    Ok(())
}

pub(super) fn grants(records: &dyn Records, out: &mut dyn Write) -> Result<()> {
    for grant in records.grants()? {
        writeln!(out, "{grant}")?;
    }
    Ok(())
}

pub(super) fn refill(records: &dyn Records, binding: &str, out: &mut dyn Write) -> Result<()> {
    records.refill(binding)?;
    writeln!(out, "binding {binding} loads again")?;
    Ok(())
}

pub(super) fn refused(records: &dyn Records, limit: usize, out: &mut dyn Write) -> Result<()> {
    for row in records.refused(limit)? {
        writeln!(out, "{row}")?;
    }
    Ok(())
}

pub(super) fn put(
    records: &dyn Records,
    id: &str,
    mut assignments: Vec<String>,
    value_files: &[String],
    replace: bool,
) -> Result<()> {
    let id = RecordId::parse_user(id)?;
    for value_file in value_files {
        assignments.push(read_value_file(value_file)?);
    }
    let mut write = parse_assignments(&assignments)?;
    write.replace = replace;
    // As PATCH does: an object merges into the one the field holds.
    write.merge = !replace;
    records.put(&id, &write)
}

pub(super) fn get(
    records: &dyn Records,
    id: &str,
    at: Option<&str>,
    out: &mut dyn Write,
) -> Result<()> {
    // Concord's own collections (`_actors`, `_grants`) read as `list` and `history` read
    // them; only writing them is reserved.
    let id = RecordId::parse(id)?;
    writeln!(out, "{}", records.get(&id, at)?)?;
    Ok(())
}

pub(super) fn revert(records: &dyn Records, id: &str, to: &str, out: &mut dyn Write) -> Result<()> {
    let id = RecordId::parse_user(id)?;
    if !records.revert(&id, to)? {
        writeln!(out, "{id} is already as it was at {to}")?;
    }
    Ok(())
}

pub(super) fn delete(records: &dyn Records, id: &str) -> Result<()> {
    records.delete(&RecordId::parse_user(id)?)
}

pub(super) fn list(records: &dyn Records, collection: &str, out: &mut dyn Write) -> Result<()> {
    let collection = Collection::new(collection)?;
    records.list(&collection, &mut |record| Ok(writeln!(out, "{record}")?))
}

pub(super) fn history(
    records: &dyn Records,
    id: &str,
    after: Option<&str>,
    limit: Option<usize>,
    out: &mut dyn Write,
) -> Result<()> {
    let id = RecordId::parse(id)?;
    let limit = concord::node::page_limit(
        limit.unwrap_or(concord::node::HISTORY_CHANGES_MAX),
        concord::node::HISTORY_CHANGES_MAX,
    )?;
    records.history(&id, after, limit, &mut |entry| {
        Ok(writeln!(out, "{entry}")?)
    })
}

pub(super) fn export(
    records: &dyn Records,
    id: &str,
    output: &Path,
    out: &mut dyn Write,
) -> Result<()> {
    let id = RecordId::parse(id)?;
    let bytes = records.export(&id)?;
    if output == Path::new("-") {
        out.write_all(&bytes)?;
    } else {
        std::fs::write(output, &bytes)
            .with_context(|| format!("cannot write {}", output.display()))?;
    }
    Ok(())
}

pub(super) fn import(
    records: &dyn Records,
    id: &str,
    file: &Path,
    out: &mut dyn Write,
) -> Result<()> {
    let id = RecordId::parse_user(id)?;
    let limit = concord::node::IMPORT_BYTES_MAX;
    let mut bytes = Vec::new();
    let reader: Box<dyn std::io::Read> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?,
        )
    };
    std::io::Read::read_to_end(
        &mut std::io::Read::take(reader, limit as u64 + 1),
        &mut bytes,
    )
    .with_context(|| format!("cannot read {}", file.display()))?;
    if bytes.len() > limit {
        bail!(
            "{} is over the limit of {limit} bytes for one import; nothing was stored",
            file.display()
        );
    }
    let new_changes = records
        .import(&id, &bytes)
        .with_context(|| format!("cannot import {}", file.display()))?;
    writeln!(out, "merged {new_changes} new changes into {id}")?;
    Ok(())
}
