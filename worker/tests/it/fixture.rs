//! Loading the reference JSON fixtures.

use std::path::PathBuf;

use serde::de::DeserializeOwned;

/// Parses `tests/fixtures/reference/<name>`, panicking with the path when it is absent or bad.
pub fn load<T: DeserializeOwned>(name: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| {
        panic!(
            "reference fixture {} is missing or unreadable ({err}); generate it with \
             tools/reference/",
            path.display()
        )
    });
    serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("reference fixture {} is malformed: {err}", path.display()))
}

/// Asserts `|got - want| <= tol * max(|want|, floor)` element-wise, naming the first offender.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64, floor: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (f64::from(g), f64::from(w));
        let allowed = tol * w.abs().max(floor);
        assert!(
            (g - w).abs() <= allowed,
            "{what}[{i}]: got {g}, want {w} (|diff| {} > {allowed})",
            (g - w).abs()
        );
    }
}

/// `tests/fixtures/reference/<name>`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(name)
}

/// `max |got − want| / max |want|`: the error relative to the tensor's scale.
pub fn relative_error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length differs");
    let scale = want.iter().fold(0f64, |m, &w| m.max(f64::from(w).abs()));
    let diff = got.iter().zip(want).fold(0f64, |m, (&g, &w)| {
        m.max((f64::from(g) - f64::from(w)).abs())
    });
    diff / scale.max(f64::MIN_POSITIVE)
}

/// Asserts shape equality and `relative_error <= tol`, printing the observed error.
pub fn assert_tensor(
    what: &str,
    got: &kiln_worker::engine::HostTensor,
    want: &kiln_worker::engine::HostTensor,
    tol: f64,
) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let err = relative_error(&got.data, &want.data);
    eprintln!("{what}: relative error {err:.3e}");
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}
