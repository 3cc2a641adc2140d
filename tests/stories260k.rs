//! stories260K (a real TinyStories Llama, in ../shared/data) against its model card: greedy
//! generation from BOS must reproduce the documented llama2.c output.

mod common;

use mechc::runtime::generate::{generate, GenOpts};
use mechc::runtime::Hooks;

/// The text of the first code block after "temperature 0.0" in the model card, minus the
/// command line that precedes it.
fn card_text() -> String {
    let card = std::fs::read_to_string(common::shared_data().join("models/stories260K/stories260K.md")).unwrap();
    let after = &card[card.find("temperature 0.0").expect("card mentions temperature 0.0")..];
    let block = after.split("```").nth(1).expect("a code block");
    block.lines().skip_while(|l| !l.starts_with("$ ./run")).skip(1).collect::<Vec<_>>().join("\n")
}

#[test]
fn greedy_from_bos_reproduces_the_model_card() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stories");
    mechc::io::gguf::import(&common::stories_gguf(), &out, candle_core::DType::F32, false, false).unwrap();
    let loaded = mechc::io::load(&out, false).unwrap();
    let bos = loaded.model.cfg.bos_token_id.expect("bos id");
    let opts = GenOpts { max_tokens: 120, ..GenOpts::default() };
    let ids = generate(&loaded.model, &[bos], &opts, &mut Hooks::new(), |_| Ok(())).unwrap();
    let text = loaded.tok().unwrap().decode(&ids, true).unwrap();
    let want = card_text();
    assert!(want.len() > 200, "card text parsed: {want:?}");
    assert!(ids.len() >= 100, "only {} tokens", ids.len());
    assert!(
        want.starts_with(&text),
        "our greedy text diverges from the card.\n ours: {text:?}\n card: {:?}",
        &want[..text.len().min(want.len())]
    );
}
