//! A small operator tool for the datapath alone, before or beside the agent:
//!
//!   meshauth-datapath load   [--pin-dir DIR] [--cgroup PATH] [--audit]
//!   meshauth-datapath detach [--pin-dir DIR] --cgroup PATH
//!   meshauth-datapath auth   [--pin-dir DIR]
//!
//! `load` loads (reusing or migrating pinned maps), attaches to the pods'
//! cgroup (detected from kubelet's layout unless given) as pinned links, and
//! exits: enforcement stays in place. `detach` removes it. `auth` lists the
//! auth map.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use auth_ebpf::maps::auth::AuthMap;
use auth_ebpf::maps::config::{DatapathConfig, Mode};
use auth_ebpf::{DEFAULT_PIN_DIR, Datapath, LoadOptions};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!(
            "usage: meshauth-datapath load|detach|auth [--pin-dir DIR] [--cgroup PATH] [--audit]"
        );
        return ExitCode::from(2);
    };
    let mut pin_dir = PathBuf::from(DEFAULT_PIN_DIR);
    let mut cgroup = None;
    let mut audit = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pin-dir" => pin_dir = args.next().map(PathBuf::from).unwrap_or_default(),
            "--cgroup" => cgroup = args.next().map(PathBuf::from),
            "--audit" => audit = true,
            other => {
                eprintln!("meshauth-datapath: unknown argument {other}");
                return ExitCode::from(2);
            }
        }
    }
    match run(&cmd, pin_dir, cgroup, audit) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshauth-datapath {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    cmd: &str,
    pin_dir: PathBuf,
    cgroup: Option<PathBuf>,
    audit: bool,
) -> Result<(), auth_ebpf::DatapathError> {
    match cmd {
        "load" => {
            let config = DatapathConfig {
                mode: if audit { Mode::Audit } else { Mode::Enforce },
                ..DatapathConfig::default()
            };
            let mut dp = Datapath::load(&LoadOptions {
                pin_dir,
                config,
                auth_capacity: None,
                ipcache_capacity: None,
            })?;
            for (map, fate) in &dp.layout_report().maps {
                println!("map {map}: {fate:?}");
            }
            let cgroup = match cgroup {
                Some(c) => c,
                None => auth_ebpf::attach::detect_pods_cgroup()?,
            };
            dp.attach(&cgroup)?;
            println!("attached to {}", cgroup.display());
            Ok(())
        }
        "detach" => {
            let cgroup = cgroup.ok_or(auth_ebpf::DatapathError::Invalid {
                what: "arguments",
                value: "detach needs --cgroup".into(),
            })?;
            let n = Datapath::detach(&pin_dir, &cgroup)?;
            println!("released {n} links on {}", cgroup.display());
            Ok(())
        }
        "auth" => {
            let now = SystemTime::now();
            for (k, expiry) in AuthMap::open(&pin_dir)?.entries()? {
                let left = expiry
                    .duration_since(now)
                    .map_or_else(|_| "expired".to_string(), |d| format!("{}s", d.as_secs()));
                println!(
                    "local={} remote={} node={} type={} expires_in={left}",
                    k.local_id, k.remote_id, k.remote_node_id, k.auth_type
                );
            }
            Ok(())
        }
        other => Err(auth_ebpf::DatapathError::Invalid {
            what: "command",
            value: other.to_string(),
        }),
    }
}
