//! The deployment files: every Kubernetes manifest of `deploy/k8s/` passes
//! `kubernetes-validate --strict` for the two newest Kubernetes versions it
//! ships; `ablate db migrate --register-token` (the migration Job) registers
//! and rotates tokens whose secrets the operator made.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::Stack;

/// `kubernetes-validate`: $ABLATE_K8S_VALIDATE, as `cargo xtask test` installs it.
fn kubernetes_validate() -> String {
    let bin = std::env::var("ABLATE_K8S_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    let found = Command::new(&bin).arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|o| o.status.success()),
        "{bin} is missing: `cargo xtask test` installs kubernetes-validate from PyPI and sets ABLATE_K8S_VALIDATE"
    );
    bin
}

#[test]
fn every_kubernetes_manifest_is_valid_for_the_two_newest_versions() {
    let bin = kubernetes_validate();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let text: String = files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    for kind in [
        "kind: Deployment",
        "kind: Service",
        "kind: Job",
        "kind: Secret",
        "kind: ConfigMap",
    ] {
        assert!(text.contains(kind), "no `{kind}` in deploy/k8s");
    }
    for needed in [
        "replicas: 2",
        "nvidia.com/gpu",
        "readinessProbe",
        "livenessProbe",
        "/readyz",
        "/healthz",
    ] {
        assert!(text.contains(needed), "deploy/k8s lacks {needed}");
    }
    // The versions it ships schemas for, asked of its own Python.
    let python = Path::new(&bin).with_file_name("python");
    let listed = Command::new(&python)
        .args([
            "-c",
            "import kubernetes_validate.utils as u; print(' '.join(u.all_versions()))",
        ])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", harness::text(&listed));
    let mut versions: Vec<(u32, u32, String)> = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .filter_map(|v| {
            let mut parts = v.split('.');
            let (_, minor, patch) = (parts.next()?, parts.next()?, parts.next()?);
            Some((minor.parse().ok()?, patch.parse().ok()?, v.to_string()))
        })
        .collect();
    versions.sort();
    versions.dedup();
    assert!(versions.len() >= 2, "{versions:?}");
    let documents = text.lines().filter(|l| l.starts_with("kind: ")).count();
    for (_, _, version) in versions.iter().rev().take(2) {
        let out = Command::new(&bin)
            .args(["--strict", "-k", version])
            .args(&files)
            .output()
            .unwrap();
        let said = harness::text(&out);
        assert!(out.status.success(), "Kubernetes {version}:\n{said}");
        // An unknown kind or a removed apiVersion only warns: that fails here too.
        assert!(
            !said.contains("WARN") && !said.contains("ERROR"),
            "Kubernetes {version}:\n{said}"
        );
        let passed = said.lines().filter(|l| l.contains(" passed for resource ")).count();
        assert_eq!(passed, documents, "every document validated against {version}:\n{said}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn db_migrate_registers_and_rotates_tokens_the_operator_made() {
    let stack = Stack::start(15.0).await;
    let migrate = |args: &[&str]| {
        Command::new(harness::bin("ablate"))
            .args(["db", "migrate", "--database-url", &stack.db_url])
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let secret = |name: &str, text: &str| {
        let path = stack.dir.join(name);
        std::fs::write(&path, format!("{text}\n")).unwrap();
        path.to_string_lossy().to_string()
    };
    let first = "a".repeat(40);
    let out = migrate(&[
        "--register-token",
        &format!("researcher:alice:{}", secret("alice-1", &first)),
    ]);
    assert!(out.status.success(), "{}", harness::text(&out));
    assert!(
        harness::stderr(&out).contains("researcher token `alice`: registered"),
        "{}",
        harness::text(&out)
    );
    let as_alice = |token: &str| {
        Command::new(harness::bin("ablate"))
            .arg("workers")
            .env("ABLATE_COORDINATOR", stack.addr())
            .env("ABLATE_TOKEN", token)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    // The coordinator reads the valid tokens again every second.
    let until = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    until("alice's token works", &|| as_alice(&first).status.success());
    let again = migrate(&[
        "--register-token",
        &format!("researcher:alice:{}", secret("alice-1b", &first)),
    ]);
    assert!(
        harness::stderr(&again).contains("already registered"),
        "{}",
        harness::text(&again)
    );

    // A rotated Secret: the name's new token works, its old one no longer does.
    let second = "b".repeat(40);
    let out = migrate(&[
        "--register-token",
        &format!("researcher:alice:{}", secret("alice-2", &second)),
    ]);
    assert!(harness::stderr(&out).contains("replaced"), "{}", harness::text(&out));
    until("the rotated token works", &|| as_alice(&second).status.success());
    until("the old token is refused", &|| !as_alice(&first).status.success());

    // Bad input says what to fix and changes nothing.
    for (arg, says) in [
        (format!("researcher:bob:{}", secret("short", "abc")), "32 or more"),
        (
            format!("owner:bob:{}", secret("bob", &"c".repeat(40))),
            "researcher, worker or admin",
        ),
        ("worker:bob".to_string(), "ROLE:NAME:FILE"),
        (
            format!("worker:bob:{}", stack.dir.join("missing").display()),
            "cannot read",
        ),
        (
            format!("worker:bob:{}", secret("same", &second)),
            "registered already, as `alice`",
        ),
    ] {
        let out = migrate(&["--register-token", &arg]);
        assert!(!out.status.success(), "{arg}");
        assert!(harness::text(&out).contains(says), "{arg}: {}", harness::text(&out));
    }
    let bobs = stack.scalar_i64("select count(*) from tokens where name = 'bob'").await;
    assert_eq!(bobs, 0);
}
