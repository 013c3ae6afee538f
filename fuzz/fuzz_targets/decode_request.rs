//! Request decoding, validation and definition rendering, from arbitrary bytes: see
//! `check.rs` for the property.

#![no_main]

mod check;

libfuzzer_sys::fuzz_target!(|body: &[u8]| check::decode_render_check(body));
