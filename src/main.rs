//! The `stepgate` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stepgate::cli;
use stepgate::config::{parse_duration, Config};

/// mimalloc instead of the system allocator: the request path allocates
/// small, short-lived buffers (headers, bodies, futures) from two threads,
/// which glibc malloc serves measurably slower (see README, Performance).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How mimalloc gives freed memory back to the kernel, unless the
/// environment sets it (`MIMALLOC_ARENA_EAGER_COMMIT`,
/// `MIMALLOC_PURGE_DELAY`, which mimalloc reads itself). With its
/// defaults, memory freed after a burst of requests (10,000 keep-alive
/// connections each sending one, whose HTTP buffers are freed once they go
/// idle) stays resident: freed pages of eagerly committed arenas are only
/// marked lazily free (`MADV_FREE`, still counted in RSS), and a purge
/// waits a second for allocator activity that an idle gateway may never
/// have. Arena memory committed on demand is returned by a purge
/// (`MADV_DONTNEED`), here after 100 ms. Measured with `bench/run.sh`
/// (README, Performance): memory after a burst and peak RSS under load
/// down, CPU per request unchanged; a purge delay of 0 cost 17 % more CPU
/// per request.
extern "C" fn tune_allocator() {
    // The option numbers of mimalloc.h (v3, as libmimalloc-sys builds it):
    // mi_option_arena_eager_commit and mi_option_purge_delay.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: each call stores an integer in mimalloc's option table,
    // unless the environment set that option; no pointer is passed.
    unsafe {
        libmimalloc_sys::mi_option_set_default(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set_default(PURGE_DELAY, 100);
    }
}

/// Runs [`tune_allocator`] before the Rust runtime starts, so before the
/// first allocation: mimalloc decides how an arena is committed when it
/// makes it, and makes the first one for the first allocation.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

#[derive(Parser)]
#[command(
    name = "stepgate",
    version,
    about = "Step-up authentication reverse proxy"
)]
struct Cli {
    /// Config file.
    #[arg(
        short,
        long,
        global = true,
        env = "STEPGATE_CONFIG",
        default_value = "gateway.yaml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Validate the config file and print a summary.
    Check,
    /// Show which rule matches a request and what it needs.
    Explain {
        /// HTTP method, e.g. GET.
        method: String,
        /// A path (/admin/x) or a full URL (https://app.example.com/admin/x).
        url: String,
    },
    /// The whole flow on one machine: sample app, in-memory store, codes on the console.
    Demo {
        /// Address of the gateway.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Mint a primary access token the config accepts (for trials and tests).
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        phone: Option<String>,
        /// Session id claim (`sid`).
        #[arg(long)]
        sid: Option<String>,
        /// Lifetime, e.g. 1h.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Private key PEM (instead of the config's HS secret).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Algorithm for --key, e.g. RS256, ES256, EdDSA.
        #[arg(long, default_value = "RS256")]
        alg: String,
    },
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    #[cfg(not(target_os = "linux"))]
    tune_allocator();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let config = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let _log = stepgate::telemetry::init_logging(&config.log);
            serve("stepgate", |shutdown| stepgate::run(config, shutdown))
        }
        Command::Demo { listen } => {
            let _log = stepgate::telemetry::init_logging(&stepgate::telemetry::LogSettings {
                format: stepgate::telemetry::LogFormat::Text,
                level: "warn,stepgate::console=warn".into(),
            });
            serve("stepgate demo", |shutdown| {
                stepgate::demo::run(listen, shutdown)
            })
        }
        Command::Check => match load(&cli.config) {
            Ok(c) => {
                print!("{}", cli::summary(&c));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Explain { method, url } => {
            let c = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match cli::explain(&c, &method, &url) {
                Ok(s) => {
                    print!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Token {
            sub,
            email,
            phone,
            sid,
            ttl,
            key,
            alg,
        } => {
            let c = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let ttl = match parse_duration(&ttl) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("--ttl: {e}");
                    return ExitCode::from(2);
                }
            };
            let key = match key {
                None => None,
                Some(path) => {
                    let pem = match std::fs::read(&path) {
                        Ok(p) => p,
                        Err(e) => {
                            eprintln!("{}: {e}", path.display());
                            return ExitCode::from(1);
                        }
                    };
                    match alg.parse() {
                        Ok(a) => Some((pem, a)),
                        Err(_) => {
                            eprintln!("--alg: unknown algorithm {alg:?}");
                            return ExitCode::from(2);
                        }
                    }
                }
            };
            let req = cli::TokenRequest {
                sub: &sub,
                email: email.as_deref(),
                phone: phone.as_deref(),
                sid: sid.as_deref(),
                ttl,
                key,
            };
            match cli::mint(&c, &req) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Run a server until it returns. The main thread's runtime accepts
/// connections and runs the background work (signals, reloads, the admin
/// listener, key refreshes); client connections are served on the
/// `listen.workers` threads the server starts (`server.rs`). The signal
/// handlers are installed before the server starts, so a SIGTERM that
/// arrives while it is starting up drains it rather than killing it.
fn serve<F, Fut>(what: &str, server: F) -> ExitCode
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{what}: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async move {
        let shutdown = shutdown_signal();
        server(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e}");
            ExitCode::from(1)
        }
    }
}

/// A future that resolves on SIGTERM or SIGINT. The handlers are
/// registered when this is called (inside the runtime), not when the
/// future is first polled.
fn shutdown_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        Box::pin(async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        })
    }
    #[cfg(not(unix))]
    {
        Box::pin(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
