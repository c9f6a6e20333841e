//! The `concord` binary: glue over the library. `main` calls [`cli::run`], which decides the
//! exit code in one place.

// Functions stay short enough to read at once (`clippy.toml` sets the bound).
#![deny(clippy::too_many_lines)]

mod cli;

/// Automerge allocates and frees many small objects per document; mimalloc takes that churn
/// about a third faster than the system allocator (BENCHMARKS.md, replication).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::run(std::env::args_os())
}
