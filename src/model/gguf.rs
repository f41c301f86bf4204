//! What candle's GGUF reader does not say when it refuses a file: which tensor
//! has a type it cannot read. Its error names only the type's number, so on
//! failure the loader walks the header itself (metadata skipped, tensor infos
//! read) to name the tensor and its type.

use std::io::{BufReader, Read, Seek};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The ggml tensor types candle 0.11 reads (and so claw loads).
const READABLE: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// ggml's name of tensor type `t` (ggml.h's `ggml_type`).
pub fn type_name(t: u32) -> &'static str {
    match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// The names of the types claw loads, for error messages.
pub fn readable_types() -> String {
    let names: Vec<&str> = READABLE.iter().map(|&t| type_name(t)).collect();
    names.join(", ")
}

/// The first tensor of the GGUF file at `path` whose type claw cannot read,
/// with that type; None when every tensor's type is readable.
pub fn unreadable_tensor(path: &Path) -> Result<Option<(String, u32)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut r = Header {
        reader: BufReader::new(file),
        wide: true,
    };
    let mut magic = [0u8; 4];
    r.reader.read_exact(&mut magic)?;
    if &magic != b"GGUF" {
        bail!("{} is not a GGUF file", path.display());
    }
    let version = r.u32()?;
    // Version 1 wrote counts and lengths as u32, later versions as u64.
    r.wide = version >= 2;
    let tensors = r.len()?;
    let entries = r.len()?;
    for _ in 0..entries {
        r.skip_string()?;
        let ty = r.u32()?;
        r.skip_value(ty)?;
    }
    for _ in 0..tensors {
        let name = r.string()?;
        let dims = r.u32()?;
        for _ in 0..dims {
            r.len()?;
        }
        let ty = r.u32()?;
        r.u64()?;
        if !READABLE.contains(&ty) {
            return Ok(Some((name, ty)));
        }
    }
    Ok(None)
}

struct Header<R> {
    reader: R,
    /// Lengths are u64 (GGUF v2+) rather than u32.
    wide: bool,
}

impl<R: Read + Seek> Header<R> {
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.reader.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.reader.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn len(&mut self) -> Result<u64> {
        match self.wide {
            true => self.u64(),
            false => Ok(u64::from(self.u32()?)),
        }
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let n = i64::try_from(n).context("GGUF length out of range")?;
        self.reader.seek_relative(n)?;
        Ok(())
    }

    fn skip_string(&mut self) -> Result<()> {
        let n = self.len()?;
        self.skip(n)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        anyhow::ensure!(n <= 1 << 16, "GGUF tensor name of {n} bytes");
        let mut b = vec![0u8; n as usize];
        self.reader.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Skips one metadata value of GGUF value type `ty`.
    fn skip_value(&mut self, ty: u32) -> Result<()> {
        match ty {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => self.skip_string(),
            9 => {
                let item = self.u32()?;
                let n = self.len()?;
                let width = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    _ => return (0..n).try_for_each(|_| self.skip_value(item)),
                };
                self.skip(n.checked_mul(width).context("GGUF array too long")?)
            }
            other => bail!("unknown GGUF metadata value type {other}"),
        }
    }
}
