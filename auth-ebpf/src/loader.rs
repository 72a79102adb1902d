//! Loading the datapath: the embedded object, pinned maps, the programs.

use std::path::{Path, PathBuf};

use aya::programs::{CgroupSkb, TestRun, TestRunOptions, TestRunResult};
use aya::{Ebpf, EbpfLoader};

use crate::error::DatapathError;
use crate::layout::{self, LayoutReport};
use crate::maps::config::{ConfigMap, DatapathConfig};
use crate::maps::names;
use crate::types::Direction;

/// The compiled datapath (`bpf/endpoint.o`, built by `bpf/build.sh` and
/// committed, so building the crate needs no clang).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/endpoint.o");

/// The ingress program's name.
pub const INGRESS_PROGRAM: &str = "meshauth_ingress";
/// The egress program's name.
pub const EGRESS_PROGRAM: &str = "meshauth_egress";

/// Default bpffs directory for pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/meshauth";

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory the maps (and links) are pinned under.
    pub pin_dir: PathBuf,
    /// Configuration written into the config map.
    pub config: DatapathConfig,
    /// Capacity of the auth map; `None` keeps the object's default
    /// (131,072 pairs). Changing it migrates the pinned entries.
    pub auth_capacity: Option<u32>,
    /// Capacity of the ipcache (pod and node addresses); `None` keeps the
    /// object's default (65,536). The map allocates per entry, so a larger
    /// capacity costs nothing until used. Changing it recreates the pinned
    /// ipcache empty; the agent rewrites it from desired state at start.
    pub ipcache_capacity: Option<u32>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            config: DatapathConfig::default(),
            auth_capacity: None,
            ipcache_capacity: None,
        }
    }
}

/// The loaded datapath: programs in the kernel, maps pinned.
#[derive(Debug)]
pub struct Datapath {
    pub(crate) ebpf: Ebpf,
    pin_dir: PathBuf,
    report: LayoutReport,
    /// The tracked-flow map of the programs this load replaces, when its
    /// layout changed: copied into the new one by [`Datapath::attach`].
    pub(crate) previous_ct: Option<layout::PreviousCt>,
}

impl Datapath {
    /// Loads the programs, reusing (or migrating) the maps pinned under
    /// `opts.pin_dir`, and writes the configuration. Attaching is separate
    /// ([`Datapath::attach`]).
    pub fn load(opts: &LoadOptions) -> Result<Self, DatapathError> {
        let pin_dir = &opts.pin_dir;
        std::fs::create_dir_all(pin_dir).map_err(DatapathError::io("mkdir", pin_dir))?;
        check_bpffs(pin_dir)?;

        let mut obj = aya_obj::Object::parse(OBJECT)?;
        let mut loader = EbpfLoader::new();
        // The programs read packets and maps only: no CO-RE relocation needs
        // the kernel's BTF, and parsing vmlinux's (~5 MiB) would cost the
        // agent's heap tens of MiB it never gives back.
        loader.btf(None);
        loader.default_map_pin_directory(pin_dir);
        if let Some(n) = opts.auth_capacity {
            if n == 0 {
                return Err(DatapathError::Invalid {
                    what: "auth map capacity",
                    value: n.to_string(),
                });
            }
            if let Some(def) = obj.maps.get_mut(names::AUTH) {
                def.set_max_entries(n);
            }
            loader.map_max_entries(names::AUTH, n);
        }
        if let Some(n) = opts.ipcache_capacity {
            if n == 0 {
                return Err(DatapathError::Invalid {
                    what: "ipcache capacity",
                    value: n.to_string(),
                });
            }
            if let Some(def) = obj.maps.get_mut(names::IPCACHE) {
                def.set_max_entries(n);
            }
            loader.map_max_entries(names::IPCACHE, n);
        }
        let prepared = layout::prepare(pin_dir, &obj)?;
        let mut ebpf = match loader.load(OBJECT) {
            Ok(ebpf) => ebpf,
            Err(e) => {
                prepared.restore();
                return Err(e.into());
            }
        };
        let (report, previous_ct) = prepared.finish(&mut ebpf)?;
        for (name, fate) in &report.maps {
            tracing::debug!(map = %name, ?fate, "datapath map");
        }
        ConfigMap::open(pin_dir)?.set(&opts.config)?;

        for name in [INGRESS_PROGRAM, EGRESS_PROGRAM] {
            program_mut(&mut ebpf, name)?
                .load()
                .map_err(DatapathError::program(name))?;
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.clone(),
            report,
            previous_ct,
        })
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// What loading did to each pinned map.
    pub fn layout_report(&self) -> &LayoutReport {
        &self.report
    }

    /// Runs one direction's program on a packet with `BPF_PROG_TEST_RUN`.
    /// `frame` starts with an Ethernet header (the kernel strips it for
    /// cgroup_skb programs and takes the protocol from its EtherType).
    pub fn test_run(
        &self,
        direction: Direction,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunResult, DatapathError> {
        let name = program_name(direction);
        let prog: &CgroupSkb = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::Missing {
                kind: "program",
                name,
            })?
            .try_into()
            .map_err(DatapathError::program(name))?;
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })
        .map_err(DatapathError::program(name))
    }
}

/// The program for a direction.
pub(crate) fn program_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => INGRESS_PROGRAM,
        Direction::Egress => EGRESS_PROGRAM,
    }
}

pub(crate) fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSkb, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(DatapathError::program(name))
}

fn check_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let st = rustix::fs::statfs(dir).map_err(|e| DatapathError::Io {
        call: "statfs",
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    if st.f_type as u64 != BPF_FS_MAGIC {
        return Err(DatapathError::NotBpffs {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}
