//! The `[yield]` settings as layers: all-optional [`YieldSettings`] from the worker's config
//! file and from flags/`KILN_YIELD_*` environment, merged defaults → file → env → flags
//! ([`YieldSettings::over`]) and turned into a [`YieldConfig`] once
//! ([`YieldSettings::validate`]).

use std::time::Duration;

use serde::Deserialize;

use super::{Hours, Window, YieldConfig};

/// One layer of `[yield]` settings; `None`: not set in this layer.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct YieldSettings {
    /// Programs whose running makes the worker yield (`processes = ["eldenring.exe"]`).
    pub processes: Option<Vec<String>>,
    /// Allowed hours, `HH:MM-HH:MM` local time (may cross midnight).
    pub hours: Option<String>,
    /// Allowed hours on Saturday and Sunday.
    pub weekend_hours: Option<String>,
    /// Yield while another process uses the GPU (NVML).
    pub gpu_busy: Option<bool>,
    /// Seconds a render in flight may take to finish once the worker must yield.
    pub grace_secs: Option<u64>,
    /// Milliseconds between two looks at the signals.
    pub poll_ms: Option<u64>,
}

impl YieldSettings {
    /// `self` over `lower`: what `self` sets wins.
    pub fn over(self, lower: YieldSettings) -> YieldSettings {
        YieldSettings {
            processes: self.processes.or(lower.processes),
            hours: self.hours.or(lower.hours),
            weekend_hours: self.weekend_hours.or(lower.weekend_hours),
            gpu_busy: self.gpu_busy.or(lower.gpu_busy),
            grace_secs: self.grace_secs.or(lower.grace_secs),
            poll_ms: self.poll_ms.or(lower.poll_ms),
        }
    }

    /// The merged settings, checked, over the defaults; `gpu_index` is the card watched for
    /// other processes.
    pub fn validate(self, gpu_index: u32) -> anyhow::Result<YieldConfig> {
        let window = |name: &str, v: Option<String>| -> anyhow::Result<Option<Window>> {
            v.map(|s| s.parse().map_err(|e| anyhow::anyhow!("yield {name}: {e}")))
                .transpose()
        };
        let weekdays = window("hours", self.hours)?;
        let weekends = window("weekend_hours", self.weekend_hours)?;
        let hours = match (weekdays, weekends) {
            (None, None) => None,
            (Some(weekdays), weekends) => Some(Hours { weekdays, weekends }),
            // Only weekends limited: weekdays any time.
            (None, Some(w)) => Some(Hours {
                weekdays: "00:00-24:00".parse().expect("the whole day parses"),
                weekends: Some(w),
            }),
        };
        let d = YieldConfig::default();
        let grace = self.grace_secs.map_or(d.grace, Duration::from_secs);
        let poll = self.poll_ms.map_or(d.poll, Duration::from_millis);
        anyhow::ensure!(
            grace <= Duration::from_secs(3600),
            "yield grace_secs: at most 3600"
        );
        let cfg = YieldConfig {
            processes: self.processes.unwrap_or_default(),
            gpu_busy: self.gpu_busy.unwrap_or(false),
            gpu_index,
            hours,
            grace,
            poll,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_merge_and_are_checked_once() {
        let file: YieldSettings = serde_yaml_ng::from_str(
            "processes: [eldenring.exe]\nhours: 22:00-08:00\ngrace_secs: 30\n",
        )
        .unwrap();
        let flags = YieldSettings {
            grace_secs: Some(5),
            weekend_hours: Some("10:00-20:00".into()),
            ..Default::default()
        };
        let cfg = flags.over(file.clone()).validate(1).unwrap();
        assert_eq!(cfg.processes, ["eldenring.exe"]);
        assert_eq!(cfg.grace, Duration::from_secs(5));
        assert_eq!(cfg.poll, Duration::from_secs(2));
        assert_eq!(cfg.gpu_index, 1);
        let h = cfg.hours.unwrap();
        assert_eq!(h.weekdays.to_string(), "22:00-08:00");
        assert_eq!(h.weekends.unwrap().to_string(), "10:00-20:00");

        let bad = YieldSettings {
            hours: Some("22-8".into()),
            ..Default::default()
        };
        let e = bad.validate(0).unwrap_err().to_string();
        assert!(e.contains("yield hours") && e.contains("HH:MM"), "{e}");
        let none = YieldSettings::default().validate(0).unwrap();
        assert!(none.hours.is_none() && none.processes.is_empty() && !none.gpu_busy);
        let weekend_only = YieldSettings {
            weekend_hours: Some("10:00-20:00".into()),
            ..Default::default()
        };
        let h = weekend_only.validate(0).unwrap().hours.unwrap();
        assert_eq!(h.weekdays.to_string(), "00:00-24:00");
    }
}
