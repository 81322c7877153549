//! Limits on the files that data names (images and clips), checked before anything is
//! read: only regular files are opened (a FIFO would block, a device would never end, a
//! folder is a mistake), the file size is checked first, and an image's pixel count is
//! read from its header before it is decoded.
//!
//! Defaults: images up to 32 MiB and 40 megapixels, clips up to 4 GiB. Each can be
//! changed with an environment variable holding a whole number:
//! `FARCER_MAX_IMAGE_BYTES`, `FARCER_MAX_IMAGE_PIXELS`, `FARCER_MAX_CLIP_BYTES`.
//! (`farcer serve` has its own, smaller limits for images sent over HTTP.)

use crate::error::{Error, IoContext, Result};
use std::io::Read;
use std::path::Path;

/// What an image or clip file may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    pub max_image_bytes: u64,
    pub max_image_pixels: u64,
    pub max_clip_bytes: u64,
}

pub const MAX_IMAGE_BYTES_VAR: &str = "FARCER_MAX_IMAGE_BYTES";
pub const MAX_IMAGE_PIXELS_VAR: &str = "FARCER_MAX_IMAGE_PIXELS";
pub const MAX_CLIP_BYTES_VAR: &str = "FARCER_MAX_CLIP_BYTES";

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_image_bytes: 32 << 20,
            max_image_pixels: 40_000_000,
            max_clip_bytes: 4 << 30,
        }
    }
}

impl InputLimits {
    /// The defaults, changed by the environment variables that are set. A value that is
    /// not a whole number above 0 is an error naming the variable.
    pub fn from_env() -> Result<Self> {
        let mut l = InputLimits::default();
        for (var, slot) in [
            (MAX_IMAGE_BYTES_VAR, &mut l.max_image_bytes),
            (MAX_IMAGE_PIXELS_VAR, &mut l.max_image_pixels),
            (MAX_CLIP_BYTES_VAR, &mut l.max_clip_bytes),
        ] {
            let Some(v) = std::env::var_os(var) else {
                continue;
            };
            let s = v.to_string_lossy();
            *slot = s
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| Error::input(var, format!("`{s}` is not a whole number above 0")))?;
        }
        Ok(l)
    }
}

/// Why a file named by the data cannot be used, checked from its metadata (symlinks
/// followed): missing, not a regular file, or larger than `max_bytes`. `var` names the
/// environment variable that sets the limit.
pub fn check_file(path: &Path, max_bytes: u64, var: &str) -> std::result::Result<u64, String> {
    let m = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        _ => e.to_string(),
    })?;
    if !m.is_file() {
        return Err(format!(
            "not a regular file (a {}): only files are read",
            kind_name(&m)
        ));
    }
    if m.len() > max_bytes {
        return Err(format!(
            "{} bytes, more than the {max_bytes} allowed (set {var} to change the limit)",
            m.len()
        ));
    }
    Ok(m.len())
}

fn kind_name(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "folder"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// The bytes of an image file, within the limits (the size is checked before reading
/// and again while reading, in case the file grows).
pub fn read_image_bytes(path: &Path, limits: &InputLimits) -> Result<Vec<u8>> {
    let max = limits.max_image_bytes;
    let bad = |m: String| Error::input(path.display().to_string(), m);
    check_file(path, max, MAX_IMAGE_BYTES_VAR).map_err(bad)?;
    let f = std::fs::File::open(path).at(path)?;
    // The path may have been replaced between the check and the open.
    let m = f.metadata().at(path)?;
    if !m.is_file() {
        return Err(bad(format!("not a regular file (a {})", kind_name(&m))));
    }
    let mut bytes = Vec::with_capacity(m.len().min(max) as usize);
    f.take(max + 1).read_to_end(&mut bytes).at(path)?;
    if bytes.len() as u64 > max {
        return Err(bad(format!(
            "more than the {max} bytes allowed (set {MAX_IMAGE_BYTES_VAR} to change the limit)"
        )));
    }
    Ok(bytes)
}

/// Decodes image bytes (PNG or JPEG); the pixel count is read from the header and checked
/// before any pixel is decoded. `path` is for messages.
pub fn decode_image(
    bytes: &[u8],
    path: &Path,
    limits: &InputLimits,
) -> Result<image::DynamicImage> {
    let bad = |m: String| Error::input(path.display().to_string(), m);
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| bad(e.to_string()))
    };
    let (w, h) = reader()?
        .into_dimensions()
        .map_err(|e| bad(format!("not a readable image: {e}")))?;
    let pixels = w as u64 * h as u64;
    if pixels > limits.max_image_pixels {
        return Err(bad(format!(
            "{w}x{h} is {pixels} pixels, more than the {} allowed (set {MAX_IMAGE_PIXELS_VAR} to change the limit)",
            limits.max_image_pixels
        )));
    }
    reader()?
        .decode()
        .map_err(|e| bad(format!("not a readable image: {e}")))
}

/// [`read_image_bytes`] then [`decode_image`].
pub fn load_image(path: &Path, limits: &InputLimits) -> Result<image::DynamicImage> {
    decode_image(&read_image_bytes(path, limits)?, path, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("farcer-limits-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// PNG's chunk checksum.
    fn crc32(b: &[u8]) -> u32 {
        let mut c = !0u32;
        for &x in b {
            c ^= x as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0xedb8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn images_are_checked_before_they_are_read_or_decoded() {
        let d = scratch();
        let png = d.join("a.png");
        image::RgbImage::new(30, 20).save(&png).unwrap();
        let small = InputLimits::default();
        assert_eq!(load_image(&png, &small).unwrap().width(), 30);
        let e = load_image(
            &png,
            &InputLimits {
                max_image_pixels: 599,
                ..small
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(&png.display().to_string()) && e.contains("30x20 is 600 pixels"),
            "{e}"
        );
        let e = load_image(
            &png,
            &InputLimits {
                max_image_bytes: 10,
                ..small
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("more than the 10 allowed") && e.contains(MAX_IMAGE_BYTES_VAR),
            "{e}"
        );
        // A header claiming 100000 x 100000 pixels is refused from the header alone.
        let mut huge = std::fs::read(&png).unwrap();
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&huge[12..29]);
        huge[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode_image(&huge, &png, &small).unwrap_err().to_string();
        assert!(e.contains("10000000000 pixels"), "{e}");
        // Folders and FIFOs are refused without being opened (a FIFO would block).
        let e = load_image(&d, &small).unwrap_err().to_string();
        assert!(e.contains("not a regular file (a folder)"), "{e}");
        let fifo = d.join("f.png");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let e = load_image(&fifo, &small).unwrap_err().to_string();
        assert!(
            e.starts_with(&fifo.display().to_string()) && e.contains("(a FIFO)"),
            "{e}"
        );
        let e = load_image(Path::new("/dev/zero"), &small)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(a device)"), "{e}");
        let e = load_image(&d.join("none.png"), &small)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.png: no such file"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
