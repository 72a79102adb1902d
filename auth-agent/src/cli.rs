//! CLI subcommands that work without a running agent.

use std::path::Path;

use policy_bridge::Verdict;
use policy_bridge::source::files::{FilesConfig, FilesSource};
use policy_bridge::status::{render_json, render_text};

/// `meshauth policy status --dir DIR`: what meshauth makes of every policy
/// in a manifest directory (the same compiler the agent runs), as text or
/// JSON. Returns the report and whether every policy was accepted or
/// partially enforced (none rejected, every file readable), so scripts and
/// CI can fail on a rejected policy.
pub fn policy_status(dir: &Path, json: bool) -> anyhow::Result<(String, bool)> {
    let mut source = FilesSource::new(FilesConfig::new(dir))?;
    source.sync()?;
    let statuses = source.engine().status();
    let load_errors = source.errors().to_vec();
    let clean = load_errors.is_empty() && statuses.iter().all(|s| s.verdict != Verdict::Rejected);
    let report = if json {
        let policies: serde_json::Value = serde_json::from_str(&render_json(&statuses)?)?;
        serde_json::to_string_pretty(&serde_json::json!({
            "policies": policies,
            "load_errors": load_errors,
        }))?
    } else {
        let mut out = render_text(&statuses);
        for e in &load_errors {
            out.push_str(&format!("load error: {e}\n"));
        }
        if statuses.is_empty() && load_errors.is_empty() {
            out.push_str(&format!("no policies in {}\n", dir.display()));
        }
        out
    };
    Ok((report, clean))
}
