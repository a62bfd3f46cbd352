//! Hugging Face repo ids resolve in a cache laid out as `huggingface_hub` lays it out: the same
//! answers as the real `huggingface_hub` gave on the same layout and environments
//! (tests/fixtures/make_hub_fixture.py, pinned; its output is tests/fixtures/hub/resolved.json).
//! Each run sets `HF_HUB_OFFLINE=1`: these read the cache; downloads are tests/hub_download.rs's.

mod common;

use std::path::Path;

use packsft::internals::hub::{cache_dir_from, snapshot_in, RepoId};

fn fixture() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub/resolved.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The cache the fixture script builds: two snapshots, `refs/main` and `refs/v1`.
fn build(cache: &Path, fx: &serde_json::Value) {
    let repo = cache.join("models--org--tiny-model");
    for commit in [
        fx["commit"].as_str().unwrap(),
        fx["tagged"].as_str().unwrap(),
    ] {
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::write(snap.join(f), commit).unwrap();
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), fx["commit"].as_str().unwrap()).unwrap();
    std::fs::write(repo.join("refs/v1"), fx["tagged"].as_str().unwrap()).unwrap();
}

#[test]
fn revisions_resolve_as_huggingface_hub_resolves_them() {
    let fx = fixture();
    let d = tempfile::tempdir().unwrap();
    build(d.path(), &fx);
    for (rev, want) in fx["files"].as_object().unwrap() {
        let id = if rev.contains('/') {
            RepoId::parse(rev).unwrap()
        } else {
            RepoId::parse(&format!("org/tiny-model@{rev}")).unwrap()
        };
        let got = snapshot_in(d.path(), &id)
            .ok()
            .map(|snap| snap.join("config.json"))
            .filter(|p| p.exists())
            .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string());
        assert_eq!(got.as_deref(), want.as_str(), "{rev}");
    }
    let e = snapshot_in(d.path(), &RepoId::parse("org/tiny-model@missing").unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not in the Hugging Face cache") && e.contains("huggingface-cli download"),
        "{e}"
    );
}

#[test]
fn the_cache_is_where_huggingface_hub_looks() {
    for case in fixture()["cache_dirs"].as_array().unwrap() {
        let env = case["env"].as_object().unwrap().clone();
        let got = cache_dir_from(|k| match k {
            "HOME" => Some("/c/user".into()),
            _ => env.get(k).map(|v| v.as_str().unwrap().into()),
        });
        assert_eq!(got, Path::new(case["cache"].as_str().unwrap()), "{case}");
    }
}

#[test]
fn a_recipe_reads_a_model_by_repo_id_from_the_cache() {
    // A tiny model "downloaded" into a cache: the quickstart's tokenizer beside a one-step model.
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    let (ok, stderr) = common::train_quickstart(&base, 1, &[]);
    assert!(ok, "{stderr}");
    let cache = d.path().join("hf/hub");
    let commit = "1111111111111111111111111111111111111111";
    let snap = cache.join("models--acme--letters/snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(base.join(f), snap.join(f)).unwrap();
    }
    std::fs::create_dir_all(cache.join("models--acme--letters/refs")).unwrap();
    std::fs::write(cache.join("models--acme--letters/refs/main"), commit).unwrap();
    let run = |model: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "eval",
                "recipes/quickstart.yaml",
                &format!("model.path={model}"),
                "model.config=null",
                "model.tokenizer=null",
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, by_id, stderr) = run("acme/letters");
    assert!(ok, "{stderr}");
    let (ok, by_path, stderr) = run(&base.display().to_string());
    assert!(ok, "{stderr}");
    assert_eq!(by_id.lines().last(), by_path.lines().last());
    // `arch` and `generate` take the id too.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, arch) = cli(&["arch", "acme/letters"]);
    assert!(ok && arch.contains("family          llama"), "{arch}");
    let (ok, text) = cli(&[
        "generate",
        "acme/letters",
        "--prompt",
        "Task: copy",
        "--max-new-tokens",
        "2",
    ]);
    assert!(ok && text.starts_with("Task: copy"), "{text}");
    let (ok, _, stderr) = run("acme/absent@main");
    assert!(
        !ok && stderr.contains(
            "model.path: acme/absent@main is no local file or directory, and as a Hub repo id: \
             acme/absent@main is not in the Hugging Face cache"
        ),
        "{stderr}"
    );
}

#[test]
fn dataset_files_resolve_as_huggingface_hub_resolves_them_and_a_recipe_reads_them() {
    let fx = fixture();
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("hub");
    let commit = fx["commit"].as_str().unwrap();
    let snap = cache
        .join("datasets--org--rows/snapshots")
        .join(commit)
        .join("data");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart/train.jsonl"),
        snap.join("train-00000-of-00001.jsonl"),
    )
    .unwrap();
    std::fs::create_dir_all(cache.join("datasets--org--rows/refs")).unwrap();
    std::fs::write(cache.join("datasets--org--rows/refs/main"), commit).unwrap();
    let got =
        packsft::internals::hub::dataset_snapshot_in(&cache, &RepoId::parse("org/rows").unwrap())
            .unwrap()
            .join("data/train-00000-of-00001.jsonl");
    assert_eq!(
        got.strip_prefix(&cache).unwrap().display().to_string(),
        fx["dataset_file"].as_str().unwrap()
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "inspect",
            "recipes/quickstart.yaml",
            "data.train=hf://datasets/org/rows/data/train-*.jsonl",
            "--n",
            "1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("4000 rows") && stdout.contains(commit),
        "{stdout}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "inspect",
            "recipes/quickstart.yaml",
            "data.train=hf://datasets/org/none/x.jsonl",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--repo-type dataset"),
        "{stderr}"
    );
}

/// A Hub dataset named without its files (`hf://datasets/org/name`) reads the recipe's split:
/// `train` by default, `data.split` to choose, a subset's folder with `data.subset`; a split
/// the dataset lacks is an error that lists the files there.
#[test]
fn a_dataset_without_its_files_reads_the_split_the_recipe_names() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = cache.join("datasets--org--splits/snapshots").join(commit);
    let q = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart");
    for (from, to) in [
        ("train.jsonl", "data/train-00000-of-00001.jsonl"),
        ("eval.jsonl", "data/test-00000-of-00001.jsonl"),
        ("eval.jsonl", "alt/train.jsonl"),
    ] {
        std::fs::create_dir_all(snap.join(to).parent().unwrap()).unwrap();
        std::fs::copy(q.join(from), snap.join(to)).unwrap();
    }
    std::fs::create_dir_all(cache.join("datasets--org--splits/refs")).unwrap();
    std::fs::write(cache.join("datasets--org--splits/refs/main"), commit).unwrap();
    let inspect = |extra: &[&str]| {
        let mut args = vec![
            "inspect",
            "recipes/quickstart.yaml",
            "data.train=hf://datasets/org/splits",
            "--n",
            "1",
        ];
        args.extend(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = inspect(&[]);
    assert!(ok && stdout.contains("4000 rows"), "{stdout}{stderr}");
    let (ok, stdout, stderr) = inspect(&["data.split=test"]);
    assert!(ok && stdout.contains("200 rows"), "{stdout}{stderr}");
    let (ok, stdout, stderr) = inspect(&["data.subset=alt"]);
    assert!(
        ok && stdout.contains("200 rows") && stdout.contains("alt/train.jsonl"),
        "{stdout}{stderr}"
    );
    let (ok, _, stderr) = inspect(&["data.split=validation"]);
    assert!(!ok, "{stderr}");
    for part in [
        "data.train:",
        "no files of split validation",
        "alt/train.jsonl, data/test-00000-of-00001.jsonl, data/train-00000-of-00001.jsonl",
    ] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
}
