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
static GLOBAL: Mimalloc = Mimalloc;

/// mimalloc, asked for an alignment only when its plain allocation does
/// not already give it. The `mimalloc` crate's allocator passes every
/// request's alignment to `mi_malloc_aligned`, and mimalloc 3 serves an
/// aligned request of more than 1 KiB whose size class is not a power of
/// two by over-allocating and offsetting (about 190 instructions against
/// 12): hyper's 8 KiB read buffers, two of them per request. `mi_malloc`
/// returns blocks aligned to 16 bytes (`MI_MAX_ALIGN_SIZE`: every size
/// class above one word is a multiple of 16 bytes, and pages start
/// 16-aligned), and 8-byte blocks for sizes up to 8, so an alignment up
/// to 16 and up to the size needs no aligned call: the rule the standard
/// library applies to `malloc` (its `MIN_ALIGN`). Anything stricter
/// still goes to the aligned calls.
struct Mimalloc;

/// What `mi_malloc` guarantees.
const MI_MAX_ALIGN_SIZE: usize = 16;

fn natural(align: usize, size: usize) -> bool {
    align <= MI_MAX_ALIGN_SIZE && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free`
// takes blocks of either kind); a block is at least as aligned as its
// layout asks, by `natural` or by the aligned call.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        // SAFETY: as the trait requires (the layout's size is non-zero).
        unsafe {
            if natural(layout.align(), layout.size()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        // SAFETY: as for `alloc`.
        unsafe {
            if natural(layout.align(), layout.size()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` was allocated by this allocator (trait contract).
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        // SAFETY: `ptr` is a live block of this allocator with `layout`
        // (trait contract); the new block keeps the layout's alignment.
        unsafe {
            if natural(layout.align(), new_size) {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::Mimalloc;
    use std::alloc::{GlobalAlloc, Layout};

    /// Every block is as aligned as its layout asks, through allocation,
    /// zeroed allocation and reallocation (growing and shrinking), on
    /// both paths (plain and aligned calls), and keeps its bytes.
    #[test]
    fn blocks_have_their_layouts_alignment_and_keep_their_bytes() {
        let sizes = [
            1, 3, 7, 8, 9, 15, 16, 17, 24, 40, 100, 1000, 1025, 8192, 8200, 70_000,
        ];
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in sizes {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: non-zero sizes; each block is written within its
                // size, reallocated with its own layout and freed once.
                unsafe {
                    let z = Mimalloc.alloc_zeroed(layout);
                    assert!(!z.is_null());
                    assert_eq!(z as usize % align, 0, "zeroed {size}/{align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0));
                    Mimalloc.dealloc(z, layout);

                    let mut p = Mimalloc.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc {size}/{align}");
                    for i in 0..size {
                        *p.add(i) = i as u8;
                    }
                    for new_size in sizes {
                        let q = Mimalloc.realloc(p, layout, new_size);
                        assert!(!q.is_null());
                        assert_eq!(q as usize % align, 0, "realloc {size}->{new_size}/{align}");
                        for i in 0..size.min(new_size) {
                            assert_eq!(*q.add(i), i as u8, "byte {i} of {size}->{new_size}");
                        }
                        let back = Layout::from_size_align(new_size, align).expect("layout");
                        let p2 = Mimalloc.realloc(q, back, size);
                        assert_eq!(p2 as usize % align, 0);
                        for i in 0..size.min(new_size) {
                            assert_eq!(*p2.add(i), i as u8);
                        }
                        Mimalloc.dealloc(p2, layout);
                        // The next round reallocates a fresh block.
                        p = Mimalloc.alloc(layout);
                        for i in 0..size {
                            *p.add(i) = i as u8;
                        }
                    }
                    Mimalloc.dealloc(p, layout);
                }
            }
        }
    }
}
