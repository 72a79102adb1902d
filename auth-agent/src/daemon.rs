//! The node daemon's entry point: what `meshauth-agent` runs, and what the
//! demo's `meshauth agent` (hidden) re-executes into, so the demo and the
//! DaemonSet run the same code.

use std::process::ExitCode;

use crate::config::LogFormat;
use crate::flags::AgentArgs;

/// Logs to stderr, filtered by `MESHAUTH_LOG` (default `default`).
pub fn init_logs(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHAUTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json { b.json().init() } else { b.init() }
}

/// One glibc malloc arena. By default every thread that allocates
/// gets its own arena and keeps what it freed: the agent's short bursts on
/// runtime and blocking threads (the first policy compile) left ~30 MiB
/// resident for good at 1,000 identities (BENCHMARKS.md, agent memory).
/// Call before any thread is started.
#[allow(unsafe_code)]
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets allocator parameters; called before any
    // thread is started, with a documented parameter and value.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Gives the heap's free pages back to the kernel (glibc `malloc_trim`).
/// Called once the agent has started: loading the datapath parses the
/// kernel's BTF (aya's loader does it on construction, even when told not
/// to use it: several MiB on a 6.x kernel) and the first policy compile
/// builds its temporaries; both are freed by then, but their pages would
/// stay resident. Returns whether memory was released.
#[allow(unsafe_code)]
pub fn release_free_heap() -> bool {
    // SAFETY: malloc_trim only returns free memory of the allocator's own
    // arenas to the kernel; no pointer is touched.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Runs the agent until SIGTERM or SIGINT: builds the configuration from
/// `args`, the environment and the file (exit 2 with every invalid value),
/// then [`crate::app::run`]. `prog` names the binary in error messages.
pub fn main(prog: &str, args: &AgentArgs) -> ExitCode {
    limit_malloc_arenas();
    let config = match args.build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{prog}: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        return match serde_json::to_string_pretty(&config) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{prog}: printing the configuration: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_logs("info", config.log_format == LogFormat::Json);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{prog}: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        tokio::spawn(async move {
            crate::app::wait_for_signal().await;
            t.cancel();
        });
        match crate::app::run(config, token).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{prog}: {e}");
                ExitCode::from(2)
            }
        }
    })
}
