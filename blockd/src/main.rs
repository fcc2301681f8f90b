use blockd::cli::{Cli, Command};
use clap::Parser;

/// Per-request futures, lookups and buffers are allocated and freed on the I/O workers'
/// threads at ~10^5/s; glibc's malloc spent ~10 % of the daemon's CPU on them (profile of
/// 4 KiB random reads, docs/benchmarks.md). mimalloc's thread-local free lists avoid that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(filter: &str) {
    let env = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Failpoints (`FAILPOINTS=name=panic;...`, see docs/reliability.md) end the process like a
/// crash: a panic raised by one aborts at once instead of unwinding into a task boundary.
fn install_failpoint_abort() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failpoint") {
            std::process::abort();
        }
    }));
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("blockd-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let (code, rt) = match &cli.cmd {
        Command::Serve(args) => {
            let cfg = match cli.config_for_serve(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(6);
                }
            };
            init_logging(&cfg.log);
            install_failpoint_abort();
            let _scenario = fail::FailScenario::setup();
            let rt = runtime(cfg.runtime.threads());
            let code = match rt.block_on(blockd::serve::serve(cfg)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            };
            (code, rt)
        }
        _ => {
            let rt = runtime(1);
            (rt.block_on(cli.run_admin()), rt)
        }
    };
    drop(rt);
    std::process::exit(code);
}
