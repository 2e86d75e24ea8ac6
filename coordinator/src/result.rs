//! A Result: what the winning attempt of a cell produced, as stored in `cells.result` (JSON).
//! Checked on the way in, so a stored result always names an object and its sha256.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Metadata of a rendered image.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RenderResult {
    /// Object key in storage.
    pub object_key: String,
    /// Storage URL prefix the key lives under.
    pub storage: String,
    /// sha256 of the PNG, lower-case hex.
    pub sha256: String,
    /// Size of the PNG.
    pub bytes: u64,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Device it rendered on.
    pub device: String,
    /// Milliseconds by phase.
    #[serde(default)]
    pub timings_ms: BTreeMap<String, u64>,
    /// A1111-style parameters text.
    #[serde(default)]
    pub parameters: String,
    /// Notes (e.g. negative prompt ignored).
    #[serde(default)]
    pub notes: Vec<String>,
}

impl RenderResult {
    /// Checks that the result names an object and a well-formed hash; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.object_key.is_empty() || self.object_key.len() > 1024 {
            return Err(Error::invalid("result.object_key: must be 1..=1024 bytes"));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid("result.sha256: must be 64 hex digits"));
        }
        if self.storage.len() > 1024 || self.device.len() > 200 {
            return Err(Error::invalid("result: storage or device too long"));
        }
        if self.parameters.len() > 64 * 1024 || self.notes.len() > 32 || self.timings_ms.len() > 32
        {
            return Err(Error::TooLarge(
                "result: parameters, notes or timings".into(),
            ));
        }
        Ok(())
    }

    /// The stored JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Corrupt(e.to_string()))
    }

    /// From stored JSON.
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("cells.result: {e}")))
    }
}
