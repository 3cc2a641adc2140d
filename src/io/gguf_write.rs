//! A streaming GGUF (version 3) writer, as the spec (ggml's docs/gguf.md) lays the file out:
//! magic, version, tensor count, metadata count, the metadata key/values, the tensor infos
//! (name, dims innermost first, ggml type, offset from the data start), padding to
//! `general.alignment` (32), then each tensor's bytes padded to the alignment.
//!
//! candle's `gguf_file::write` needs every tensor in memory at once and writes version 2; this
//! writer takes the tensor infos up front (their sizes follow from shape and type) and asks for
//! one tensor's bytes at a time, so an export holds one tensor, not the model. Output is
//! byte-deterministic: the metadata and tensors in the order given, zero padding.

use std::io::Write;

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

pub const ALIGNMENT: u64 = 32;

/// A metadata value (the GGUF value types mechc writes).
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArr(Vec<String>),
    F32Arr(Vec<f32>),
    I32Arr(Vec<i32>),
    U32Arr(Vec<u32>),
}

impl Meta {
    pub fn str(s: impl Into<String>) -> Meta {
        Meta::Str(s.into())
    }
}

// GGUF value type ids.
const UINT32: u32 = 4;
const INT32: u32 = 5;
const FLOAT32: u32 = 6;
const BOOL: u32 = 7;
const STRING: u32 = 8;
const ARRAY: u32 = 9;
const UINT64: u32 = 10;

/// One tensor as the header describes it. `dims` in HF (row-major, outermost first) order;
/// the file stores them innermost first, as ggml's `ne`.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorInfo {
    /// Bytes of the tensor's data (unpadded).
    pub fn size(&self) -> Result<u64> {
        let n: usize = self.dims.iter().product();
        let bs = self.dtype.block_size();
        if self.dims.last().is_none_or(|&d| d % bs != 0) {
            return Err(Error::invalid(format!(
                "tensor `{}` {:?}: the last dimension is not a multiple of {:?}'s block of {bs}",
                self.name, self.dims, self.dtype
            )));
        }
        Ok((n / bs * self.dtype.type_size()) as u64)
    }
}

/// The spec's `ggml_type` number of the types mechc writes.
fn ggml_type_id(t: GgmlDType) -> Result<u32> {
    Ok(match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q4K => 12,
        GgmlDType::Q6K => 14,
        GgmlDType::BF16 => 30,
        other => return Err(Error::invalid(format!("mechc does not write GGUF tensors of type {other:?}"))),
    })
}

fn pad(n: u64) -> u64 {
    (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &Meta) {
    let arr = |b: &mut Vec<u8>, ty: u32, n: usize| {
        b.extend(ty.to_le_bytes());
        b.extend((n as u64).to_le_bytes());
    };
    match v {
        Meta::U32(x) => b.extend(x.to_le_bytes()),
        Meta::I32(x) => b.extend(x.to_le_bytes()),
        Meta::U64(x) => b.extend(x.to_le_bytes()),
        Meta::F32(x) => b.extend(x.to_le_bytes()),
        Meta::Bool(x) => b.push(*x as u8),
        Meta::Str(s) => put_str(b, s),
        Meta::StrArr(a) => {
            arr(b, STRING, a.len());
            a.iter().for_each(|s| put_str(b, s));
        }
        Meta::F32Arr(a) => {
            arr(b, FLOAT32, a.len());
            a.iter().for_each(|x| b.extend(x.to_le_bytes()));
        }
        Meta::I32Arr(a) => {
            arr(b, INT32, a.len());
            a.iter().for_each(|x| b.extend(x.to_le_bytes()));
        }
        Meta::U32Arr(a) => {
            arr(b, UINT32, a.len());
            a.iter().for_each(|x| b.extend(x.to_le_bytes()));
        }
    }
}

fn type_id(v: &Meta) -> u32 {
    match v {
        Meta::U32(_) => UINT32,
        Meta::I32(_) => INT32,
        Meta::U64(_) => UINT64,
        Meta::F32(_) => FLOAT32,
        Meta::Bool(_) => BOOL,
        Meta::Str(_) => STRING,
        Meta::StrArr(_) | Meta::F32Arr(_) | Meta::I32Arr(_) | Meta::U32Arr(_) => ARRAY,
    }
}

/// The header bytes (through the padding before the data) and each tensor's offset.
pub fn header(meta: &[(String, Meta)], tensors: &[TensorInfo]) -> Result<Vec<u8>> {
    let mut seen = std::collections::BTreeSet::new();
    for (k, _) in meta {
        if !seen.insert(k.as_str()) {
            return Err(Error::invalid(format!("GGUF metadata key `{k}` given twice")));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(Error::invalid(format!("GGUF tensor `{}` given twice", t.name)));
        }
    }
    let mut b = Vec::new();
    b.extend(0x4655_4747u32.to_le_bytes()); // "GGUF"
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        b.extend(type_id(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for &d in t.dims.iter().rev() {
            b.extend((d as u64).to_le_bytes());
        }
        b.extend(ggml_type_id(t.dtype)?.to_le_bytes());
        b.extend(offset.to_le_bytes());
        let size = t.size()?;
        offset += size + pad(size);
    }
    b.resize(b.len() + pad(b.len() as u64) as usize, 0);
    Ok(b)
}

/// Write a whole GGUF to `w`: the header, then each tensor's bytes, which `data(i, w)` writes
/// itself (so no second copy of a tensor is made) and must be exactly the size its info implies.
pub fn write<W: Write>(
    w: &mut W,
    meta: &[(String, Meta)],
    tensors: &[TensorInfo],
    mut data: impl FnMut(usize, &mut Counted<'_, W>) -> Result<()>,
) -> Result<()> {
    w.write_all(&header(meta, tensors)?).map_err(io_err)?;
    for (i, t) in tensors.iter().enumerate() {
        let mut c = Counted { inner: w, n: 0 };
        data(i, &mut c)?;
        let want = t.size()?;
        if c.n != want {
            return Err(Error::invalid(format!("tensor `{}`: {} bytes of data, its info says {want}", t.name, c.n)));
        }
        w.write_all(&vec![0u8; pad(want) as usize]).map_err(io_err)?;
    }
    Ok(())
}

fn io_err(e: std::io::Error) -> Error {
    Error::invalid(format!("writing GGUF: {e}"))
}

/// A writer that counts the bytes through it.
pub struct Counted<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Counted<'_, W> {
    pub fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.n += bytes.len() as u64;
        self.inner.write_all(bytes).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::{Content, Value};
    use candle_core::{Device, Tensor};

    /// candle's independent reader parses what this writer writes: every value type, the
    /// dims order, the offsets of tensors of several types, the data.
    #[test]
    fn candles_reader_reads_every_value_type_and_tensor_back() {
        let meta: Vec<(String, Meta)> = vec![
            ("a.u32".into(), Meta::U32(7)),
            ("a.i32".into(), Meta::I32(-3)),
            ("a.u64".into(), Meta::U64(1 << 40)),
            ("a.f32".into(), Meta::F32(0.5)),
            ("a.bool".into(), Meta::Bool(true)),
            ("a.str".into(), Meta::str("héllo")),
            ("a.strs".into(), Meta::StrArr(vec!["x".into(), "".into(), "yz".into()])),
            ("a.f32s".into(), Meta::F32Arr(vec![1.0, -2.5])),
            ("a.i32s".into(), Meta::I32Arr(vec![1, 3, 6])),
            ("a.u32s".into(), Meta::U32Arr(vec![])),
        ];
        let x: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let t = Tensor::from_slice(&x, (3, 64), &Device::Cpu).unwrap();
        let q8 = candle_core::quantized::QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let f16: Vec<u8> = x[..5].iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        let infos = vec![
            TensorInfo { name: "w.q8".into(), dims: vec![3, 64], dtype: GgmlDType::Q8_0 },
            TensorInfo { name: "v.f16".into(), dims: vec![5], dtype: GgmlDType::F16 },
            TensorInfo { name: "m.f32".into(), dims: vec![3, 64], dtype: GgmlDType::F32 },
        ];
        let mut buf = vec![];
        write(&mut buf, &meta, &infos, |i, w| match i {
            0 => w.put(&q8.data().unwrap()),
            1 => w.put(&f16),
            _ => w.put(&x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()),
        })
        .unwrap();
        let c = Content::read(&mut std::io::Cursor::new(&buf)).unwrap();
        let m = &c.metadata;
        assert_eq!(m["a.u32"].to_u32().unwrap(), 7);
        assert_eq!(m["a.i32"].to_i32().unwrap(), -3);
        assert_eq!(m["a.u64"].to_u64().unwrap(), 1 << 40);
        assert_eq!(m["a.f32"].to_f32().unwrap(), 0.5);
        assert!(m["a.bool"].to_bool().unwrap());
        assert_eq!(m["a.str"].to_string().unwrap(), "héllo");
        let strs: Vec<String> = m["a.strs"].to_vec().unwrap().iter().map(|v| v.to_string().unwrap().clone()).collect();
        assert_eq!(strs, ["x", "", "yz"]);
        assert!(matches!(&m["a.f32s"], Value::Array(a) if a.len() == 2 && a[1].to_f32().unwrap() == -2.5));
        assert!(matches!(&m["a.i32s"], Value::Array(a) if a.iter().map(|v| v.to_i32().unwrap()).eq([1, 3, 6])));
        assert!(matches!(&m["a.u32s"], Value::Array(a) if a.is_empty()));
        assert_eq!(c.tensor_infos["w.q8"].shape.dims(), [3, 64]);
        assert_eq!(c.tensor_infos["w.q8"].ggml_dtype, GgmlDType::Q8_0);
        let mut r = std::io::Cursor::new(&buf);
        let back = c.tensor(&mut r, "m.f32", &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), x);
        let back = c.tensor(&mut r, "v.f16", &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let want: Vec<f32> = x[..5].iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
        assert_eq!(back.to_vec1::<f32>().unwrap(), want);
        let back = c.tensor(&mut r, "w.q8", &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let want = q8.dequantize(&Device::Cpu).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(c.tensor_data_offset % ALIGNMENT, 0);
    }

    #[test]
    fn refuses_what_the_format_cannot_hold() {
        let t = |n: &str, d: usize, ty| TensorInfo { name: n.into(), dims: vec![2, d], dtype: ty };
        let e = header(&[], &[t("w", 48, GgmlDType::Q8_0)]).unwrap_err().to_string();
        assert!(e.contains("multiple of") && e.contains("`w`"), "{e}");
        assert!(header(&[], &[t("w", 8, GgmlDType::F32), t("w", 8, GgmlDType::F32)]).unwrap_err().to_string().contains("twice"));
        let dup = vec![("k".to_string(), Meta::U32(1)), ("k".to_string(), Meta::U32(2))];
        assert!(header(&dup, &[]).unwrap_err().to_string().contains("twice"));
        let mut buf = vec![];
        let e = write(&mut buf, &[], &[t("w", 8, GgmlDType::F32)], |_, w| w.put(&[0; 3])).unwrap_err().to_string();
        assert!(e.contains("3 bytes"), "{e}");
    }
}
