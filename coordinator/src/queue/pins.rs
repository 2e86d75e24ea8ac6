//! The registry's limits and a stored sweep's pins, shared by the queue's registry code, its
//! submit path and the API (apart from `models.rs`, so `queue/mod.rs` re-exports them without
//! depending on the code that uses the queue).

use std::collections::BTreeMap;

/// Most names the registry holds (and so rows `ListModels` answers).
pub const MAX_MODELS: usize = 4096;

/// Most registry references one sweep file may make (`model`, `vae`, `[[loras]]`, axes).
pub const MAX_SWEEP_MODEL_REFS: usize = 256;

/// Largest registered file, bytes (1 TiB: far past any checkpoint, inside an `i64`).
pub const MAX_MODEL_BYTES: u64 = 1 << 40;

/// The pins a stored sweep was planned with (`sweeps.spec`'s `models`; none for a sweep sent
/// as cells or stored before the registry).
pub fn stored_pins(spec: &str) -> BTreeMap<String, String> {
    serde_json::from_str::<serde_json::Value>(spec)
        .ok()
        .and_then(|v| serde_json::from_value(v.get("models")?.clone()).ok())
        .unwrap_or_default()
}
