//! Layered settings: command-line flags over environment variables over a
//! YAML file over defaults. This module knows no setting of the agent: a
//! [`Key`] names a setting's flag, environment variable and file key, a
//! [`Resolver`] finds the winning raw value with its source and collects
//! every invalid value, so that all are reported at once, each naming where
//! it came from (`--connect-timeout`, `MESHAUTH_MODE`, `/etc/meshauth.yaml:
//! mode`).
//!
//! Not `figment`: it extracts through serde, which stops at the first value
//! of the wrong type, validation (ranges, paths) would come after extraction
//! and see no sources, and it has no provider naming a value's flag. Values
//! stay raw strings here until the caller's validator reads them, so every
//! bad value of every layer is found in one pass, with its source.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One setting: its flag (without `--`), its environment variable and its
/// key in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The flag, without `--` (`connect-timeout`).
    pub flag: &'static str,
    /// The environment variable (`MESHAUTH_CONNECT_TIMEOUT`).
    pub env: &'static str,
    /// The key in the file (`connectTimeout`).
    pub file: &'static str,
}

impl Key {
    /// A setting set by `--flag`, `env` and the file's `file` key.
    pub const fn new(flag: &'static str, env: &'static str, file: &'static str) -> Self {
        Self { flag, env, file }
    }
}

/// One invalid value: where it came from, what it was, what would be right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// `--flag`, `ENV_VAR` or `file: key`.
    pub source: String,
    /// The value given.
    pub value: String,
    /// What is wrong and what would be right.
    pub reason: String,
}

/// Every invalid value found, all at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} invalid configuration value(s):\n{}", .0.len(), .0.iter().map(|i| format!("  {} = {:?}: {}", i.source, i.value, i.reason)).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<Invalid>);

/// The file layer: the YAML file's values as raw strings, with its path for
/// messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct File {
    path: PathBuf,
    values: BTreeMap<String, String>,
}

impl File {
    /// Reads `path`: a YAML mapping whose values are scalars or lists of
    /// scalars (a list is read as its items joined with `,`, null as not
    /// set). Refuses an unreadable file, YAML that is not such a mapping, and
    /// keys not in `known`, every one at once.
    pub fn read(path: &Path, known: &[&str]) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![Invalid {
                source: path.display().to_string(),
                value: String::new(),
                reason: format!("cannot read: {e}"),
            }])
        })?;
        Self::parse(path, &text, known)
    }

    /// [`File::read`] of `text`, as if read from `path`.
    pub fn parse(path: &Path, text: &str, known: &[&str]) -> Result<Self, ConfigErrors> {
        let whole = |reason: String| {
            ConfigErrors(vec![Invalid {
                source: path.display().to_string(),
                value: String::new(),
                reason,
            }])
        };
        let mapping = match serde_norway::from_str::<serde_norway::Value>(text) {
            Ok(serde_norway::Value::Mapping(m)) => m,
            Ok(serde_norway::Value::Null) => serde_norway::Mapping::new(),
            Ok(_) => return Err(whole("not a mapping of keys to values".into())),
            Err(e) => return Err(whole(format!("not YAML: {e}"))),
        };
        let mut values = BTreeMap::new();
        let mut errors = Vec::new();
        for (k, v) in mapping {
            let Some(k) = k.as_str().map(str::to_owned) else {
                errors.push(Invalid {
                    source: path.display().to_string(),
                    value: scalar(&k).unwrap_or_default(),
                    reason: "a key is a string".into(),
                });
                continue;
            };
            let source = format!("{}: {k}", path.display());
            if !known.contains(&k.as_str()) {
                let mut reason = "unknown key".to_owned();
                if let Some(close) = closest(&k, known) {
                    let _ = write!(reason, "; did you mean {close}?");
                }
                let _ = write!(reason, " (known: {})", known.join(", "));
                errors.push(Invalid {
                    source,
                    value: raw(&v).unwrap_or_default(),
                    reason,
                });
                continue;
            }
            match v {
                serde_norway::Value::Null => {}
                v => match raw(&v) {
                    Some(text) => {
                        values.insert(k, text);
                    }
                    None => errors.push(Invalid {
                        source,
                        value: String::new(),
                        reason: "a single value or a list of values".into(),
                    }),
                },
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Self {
            path: path.to_owned(),
            values,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A scalar as text.
fn scalar(v: &serde_norway::Value) -> Option<String> {
    match v {
        serde_norway::Value::Bool(b) => Some(b.to_string()),
        serde_norway::Value::Number(n) => Some(n.to_string()),
        serde_norway::Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// A scalar, or a list of scalars joined with `,`, as text.
fn raw(v: &serde_norway::Value) -> Option<String> {
    match v {
        serde_norway::Value::Sequence(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        v => scalar(v),
    }
}

/// The known key closest to `key` (a typo, a different case), if any is
/// close.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let key = key.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&key, &k.to_ascii_lowercase()), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

/// Levenshtein distance, with a transposition counted as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

/// The inputs, in the order that wins: flags, environment, file.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// Flag name (without `--`) → value, in command-line order (the last
    /// of a repeated flag wins).
    pub flags: Vec<(&'static str, String)>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// The file, if one was given.
    pub file: Option<File>,
}

/// A raw value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// `--flag`, `ENV_VAR` or `file: key`.
    pub source: String,
    /// The value as given.
    pub text: String,
}

impl Layers {
    /// The winning raw value of `key`, if any layer sets it.
    pub fn get(&self, key: &Key) -> Option<Value> {
        if let Some((_, v)) = self.flags.iter().rev().find(|(f, _)| *f == key.flag) {
            return Some(Value {
                source: format!("--{}", key.flag),
                text: v.clone(),
            });
        }
        if let Some((_, v)) = self.env.iter().find(|(k, _)| k == key.env) {
            return Some(Value {
                source: key.env.to_owned(),
                text: v.clone(),
            });
        }
        let file = self.file.as_ref()?;
        file.values.get(key.file).map(|v| Value {
            source: format!("{}: {}", file.path.display(), key.file),
            text: v.clone(),
        })
    }
}

/// Reads settings from [`Layers`] and keeps every invalid value found, in
/// the order found.
#[derive(Debug)]
pub struct Resolver<'a> {
    layers: &'a Layers,
    errors: Vec<Invalid>,
}

impl<'a> Resolver<'a> {
    /// A resolver over `layers`, with no invalid value yet.
    pub fn new(layers: &'a Layers) -> Self {
        Self {
            layers,
            errors: Vec::new(),
        }
    }

    /// The winning raw value of `key`, if any layer sets it.
    pub fn raw(&self, key: &Key) -> Option<Value> {
        self.layers.get(key)
    }

    /// The value of `key` read by `parse`; `default` when no layer sets it,
    /// or when `parse` refuses it (its reason is kept with the value and its
    /// source).
    pub fn get<T>(
        &mut self,
        key: &Key,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        let Some(v) = self.raw(key) else {
            return default;
        };
        match parse(&v.text) {
            Ok(t) => t,
            Err(reason) => {
                self.invalid(&v, reason);
                default
            }
        }
    }

    /// Keeps `value` as invalid for `reason`.
    pub fn invalid(&mut self, value: &Value, reason: impl Into<String>) {
        self.errors.push(Invalid {
            source: value.source.clone(),
            value: value.text.clone(),
            reason: reason.into(),
        });
    }

    /// Keeps an invalid value of `source` (e.g. a required setting no layer
    /// sets: its flag and an empty value).
    pub fn invalid_at(&mut self, source: &str, value: &str, reason: impl Into<String>) {
        self.errors.push(Invalid {
            source: source.to_owned(),
            value: value.to_owned(),
            reason: reason.into(),
        });
    }

    /// `Ok(())` if every value read was valid, else all the invalid ones.
    pub fn finish(self) -> Result<(), ConfigErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(self.errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Key = Key::new("a-b", "X_A_B", "aB");
    const N: Key = Key::new("n", "X_N", "n");

    fn file(text: &str) -> File {
        File::parse(Path::new("/etc/x.yaml"), text, &["aB", "n", "list"]).unwrap()
    }

    #[test]
    fn flags_beat_environment_beat_file_and_each_names_its_source() {
        let mut layers = Layers {
            flags: vec![("a-b", "1".into()), ("a-b", "2".into())],
            env: vec![("X_A_B".into(), "env".into())],
            file: Some(file("aB: file\n")),
        };
        let got = |l: &Layers| l.get(&A).map(|v| (v.source, v.text));
        assert_eq!(got(&layers), Some(("--a-b".into(), "2".into())));
        layers.flags.clear();
        assert_eq!(got(&layers), Some(("X_A_B".into(), "env".into())));
        layers.env.clear();
        assert_eq!(
            got(&layers),
            Some(("/etc/x.yaml: aB".into(), "file".into()))
        );
        layers.file = None;
        assert_eq!(got(&layers), None);
    }

    #[test]
    fn file_values_are_raw_text_lists_joined_and_null_unset() {
        let f = file("aB: 2.5\nn: true\nlist: [a, b]\n");
        assert_eq!(f.values["aB"], "2.5");
        assert_eq!(f.values["n"], "true");
        assert_eq!(f.values["list"], "a,b");
        assert!(!file("aB: ~\n").values.contains_key("aB"));
        assert!(file("").values.is_empty());
    }

    #[test]
    fn every_bad_file_key_is_reported_at_once() {
        let e = File::parse(
            Path::new("/etc/x.yaml"),
            "ab: 1\nzzz: 2\nn: {a: 1}\n",
            &["aB", "n"],
        )
        .unwrap_err();
        let got: Vec<(&str, &str)> =
            e.0.iter()
                .map(|i| (i.source.as_str(), i.reason.as_str()))
                .collect();
        assert_eq!(got.len(), 3, "{e}");
        assert_eq!(got[0].0, "/etc/x.yaml: ab");
        assert!(got[0].1.contains("did you mean aB?"), "{e}");
        assert_eq!(got[1].0, "/etc/x.yaml: zzz");
        assert!(!got[1].1.contains("did you mean"), "{e}");
        assert!(got[1].1.contains("known: aB, n"), "{e}");
        assert_eq!(
            got[2],
            ("/etc/x.yaml: n", "a single value or a list of values")
        );
        for bad in ["- a\n- b\n", ": : :\n"] {
            assert!(File::parse(Path::new("/x"), bad, &[]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_resolver_keeps_every_invalid_value_in_order() {
        let layers = Layers {
            flags: vec![("n", "x".into())],
            env: vec![("X_A_B".into(), "y".into())],
            file: None,
        };
        let mut r = Resolver::new(&layers);
        let parse = |v: &str| v.parse::<u32>().map_err(|_| "a number".to_owned());
        assert_eq!(r.get(&N, 7, parse), 7);
        assert_eq!(r.get(&A, 8, parse), 8);
        assert_eq!(r.get(&Key::new("c", "X_C", "c"), 9, parse), 9);
        r.invalid_at("--d", "", "required");
        let e = r.finish().unwrap_err();
        let sources: Vec<&str> = e.0.iter().map(|i| i.source.as_str()).collect();
        assert_eq!(sources, ["--n", "X_A_B", "--d"]);
        assert!(
            e.to_string()
                .starts_with("3 invalid configuration value(s):\n  --n = \"x\": a number\n"),
            "{e}"
        );
        assert!(Resolver::new(&layers).finish().is_ok());
    }
}
