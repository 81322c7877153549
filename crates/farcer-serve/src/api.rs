//! What requests carry, and how each part of them is checked before the model sees it.

use crate::{ApiError, Limits};
use base64::Engine as _;
use farcer::data::{Scope, Utterance};
use farcer::decode::Decode;
use farcer::eval::PastSource;
use farcer::infer::{PredictOptions, SessionOptions, UtterancePrediction};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// One utterance as sent: the JSON-lines schema of `farcer predict`, with the image
/// inline (`image_b64`) or as a path under the server's image root (`image`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InUtterance {
    #[serde(default)]
    pub id: Option<String>,
    pub speaker: String,
    pub text: String,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub image_b64: Option<String>,
    /// Video is refused: the server never runs ffmpeg on uploads.
    #[serde(default)]
    pub clip: Option<serde_json::Value>,
}

/// `POST /v1/predict`: a dialogue in the JSON-lines schema, with the options at the top.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    #[serde(default)]
    pub id: Option<String>,
    pub utterances: Vec<InUtterance>,
    #[serde(default = "scope_last")]
    pub scope: Scope,
    #[serde(default = "constrained")]
    pub decode: Decode,
    #[serde(default)]
    pub shots: Option<usize>,
    #[serde(default)]
    pub prompt_set: u64,
    #[serde(default)]
    pub past_labels: Option<bool>,
    #[serde(default)]
    pub past_labels_from: PastSource,
}

fn scope_last() -> Scope {
    Scope::Last
}
fn constrained() -> Decode {
    Decode::Constrained
}

impl PredictRequest {
    pub fn options(&self) -> PredictOptions {
        PredictOptions {
            scope: self.scope,
            decode: self.decode,
            shots: self.shots,
            prompt_set: self.prompt_set,
            past_labels: self.past_labels,
            past_labels_from: self.past_labels_from,
        }
    }
}

/// `POST /v1/sessions`.
pub type SessionRequest = SessionOptions;

/// The answer for one utterance, probabilities by label.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub index: usize,
    pub id: String,
    pub speaker: String,
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probs: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub dropped: usize,
    pub tokens: usize,
    pub model_ms: f64,
}

impl Answer {
    pub fn new(p: UtterancePrediction, labels: &[String]) -> Self {
        Answer {
            probs: p.probs_by_label(labels),
            index: p.index,
            id: p.id,
            speaker: p.speaker,
            label: p.label,
            text: p.text,
            dropped: p.dropped,
            tokens: p.tokens,
            model_ms: p.seconds * 1e3,
        }
    }
}

/// Parses a JSON body; the error names the field (`utterances[1].text: ...`).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        ApiError::bad(field, inner.to_string())
    })
}

/// Checks one utterance and turns it into the library's, with its image decoded.
pub fn utterance(
    u: InUtterance,
    at: &str,
    index: usize,
    limits: &Limits,
    image_root: Option<&Path>,
    labels: &[String],
) -> Result<(Utterance, Option<image::DynamicImage>), ApiError> {
    if u.clip.is_some() {
        return Err(ApiError::bad(
            format!("{at}.clip"),
            "the server does not read video: send a frame as image_b64",
        ));
    }
    for (name, v) in [("speaker", &u.speaker), ("text", &u.text)] {
        let n = v.chars().count();
        if n > limits.max_text_chars {
            return Err(ApiError::bad(
                format!("{at}.{name}"),
                format!(
                    "{n} characters, more than the {} allowed",
                    limits.max_text_chars
                ),
            ));
        }
    }
    if u.speaker.trim().is_empty() {
        return Err(ApiError::bad(format!("{at}.speaker"), "empty"));
    }
    if let Some(l) = &u.label {
        let l = l.to_lowercase();
        if !labels.contains(&l) {
            return Err(ApiError::bad(
                format!("{at}.label"),
                format!(
                    "`{l}` is not one of the model's labels ({})",
                    labels.join(", ")
                ),
            ));
        }
    }
    let bytes = match (&u.image_b64, &u.image) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                format!("{at}.image"),
                "give image or image_b64, not both",
            ))
        }
        (Some(b64), None) => {
            // Four base64 characters carry three bytes: refuse before decoding.
            if b64.len() / 4 * 3 > limits.max_image_bytes + 3 {
                return Err(too_big(&format!("{at}.image_b64"), limits));
            }
            let b = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| {
                    ApiError::bad(format!("{at}.image_b64"), format!("not base64: {e}"))
                })?;
            Some((format!("{at}.image_b64"), b))
        }
        (None, Some(p)) => Some((
            format!("{at}.image"),
            read_under_root(p, image_root, limits, &format!("{at}.image"))?,
        )),
        (None, None) => None,
    };
    let img = match bytes {
        Some((field, b)) => Some(decode_image(&b, &field, limits)?),
        None => None,
    };
    let mut out = Utterance::new(u.id.unwrap_or_else(|| index.to_string()), u.speaker, u.text);
    out.label = u.label.map(|l| l.to_lowercase());
    Ok((out, img))
}

fn too_big(field: &str, limits: &Limits) -> ApiError {
    ApiError::new(
        413,
        field,
        format!("the image is larger than {} bytes", limits.max_image_bytes),
    )
}

/// A PNG or JPEG, its size checked from the header before any pixel is decoded.
pub fn decode_image(
    b: &[u8],
    field: &str,
    limits: &Limits,
) -> Result<image::DynamicImage, ApiError> {
    if b.len() > limits.max_image_bytes {
        return Err(too_big(field, limits));
    }
    let format = image::guess_format(b)
        .ok()
        .filter(|f| matches!(f, image::ImageFormat::Png | image::ImageFormat::Jpeg))
        .ok_or_else(|| ApiError::new(415, field, "not a PNG or JPEG image"))?;
    let reader = image::ImageReader::with_format(std::io::Cursor::new(b), format);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::bad(field, format!("unreadable image header: {e}")))?;
    if (w as u64) * (h as u64) > limits.max_image_pixels {
        return Err(ApiError::new(
            413,
            field,
            format!(
                "{w}x{h} pixels, more than the {} allowed",
                limits.max_image_pixels
            ),
        ));
    }
    image::load_from_memory_with_format(b, format)
        .map_err(|e| ApiError::bad(field, format!("undecodable image: {e}")))
}

/// Reads a file named relative to the image root: no absolute paths, no `..`, nothing
/// that resolves (through symlinks) outside the root, regular files only.
pub fn read_under_root(
    p: &str,
    root: Option<&Path>,
    limits: &Limits,
    field: &str,
) -> Result<Vec<u8>, ApiError> {
    let root = root.ok_or_else(|| {
        ApiError::new(
            403,
            field,
            "image paths are off on this server (start it with --image-root): send image_b64",
        )
    })?;
    let rel = PathBuf::from(p);
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(ApiError::new(
            403,
            field,
            "a path relative to the image root, without `..`",
        ));
    }
    let full = root.join(&rel);
    let real = full
        .canonicalize()
        .map_err(|_| ApiError::new(404, field, format!("no image `{p}` under the image root")))?;
    if !real.starts_with(root) {
        return Err(ApiError::new(
            403,
            field,
            "the path leads outside the image root",
        ));
    }
    let meta = std::fs::metadata(&real)
        .map_err(|_| ApiError::new(404, field, format!("no image `{p}` under the image root")))?;
    if !meta.is_file() {
        return Err(ApiError::new(403, field, "not a regular file"));
    }
    if meta.len() > limits.max_image_bytes as u64 {
        return Err(too_big(field, limits));
    }
    let mut b = Vec::new();
    std::fs::File::open(&real)
        .and_then(|f| {
            f.take(limits.max_image_bytes as u64 + 1)
                .read_to_end(&mut b)
        })
        .map_err(|e| ApiError::new(404, field, format!("cannot read `{p}`: {e}")))?;
    Ok(b)
}
