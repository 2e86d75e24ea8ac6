//! The hub client's settings from the environment, as Hugging Face's own tools read them, and
//! installing it for `kiln render`, `kiln worker` and `kiln run`:
//!
//! - `HF_ENDPOINT` (default `https://huggingface.co`), `HF_TOKEN` (else the file
//!   `$HF_TOKEN_PATH` or `$HF_HOME/token` that `hf auth login` writes);
//! - `HF_HUB_CACHE`, else `$HF_HOME/hub`, `HF_HOME` defaulting to `$XDG_CACHE_HOME/huggingface`
//!   or `~/.cache/huggingface` (on Windows too, as huggingface_hub does);
//! - `KILN_OFFLINE` or `HF_HUB_OFFLINE` (`1`, `true`, `yes`, `on`): cached files only;
//! - `KILN_CACHE_DIR` (default `~/.cache/kiln`): URL downloads go to its `urls/`;
//! - `KILN_MAX_DOWNLOAD_GB` (default 16): the largest file fetched.

use std::path::PathBuf;

use kiln_worker::hub::{DEFAULT_MAX_BYTES, Hub, HubConfig};

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// huggingface_hub's truth test for its switches.
fn is_true(name: &str) -> bool {
    var(name).is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "on" | "yes" | "true"
        )
    })
}

/// `$XDG_CACHE_HOME`, or `~/.cache`.
fn cache_home() -> PathBuf {
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return PathBuf::from(dir);
    }
    let home = if cfg!(windows) {
        var("USERPROFILE")
    } else {
        var("HOME")
    };
    home.map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache")
}

/// The settings the environment gives.
pub fn config_from_env(prefer_f16: bool, allow_urls: bool) -> anyhow::Result<HubConfig> {
    let hf_home = var("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_home().join("huggingface"));
    let hub_cache = var("HF_HUB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home.join("hub"));
    let token = var("HF_TOKEN").or_else(|| {
        let file = var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("token"));
        std::fs::read_to_string(file)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    });
    let max_bytes = match var("KILN_MAX_DOWNLOAD_GB") {
        None => DEFAULT_MAX_BYTES,
        Some(gb) => match gb.trim().parse::<f64>() {
            Ok(gb) if gb > 0.0 && gb.is_finite() => (gb * (1u64 << 30) as f64) as u64,
            _ => anyhow::bail!("KILN_MAX_DOWNLOAD_GB={gb}: a number of GiB above 0"),
        },
    };
    Ok(HubConfig {
        endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
        token,
        hub_cache,
        kiln_cache: var("KILN_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_home().join("kiln")),
        offline: is_true("KILN_OFFLINE") || is_true("HF_HUB_OFFLINE"),
        prefer_f16,
        allow_urls,
        max_bytes,
    })
}

/// Installs the hub client `hf:` and URL references resolve through in this process.
pub fn install(prefer_f16: bool, allow_urls: bool) -> anyhow::Result<()> {
    kiln_worker::hub::install(Hub::new(config_from_env(prefer_f16, allow_urls)?));
    Ok(())
}
