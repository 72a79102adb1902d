//! Section 4: the binaries' sizes, read from their ELF headers: the file,
//! what the loader maps (PT_LOAD file bytes) and of that the executable
//! code. `meshauth-agent` beside `meshauth` (the agent plus CLI, demo, lab,
//! spire-dev and rcgen: what every agent ran before the split), and beside
//! the pre-split binary given as `OLD_MESHAUTH_BIN`, if any.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub path: PathBuf,
    pub file: u64,
    pub loaded: u64,
    pub code: u64,
}

/// PT_LOAD file bytes in all and in executable segments, of a 64-bit
/// little-endian ELF file.
fn segments(bytes: &[u8]) -> anyhow::Result<(u64, u64)> {
    anyhow::ensure!(
        bytes.len() >= 64 && bytes[..4] == *b"\x7fELF" && bytes[4] == 2 && bytes[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    anyhow::ensure!(
        phentsize >= 56 && phoff + phentsize * phnum <= bytes.len(),
        "program headers out of bounds"
    );
    let (mut loaded, mut code) = (0, 0);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        const PT_LOAD: u32 = 1;
        const PF_X: u32 = 1;
        if u32_at(ph) == PT_LOAD {
            let filesz = u64_at(ph + 0x20);
            loaded += filesz;
            if u32_at(ph + 4) & PF_X != 0 {
                code += filesz;
            }
        }
    }
    Ok((loaded, code))
}

fn measure(name: &str, path: &Path) -> anyhow::Result<Row> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (loaded, code) = segments(&bytes).with_context(|| path.display().to_string())?;
    Ok(Row {
        name: name.into(),
        path: path.into(),
        file: bytes.len() as u64,
        loaded,
        code,
    })
}

pub fn run() -> anyhow::Result<Vec<Row>> {
    let mut rows = vec![
        measure("meshauth-agent", &super::rss::agent_bin()?)?,
        measure(
            "meshauth (CLI + demo + lab + agent)",
            Path::new(env!("CARGO_BIN_EXE_meshauth")),
        )?,
    ];
    if let Some(old) = std::env::var_os("OLD_MESHAUTH_BIN") {
        rows.push(measure("meshauth before the split", Path::new(&old))?);
    }
    Ok(rows)
}

pub fn print(rows: &[Row]) {
    println!("\n### 4. Binary size (MiB; release profile, debug = 1)\n");
    println!("| binary | file | mapped (PT_LOAD) | of it code | path |");
    println!("| --- | ---: | ---: | ---: | --- |");
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for r in rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {} |",
            r.name,
            mib(r.file),
            mib(r.loaded),
            mib(r.code),
            r.path.display()
        );
    }
}
