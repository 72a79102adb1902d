//! Per-policy status: accepted, partially enforced or rejected, with the
//! reasons — what `meshauth policy status` prints.

use std::fmt::Write;

use serde::Serialize;

use crate::compile::{CompiledPolicy, Problem};
use crate::model::ObjectKey;

/// Errors rendering status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// JSON encoding failed.
    #[error("encoding policy status as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// What meshauth made of a policy.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Everything meshauth is responsible for is enforced (possibly nothing:
    /// a policy without `authentication.mode: required`).
    Accepted,
    /// Some of it is enforced; the notes or errors say what is not.
    PartiallyEnforced,
    /// Nothing of it is enforced because of errors.
    Rejected,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Accepted => "accepted",
            Self::PartiallyEnforced => "partially enforced",
            Self::Rejected => "rejected",
        })
    }
}

/// What a policy's compiled rules cover in the cluster as it is now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// Compiled rules requiring authentication (one per subject × peer ×
    /// direction; a rule entry with two `fromEndpoints` compiles to two).
    pub compiled_rules: usize,
    /// Running pods with an address on either end of a covered pair.
    pub pods: usize,
    /// (local identity, remote identity or "any cluster identity") pairs the
    /// rules require authentication for.
    pub pairs: usize,
    /// Auth rules the policy puts in the datapath (pairs × ports).
    pub datapath_rules: usize,
}

/// The status of one policy object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyStatus {
    /// Kind.
    pub kind: String,
    /// Namespace (namespaced kinds).
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Rule entries with `authentication.mode: required` that compiled (as
    /// written: one entry may compile to several rules).
    pub required_rules: usize,
    /// What those rules cover in the cluster as it is now.
    pub coverage: Coverage,
    /// Errors (rejected rules, invalid fields), each with its field path.
    pub errors: Vec<Problem>,
    /// Accepted parts meshauth does not enforce.
    pub notes: Vec<Problem>,
}

impl PolicyStatus {
    /// Status of a compiled policy; `invalid` is a parse error of a newer
    /// version of it (the compiled one stays in force).
    pub fn of(c: Option<&CompiledPolicy>, key: &ObjectKey, invalid: Option<&str>) -> Self {
        let mut errors = c.map(|c| c.errors.clone()).unwrap_or_default();
        let notes = c.map(|c| c.notes.clone()).unwrap_or_default();
        let required_rules = c.map_or(0, |c| c.required_rules);
        if let Some(msg) = invalid {
            let tail = if c.is_some() {
                "; the previous version stays in force"
            } else {
                ""
            };
            errors.insert(
                0,
                Problem {
                    path: "(object)".into(),
                    message: format!("invalid: {msg}{tail}"),
                },
            );
        }
        let verdict = if c.is_none() || (!errors.is_empty() && required_rules == 0) {
            Verdict::Rejected
        } else if !errors.is_empty() || !notes.is_empty() {
            Verdict::PartiallyEnforced
        } else {
            Verdict::Accepted
        };
        Self {
            kind: key.kind.to_string(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            verdict,
            required_rules,
            coverage: Coverage {
                compiled_rules: c.map_or(0, |c| c.rules.len()),
                ..Coverage::default()
            },
            errors,
            notes,
        }
    }
}

/// A plain-text report, one block per policy.
pub fn render_text(statuses: &[PolicyStatus]) -> String {
    let mut out = String::new();
    for s in statuses {
        let name = match &s.namespace {
            Some(ns) => format!("{ns}/{}", s.name),
            None => s.name.clone(),
        };
        let _ = writeln!(out, "{} {name}: {} ({})", s.kind, s.verdict, enforcement(s));
        for e in &s.errors {
            let _ = writeln!(out, "  error: {e}");
        }
        for n in &s.notes {
            let _ = writeln!(out, "  not enforced: {n}");
        }
    }
    out
}

/// What a policy enforces, in words that do not overstate it: the compiled
/// rules and what they cover now, or plainly that nothing is enforced.
pub(crate) fn enforcement(s: &PolicyStatus) -> String {
    let c = &s.coverage;
    let rules = match c.compiled_rules {
        1 => "1 compiled rule requiring authentication".to_string(),
        n => format!("{n} compiled rules requiring authentication"),
    };
    if c.compiled_rules == 0 {
        if s.verdict == Verdict::Rejected {
            "nothing enforced".into()
        } else {
            "no rule requires authentication: nothing for meshauth to enforce".into()
        }
    } else if c.pairs == 0 {
        format!("{rules}; selects no pod: nothing enforced")
    } else {
        format!(
            "{rules}, enforced for {} running pod(s) in {} identity pair(s), {} datapath rule(s)",
            c.pods, c.pairs, c.datapath_rules
        )
    }
}

/// The report as JSON (for `-o json`).
pub fn render_json(statuses: &[PolicyStatus]) -> Result<String, StatusError> {
    Ok(serde_json::to_string_pretty(statuses)?)
}
