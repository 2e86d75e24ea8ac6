//! Reading safetensors weights and handing them to the model builders.
//!
//! Owns [`Weights`] (every tensor of one file, upcast to f32 on the host, where LoRA merging
//! happens) and [`Params`] (a scoped view that checks each tensor's shape against what the
//! `config.json` implies and moves it to the compute device and dtype). Files are mapped whole
//! ([`FileBytes`]) and validated by the safetensors parser, so a truncated file is an error
//! before any tensor is used. It knows nothing about which architecture asks for which name.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};

use crate::engine::error::{EngineError, Result};
pub(crate) use crate::engine::nets::conv::Conv2d;
pub(crate) use crate::engine::nets::dense::Linear;
pub(crate) use crate::engine::nets::fused::GroupNorm;
use crate::engine::profile::{OpKind, timed};

/// A dense f32 array on the host: the engine's tensor type at its public boundary.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Reads every tensor of a safetensors file as f32 (integer and half tensors are converted).
///
/// Meant for tools and tests that compare against reference outputs.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let weights = Weights::read(path)?;
    let mut out = BTreeMap::new();
    for (name, tensor) in weights.tensors {
        let shape = tensor.dims().to_vec();
        let data = tensor.flatten_all()?.to_vec1::<f32>()?;
        out.insert(name, HostTensor { shape, data });
    }
    Ok(out)
}

/// The largest safetensors header accepted, bytes: the safetensors crate's own limit.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Opens `path` for reading only if it is a regular file (never a device, pipe or folder, which
/// could be read without end), and gives its length.
pub(crate) fn open_regular(path: &Path) -> Result<(std::fs::File, u64)> {
    let io = |source| EngineError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(EngineError::Safetensors {
            path: path.to_owned(),
            reason: "not a regular file".into(),
        });
    }
    Ok((file, meta.len()))
}

/// The bytes of a safetensors file, mapped read-only from the page cache rather than copied:
/// loading SD1.5 reads about 2 GB, which a copy into a fresh buffer made slower than the rest of
/// loading together (issue 19). Dereferences to the file's bytes.
///
/// A file mapped while another process truncates it faults (SIGBUS) on the lost pages. kiln
/// maps a file only while it converts its tensors, and its model cache never writes into a
/// finished file (downloads are renamed into place; eviction unlinks, and skips blobs whose
/// shared use lock a process holds). A file a user names directly (`kiln render --model`, a
/// worker's local model folders) is the user's: overwriting it in place during a load can end
/// the process, as it can with the memory-mapped loading of safetensors/diffusers; on Windows
/// the map instead keeps it from being replaced until the load ends.
#[derive(Debug)]
pub(crate) struct FileBytes(memmap2::Mmap);

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for FileBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// The bytes of the safetensors file `path`, mapped only after its header's declared size has
/// been checked against the limit and the file's length, and never more than that length: a
/// damaged or hostile file costs at most its own size in (page-cache) memory.
pub(crate) fn read_safetensors_bytes(path: &Path) -> Result<FileBytes> {
    use std::io::Read;
    let bad = |reason: String| EngineError::Safetensors {
        path: path.to_owned(),
        reason,
    };
    let io = |source| EngineError::Io {
        path: path.to_owned(),
        source,
    };
    let (mut file, len) = open_regular(path)?;
    if len < 8 {
        return Err(bad(format!("{len} bytes, shorter than a header")));
    }
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).map_err(io)?;
    let header = u64::from_le_bytes(prefix);
    if header > MAX_HEADER_BYTES || header > len - 8 {
        return Err(bad(format!(
            "its header claims {header} bytes in a file of {len} bytes"
        )));
    }
    let len = usize::try_from(len).map_err(|_| bad("too large".into()))?;
    // SAFETY: the map is read-only and lives only as long as the `FileBytes`; what a concurrent
    // truncation would do is stated on `FileBytes`. `populate` maps every page in one call
    // instead of one fault per 4 KiB page later.
    let map = unsafe { memmap2::MmapOptions::new().len(len).populate().map(&file) }.map_err(io)?;
    Ok(FileBytes(map))
}

/// All tensors of one weights file, as f32 on the host. Cloning shares the tensors' storage.
#[derive(Clone, Debug)]
pub(crate) struct Weights {
    /// File name used in error messages.
    pub(crate) file: String,
    pub(crate) tensors: HashMap<String, Tensor>,
}

impl Weights {
    /// Reads and validates `path`, upcasting every tensor to f32.
    pub(crate) fn read(path: &Path) -> Result<Self> {
        Self::from_bytes(path, &read_safetensors_bytes(path)?)
    }

    /// Parses an in-memory safetensors file (`path` only names it in errors). f16, bf16 and
    /// f32 tensors are converted straight from the file's bytes into f32 tensors, several
    /// tensors at once; any other dtype goes through candle's conversion.
    pub(crate) fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        use rayon::prelude::*;
        let bad = |reason: String| EngineError::Safetensors {
            path: path.to_owned(),
            reason,
        };
        let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let views = file.tensors();
        let tensors = views
            .into_par_iter()
            .map(|(name, view)| {
                let tensor = tensor_f32(&view).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
                Ok((name, tensor))
            })
            .collect::<Result<HashMap<String, Tensor>>>()?;
        Ok(Self {
            file: display_name(path),
            tensors,
        })
    }

    /// The tensor called `name`, checked against `shape`.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<&Tensor> {
        let tensor = self
            .tensors
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor {
                file: self.file.clone(),
                name: name.to_owned(),
            })?;
        if tensor.dims() != shape {
            return Err(EngineError::Shape {
                file: self.file.clone(),
                name: name.to_owned(),
                expected: shape.to_vec(),
                found: tensor.dims().to_vec(),
            });
        }
        Ok(tensor)
    }
}

/// A tensor of a safetensors file as f32 on the host: converted from f16, bf16 or f32 bytes in
/// one pass (vectorised where the bytes are aligned), other dtypes through candle.
pub(crate) fn tensor_f32(
    view: &safetensors::tensor::TensorView<'_>,
) -> candle_core::Result<Tensor> {
    to_f32(view)?.to_dtype(DType::F32)
}

/// [`tensor_f32`] before the last step: other dtypes are left as candle reads them.
fn to_f32(view: &safetensors::tensor::TensorView<'_>) -> candle_core::Result<Tensor> {
    use safetensors::Dtype;
    let shape = view.shape().to_vec();
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => widen(data, half::f16::from_bits, |h: &[half::f16], out| {
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, out)
        }),
        Dtype::BF16 => widen(data, half::bf16::from_bits, |h: &[half::bf16], out| {
            half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, out)
        }),
        _ => {
            return candle_core::safetensors::Load::load(view, &Device::Cpu);
        }
    };
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// 16-bit floats (little-endian bytes) to f32: `convert` on the bytes viewed as `H` when they
/// are aligned for it (the header pads the data so they are), else one value at a time.
fn widen<H: bytemuck::Pod + Into<f32>>(
    data: &[u8],
    from_bits: fn(u16) -> H,
    convert: fn(&[H], &mut [f32]),
) -> Vec<f32> {
    let mut out = vec![0f32; data.len() / 2];
    match bytemuck::try_cast_slice::<u8, H>(data) {
        Ok(halves) if cfg!(target_endian = "little") => convert(halves, &mut out),
        _ => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = from_bits(u16::from_le_bytes([b[0], b[1]])).into();
            }
        }
    }
    out
}

/// `parent/file` for messages: enough to tell `unet/…` from `vae/…`.
pub(crate) fn display_name(path: &Path) -> String {
    let mut parts: Vec<String> = path
        .iter()
        .rev()
        .take(2)
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    parts.reverse();
    PathBuf::from_iter(parts).display().to_string()
}

/// A scoped, shape-checked view of [`Weights`] that builds layers on the compute device.
#[derive(Clone)]
pub(crate) struct Params<'a> {
    weights: &'a Weights,
    prefix: String,
    device: &'a Device,
    dtype: DType,
}

impl<'a> Params<'a> {
    pub(crate) fn new(weights: &'a Weights, device: &'a Device, dtype: DType) -> Self {
        Self {
            weights,
            prefix: String::new(),
            device,
            dtype,
        }
    }

    /// The view below `name` (`pp("down_blocks").pp(0)` reads `down_blocks.0.*`).
    pub(crate) fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    /// The tensor `name` under this scope, with the given shape, on the compute device.
    pub(crate) fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}.{name}", self.prefix);
        let tensor = self.weights.get(&full, shape)?;
        Ok(tensor.to_device(self.device)?.to_dtype(self.dtype)?)
    }

    /// `nn.Linear(input, output, bias)`: weight `[output, input]`.
    pub(crate) fn linear(&self, input: usize, output: usize, bias: bool) -> Result<Linear> {
        let weight = self.tensor("weight", &[output, input])?;
        let bias = bias.then(|| self.tensor("bias", &[output])).transpose()?;
        Linear::new(weight, bias)
    }

    /// `nn.Conv2d(input, output, kernel, stride, padding)` with a bias.
    pub(crate) fn conv2d(
        &self,
        input: usize,
        output: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Conv2d> {
        let weight = self.tensor("weight", &[output, input, kernel, kernel])?;
        let bias = self.tensor("bias", &[output])?;
        Conv2d::new(weight, bias, stride, padding)
    }

    /// `nn.GroupNorm(groups, channels, eps)` with affine parameters.
    pub(crate) fn group_norm(&self, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
        let weight = self.tensor("weight", &[channels])?;
        let bias = self.tensor("bias", &[channels])?;
        Ok(GroupNorm::from_tensors(weight, bias, groups, eps, false)?)
    }

    /// `nn.LayerNorm(dim, eps)` with affine parameters.
    pub(crate) fn layer_norm(&self, dim: usize, eps: f64) -> Result<LayerNorm> {
        let weight = self.tensor("weight", &[dim])?;
        let bias = self.tensor("bias", &[dim])?;
        Ok(LayerNorm(candle_nn::LayerNorm::new(weight, bias, eps)))
    }
}

/// `nn.LayerNorm` (candle's), each call counted as [`OpKind::Norm`] by
/// [`crate::engine::profile`].
#[derive(Clone, Debug)]
pub(crate) struct LayerNorm(candle_nn::LayerNorm);

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        timed(OpKind::Norm, || self.0.forward(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(path: &Path) -> String {
        match read_safetensors_bytes(path) {
            Err(EngineError::Safetensors { reason, .. }) => reason,
            other => panic!(
                "{}: expected a safetensors error, got {other:?}",
                path.display()
            ),
        }
    }

    #[test]
    fn a_device_or_folder_is_refused_before_any_read() {
        // /dev/zero reads without end: it must be refused at once, not read.
        #[cfg(unix)]
        assert_eq!(reason(Path::new("/dev/zero")), "not a regular file");
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(reason(dir.path()), "not a regular file");
    }

    #[test]
    fn a_header_larger_than_its_file_is_refused_before_the_body_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lies.safetensors");
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&path, &bytes).unwrap();
        let r = reason(&path);
        assert!(
            r.contains("header claims 1099511627776 bytes in a file of 10"),
            "{r}"
        );
        std::fs::write(&path, b"abc").unwrap();
        assert!(reason(&path).contains("shorter than a header"));
        // A well-formed empty file reads whole.
        let mut ok = 2u64.to_le_bytes().to_vec();
        ok.extend_from_slice(b"{}");
        std::fs::write(&path, &ok).unwrap();
        assert_eq!(&*read_safetensors_bytes(&path).unwrap(), &ok[..]);
    }
}
