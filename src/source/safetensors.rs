//! The safetensors container, read and written one tensor at a time.
//!
//! A file is `u64` little-endian header length `H`, `H` bytes of JSON
//! (`{"name": {"dtype": "I8", "shape": [N, K], "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the data; offsets count from the end of the header. Every header field is checked
//! against the file before it sizes anything: a tensor's bytes are read only after its
//! `shape × dtype size` has been found equal to `end − begin` and inside the file.

use candle_core::{bail, DType, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Largest header accepted (the safetensors reference implementation's limit).
const MAX_HEADER: u64 = 100_000_000;

/// Element types of the container that this crate reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 8-bit signed integers (int8 weights).
    I8,
    /// 8-bit unsigned integers.
    U8,
    /// 32-bit signed integers (static zero points).
    I32,
    /// 64-bit signed integers.
    I64,
    /// IEEE half precision (int8 weight scales).
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::I8 | Dtype::U8 => 1,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::F64 => 8,
        }
    }

    /// The dtype's name in a safetensors header (`"F16"`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Dtype::I8, Dtype::U8, Dtype::I32, Dtype::I64, Dtype::F16, Dtype::BF16, Dtype::F32, Dtype::F64].into_iter().find(|d| d.name() == s)
    }

    /// Whether values are floating point.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }

    /// The candle dtype holding the same bytes (`I8` has none: it is read as `U8`).
    pub fn candle(self) -> DType {
        match self {
            Dtype::I8 | Dtype::U8 => DType::U8,
            Dtype::I32 => DType::I32,
            Dtype::I64 => DType::I64,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
        }
    }

    /// The container dtype of a candle float dtype.
    pub fn from_candle(dtype: DType) -> Result<Self> {
        Ok(match dtype {
            DType::U8 => Dtype::U8,
            DType::I32 => Dtype::I32,
            DType::I64 => Dtype::I64,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::F32 => Dtype::F32,
            DType::F64 => Dtype::F64,
            other => bail!("tensors of dtype {other:?} cannot be written to safetensors here"),
        })
    }
}

/// Where one tensor's bytes lie, checked against the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Absolute position of the first byte in the file.
    offset: u64,
    len: u64,
}

/// One safetensors file, its header parsed and checked; data read on demand with `pread`, so
/// nothing of it stays resident after a tensor has been used.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    tensors: BTreeMap<String, TensorInfo>,
}

fn err(path: &Path, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: {msg}", path.display()))
}

impl SafetensorsFile {
    /// Opens `path` and checks its header: every tensor's dtype, shape and byte range against the file; errors name the file and tensor.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| err(path, format!("cannot open: {e}")))?;
        let file_len = file.metadata().map_err(|e| err(path, e))?.len();
        let mut len8 = [0u8; 8];
        file.read_exact_at(&mut len8, 0).map_err(|_| err(path, format!("not a safetensors file ({file_len} bytes, no header)")))?;
        let header_len = u64::from_le_bytes(len8);
        if header_len > MAX_HEADER || header_len > file_len - 8 {
            bail!(
                "{}: safetensors header of {header_len} bytes does not fit the file ({file_len} bytes): truncated or not safetensors",
                path.display()
            )
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8).map_err(|e| err(path, e))?;
        let json: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| err(path, format!("safetensors header is not valid JSON: {e}")))?;
        let Some(entries) = json.as_object() else { bail!("{}: safetensors header is not a JSON object", path.display()) };
        let data_start = 8 + header_len;
        let data_len = file_len - data_start;
        let mut tensors = BTreeMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                continue;
            }
            let info = parse_entry(entry, data_start, data_len).map_err(|m| err(path, format!("tensor '{name}': {m}")))?;
            tensors.insert(name.clone(), info);
        }
        Ok(Self { path: path.to_path_buf(), file, tensors })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in the order their data lies in the file.
    pub fn names_in_storage_order(&self) -> Vec<String> {
        let mut names: Vec<(&String, u64)> = self.tensors.iter().map(|(n, i)| (n, i.offset)).collect();
        names.sort_by_key(|&(_, at)| at);
        names.into_iter().map(|(n, _)| n.clone()).collect()
    }

    /// The header entry of `name` (an error naming the file when there is none).
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| err(&self.path, format!("no tensor '{name}'")))
    }

    /// The stored bytes of `name` into `buf` (replacing its contents, reusing its allocation);
    /// their length was checked against the header when the file was opened.
    pub fn read_into(&self, name: &str, buf: &mut Vec<u8>) -> Result<()> {
        let info = self.info(name)?;
        if buf.capacity() < info.len as usize {
            *buf = crate::kernels::memory::zeroed(info.len as usize);
        }
        buf.resize(info.len as usize, 0);
        self.file.read_exact_at(buf, info.offset).map_err(|e| err(&self.path, format!("reading tensor '{name}': {e}")))
    }

    /// Asks the kernel to start reading `name`'s bytes into the page cache in the background
    /// (`posix_fadvise(WILLNEED)`), so that a later [`Self::read_into`] finds them there.
    pub fn prefetch(&self, name: &str) {
        use std::os::fd::AsRawFd;
        if let Ok(info) = self.info(name) {
            let (Ok(offset), Ok(len)) = (libc::off_t::try_from(info.offset), libc::off_t::try_from(info.len)) else { return };
            // SAFETY: a plain system call on a descriptor this struct owns; it reads no memory
            // of ours, and its result (a hint) is ignored.
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED) };
        }
    }
}

fn parse_entry(entry: &serde_json::Value, data_start: u64, data_len: u64) -> std::result::Result<TensorInfo, String> {
    let dtype = entry.get("dtype").and_then(|d| d.as_str()).ok_or("no dtype")?;
    let dtype = Dtype::parse(dtype).ok_or_else(|| format!("dtype '{dtype}' is not supported"))?;
    let shape: Vec<usize> = entry
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or("no shape")?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()).ok_or("shape holds a non-integer"))
        .collect::<std::result::Result<_, _>>()?;
    let offsets = entry.get("data_offsets").and_then(|o| o.as_array()).ok_or("no data_offsets")?;
    let [begin, end] = offsets.as_slice() else { return Err("data_offsets must hold two numbers".into()) };
    let (Some(begin), Some(end)) = (begin.as_u64(), end.as_u64()) else { return Err("data_offsets must hold two numbers".into()) };
    if begin > end || end > data_len {
        return Err(format!("data_offsets [{begin}, {end}] lie outside the {data_len} data bytes of the file (truncated?)"));
    }
    let bytes = shape.iter().try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d as u64)).ok_or("shape overflows")?;
    if bytes != end - begin {
        return Err(format!("shape {shape:?} of {} needs {bytes} bytes, the header gives it {}", dtype.name(), end - begin));
    }
    Ok(TensorInfo { dtype, shape, offset: data_start + begin, len: bytes })
}

/// A tensor to be written: its name, dtype and shape, known before any data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl Entry {
    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// Writes `entries` to `path`: the header first (all sizes are known), then each tensor's bytes
/// as `fill(i, buf)` produces them into `buf` (cleared before each call). A tensor whose bytes
/// disagree with its declared size is an error, and the file is then incomplete: callers write
/// under a temporary name.
pub fn write_file(path: &Path, entries: &[Entry], mut fill: impl FnMut(usize, &mut Vec<u8>) -> Result<()>) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut at = 0u64;
    for e in entries {
        let n = e.nbytes();
        header.insert(e.name.clone(), serde_json::json!({"dtype": e.dtype.name(), "shape": e.shape, "data_offsets": [at, at + n]}));
        at += n;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut text = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| err(path, e))?;
    // Data starts on an 8-byte boundary (header padded with spaces, as the reference writer does).
    text.resize((text.len() + 8).next_multiple_of(8) - 8, b' ');
    let mut out = SequentialWriter::create(path).map_err(|e| err(path, format!("cannot create: {e}")))?;
    let io = |e: std::io::Error| err(path, format!("writing: {e}"));
    out.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&text).map_err(io)?;
    // A writer thread takes each tensor's bytes while the next one is being produced (read,
    // quantized): writing into the page cache costs as much as the arithmetic.
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
        let writer = scope.spawn(move || -> Result<()> {
            for buf in rx {
                out.write_all(&buf).map_err(io)?;
            }
            out.finish().map_err(io)
        });
        let mut produce = || -> Result<()> {
            for (i, e) in entries.iter().enumerate() {
                let mut buf = Vec::new();
                fill(i, &mut buf)?;
                if buf.len() as u64 != e.nbytes() {
                    bail!(
                        "{}: tensor '{}' {:?} of {} produced {} bytes, expected {}",
                        path.display(),
                        e.name,
                        e.shape,
                        e.dtype.name(),
                        buf.len(),
                        e.nbytes()
                    )
                }
                // A closed channel means the writer failed: stop, its error is reported below.
                if tx.send(buf).is_err() {
                    break;
                }
            }
            Ok(())
        };
        let produced = produce();
        drop(tx);
        let written = writer.join().map_err(|_| err(path, "the writer thread panicked"))?;
        produced.and(written)
    })
}

/// Alignment of direct writes: file offsets, lengths and buffer addresses (the largest logical
/// block size in common use).
const ALIGN: usize = 4096;
/// Bytes gathered before each write.
const STAGE: usize = 8 << 20;

/// Writes a file front to back through an aligned staging buffer, bypassing the page cache
/// (`O_DIRECT`) where the filesystem allows it: a checkpoint is written once and not read back
/// soon, and copying gigabytes into the page cache costs as much CPU time as quantizing them.
/// Elsewhere (tmpfs, other systems) it writes through the page cache. The last partial block
/// always goes through the page cache.
struct SequentialWriter {
    direct: Option<File>,
    plain: File,
    buf: Vec<u8>,
    /// Where the aligned staging area starts in `buf`.
    start: usize,
    /// Bytes staged.
    len: usize,
    /// File offset of the staging area (a multiple of `ALIGN`).
    pos: u64,
}

impl SequentialWriter {
    fn create(path: &Path) -> std::io::Result<Self> {
        let plain = File::create(path)?;
        #[cfg(target_os = "linux")]
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
        };
        #[cfg(not(target_os = "linux"))]
        let direct = None;
        let buf = vec![0u8; STAGE + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Ok(Self { direct, plain, buf, start, len: 0, pos: 0 })
    }

    fn write_all(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = (STAGE - self.len).min(data.len());
            self.buf[self.start + self.len..self.start + self.len + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
            if self.len == STAGE {
                self.write_blocks()?;
            }
        }
        Ok(())
    }

    /// Writes the whole blocks staged; the rest moves to the front of the staging area.
    fn write_blocks(&mut self) -> std::io::Result<()> {
        let whole = self.len / ALIGN * ALIGN;
        if whole == 0 {
            return Ok(());
        }
        let blocks = &self.buf[self.start..self.start + whole];
        let direct = match &self.direct {
            Some(d) => d.write_all_at(blocks, self.pos),
            None => self.plain.write_all_at(blocks, self.pos),
        };
        match direct {
            // A filesystem that takes O_DIRECT at open but not these writes: page cache from now on.
            Err(e) if self.direct.is_some() && e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct = None;
                self.plain.write_all_at(blocks, self.pos)?;
            }
            other => other?,
        }
        self.pos += whole as u64;
        self.buf.copy_within(self.start + whole..self.start + self.len, self.start);
        self.len -= whole;
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.write_blocks()?;
        self.plain.write_all_at(&self.buf[self.start..self.start + self.len], self.pos)?;
        if let Some(d) = &self.direct {
            d.sync_all()?;
        }
        self.plain.sync_all()
    }
}
