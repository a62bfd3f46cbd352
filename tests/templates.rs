//! The shipped templates render what transformers 4.46.3 renders (fixtures made by
//! tests/fixtures/make_template_fixtures.py): every chat template on every conversation, with and
//! without the generation prompt, text or error message; the prompt templates block by block.

use std::path::Path;

use minijinja::value::Value;
use packsft::internals::template::{Template, TemplateKind, SHIPPED};

const FAMILIES: &[&str] = &[
    "llama2",
    "llama3",
    "mistral",
    "gemma",
    "phi3",
    "qwen2",
    "granite",
    "starcoder2",
    "qwen3",
    "gemma3",
    "olmo2",
];

fn fixture(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/templates")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn to_value(v: &serde_json::Value) -> Value {
    // Through the JSON text, so key order is the fixture's (as Python keeps it).
    serde_json::from_str(&v.to_string()).unwrap()
}

fn globals(fx: &serde_json::Value) -> Vec<(String, Value)> {
    fx["context"]["special_tokens"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), to_value(v)))
        .collect()
}

#[test]
fn chat_templates_render_as_transformers() {
    let mut checked = 0;
    let mut errors = 0;
    for family in FAMILIES {
        let fx = fixture(family);
        let (_, file, src) = SHIPPED.iter().find(|(n, _, _)| n == family).unwrap();
        assert_eq!(
            *src,
            fx["chat_template"].as_str().unwrap(),
            "{file} differs from the fixture's template"
        );
        let t = Template::from_source(file, src, globals(&fx)).unwrap();
        assert_eq!(t.kind, TemplateKind::Chat, "{file}");
        for case in fx["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let msgs: Vec<Value> = case["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(to_value)
                .collect();
            // Cases rendered with apply_chat_template(**kwargs) (Qwen3's enable_thinking).
            let got = match case.get("kwargs") {
                Some(k) => {
                    let kwargs = serde_json::from_value(k.clone()).unwrap();
                    let with = Template::from_source(file, src, globals(&fx)).unwrap();
                    with.with_kwargs(&kwargs).unwrap().render_chat(&msgs, agp)
                }
                None => t.render_chat(&msgs, agp),
            };
            match (&case["expected"], &case["error"]) {
                (serde_json::Value::String(want), _) => {
                    let got = got.unwrap_or_else(|e| panic!("{family}/{name}/{agp}: {e}"));
                    assert_eq!(&got, want, "{family}/{name} add_generation_prompt={agp}");
                }
                (_, err) => {
                    let e = got.expect_err(&format!("{family}/{name}/{agp} should fail"));
                    assert_eq!(
                        e.message,
                        err["message"].as_str().unwrap(),
                        "{family}/{name}/{agp}"
                    );
                    assert_eq!(e.template, *file);
                    assert!(e.line.is_some(), "{family}/{name}: no line in {e}");
                    errors += 1;
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= FAMILIES.len() * 20, "only {checked} cases");
    assert!(errors >= 10, "only {errors} error cases");
}

#[test]
fn prompt_templates_render_block_by_block() {
    let fx = fixture("prompt_templates");
    let mut n = 0;
    for (name, spec) in fx["templates"].as_object().unwrap() {
        let t = Template::load(name, None).unwrap();
        assert_eq!(t.kind, TemplateKind::Prompt, "{name}");
        for case in spec["cases"].as_array().unwrap() {
            let vars = to_value(&case["variables"]);
            let p = t.render_prompt_block(&vars);
            let c = t.render_completion_block(&vars);
            for (block, got) in [("prompt", &p), ("completion", &c)] {
                match &case[block] {
                    serde_json::Value::String(want) => {
                        assert_eq!(got.as_ref().unwrap(), want, "{name} {block} {vars}")
                    }
                    _ => {
                        let e = got.as_ref().expect_err("the block should raise");
                        assert_eq!(
                            e.message,
                            case["errors"][block]["message"].as_str().unwrap(),
                            "{name} {block}"
                        );
                        assert!(
                            e.to_string().contains(&format!("{name}.jinja line ")),
                            "{e}"
                        );
                    }
                }
            }
            if let Some(full) = case["full"].as_str() {
                assert_eq!(t.render_whole(&vars).unwrap(), full, "{name}");
                assert_eq!(format!("{}{}", p.unwrap(), c.unwrap()), full);
            }
            n += 1;
        }
    }
    assert!(n >= 12, "only {n} cases");
}

#[test]
fn templates_are_named_by_name_path_or_tokenizer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let t = Template::load("chat/llama3", None).unwrap();
    assert_eq!(t.name, "chat/llama3.jinja");
    let p = root.join("templates/chat/qwen2.jinja");
    let t = Template::load(p.to_str().unwrap(), None).unwrap();
    assert_eq!(t.kind, TemplateKind::Chat);
    let e = Template::load("vicuna", None).unwrap_err().to_string();
    assert!(e.contains("`vicuna`") && e.contains("llama3"), "{e}");

    // `tokenizer`: the chat_template of tokenizer_config.json.
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        root.join("recipes/quickstart/tokenizer.json"),
        d.path().join("tokenizer.json"),
    )
    .unwrap();
    let tok = packsft::TextTokenizer::load(d.path()).unwrap();
    let e = Template::load("tokenizer", Some(&tok))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no chat template"), "{e}");
    std::fs::write(
        d.path().join("tokenizer_config.json"),
        serde_json::json!({
            "bos_token": "<s>", "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}"
        })
        .to_string(),
    )
    .unwrap();
    let tok = packsft::TextTokenizer::load(d.path()).unwrap();
    let t = Template::load("tokenizer", Some(&tok)).unwrap();
    let m = Value::from_iter([("role", "user"), ("content", "hi")]);
    assert_eq!(t.render_chat(&[m], false).unwrap(), "<s>user: hi</s>");

    // A template that does not compile names itself and the line.
    let e = Template::from_source("bad.jinja", "line one\n{% if %}", vec![]).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("bad.jinja line 2"), "{e}");
}

#[test]
fn python_string_methods_and_globals() {
    let t = Template::from_source(
        "py.jinja",
        "{{ messages[0].content.strip().title() }}|{{ messages[0].content.startswith('  he') }}|{{ tools is defined }}|{{ tools is none }}|{{ strftime_now('%Y') | length }}",
        vec![],
    )
    .unwrap();
    let m = Value::from_iter([("role", "user"), ("content", "  hello world ")]);
    assert_eq!(
        t.render_chat(&[m], false).unwrap(),
        "Hello World|True|True|True|4"
    );
}
