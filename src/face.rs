//! Optional face crop (`--face-crop`): the largest face found by rustface's SeetaFace
//! frontal detector, with a margin, else nothing (the caller keeps the whole frame).
//! The paper's ViT was fine-tuned on face crops; the authors fed whole frames.

static MODEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seeta_fd_frontal_v1.0.bin"));

/// Whether this build carries the detector's model.
pub fn available() -> bool {
    !MODEL.is_empty()
}

/// The largest detected face, widened by a fifth on each side; `None` if no face (or no
/// detector model in this build).
pub fn crop_largest_face(img: &image::DynamicImage) -> Option<image::DynamicImage> {
    if !available() {
        return None;
    }
    let model = rustface::read_model(MODEL).ok()?;
    let mut det = rustface::create_detector_with_model(model);
    det.set_min_face_size(24);
    det.set_score_thresh(2.0);
    det.set_pyramid_scale_factor(0.8);
    det.set_slide_window_step(4, 4);
    let gray = img.to_luma8();
    let (w, h) = (gray.width(), gray.height());
    let faces = det.detect(&rustface::ImageData::new(gray.as_raw(), w, h));
    let best = faces
        .iter()
        .max_by_key(|f| f.bbox().width() * f.bbox().height())?;
    let b = best.bbox();
    let m = (b.width().max(b.height()) / 5) as i64;
    let x0 = (b.x() as i64 - m).max(0) as u32;
    let y0 = (b.y() as i64 - m).max(0) as u32;
    let x1 = ((b.x() as i64 + b.width() as i64 + m) as u32).min(w);
    let y1 = ((b.y() as i64 + b.height() as i64 + m) as u32).min(h);
    if x1 <= x0 || y1 <= y0 {
        return None;
    }
    Some(img.crop_imm(x0, y0, x1 - x0, y1 - y0))
}
