//! The config loader never panics and every refusal is located.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stepgate::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = std::path::Path::new("/nonexistent/fuzz.yaml");
    if let Err(e) = Config::from_yaml(file, text, &Default::default()) {
        assert!(!e.problems.is_empty());
        for p in &e.problems {
            assert!(p.line >= 1 && p.col >= 1, "unlocated problem: {e}");
        }
    }
});
