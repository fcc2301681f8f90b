//! `fio-benches`: compares blockd with its peers (fio io_uring on the raw file,
//! qemu-storage-daemon, nbdkit) using one fio job set, in one run, on the same disk.
//! See README.md. A program, not a test: it measures and reports, it asserts nothing.

mod bench;
mod cli;
mod fio;
mod jobs;
mod process;
mod report;
mod sysinfo;
mod targets;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(if process::check_interrupted().is_err() {
                130
            } else {
                1
            });
        }
    }
}

/// Returns whether every target ran cleanly.
fn run(cli: &Cli) -> Result<bool> {
    process::install_signal_handlers()?;
    match &cli.cmd {
        Command::Nbd(args) => {
            let report = bench::run(args)?;
            println!();
            print!("{}", report.to_text());
            if let Some(p) = &args.json {
                let text = serde_json::to_string_pretty(&report.to_json())?;
                std::fs::write(p, text + "\n")
                    .with_context(|| format!("writing {}", p.display()))?;
                eprintln!("wrote {}", p.display());
            }
            if let Some(p) = &args.markdown {
                std::fs::write(p, report.to_markdown())
                    .with_context(|| format!("writing {}", p.display()))?;
                eprintln!("wrote {}", p.display());
            }
            Ok(report.errors.is_empty())
        }
    }
}
