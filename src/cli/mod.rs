//! The `concord` command line.
//!
//! A contract that the README and the tests rely on. Exit codes: 0 on success, 1 for a usage
//! or data error (one line on stderr), 2 when the record asked for is not found. Logs go to
//! stderr through `tracing`, filtered by `RUST_LOG` (default `warn`).

mod args;
mod cluster_demo;
mod commands;
mod demo;
mod load;
mod records;
mod remote;
mod status;
mod table_demo;

pub use args::Cli;
use args::{CaCommand, Command, DemoArgs, NodeCommand, RecordCommand, RestoreArgs};
use load::backup;
use records::Records;
use status::print_status;

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use concord::node::{Node, NodeError};
use concord::record::{Collection, Key, RecordId, RecordWrite};
use serde_json::{Map, Value as Json};

/// Records written per flush by `load`.
pub const LOAD_BATCH_RECORDS_DEFAULT: usize = 1000;
/// Most records `load` may write per flush.
pub const LOAD_BATCH_RECORDS_MAX: usize = 100_000;
/// Longest line `load` accepts, in bytes: what the API takes in one request, so a line loads
/// alike into a stopped node and through a running one.
pub const LOAD_LINE_BYTES_MAX: usize = concord::node::api::REQUEST_BYTES_MAX;

/// The node the record commands reach: through its API while it runs, its data dir itself
/// while it is stopped.
fn target(data: Option<PathBuf>) -> Result<Box<dyn Records>> {
    let dir = data_dir(data)?;
    // A running node holds its store's lock: through its API at once, without waiting. A
    // lock held with nothing at the API's address is a store just closed (its threads let go
    // a moment later): opened below, which waits for the lock.
    if concord::node::store_in_use(&dir)? {
        let api = remote::ApiClient::for_data_dir(&dir)?;
        if api.answers() {
            return Ok(Box::new(api));
        }
    }
    match Node::open(&dir) {
        Ok(node) => Ok(Box::new(node)),
        Err(NodeError::Locked { .. }) => Ok(Box::new(remote::ApiClient::for_data_dir(&dir)?)),
        Err(error) => Err(error.into()),
    }
}

/// Parses `args`, runs the command, and turns the outcome into the exit code.
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    init_logging();
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let mut stdout = std::io::stdout().lock();
    match execute(cli, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let not_found = matches!(
                error.downcast_ref::<NodeError>(),
                Some(NodeError::NotFound(_))
            );
            eprintln!("error: {}", error_text(&error));
            if not_found {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second call (the demo runs commands in-process) finds a subscriber already set.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn data_dir(cli_data: Option<PathBuf>) -> Result<PathBuf> {
    cli_data.context("no data dir: pass --data DIR or set CONCORD_DATA")
}

fn open(data: Option<PathBuf>) -> Result<Node> {
    let dir = data_dir(data)?;
    Ok(Node::open(&dir)?)
}

/// Runs one parsed command, writing its output to `out`.
pub fn execute(cli: Cli, out: &mut dyn Write) -> Result<()> {
    match cli.command {
        Command::Record(command) => record_command(command, cli.data, out),
        Command::Init(init) => {
            let dir = init.dir.clone();
            let id = Node::init_with(&dir, &init.options())?;
            writeln!(out, "initialized node {id} in {}", dir.display())?;
            Ok(())
        }
        Command::Ca {
            action: CaCommand::Init { dir },
        } => {
            let cluster = concord::net::tls::create_ca(&dir)?;
            let cluster = hex::encode(cluster);
            writeln!(out, "created cluster CA {cluster} in {}", dir.display())?;
            Ok(())
        }
        Command::Run => run_node(cli.data),
        Command::Backup { dir, output } => {
            let dir = dir.map_or_else(|| data_dir(cli.data), Ok)?;
            backup(&dir, &output, out)
        }
        Command::Restore(restore) => restore_backup(restore, out),
        Command::Recover { dir } => recover(dir.map_or_else(|| data_dir(cli.data), Ok)?, out),
        Command::SalvageCopy { from, to, space } => {
            let space = u8::try_from(space).context("a key space is one ASCII letter")?;
            concord::node::maintenance::salvage_copy(&from, &to, space, std::io::stdout())?;
            Ok(())
        }
        Command::Status => {
            let status = api_of(cli.data)?
                .status()
                .context("is the node running? (`concord run`)")?;
            print_status(&status, out)
        }
        Command::Errors => {
            let answer = api_of(cli.data)?
                .errors()
                .context("is the node running? (`concord run`)")?;
            for row in answer["errors"].as_array().cloned().unwrap_or_default() {
                writeln!(out, "{row}")?;
            }
            Ok(())
        }
        Command::Demo(demo) => run_demo(demo, out),
    }
}

/// A record command, on the node wherever it is: its data dir while it is stopped, its API
/// while it runs.
fn record_command(
    command: RecordCommand,
    data: Option<PathBuf>,
    out: &mut dyn Write,
) -> Result<()> {
    // What can be refused before the node is reached is.
    let signing = match &command {
        RecordCommand::Grant { read, write, .. } => Some(commands::Signing::Grant {
            read: commands::parse_scopes(read)?,
            write: commands::parse_scopes(write)?,
        }),
        _ => None,
    };
    if let RecordCommand::Load(load) = &command {
        load.check()?;
    }
    let target = target(data)?;
    let records = target.as_ref();
    match command {
        RecordCommand::Audit(filter) => commands::audit(records, &filter, out),
        RecordCommand::Conflicts { collection, limit } => {
            commands::conflicts(records, collection.as_deref(), limit, out)
        }
        RecordCommand::Resolve {
            id,
            field,
            pick,
            value,
        } => commands::resolve(records, &id, &field, pick, value, out),
        RecordCommand::Grant { node, ca, .. } => {
            let signing = signing.context("a grant's scopes are parsed first")?;
            commands::sign(records, &node, &ca, signing, out)
        }
        RecordCommand::Revoke { node, ca } => {
            commands::sign(records, &node, &ca, commands::Signing::Revoke, out)
        }
        RecordCommand::Node {
            action: NodeCommand::Remove { node, ca },
        } => commands::sign(records, &node, &ca, commands::Signing::Remove, out),
        RecordCommand::Grants => commands::grants(records, out),
        RecordCommand::Refill { binding } => commands::refill(records, &binding, out),
        RecordCommand::Refused { limit } => commands::refused(records, limit, out),
        RecordCommand::Put {
            id,
            fields,
            value_files,
            replace,
        } => commands::put(records, &id, fields, &value_files, replace),
        RecordCommand::Get { id, at } => commands::get(records, &id, at.as_deref(), out),
        RecordCommand::Revert { id, to } => commands::revert(records, &id, &to, out),
        RecordCommand::Delete { id } => commands::delete(records, &id),
        RecordCommand::List { collection } => commands::list(records, &collection, out),
        RecordCommand::History { id, after, limit } => {
            commands::history(records, &id, after.as_deref(), limit, out)
        }
        RecordCommand::Export { id, file, output } => {
            let output = file.or(output).unwrap_or_else(|| PathBuf::from("-"));
            commands::export(records, &id, &output, out)
        }
        RecordCommand::Import { id, file } => commands::import(records, &id, &file, out),
        RecordCommand::Load(load) => load.run(records, out),
    }
}

/// The API of the node that serves the data dir, for what only a running node answers.
fn api_of(data: Option<PathBuf>) -> Result<remote::ApiClient> {
    remote::ApiClient::for_data_dir(&data_dir(data)?)
}

/// `concord run`: the node until SIGTERM or Ctrl-C.
fn run_node(data: Option<PathBuf>) -> Result<()> {
    let node = std::sync::Arc::new(open(data)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let config = node.config().clone();
    let (id, name) = (node.id(), config.node.name.clone());
    runtime.block_on(async {
        let running = concord::node::runtime::start(node).await?;
        eprintln!(
            "concord: node {name} ({id}) running: peers connect to {}, the API is at \
             http://{}; Ctrl-C or SIGTERM stops it",
            config.network.listen, config.network.api
        );
        running.run_until(shutdown_signal()).await
    })?;
    eprintln!("concord: node {name} stopped");
    Ok(())
}

fn restore_backup(restore: RestoreArgs, out: &mut dyn Write) -> Result<()> {
    let progress = spinner("{spinner} restoring: {msg}");
    let options = concord::node::maintenance::RestoreOptions {
        ca: restore.ca.as_deref(),
        replace: restore.replace,
        engine: restore.engine,
    };
    let report = concord::node::maintenance::restore(
        &restore.file,
        &restore.dir,
        &options,
        |what, count| progress.set_message(format!("{count} {what}")),
    )?;
    progress.finish_and_clear();
    writeln!(out, "{}", serde_json::to_string(&report)?)?;
    Ok(())
}

fn recover(dir: PathBuf, out: &mut dyn Write) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program to run the salvage")?;
    let command = vec![exe.into_os_string(), OsString::from("__salvage-copy")];
    let progress = spinner("{spinner} recovering: {msg}");
    let report = concord::node::maintenance::recover(&dir, &command, |what, count| {
        progress.set_message(format!("{count} {what}"))
    })?;
    progress.finish_and_clear();
    writeln!(out, "{}", serde_json::to_string(&report)?)?;
    Ok(())
}

fn run_demo(demo: DemoArgs, out: &mut dyn Write) -> Result<()> {
    if demo.cli {
        demo::run(demo.dir, out)
    } else if demo.partition {
        cluster_demo::run(demo.dir, out)
    } else {
        let options = table_demo::Options {
            dir: demo.dir,
            postgres: (!demo.sqlite_only).then_some(demo.postgres),
        };
        table_demo::run(options, out)
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGTERM");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// An error and its causes on one line, each said once: many errors already name their
/// cause in their own text, and the chain would repeat it.
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Reads `FIELD=PATH` into `FIELD=CONTENTS`, refusing a file larger than a request may be.
/// One `--read` or `--write` scope. A scope's value is data, so a comma never starts another
/// scope; a list given the old way, `a,b`, fails as a collection name, and says so.
fn parse_scope(text: &str) -> Result<concord::scope::Scope> {
    concord::scope::Scope::parse(text).map_err(|error| {
        let hint = if text.contains(',') && !text.contains(':') {
            " (give one scope per flag: --read a --read b)"
        } else {
            ""
        };
        anyhow::anyhow!("{error}{hint}")
    })
}

fn read_value_file(assignment: &str) -> Result<String> {
    use std::io::Read;
    let Some((field, path)) = assignment.split_once('=') else {
        bail!("{assignment:?} is not FIELD=PATH");
    };
    let limit = concord::node::api::REQUEST_BYTES_MAX;
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {path}"))?;
    let mut contents = String::new();
    file.take(limit as u64 + 1)
        .read_to_string(&mut contents)
        .with_context(|| format!("cannot read {path} as UTF-8 text"))?;
    if contents.len() > limit {
        bail!("{path} is over the limit of {limit} bytes for one write; nothing was stored");
    }
    if contents.is_empty() {
        bail!("{path} is empty (to remove the field, give {field}=)");
    }
    Ok(format!("{field}={contents}"))
}

/// Turns `FIELD=VALUE` arguments into a write.
fn parse_assignments(assignments: &[String]) -> Result<RecordWrite> {
    let mut write = RecordWrite::default();
    for assignment in assignments {
        let Some((field, value)) = assignment.split_once('=') else {
            bail!("{assignment:?} is not FIELD=VALUE");
        };
        if value.is_empty() {
            write.remove.push(field.to_owned());
        } else {
            let value =
                serde_json::from_str(value).unwrap_or_else(|_| Json::String(value.to_owned()));
            write.set.push((field.to_owned(), value));
        }
    }
    write.check()?;
    Ok(write)
}

/// A spinner on stderr that shows `template`.
fn spinner(template: &str) -> indicatif::ProgressBar {
    let progress = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template(template).expect("the progress template is valid"),
    );
    progress.enable_steady_tick(std::time::Duration::from_millis(200));
    progress
}
