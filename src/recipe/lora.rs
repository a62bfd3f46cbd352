//! The recipe's `lora:` section: PEFT's `LoraConfig` keys as a recipe spells them, checked and
//! turned into the model's `LoraConfig`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::lora::{LoraConfig, LoraInit, Targets};

/// `lora:`: train LoRA adapters on a frozen base instead of every weight.
///
/// ```yaml
/// lora:
///   r: 16
///   alpha: 32
///   dropout: 0.05
///   target_modules: all-linear     # or [q_proj, v_proj]; left out: PEFT's list for the family
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// The rank of every adapter (PEFT's default 8).
    #[serde(default)]
    pub r: Option<usize>,
    /// `lora_alpha`: adapters are scaled by alpha / r (PEFT's default 8).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Dropout on the adapters' input while training (default 0).
    #[serde(default)]
    pub dropout: Option<f64>,
    /// `all-linear` (every linear layer but lm_head), or a list of module names as transformers
    /// names them; left out, PEFT's default list for the family.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Scale by alpha / √r (rank-stabilised LoRA).
    #[serde(default)]
    pub use_rslora: Option<bool>,
    /// Modules trained in full and saved with the adapter (`embed_tokens`, `lm_head`).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `default` (A Kaiming-uniform, B zero, as PEFT) or `gaussian` (A normal(0, 1/r)).
    #[serde(default)]
    pub init: Option<InitName>,
    /// A PEFT adapter directory to continue training or to evaluate; its adapter_config.json
    /// sets r, alpha, targets, rsLoRA and saved modules (a recipe value that differs is an
    /// error).
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// Also write the merged model (W + s·B·A, float32) to
    /// `output_dir/merged` at the end of training.
    #[serde(default)]
    pub merge: bool,
}

/// `target_modules`: `all-linear` or a list of names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetModules {
    /// `all-linear`.
    One(String),
    /// Module names.
    List(Vec<String>),
}

/// `init`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InitName {
    Default,
    Gaussian,
}

impl LoraSection {
    /// The model's configuration; `seed` seeds the adapters' initialisation and dropout. Errors
    /// name the `lora.` key.
    pub fn to_config(&self, seed: u64) -> std::result::Result<LoraConfig, String> {
        let targets = match &self.target_modules {
            None => None,
            Some(TargetModules::One(s)) if s == "all-linear" => Some(Targets::AllLinear),
            Some(TargetModules::One(s)) => {
                return Err(format!(
                    "lora.target_modules: {s:?} is neither all-linear nor a list; write [{s}] for one module \
                     (a single string is a regular expression in PEFT, which packsft does not read)"
                ))
            }
            Some(TargetModules::List(v)) => Some(Targets::Names(v.clone())),
        };
        let init = match self.init {
            Some(InitName::Gaussian) => LoraInit::Gaussian,
            _ => LoraInit::Default,
        };
        let cfg = match &self.adapter {
            Some(dir) => {
                let mut c = LoraConfig::from_peft_dir(dir).map_err(|e| e.to_string())?;
                let differs = |key: &str, ours: String, theirs: String| {
                    Err(format!(
                        "lora.{key} is {ours} but the adapter {} has {theirs}: leave it out to continue the adapter",
                        dir.display()
                    ))
                };
                if let Some(r) = self.r.filter(|r| *r != c.r) {
                    return differs("r", r.to_string(), c.r.to_string());
                }
                if let Some(a) = self.alpha.filter(|a| *a != c.alpha) {
                    return differs("alpha", a.to_string(), c.alpha.to_string());
                }
                // The adapter lists the modules it adapts; a recipe list must name the same
                // ones, and `all-linear` (which PEFT writes out as names) is taken as the list.
                let sorted = |v: &[String]| {
                    let mut v = v.to_vec();
                    v.sort();
                    v.dedup();
                    v
                };
                match (&targets, &c.targets) {
                    (Some(Targets::Names(ours)), Targets::Names(theirs))
                        if sorted(ours) != sorted(theirs) =>
                    {
                        return differs(
                            "target_modules",
                            format!("{:?}", sorted(ours)),
                            format!("{:?}", sorted(theirs)),
                        );
                    }
                    (Some(Targets::AllLinear), Targets::Names(theirs)) => tracing::info!(
                        "lora.target_modules: all-linear; the adapter {} adapts {}",
                        dir.display(),
                        theirs.join(", ")
                    ),
                    _ => {}
                }
                if let Some(u) = self.use_rslora.filter(|u| *u != c.use_rslora) {
                    return differs("use_rslora", u.to_string(), c.use_rslora.to_string());
                }
                if let Some(m) = self
                    .modules_to_save
                    .as_ref()
                    .filter(|m| **m != c.modules_to_save)
                {
                    return differs(
                        "modules_to_save",
                        format!("{m:?}"),
                        format!("{:?}", c.modules_to_save),
                    );
                }
                if let Some(d) = self.dropout {
                    c.dropout = d;
                }
                c.init = init;
                c.seed = seed;
                c
            }
            None => {
                let d = LoraConfig::default();
                LoraConfig {
                    r: self.r.unwrap_or(d.r),
                    alpha: self.alpha.unwrap_or(d.alpha),
                    dropout: self.dropout.unwrap_or(d.dropout),
                    targets: targets.unwrap_or(d.targets),
                    use_rslora: self.use_rslora.unwrap_or(false),
                    modules_to_save: self.modules_to_save.clone().unwrap_or_default(),
                    init,
                    seed,
                    adapter: None,
                }
            }
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(yaml: &str) -> LoraSection {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn keys_become_pefts_config_with_its_defaults() {
        let c = section("{}").to_config(5).unwrap();
        assert_eq!((c.r, c.alpha, c.dropout), (8, 8.0, 0.0));
        assert_eq!(c.targets, Targets::FamilyDefault);
        assert_eq!(c.seed, 5);
        let c = section("{r: 16, alpha: 32, target_modules: all-linear, use_rslora: true}")
            .to_config(0)
            .unwrap();
        assert_eq!(c.targets, Targets::AllLinear);
        assert_eq!(c.scaling(), 8.0);
        let c = section("{target_modules: [q_proj, v_proj], init: gaussian}")
            .to_config(0)
            .unwrap();
        assert_eq!(
            c.targets,
            Targets::Names(vec!["q_proj".into(), "v_proj".into()])
        );
        assert_eq!(c.init, LoraInit::Gaussian);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = section("{target_modules: q_proj}")
            .to_config(0)
            .unwrap_err();
        assert!(
            e.contains("lora.target_modules") && e.contains("[q_proj]"),
            "{e}"
        );
        let e = section("{r: 0}").to_config(0).unwrap_err();
        assert!(e.contains("lora.r"), "{e}");
        let e = section("{dropout: 1.5}").to_config(0).unwrap_err();
        assert!(e.contains("lora.dropout"), "{e}");
        assert!(serde_yaml::from_str::<LoraSection>("{rank: 4}").is_err());
    }
}
