//! Downloads from the Hub into its cache, against a stand-in Hub on localhost that answers as
//! huggingface.co does for what `hf-hub` asks (the repo's file list at
//! `/api/{models,datasets}/<repo>/revision/<rev>`, and `/<repo>/resolve/<rev>/<file>` with a
//! byte range, an `ETag`, `X-Repo-Commit` and `Content-Range`): a model id and a dataset split
//! are fetched once into the standard layout, then read from the cache with the Hub gone, and
//! `HF_HUB_OFFLINE` forbids asking.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

const COMMIT: &str = "c0ffee0000000000000000000000000000000001";

/// The quickstart recipe reading the stand-in Hub's dataset by its split.
const INSPECT_ROWS: [&str; 5] = [
    "inspect",
    "recipes/quickstart.yaml",
    "data.train=hf://datasets/org/rows",
    "--n",
    "1",
];

/// A stand-in Hub: `repos` maps `models/acme/tiny` or `datasets/org/rows` to its files. Returns
/// the endpoint URL and the count of requests served.
fn stand_in_hub(repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().to_string());
                }
            }
            count.fetch_add(1, Ordering::SeqCst);
            let reply = answer(&repos, &path, range.as_deref());
            let _ = stream.write_all(&reply);
        }
    });
    (url, served)
}

fn answer(
    repos: &BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    path: &str,
    range: Option<&str>,
) -> Vec<u8> {
    let respond = |status: &str, headers: Vec<String>, body: &[u8]| {
        let mut r = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for h in headers {
            r.push_str(&h);
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        let mut r = r.into_bytes();
        r.extend_from_slice(body);
        r
    };
    for (repo, files) in repos {
        // `models/acme/tiny` is served as `acme/tiny` (the Hub's model URLs have no prefix).
        let base = repo.strip_prefix("models/").unwrap_or(repo);
        if path == format!("/api/{repo}/revision/main") {
            let siblings: Vec<_> = files
                .keys()
                .map(|f| serde_json::json!({ "rfilename": f }))
                .collect();
            let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
            return respond(
                "200 OK",
                vec!["Content-Type: application/json".into()],
                body.as_bytes(),
            );
        }
        if let Some(file) = path.strip_prefix(&format!("/{base}/resolve/main/")) {
            let Some(data) = files.get(file) else { break };
            let start: usize = range
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let end = match range
                .and_then(|r| r.split('-').nth(1))
                .filter(|e| !e.is_empty())
            {
                Some(e) => e.parse::<usize>().unwrap().min(data.len() - 1),
                None => data.len() - 1,
            };
            let etag = format!("{:x}", Sha256::digest(data));
            return respond(
                "206 Partial Content",
                vec![
                    format!("ETag: \"{etag}\""),
                    format!("X-Repo-Commit: {COMMIT}"),
                    format!("Content-Range: bytes {start}-{end}/{}", data.len()),
                ],
                &data[start..=end],
            );
        }
    }
    respond("404 Not Found", vec![], b"not found")
}

fn packsft(env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .env_remove("HF_HUB_OFFLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_model_and_a_dataset_split_download_into_the_cache_once() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    let (ok, stderr) = common::train_quickstart(&base, 1, &[]);
    assert!(ok, "{stderr}");
    let read = |p: &Path| std::fs::read(p).unwrap();
    let mut model = BTreeMap::new();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        model.insert(f.to_string(), read(&base.join(f)));
    }
    // Files a trainer never reads stay on the Hub.
    model.insert("original/consolidated.pth".into(), b"not wanted".to_vec());
    model.insert("README.md".into(), b"# tiny".to_vec());
    model.insert("consolidated.safetensors".into(), b"a second copy".to_vec());
    let q = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart");
    let mut rows = BTreeMap::new();
    rows.insert(
        "data/train-00000-of-00001.jsonl".to_string(),
        read(&q.join("train.jsonl")),
    );
    rows.insert(
        "data/test-00000-of-00001.jsonl".to_string(),
        read(&q.join("eval.jsonl")),
    );
    let repos = BTreeMap::from([
        ("models/acme/tiny".to_string(), model),
        ("datasets/org/rows".to_string(), rows),
    ]);
    let (endpoint, served) = stand_in_hub(repos);
    let cache = d.path().join("hub");
    let cache_s = cache.display().to_string();
    let env = [
        ("HF_ENDPOINT", endpoint.as_str()),
        ("HF_HUB_CACHE", cache_s.as_str()),
    ];

    // A model id: what training reads is downloaded, in huggingface_hub's layout.
    let (ok, arch, stderr) = packsft(&env, &["arch", "acme/tiny"]);
    assert!(
        ok && arch.contains("family          llama"),
        "{arch}{stderr}"
    );
    let repo = cache.join("models--acme--tiny");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    let snap = repo.join("snapshots").join(COMMIT);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let link = snap.join(f);
        assert_eq!(read(&link), read(&base.join(f)), "{f}");
        let target = std::fs::read_link(&link).unwrap();
        assert!(
            target.starts_with("../../blobs"),
            "{f} -> {}",
            target.display()
        );
    }
    for f in ["original", "README.md", "consolidated.safetensors"] {
        assert!(!snap.join(f).exists(), "{f} was fetched");
    }

    // A dataset split, by a recipe.
    let (ok, stdout, stderr) = packsft(&env, &INSPECT_ROWS);
    assert!(ok && stdout.contains("4000 rows"), "{stdout}{stderr}");
    let rows_snap = cache.join("datasets--org--rows/snapshots").join(COMMIT);
    assert!(rows_snap.join("data/train-00000-of-00001.jsonl").exists());
    assert!(
        !rows_snap.join("data/test-00000-of-00001.jsonl").exists(),
        "only the split read"
    );

    // Then the cache answers: with the Hub unreachable (a warning, and the cached snapshot),
    // or offline (no request at all).
    let before = served.load(Ordering::SeqCst);
    let (ok, text, stderr) = packsft(
        &[
            ("HF_HUB_CACHE", cache_s.as_str()),
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ],
        &[
            "generate",
            "acme/tiny",
            "--prompt",
            "Task: copy",
            "--max-new-tokens",
            "2",
        ],
    );
    assert!(ok && text.starts_with("Task: copy"), "{text}{stderr}");
    assert!(stderr.contains("using the cached snapshot"), "{stderr}");
    let (ok, stdout, stderr) = packsft(
        &[("HF_HUB_CACHE", cache_s.as_str()), ("HF_HUB_OFFLINE", "1")],
        &INSPECT_ROWS,
    );
    assert!(ok && stdout.contains("4000 rows"), "{stdout}{stderr}");
    assert_eq!(served.load(Ordering::SeqCst), before);

    // Offline, what the cache lacks is an error that says so; online, a repo the Hub does not
    // have is named.
    let (ok, _, stderr) = packsft(
        &[
            ("HF_HUB_CACHE", cache_s.as_str()),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_ENDPOINT", endpoint.as_str()),
        ],
        &["arch", "acme/other"],
    );
    assert!(
        !ok && stderr.contains("not in the Hugging Face cache")
            && stderr.contains("HF_HUB_OFFLINE is set"),
        "{stderr}"
    );
    assert_eq!(
        served.load(Ordering::SeqCst),
        before,
        "offline asks nothing"
    );
    let (ok, _, stderr) = packsft(&env, &["arch", "acme/other"]);
    assert!(
        !ok && stderr.contains("acme/other@main") && stderr.contains("no such repo"),
        "{stderr}"
    );
    // A recipe naming one id as its model and as its tokenizer asks the Hub about it once:
    // as many requests as naming it as the tokenizer alone.
    let requests = |extra: &[&str]| {
        let before = served.load(Ordering::SeqCst);
        let mut args = vec![
            "inspect",
            "recipes/quickstart.yaml",
            "model.tokenizer=acme/tiny",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--n", "1"]);
        let (ok, stdout, stderr) = packsft(&env, &args);
        assert!(ok, "{stdout}{stderr}");
        served.load(Ordering::SeqCst) - before
    };
    let alone = requests(&[]);
    assert!(alone >= 1, "the tokenizer's id was looked up");
    let both = requests(&["model.path=acme/tiny", "model.config=null"]);
    assert_eq!(
        both, alone,
        "model.path and model.tokenizer: one id, one lookup"
    );
    // tests/fixtures/check_hub_download.py reads a kept copy with huggingface_hub itself.
    if let Some(keep) = std::env::var_os("PACKSFT_KEEP_HUB_CACHE") {
        let status = std::process::Command::new("cp")
            .args(["-a", &cache_s, &keep.to_string_lossy()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}
