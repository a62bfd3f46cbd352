//! Every recipe shipped under recipes/ parses and points at files that exist.

use std::path::Path;

#[test]
fn every_shipped_recipe_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(root.join("recipes")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let r = packsft::Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
        // Paths in recipes are relative to the repository root (where the README runs them).
        let train = match &r.data.train {
            packsft::TrainData::Path(p) => vec![p.clone()],
            packsft::TrainData::Mix(sources) => sources.iter().map(|s| s.path.clone()).collect(),
        };
        for f in train
            .iter()
            .map(Some)
            .chain([
                r.data.eval.as_ref(),
                r.model.tokenizer.as_ref(),
                r.model.path.as_ref(),
            ])
            .flatten()
        {
            assert!(
                root.join(f).exists(),
                "{}: {} does not exist",
                p.display(),
                f.display()
            );
        }
        n += 1;
    }
    assert!(n >= 1, "no recipe found");
}
