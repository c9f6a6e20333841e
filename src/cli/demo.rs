//! `concord demo --cli`: a short scripted session on a fresh embedded node.
//!
//! Each step is a real command line, parsed and executed by the same code as a typed one, and
//! printed with its output, so the demo shows exactly what a person would type.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

use super::{execute, Cli};

pub fn run(dir: Option<PathBuf>, out: &mut dyn Write) -> Result<()> {
    let (dir, _temporary) = match dir {
        Some(dir) => (dir, None),
        None => {
            let temporary = tempfile::Builder::new()
                .prefix("concord-demo-")
                .tempdir()
                .context("cannot create a temporary folder")?;
            (temporary.path().join("site-a"), Some(temporary))
        }
    };
    let data = dir.display().to_string();
    let export = dir.with_extension("automerge").display().to_string();
    let steps: Vec<Vec<&str>> = vec![
        vec!["init", &data, "--name", "site-a"],
        vec![
            "put",
            "customers/42",
            "name=Ada Lovelace",
            "email=ada@example.com",
            "credit=1500",
        ],
        vec![
            "put",
            "customers/43",
            "name=Grace Hopper",
            r#"address={"city":"Arlington","zip":"22201"}"#,
        ],
        vec!["get", "customers/42"],
        vec!["put", "customers/42", "credit=2500", "email="],
        vec!["list", "customers"],
        vec!["delete", "customers/43"],
        vec![
            "put",
            "customers/43",
            "name=Grace Hopper",
            "rank=Rear Admiral",
        ],
        vec!["history", "customers/42"],
        vec!["export", "customers/42", "-o", &export],
        vec!["import", "customers/44", &export],
        vec!["get", "customers/44"],
    ];
    writeln!(
        out,
        "# Concord demo: one node on an embedded store in {data}"
    )?;
    for step in steps {
        let needs_data = step[0] != "init";
        let mut args = vec!["concord"];
        if needs_data {
            args.extend(["--data", &data]);
        }
        args.extend(step.iter().copied());
        let shown: Vec<String> = step.iter().map(|arg| shell_quote(arg)).collect();
        writeln!(out, "\n$ concord {}", shown.join(" "))?;
        let cli = Cli::try_parse_from(&args).context("demo step does not parse")?;
        execute(cli, out)?;
    }
    writeln!(
        out,
        "\n# Every write above was durable (flushed to disk) before the next step ran."
    )?;
    Ok(())
}

fn shell_quote(arg: &str) -> String {
    if arg
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/-_.=:".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}
