//! The property the fuzz target checks, shared with `worker/tests/fuzz_corpus.rs`, which
//! replays the kept corpus under plain `cargo test`.
//!
//! Whatever the bytes, `decode` must return (no panic, no stack overflow, no hang); a refusal
//! must carry a 4xx status and a message; and a `start` it accepts must render a definition
//! file with exactly the intended structure (the same check the worker makes before a build).

use orchestrator_worker::intake::decode;
use orchestrator_worker::runtime::definition::{Definition, Outline};
use schemas::Request;

const MAX_BODY: usize = 1024 * 1024;

pub fn decode_render_check(body: &[u8]) {
    match decode(body, MAX_BODY) {
        Err(refused) => {
            let status = refused.refusal.code.status();
            assert!((400..500).contains(&status), "{refused:?}");
            assert!(!refused.refusal.message.is_empty());
        }
        Ok(Request::Start(start)) => {
            let definition = Definition::of_start(&start);
            let text = definition.render();
            assert_eq!(
                Outline::of(&text),
                definition.intended_outline(),
                "accepted request renders another structure:\n{text}"
            );
        }
        Ok(_) => {}
    }
}
