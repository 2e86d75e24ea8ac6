//! The signal sources besides the hours: game processes by name, another process on the GPU
//! (NVML), the coordinator's admin pausing the worker, and a fake busy GPU for tests.

use chrono::NaiveDateTime;
use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System};
use tokio::sync::watch;

use super::{Order, YieldSource};

/// A process name as compared: lower case, without `.exe`.
fn normalize(name: &str) -> String {
    let lower = name.trim().to_lowercase();
    match lower.strip_suffix(".exe") {
        Some(stem) => stem.to_owned(),
        None => lower,
    }
}

/// Linux keeps only the first 15 bytes of a process name.
const LINUX_COMM_BYTES: usize = 15;

/// Whether a running process called `running` is the listed `wanted` (both normalized):
/// equal, or on Linux `running` is `wanted` cut at 15 bytes.
fn matches(running: &str, wanted: &str) -> bool {
    running == wanted
        || (cfg!(target_os = "linux")
            && running.len() == LINUX_COMM_BYTES
            && wanted.len() > LINUX_COMM_BYTES
            && wanted.as_bytes().starts_with(running.as_bytes()))
}

/// "game.exe running" while a listed program runs. Names are compared case-insensitively and
/// `.exe` is optional on either side; only process names are read (no command lines, memory or
/// CPU), so a check costs one directory walk of the process table.
pub struct Processes {
    /// Normalized wanted names, with the names as the user wrote them.
    wanted: Vec<(String, String)>,
    system: Option<System>,
}

impl Processes {
    /// Watches for `names`.
    pub fn new(names: &[String]) -> Self {
        Processes {
            wanted: names.iter().map(|n| (normalize(n), n.clone())).collect(),
            system: None,
        }
    }
}

impl YieldSource for Processes {
    fn check(&mut self, _now: NaiveDateTime) -> Option<String> {
        if self.wanted.is_empty() {
            return None;
        }
        if self.system.is_none() {
            match System::new() {
                Ok(s) => self.system = Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "the process list cannot be read: --yield-process is off");
                    self.wanted.clear();
                    return None;
                }
            }
        }
        let system = self.system.as_mut()?;
        system.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing(),
        );
        let running: Vec<String> = system
            .processes()
            .values()
            .map(|p| normalize(&p.name().to_string_lossy()))
            .collect();
        self.wanted
            .iter()
            .find(|(w, _)| running.iter().any(|r| matches(r, w)))
            .map(|(_, name)| format!("{name} running"))
    }
}

/// "another process uses the GPU" while NVML lists a compute or graphics process other than
/// this worker on its card. NVML (libnvidia-ml, shipped with the NVIDIA driver on Windows and
/// Linux) is loaded when the source first runs: without it, or without an NVIDIA card, the
/// source is off and says so once in the log. `index` is NVML's device index, which matches
/// CUDA's when `CUDA_DEVICE_ORDER=PCI_BUS_ID`.
pub struct GpuBusy {
    index: u32,
    own_pid: u32,
    nvml: Option<nvml_wrapper::Nvml>,
    off: bool,
}

impl GpuBusy {
    /// Watches NVML device `index`.
    pub fn new(index: u32) -> Self {
        GpuBusy {
            index,
            own_pid: std::process::id(),
            nvml: None,
            off: false,
        }
    }

    fn others(&mut self) -> Result<Vec<u32>, nvml_wrapper::error::NvmlError> {
        if self.nvml.is_none() {
            self.nvml = Some(nvml_wrapper::Nvml::init()?);
        }
        let nvml = self.nvml.as_ref().expect("initialized above");
        let device = nvml.device_by_index(self.index)?;
        let mut pids: Vec<u32> = device
            .running_compute_processes()?
            .into_iter()
            .chain(device.running_graphics_processes()?)
            .map(|p| p.pid)
            .filter(|&pid| pid != self.own_pid)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }
}

impl YieldSource for GpuBusy {
    fn check(&mut self, _now: NaiveDateTime) -> Option<String> {
        if self.off {
            return None;
        }
        match self.others() {
            Ok(pids) if pids.is_empty() => None,
            Ok(pids) => Some(format!("another process uses the GPU (pid {})", pids[0])),
            Err(e) => {
                tracing::warn!(error = %e, gpu = self.index, "NVML is not available: --yield-gpu-busy is off");
                self.off = true;
                None
            }
        }
    }
}

/// A busy GPU as a test sets it: busy while the file exists. A second process on the card
/// cannot be caused on a test machine without one, so this stands in for [`GpuBusy`] (which
/// is compiled everywhere and documented, but runs only beside an NVIDIA driver). Test builds
/// only.
#[cfg(feature = "testing")]
pub struct FakeGpuBusy(pub std::path::PathBuf);

#[cfg(feature = "testing")]
impl YieldSource for FakeGpuBusy {
    fn check(&mut self, _now: NaiveDateTime) -> Option<String> {
        self.0
            .exists()
            .then(|| "another process uses the GPU (test)".to_owned())
    }
}

/// The coordinator's admin pausing this worker (the order its heartbeat replies carry).
pub struct Remote(pub watch::Receiver<Order>);

impl YieldSource for Remote {
    fn check(&mut self, _now: NaiveDateTime) -> Option<String> {
        (*self.0.borrow() == Order::Pause).then(|| "paused by the admin".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_case_insensitively_with_exe_optional() {
        assert_eq!(normalize(" Game.EXE "), "game");
        assert_eq!(normalize("eldenring"), "eldenring");
        assert!(matches(
            &normalize("EldenRing.exe"),
            &normalize("eldenring")
        ));
        assert!(matches(
            &normalize("eldenring"),
            &normalize("ELDENRING.exe")
        ));
        assert!(!matches(&normalize("eldenring2"), &normalize("eldenring")));
        // Linux cuts names at 15 bytes.
        let long = normalize("cyberpunk2077-launcher");
        assert_eq!(
            matches(&long[..15], &long),
            cfg!(target_os = "linux"),
            "a cut name matches on Linux only"
        );
        assert!(!matches(&long[..14], &long));
    }

    #[test]
    fn a_real_process_is_seen_while_it_runs() {
        // This test binary is itself a running process: its own name is found, a name nobody
        // runs is not.
        let me = std::env::current_exe().unwrap();
        let name = me.file_name().unwrap().to_string_lossy().to_uppercase();
        let mut found = Processes::new(&[name.clone(), "no-such-game-xyz".into()]);
        let now = chrono::Local::now().naive_local();
        assert_eq!(found.check(now), Some(format!("{name} running")));
        let mut absent = Processes::new(&["no-such-game-xyz.exe".into()]);
        assert_eq!(absent.check(now), None);
        assert_eq!(Processes::new(&[]).check(now), None);
    }

    #[test]
    fn without_nvml_the_gpu_source_is_off() {
        // On a machine with an NVIDIA driver this may report another process; either way it
        // answers without failing, and once off it stays off.
        let mut gpu = GpuBusy::new(u32::MAX);
        let now = chrono::Local::now().naive_local();
        assert_eq!(gpu.check(now), None, "no device has index u32::MAX");
        assert!(gpu.off);
        assert_eq!(gpu.check(now), None);
    }
}
