//! Compute devices: naming one (`cpu`, `cuda:N`, `metal:N`), opening it in its compute dtype,
//! and asking it what it is and how much memory it has free.
//!
//! Owns the question "can this build use that device?", answered at start-up rather than at a
//! worker's first cell: a GPU backend that was not compiled in, or a driver that does not
//! answer, is an [`EngineError::Device`] with a message a user can act on. The GPU backends
//! (candle's `cuda` and `metal` features) are compiled in only when the worker crate is built
//! with the feature of that name; nothing outside this module needs to know which are.

use std::str::FromStr;

use candle_core::DType;

use crate::engine::error::{ComputeError, EngineError, Result};

/// How a user gets a build with CUDA, for error messages and `kiln devices`.
pub const CUDA_HINT: &str = "build kiln with CUDA: tools/gpu/build.sh (README, section GPU)";

/// How a user gets a build with Metal.
pub const METAL_HINT: &str = "build kiln on macOS with `cargo build --release --features metal`";

/// Where the networks run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// The host CPU, computing in f32 (the reference-exact path).
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal, in f16 (needs the `cuda` feature).
    Cuda(usize),
    /// An Apple GPU by ordinal, in f16 (needs the `metal` feature).
    Metal(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

/// `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`.
impl FromStr for Device {
    type Err = EngineError;

    fn from_str(value: &str) -> Result<Self> {
        let bad = || {
            EngineError::InvalidRequest(format!(
                "unknown device {value:?} (expected cpu, cuda, cuda:N, metal or metal:N)"
            ))
        };
        let ordinal = |n: &str| n.parse::<usize>().map_err(|_| bad());
        match value.split_once(':') {
            None if value == "cpu" => Ok(Self::Cpu),
            None if value == "cuda" => Ok(Self::Cuda(0)),
            None if value == "metal" => Ok(Self::Metal(0)),
            Some(("cuda", n)) => Ok(Self::Cuda(ordinal(n)?)),
            Some(("metal", n)) => Ok(Self::Metal(ordinal(n)?)),
            _ => Err(bad()),
        }
    }
}

/// What a device is and what it has free, as `kiln devices` and a worker's registration show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device.
    pub device: Device,
    /// A human name: the card's name, or the CPU's instruction-set features.
    pub name: String,
    /// CUDA compute capability (major, minor).
    pub compute_capability: Option<(u32, u32)>,
    /// Device memory free now, bytes (GPUs only; the CPU shares the host's memory).
    pub free_bytes: Option<u64>,
    /// Device memory in all, bytes (GPUs only).
    pub total_bytes: Option<u64>,
}

impl Device {
    /// Whether this is a GPU (its weights live in device memory, apart from the host's).
    pub fn is_gpu(self) -> bool {
        !matches!(self, Self::Cpu)
    }

    /// Opens the device and returns it with its compute dtype: f32 on the CPU, f16 on GPUs.
    pub(crate) fn open(self) -> Result<(candle_core::Device, DType)> {
        match self {
            Self::Cpu => Ok((candle_core::Device::Cpu, DType::F32)),
            Self::Cuda(i) => {
                if !cfg!(feature = "cuda") {
                    return Err(self.not_compiled(CUDA_HINT));
                }
                candle_core::Device::new_cuda(i)
                    .map(|d| (d, DType::F16))
                    .map_err(|e| {
                        self.failed(e.context(
                            "the NVIDIA driver said no (`kiln devices` lists the cards, \
                             `nvidia-smi` checks the driver: this build needs 580 or newer)",
                        ))
                    })
            }
            Self::Metal(i) => {
                if !cfg!(feature = "metal") {
                    return Err(self.not_compiled(METAL_HINT));
                }
                candle_core::Device::new_metal(i)
                    .map(|d| (d, DType::F16))
                    .map_err(|e| self.failed(e))
            }
        }
    }

    /// Opens the device and describes it: the check a worker makes before it registers, so
    /// that a device this build or this machine cannot use fails at start, not at a cell.
    pub fn probe(self) -> Result<DeviceInfo> {
        let (handle, _) = self.open()?;
        let info = DeviceInfo {
            device: self,
            name: match self {
                Self::Cpu => cpu_name(),
                Self::Cuda(i) => format!("CUDA device {i}"),
                Self::Metal(i) => format!("Metal device {i}"),
            },
            compute_capability: None,
            free_bytes: None,
            total_bytes: None,
        };
        #[cfg(feature = "cuda")]
        let info = match &handle {
            candle_core::Device::Cuda(cuda) => {
                cuda::describe(cuda, info).map_err(|e| self.failed(e))?
            }
            _ => info,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = handle;
        Ok(info)
    }

    fn not_compiled(self, hint: &str) -> EngineError {
        EngineError::Device {
            device: self.to_string(),
            reason: ComputeError::from(candle_core::Error::Msg(format!(
                "this kiln was built without {} support; {hint}",
                match self {
                    Self::Metal(_) => "Metal",
                    _ => "CUDA",
                }
            ))),
        }
    }

    fn failed(self, e: candle_core::Error) -> EngineError {
        EngineError::Device {
            device: self.to_string(),
            reason: e.into(),
        }
    }
}

/// Device memory free now on the device `handle`, bytes; `None` on the CPU.
pub(crate) fn free_bytes(handle: &candle_core::Device) -> Option<u64> {
    match handle {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(cuda) => cuda::free_bytes(cuda),
        _ => None,
    }
}

/// The lowest free device memory seen while it runs, for benchmarks: a thread that asks the
/// driver every 2 ms. Comparable with any other process measured the same way (free memory
/// before loading minus the lowest seen), allocator caches included.
pub struct MemoryWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<u64>>,
}

impl MemoryWatch {
    /// Starts watching `device`; `None` on the CPU (use the process's peak RSS there).
    pub fn start(device: Device) -> Result<Option<Self>> {
        if !device.is_gpu() {
            return Ok(None);
        }
        let (handle, _) = device.open()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut lowest: Option<u64> = None;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(free) = free_bytes(&handle) {
                    lowest = Some(lowest.map_or(free, |l| l.min(free)));
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            lowest
        });
        Ok(Some(Self { stop, thread }))
    }

    /// Stops and returns the lowest free memory seen, bytes.
    pub fn stop(self) -> Option<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().ok().flatten()
    }
}

/// Every device this build can use on this machine, for `kiln devices`: the CPU first, then
/// each CUDA card; with a line for each GPU backend that is not compiled in or finds nothing.
pub fn list() -> (Vec<DeviceInfo>, Vec<String>) {
    let mut found = vec![Device::Cpu.probe().expect("the CPU always opens")];
    let mut notes = Vec::new();
    if cfg!(feature = "cuda") {
        match cuda_count() {
            Ok(0) => notes.push("CUDA: built in, but no NVIDIA card was found".into()),
            Ok(n) => {
                for i in 0..n {
                    match Device::Cuda(i).probe() {
                        Ok(info) => found.push(info),
                        Err(e) => notes.push(e.to_string()),
                    }
                }
            }
            Err(e) => notes.push(format!(
                "CUDA: built in, but the NVIDIA driver does not answer ({e}); check `nvidia-smi`"
            )),
        }
    } else {
        notes.push(format!("CUDA: not in this build; {CUDA_HINT}"));
    }
    if cfg!(feature = "metal") {
        match Device::Metal(0).probe() {
            Ok(info) => found.push(info),
            Err(e) => notes.push(e.to_string()),
        }
    } else if cfg!(target_os = "macos") {
        notes.push(format!("Metal: not in this build; {METAL_HINT}"));
    }
    (found, notes)
}

fn cuda_count() -> std::result::Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        cuda::count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(0)
    }
}

/// The CPU's SIMD features that candle's kernels use, and its thread count.
fn cpu_name() -> String {
    let mut features = Vec::new();
    if candle_core::utils::with_avx() {
        features.push("avx");
    }
    if candle_core::utils::with_f16c() {
        features.push("f16c");
    }
    if candle_core::utils::with_neon() {
        features.push("neon");
    }
    if candle_core::utils::with_simd128() {
        features.push("simd128");
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            features.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            features.push("fma");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            features.push("avx512f");
        }
    }
    format!(
        "{} CPU, {} threads, features: {}",
        std::env::consts::ARCH,
        candle_core::utils::get_num_threads(),
        if features.is_empty() {
            "none".into()
        } else {
            features.join(" ")
        }
    )
}

#[cfg(feature = "cuda")]
mod cuda {
    //! The CUDA driver's answers, through the `cudarc` that candle re-exports.

    use candle_core::cuda_backend::cudarc::driver::CudaContext;

    use super::DeviceInfo;

    pub(super) fn count() -> Result<usize, String> {
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| e.to_string())
    }

    pub(super) fn describe(
        device: &candle_core::CudaDevice,
        mut info: DeviceInfo,
    ) -> candle_core::Result<DeviceInfo> {
        let ctx = device.cuda_stream().context().clone();
        let wrap = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
            candle_core::Error::Cuda(Box::new(e))
        };
        info.name = ctx.name().map_err(wrap)?;
        let (major, minor) = ctx.compute_capability().map_err(wrap)?;
        info.compute_capability = Some((major.max(0) as u32, minor.max(0) as u32));
        let (free, total) = ctx.mem_get_info().map_err(wrap)?;
        info.free_bytes = Some(free as u64);
        info.total_bytes = Some(total as u64);
        Ok(info)
    }

    pub(super) fn free_bytes(device: &candle_core::CudaDevice) -> Option<u64> {
        let ctx = device.cuda_stream().context().clone();
        ctx.mem_get_info().ok().map(|(free, _)| free as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (text, device) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:3", Device::Cuda(3)),
            ("metal", Device::Metal(0)),
            ("metal:1", Device::Metal(1)),
        ] {
            assert_eq!(text.parse::<Device>().unwrap(), device, "{text}");
        }
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cpu:0", "rocm:0", ""] {
            let err = bad.parse::<Device>().unwrap_err().to_string();
            assert!(err.contains("expected cpu, cuda"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_cpu_is_always_listed_first() {
        let (found, _) = list();
        assert_eq!(found[0].device, Device::Cpu);
        assert!(found[0].name.contains("threads"), "{}", found[0].name);
        assert_eq!(found[0].free_bytes, None);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_this_build_lacks_fails_at_probe_and_says_how_to_get_it() {
        let err = Device::Cuda(0).probe().unwrap_err().to_string();
        assert!(err.starts_with("cannot use device cuda:0"), "{err}");
        assert!(err.contains("built without CUDA support"), "{err}");
        assert!(err.contains("tools/gpu/build.sh"), "{err}");
        let (_, notes) = list();
        assert!(
            notes.iter().any(|n| n.contains("CUDA: not in this build")),
            "{notes:?}"
        );
    }
}
