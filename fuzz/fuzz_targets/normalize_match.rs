//! Normalise + match, with the oracle of `tests/properties.rs`: the normal
//! form is idempotent, holds no `//`, `/./`, `/../`, and a path that
//! normalises into a protected prefix always matches that prefix's rule.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stepgate::policy::{normalize_path, Glob};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(norm) = normalize_path(raw) else {
        return;
    };
    assert_eq!(normalize_path(&norm).as_deref(), Ok(norm.as_str()), "not idempotent");
    assert!(norm.starts_with('/'));
    assert!(!norm.contains("//") && !norm.contains("/./") && !norm.contains("/../"), "{norm:?}");
    assert!(!norm.ends_with("/.") && !norm.ends_with("/.."), "{norm:?}");
    assert!(!norm.contains('\\') && !norm.contains(';'), "{norm:?}");
    if norm == "/admin" || norm.starts_with("/admin/") {
        let rule = Glob::new("/admin/**").expect("glob");
        assert!(rule.matches(&norm), "{raw:?} -> {norm:?} escapes /admin/**");
    }
    // Any glob built from the input must not panic either.
    if let Ok(g) = Glob::new(raw) {
        let _ = g.matches(&norm);
    }
});
