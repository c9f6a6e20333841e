//! The `concord` binary: glue over the library. `main` calls [`cli::run`], which decides the
//! exit code in one place.

mod cli;

fn main() -> std::process::ExitCode {
    cli::run(std::env::args_os())
}
