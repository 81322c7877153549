//! Safetensors weights read tensor by tensor with positioned reads, never memory-mapped.
//!
//! **Why not a memory map** (candle's `VarBuilder::from_mmaped_safetensors`): when a mapped
//! file shrinks underneath (truncated or rewritten in place by another process, a network
//! file system going away), touching a page past the new end raises SIGBUS, which kills
//! the process with no error message and no chance to clean up. With `pread` the same event
//! is an I/O error naming the file. The cost is small: candle copies every tensor out of
//! the map into memory it owns anyway, so reading each tensor's bytes into a buffer first
//! adds one short-lived buffer of one tensor at a time; peak memory is the loaded model
//! plus its largest tensor, as with the map. The files are only read while a model loads.
//!
//! **What is checked before any tensor is read**, against the file's length: the 8-byte
//! header length is below the file's length (and at most 100 MB, safetensors' own cap),
//! the header is UTF-8 JSON describing tensors whose offsets follow one another from 0
//! with sizes that match their dtype and shape without overflow (the safetensors crate's
//! validation), and the tensor data ends exactly where the file ends. A hostile header can
//! therefore make farcer allocate at most the file's own size.

use crate::error::{Error, IoContext, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Largest header the safetensors format allows.
const MAX_HEADER: u64 = 100_000_000;

struct WeightFile {
    path: PathBuf,
    file: File,
    /// Where tensor data starts (8 + header length).
    data_start: u64,
}

/// The tensors of one or more safetensors files (a checkpoint's shards), checked and
/// indexed, read on demand.
pub struct WeightFiles {
    files: Vec<WeightFile>,
    tensors: HashMap<String, (usize, TensorInfo)>,
}

impl WeightFiles {
    /// Opens and checks every file (see the module's notes); a tensor name found in two
    /// files is an error.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let (file, data_start, meta) = read_header(path)?;
            for (name, info) in meta.tensors() {
                if tensors.contains_key(&name) {
                    return Err(Error::model(
                        path.display().to_string(),
                        format!("tensor `{name}` is also in another shard"),
                    ));
                }
                tensors.insert(name, (i, info.clone()));
            }
            files.push(WeightFile {
                path: path.clone(),
                file,
                data_start,
            });
        }
        Ok(WeightFiles { files, tensors })
    }

    /// Names of every tensor, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Reads one tensor in its stored dtype, on `device`.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (i, info) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::model(self.where_(), format!("no tensor named `{name}`")))?;
        let f = &self.files[*i];
        let (s, e) = info.data_offsets;
        let mut buf = vec![0u8; e - s];
        f.file
            .read_exact_at(&mut buf, f.data_start + s as u64)
            .map_err(|err| {
                let err = if err.kind() == std::io::ErrorKind::UnexpectedEof {
                    std::io::Error::new(
                        err.kind(),
                        format!("tensor `{name}` ends past the end of the file: it was truncated while loading"),
                    )
                } else {
                    err
                };
                Error::io(&f.path, err)
            })?;
        let view = TensorView::new(info.dtype, info.shape.clone(), &buf).map_err(|err| {
            Error::model(
                f.path.display().to_string(),
                format!("tensor `{name}`: {err}"),
            )
        })?;
        view.load(device).map_err(|err| {
            Error::model(
                f.path.display().to_string(),
                format!("tensor `{name}`: {err}"),
            )
        })
    }

    /// A `VarBuilder` over these files, converting to `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn where_(&self) -> String {
        match self.files.as_slice() {
            [one] => one.path.display().to_string(),
            _ => self
                .files
                .first()
                .and_then(|f| f.path.parent())
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }
    }
}

/// A `VarBuilder` over safetensors files, read without a memory map.
pub fn var_builder(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    Ok(WeightFiles::open(paths)?.var_builder(dtype, device))
}

/// The checked header of one file: the open file, where data starts, the tensors.
fn read_header(path: &Path) -> Result<(File, u64, Metadata)> {
    let bad = |m: String| Error::model(path.display().to_string(), m);
    let file = File::open(path).at(path)?;
    let meta = file.metadata().at(path)?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let len = meta.len();
    let mut n = [0u8; 8];
    if len < 8 {
        return Err(bad(format!(
            "{len} bytes: too short for a safetensors file (truncated?)"
        )));
    }
    file.read_exact_at(&mut n, 0).at(path)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len - 8 {
        return Err(bad(format!(
            "the header claims {n} bytes but the file has {len}: truncated, or not a safetensors file"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8).at(path)?;
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a safetensors header: {e}")))?;
    let data_len = metadata
        .tensors()
        .values()
        .map(|t| t.data_offsets.1 as u64)
        .max()
        .unwrap_or(0);
    let data_start = 8 + n;
    if data_start + data_len != len {
        return Err(bad(format!(
            "the header describes {data_len} bytes of tensor data, the file holds {} after it: truncated or damaged",
            len - data_start
        )));
    }
    Ok((file, data_start, metadata))
}

impl SimpleBackend for WeightFiles {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some((_, info)) = self.tensors.get(name) {
            if info.shape.as_slice() != s.dims() {
                return Err(candle_core::Error::UnexpectedShape {
                    msg: format!("shape mismatch for {name}"),
                    expected: s,
                    got: info.shape.clone().into(),
                }
                .bt());
            }
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
