//! `kiln devices`: what this build of kiln can compute on, here. Lists the CPU (its SIMD
//! features and thread count), each CUDA card (name, compute capability, free and total
//! memory) and Metal, and says plainly when a GPU backend is not in this build and how to get it.
//! Also the one place the worker commands (`kiln worker`, `kiln run`) turn `--device` into a
//! probed device and the memory they declare and budget.

use kiln_worker::engine::{Device, DeviceInfo};

pub const EXAMPLES: &str = "Examples:
  kiln devices
  kiln worker --device cuda:0 ...      # use the first card listed";

/// Host memory a CPU worker declares when `--memory-mib` is not given, MiB.
pub const CPU_DECLARED_MIB: u64 = 8192;

/// Device memory left out of the pipeline cache for a render's activations when the cache's
/// device budget is taken from the card's free memory: the larger of 4 GiB and a quarter.
fn device_workspace(free: u64) -> u64 {
    (4u64 << 30).max(free / 4)
}

/// A device a worker will use, opened once at start.
#[derive(Debug)]
pub struct Opened {
    pub device: Device,
    pub info: DeviceInfo,
    /// Memory declared to the coordinator, MiB: the flag, else the card's free memory, else
    /// [`CPU_DECLARED_MIB`].
    pub memory_mib: u64,
    /// The pipeline cache's device budget, bytes: the flag, else the card's free memory less
    /// [`device_workspace`], else (Metal, whose memory is the host's) the host budget; unused
    /// on the CPU.
    pub device_cache_bytes: u64,
}

/// Parses `--device` and opens it, so that a device this build or this machine cannot use is
/// an error at start (with how to get one that can), not a failure of every cell.
pub fn open(
    device: &str,
    memory_mib: Option<u64>,
    device_cache_gb: Option<f64>,
    host_cache_bytes: u64,
) -> anyhow::Result<Opened> {
    let device: Device = device
        .parse()
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let info = device.probe()?;
    let free = info.free_bytes;
    let memory_mib = memory_mib
        .or(free.map(|b| b >> 20))
        .unwrap_or(CPU_DECLARED_MIB);
    let device_cache_bytes = match device_cache_gb {
        Some(gb) => (gb.max(0.0) * (1u64 << 30) as f64) as u64,
        None => free.map_or(host_cache_bytes, |f| f.saturating_sub(device_workspace(f))),
    };
    Ok(Opened {
        device,
        info,
        memory_mib,
        device_cache_bytes,
    })
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// One line per device.
pub fn describe(info: &DeviceInfo) -> String {
    let mut line = format!("{:<8} {}", info.device.to_string(), info.name);
    if let Some((major, minor)) = info.compute_capability {
        line.push_str(&format!(", compute capability {major}.{minor}"));
    }
    if let (Some(free), Some(total)) = (info.free_bytes, info.total_bytes) {
        line.push_str(&format!(", {} free of {}", gib(free), gib(total)));
    }
    line
}

/// Runs `kiln devices`.
pub fn main() -> anyhow::Result<()> {
    let (found, notes) = kiln_worker::engine::device::list();
    for info in &found {
        println!("{}", describe(info));
    }
    for note in notes {
        println!("{note}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_is_at_least_four_gib_and_grows_with_the_card() {
        assert_eq!(device_workspace(8 << 30), 4 << 30);
        assert_eq!(device_workspace(80 << 30), 20 << 30);
    }

    #[test]
    fn a_cpu_declares_the_default_or_the_flag() {
        let cpu = open("cpu", None, None, 1 << 30).unwrap();
        assert_eq!(cpu.memory_mib, CPU_DECLARED_MIB);
        assert_eq!(open("cpu", Some(100), None, 0).unwrap().memory_mib, 100);
        let flag = open("cpu", None, Some(2.0), 0).unwrap();
        assert_eq!(flag.device_cache_bytes, 2 << 30);
        let err = open("gpu", None, None, 0).unwrap_err().to_string();
        assert!(err.starts_with("--device: "), "{err}");
    }
}
