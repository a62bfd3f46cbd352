//! `packsft train` and `packsft eval`: run a recipe.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Args;

use crate::error::{Error, Result};
use crate::recipe::{build, Recipe};

#[derive(Args)]
pub(crate) struct TrainCmd {
    recipe: PathBuf,
    /// Dotted overrides of recipe keys, e.g. train.max_steps=100
    overrides: Vec<String>,
    /// Encode the data again instead of reading the tokenization cache (data.cache=false)
    #[arg(long)]
    no_cache: bool,
}

#[derive(Args)]
pub(crate) struct EvalCmd {
    recipe: PathBuf,
    overrides: Vec<String>,
}

pub(crate) fn train(c: TrainCmd) -> Result<()> {
    let mut overrides = c.overrides.clone();
    if c.no_cache {
        overrides.push("data.cache=false".into());
    }
    let r = Recipe::load(&c.recipe, &overrides)?;
    // First SIGINT/SIGTERM: checkpoint after the current step and exit; a second one exits at
    // once.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
            .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
            .map_err(|e| Error::io("signal handler", e))?;
    }
    // A rank of a multi-process run takes its node's GPU by LOCAL_RANK.
    let device = match crate::dist::World::from_env()? {
        Some(w) if r.train.device == "cuda" => format!("cuda:{}", w.local_rank),
        _ => r.train.device.clone(),
    };
    let dev = crate::device::open(&device)?;
    let summary = build::train(&r, &c.recipe, &dev, Some(stop))?;
    if summary.interrupted {
        let at = summary
            .last_checkpoint
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        eprintln!("interrupted: saved {at}; resume with resume_from=latest");
        return Err(Error::Training("interrupted".into()));
    }
    if let (Some(first), Some(last)) = (summary.steps.first(), summary.steps.last()) {
        println!(
            "{}",
            serde_json::json!({
                "steps": last.step,
                "first_loss": first.loss,
                "final_loss": last.loss,
                "eval_loss": summary.evals.last().map(|e| e.eval_loss),
                "output_dir": r.output_dir,
            })
        );
    }
    Ok(())
}

pub(crate) fn eval(c: EvalCmd) -> Result<()> {
    let r = Recipe::load(&c.recipe, &c.overrides)?;
    let dev = crate::device::open(&r.train.device)?;
    let (loss, n) = build::eval(&r, &c.recipe, &dev)?;
    println!(
        "{}",
        serde_json::json!({"eval_loss": loss, "eval_tokens": n})
    );
    Ok(())
}
