#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed step is a failed test"
)]
//! The threat model must not drift from the code (threat-model/README.md). The first test
//! parses `threat-model/threats.md` and fails when a row names a test or a `file::function`
//! that does not exist, when a row has no test and is not `accepted` with a reason, when a
//! `mitigated` row has no test, when a `tm_*` test is named by no row, or when frameworks.md
//! names a row that does not exist. The other tests are
//! the `tm_*` tests of rows no earlier test covered.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether `text` defines a function called `name`.
fn defines(text: &str, name: &str) -> bool {
    text.match_indices(&format!("fn {name}")).any(|(at, m)| {
        let next = text[at + m.len()..].chars().next();
        matches!(next, Some('(' | '<'))
    })
}

/// Each workspace member's package name and directory.
fn packages() -> BTreeMap<String, PathBuf> {
    let manifest = read(&root().join("Cargo.toml"));
    let members = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("workspace members");
    members
        .split('"')
        .skip(1)
        .step_by(2)
        .map(|dir| {
            let path = root().join(dir);
            let text = read(&path.join("Cargo.toml"));
            let name = text
                .lines()
                .find_map(|l| {
                    let l = l.trim();
                    l.strip_prefix("name = \"")
                        .and_then(|r| r.strip_suffix('"'))
                })
                .expect("package name");
            (name.to_owned(), path)
        })
        .collect()
}

/// One row of the table.
#[derive(Debug)]
struct Row {
    id: String,
    evidence: Vec<String>,
    tests: Vec<String>,
    status: String,
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn rows() -> Vec<Row> {
    let text = read(&root().join("threat-model/threats.md"));
    let rows: Vec<Row> = text
        .lines()
        .filter(|l| l.starts_with("| T"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            assert_eq!(cells.len(), 8, "a row needs eight columns: {l}");
            Row {
                id: cells[0].to_owned(),
                evidence: backticked(cells[5]),
                tests: backticked(cells[6]),
                status: cells[7].to_owned(),
            }
        })
        .collect();
    assert!(rows.len() >= 30, "the table lost rows: {}", rows.len());
    rows
}

/// Where a test as `cargo nextest list` names it is defined, if it is: `package::binary
/// name` (an integration test in `tests/binary.rs`) or `package module::path::name` (a unit
/// test in `src/module/path.rs` or `src/module/path/mod.rs`).
fn test_exists(packages: &BTreeMap<String, PathBuf>, test: &str) -> Result<(), String> {
    let (binary, path) = test
        .split_once(' ')
        .ok_or_else(|| format!("`{test}`: expected `package::binary name` or `package path`"))?;
    let name = path.rsplit("::").next().unwrap_or(path);
    let files: Vec<PathBuf> = match binary.split_once("::") {
        Some((package, bin)) => {
            let dir = packages
                .get(package)
                .ok_or_else(|| format!("`{test}`: no package {package}"))?;
            vec![dir.join("tests").join(format!("{bin}.rs"))]
        }
        None => {
            let dir = packages
                .get(binary)
                .ok_or_else(|| format!("`{test}`: no package {binary}"))?;
            let module: Vec<&str> = path
                .split("::")
                .filter(|s| *s != "tests")
                .collect::<Vec<_>>()
                .split_last()
                .map(|(_, m)| m.to_vec())
                .unwrap_or_default();
            // The module's own file, or a parent's that holds it inline.
            let mut files = vec![dir.join("src/lib.rs")];
            for depth in 1..=module.len() {
                let base = dir.join("src").join(module[..depth].join("/"));
                files.push(base.with_extension("rs"));
                files.push(base.join("mod.rs"));
            }
            files
        }
    };
    let found = files
        .iter()
        .filter(|f| f.is_file())
        .any(|f| defines(&read(f), name));
    if found {
        Ok(())
    } else {
        Err(format!("`{test}`: no fn {name} in {files:?}"))
    }
}

fn evidence_exists(reference: &str) -> Result<(), String> {
    let (file, function) = match reference.split_once("::") {
        Some((f, func)) => (f, Some(func)),
        None => (reference, None),
    };
    let path = root().join(file);
    if !path.is_file() {
        return Err(format!("`{reference}`: no file {file}"));
    }
    match function {
        Some(f) if !defines(&read(&path), f) => Err(format!("`{reference}`: no fn {f} in {file}")),
        _ => Ok(()),
    }
}

/// Every `fn tm_...` test in the workspace's Rust files, by name.
fn tm_tests() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() && !name.starts_with('.') && name != "target" {
                walk(&path, out);
            } else if name.ends_with(".rs") {
                let text = read(&path);
                // `fn tm_t<digits>_...`: a threat's test.
                for (at, _) in text.match_indices("fn tm_t") {
                    let rest = &text[at + 3..];
                    if !rest[4..].starts_with(|c: char| c.is_ascii_digit()) {
                        continue;
                    }
                    let end = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    out.insert(rest[..end].to_owned());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&root(), &mut out);
    out
}

#[test]
fn the_threat_model_names_only_real_tests_and_code() {
    let packages = packages();
    let rows = rows();
    let mut problems = Vec::new();
    let mut ids = BTreeSet::new();
    let mut named = BTreeSet::new();
    for row in &rows {
        if !ids.insert(row.id.clone()) {
            problems.push(format!("{}: the id is used twice", row.id));
        }
        for e in &row.evidence {
            if let Err(p) = evidence_exists(e) {
                problems.push(format!("{}: evidence {p}", row.id));
            }
        }
        for t in &row.tests {
            if let Err(p) = test_exists(&packages, t) {
                problems.push(format!("{}: test {p}", row.id));
            }
            let name = t.rsplit([' ', ':']).next().unwrap_or(t);
            if let Some(rest) = name.strip_prefix("tm_") {
                let own = format!("{}_", row.id.to_lowercase());
                if !rest.starts_with(&own) {
                    problems.push(format!("{}: {name} is named for another row", row.id));
                }
                named.insert(name.to_owned());
            }
        }
        let reason = |prefix: &str| {
            row.status
                .strip_prefix(prefix)
                .is_some_and(|r| r.trim().len() > 10)
        };
        let ok = match row.status.as_str() {
            "mitigated" => !row.tests.is_empty(),
            s if s.starts_with("accepted:") => reason("accepted:"),
            s if s.starts_with("open:") => reason("open:") && !row.tests.is_empty(),
            _ => false,
        };
        if !ok {
            problems.push(format!(
                "{}: status {:?} needs a test (mitigated, open: reason) or a reason (accepted: reason)",
                row.id, row.status
            ));
        }
    }
    // frameworks.md names rows only by ids the table has (OWASP's own T-numbers aside).
    let frameworks = read(&root().join("threat-model/frameworks.md")).replace("OWASP T", "OWASP ");
    for token in frameworks.split(|c: char| !c.is_ascii_alphanumeric()) {
        let is_row = token.len() == 3
            && token.starts_with('T')
            && token[1..].chars().all(|c| c.is_ascii_digit());
        if is_row && !ids.contains(token) {
            problems.push(format!(
                "frameworks.md names {token}, which threats.md does not have"
            ));
        }
    }
    for tm in tm_tests() {
        if !named.contains(&tm) {
            problems.push(format!("{tm} is named by no row of threats.md"));
        }
    }
    assert!(
        problems.is_empty(),
        "threat-model/threats.md:\n{}",
        problems.join("\n")
    );
}

/// The checker itself: a missing test, a missing function and a bare status are found.
#[test]
fn the_check_refuses_what_does_not_exist() {
    let packages = packages();
    assert!(test_exists(&packages, "kms-tests::governance authorisation_matrix").is_ok());
    assert!(test_exists(&packages, "kms-core blob::tests::round_trip").is_ok());
    assert!(test_exists(&packages, "kms-core::conformance hsm::data_key_round_trip").is_ok());
    assert!(test_exists(&packages, "kms-tests::governance no_such_test").is_err());
    assert!(test_exists(&packages, "kms-core blob::tests::no_such_test").is_err());
    assert!(test_exists(&packages, "nope::x y").is_err());
    assert!(evidence_exists("kms-core/src/blob.rs::parse").is_ok());
    assert!(evidence_exists("kms-core/src/blob.rs::pars").is_err());
    assert!(evidence_exists("kms-core/src/nothing.rs::parse").is_err());
}

/// T04: no admin-plane message has a field that could carry key material, plaintext or a
/// secret. A field added under any of these names fails here and needs a threat-model
/// review.
#[test]
fn tm_t04_no_admin_message_carries_key_material() {
    let proto = read(&root().join("api/proto/kms/v1/admin.proto"));
    let forbidden = [
        "plaintext",
        "dek",
        "data_key",
        "key_material",
        "material",
        "kek",
        "share",
        "secret",
        "pin",
        "private",
        "wrapped",
        "sealed_key",
    ];
    let mut fields = 0;
    for line in proto.lines().map(str::trim) {
        // A field: `[repeated] TYPE name = N;`
        let Some((decl, _)) = line.split_once(" = ") else {
            continue;
        };
        if line.starts_with("//") || !line.ends_with(';') {
            continue;
        }
        let Some(name) = decl.split_whitespace().last() else {
            continue;
        };
        if decl.split_whitespace().count() < 2 {
            continue; // an enum value
        }
        fields += 1;
        let words: Vec<&str> = name.split('_').collect();
        for f in forbidden {
            let parts: Vec<&str> = f.split('_').collect();
            let hit = words.windows(parts.len()).any(|w| w == parts.as_slice());
            assert!(
                !hit,
                "admin.proto field `{name}` looks like key material ({f})"
            );
        }
    }
    assert!(fields > 100, "the parser found only {fields} fields");
}

/// T31: every landing runs `cargo deny` (scripts/supply-chain.sh from .ci/run) with a policy
/// that allows only crates.io, checks licences and duplicates; `deny.toml` is that policy.
#[test]
fn tm_t31_every_landing_runs_cargo_deny() {
    let runs = |text: &str, what: &str| {
        text.lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains(what))
    };
    let ci = read(&root().join(".ci/run"));
    assert!(
        runs(&ci, "scripts/supply-chain.sh"),
        ".ci/run does not run the supply-chain check"
    );
    let check = read(&root().join("scripts/supply-chain.sh"));
    assert!(
        runs(&check, "cargo deny check bans licenses sources"),
        "the supply-chain check does not run cargo deny's licence, source and duplicate checks"
    );
    assert!(runs(&check, "cargo deny check advisories"));
    // Without a route to the RustSec database, the offline copy is checked, never skipped.
    assert!(runs(&check, "cargo deny --offline check advisories"));
    assert!(runs(&check, "advisory-db.tar.gz"));
    let deny = read(&root().join("deny.toml"));
    for section in ["[licenses]", "[sources]", "[bans]", "[advisories]"] {
        assert!(deny.contains(section), "deny.toml has no {section}");
    }
    assert!(deny.contains("unknown-registry = \"deny\""));
    assert!(deny.contains("unknown-git = \"deny\""));
    let install = read(&root().join("scripts/install-deps.sh"));
    assert!(
        install.contains("cargo-deny"),
        "install-deps.sh does not install cargo-deny"
    );
}
