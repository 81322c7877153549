//! PNG pictures without a plotting stack: confusion matrices (and simple line charts for
//! benchmarks), drawn on an RGB canvas with the public-domain 8x8 bitmap font.

use crate::error::{Error, Result};
use font8x8::{UnicodeFonts, BASIC_FONTS};
use image::{Rgb, RgbImage};
use std::path::Path;

pub struct Canvas {
    pub img: RgbImage,
}

pub const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
pub const BLACK: Rgb<u8> = Rgb([0, 0, 0]);
pub const GREY: Rgb<u8> = Rgb([200, 200, 200]);

impl Canvas {
    pub fn new(w: u32, h: u32) -> Self {
        Canvas {
            img: RgbImage::from_pixel(w, h, WHITE),
        }
    }

    pub fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>) {
        for yy in y.max(0)..(y + h).min(self.img.height() as i64) {
            for xx in x.max(0)..(x + w).min(self.img.width() as i64) {
                self.img.put_pixel(xx as u32, yy as u32, c);
            }
        }
    }

    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb<u8>) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = BASIC_FONTS
                .get(ch)
                .or_else(|| BASIC_FONTS.get('?'))
                .unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.rect(
                            x + (i as i64 * 8 + col) * scale,
                            y + row as i64 * scale,
                            scale,
                            scale,
                            c,
                        );
                    }
                }
            }
        }
    }

    pub fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 8 * scale
    }

    pub fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>, width: i64) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).max(1);
        for i in 0..=n {
            let x = x0 + (x1 - x0) * i / n;
            let y = y0 + (y1 - y0) * i / n;
            self.rect(x - width / 2, y - width / 2, width, width, c);
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = crate::util::tmp_sibling(path);
        crate::util::crash_point("write a picture");
        self.img
            .save_with_format(&tmp, image::ImageFormat::Png)
            .map_err(|e| Error::msg(format!("{}: {e}", tmp.display())))?;
        crate::util::crash_point("rename a picture");
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

/// A labelled heat map of a confusion matrix: rows gold, columns predicted (the last
/// column may be `invalid`); shade by the row's share, counts written in the cells.
pub fn confusion_png(
    path: &Path,
    title: &str,
    rows: &[String],
    cols: &[String],
    m: &[Vec<usize>],
) -> Result<()> {
    let s = 2;
    let cell_w = cols
        .iter()
        .map(|c| Canvas::text_width(c, 1))
        .max()
        .unwrap_or(40)
        .max(56)
        + 16;
    let cell_h = 40;
    let left = rows
        .iter()
        .map(|r| Canvas::text_width(r, s))
        .max()
        .unwrap_or(40)
        + 48;
    let top = 90;
    let w = left + cell_w * cols.len() as i64 + 24;
    let h = top + cell_h * rows.len() as i64 + 50;
    let mut c = Canvas::new(w as u32, h as u32);
    c.text(12, 10, title, s, BLACK);
    c.text(left, 44, "predicted", 1, BLACK);
    c.text(12, top - 20, "gold", 1, BLACK);
    for (j, name) in cols.iter().enumerate() {
        let x = left + j as i64 * cell_w + (cell_w - Canvas::text_width(name, 1)) / 2;
        c.text(x, top - 20, name, 1, BLACK);
    }
    for (i, row) in m.iter().enumerate() {
        let total: usize = row.iter().sum();
        let y = top + i as i64 * cell_h;
        c.text(12, y + (cell_h - 16) / 2, &rows[i], s, BLACK);
        for (j, &v) in row.iter().enumerate() {
            let share = if total > 0 {
                v as f64 / total as f64
            } else {
                0.0
            };
            let shade = |lo: f64, hi: f64| (lo + (hi - lo) * share) as u8;
            let col = image::Rgb([shade(247.0, 8.0), shade(251.0, 48.0), shade(255.0, 107.0)]);
            let x = left + j as i64 * cell_w;
            c.rect(x, y, cell_w - 2, cell_h - 2, col);
            let txt = v.to_string();
            let fg = if share > 0.5 { WHITE } else { BLACK };
            c.text(
                x + (cell_w - Canvas::text_width(&txt, s)) / 2,
                y + (cell_h - 16) / 2,
                &txt,
                s,
                fg,
            );
        }
    }
    c.text(
        12,
        h - 24,
        "rows: gold label; shade: share of the row",
        1,
        BLACK,
    );
    c.save(path)
}

/// A named, coloured line of `(x, y)` points.
pub type Series = (String, Rgb<u8>, Vec<(f64, f64)>);

/// A line chart of several series `(name, colour, points)` with axis labels.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let mut c = Canvas::new(900, 560);
    c.chart((0, 0, 900, 560), title, x_label, y_label, series);
    c.save(path)
}

/// One chart of a row of charts: `(title, x label, y label, series)`.
pub type Panel<'a> = (&'a str, &'a str, &'a str, Vec<Series>);

/// Line charts side by side, 700 x 560 pixels each.
pub fn panels_png(path: &Path, panels: &[Panel]) -> Result<()> {
    let mut c = Canvas::new(700 * panels.len().max(1) as u32, 560);
    for (i, (title, x, y, series)) in panels.iter().enumerate() {
        c.chart((700 * i as i64, 0, 700, 560), title, x, y, series);
    }
    c.save(path)
}

/// A run's learning curves: training loss (left) and validation weighted F1 (right) per
/// epoch, from `(epoch (1-based), train loss, validation weighted F1)`.
pub fn curves_png(path: &Path, title: &str, epochs: &[(f64, f64, f64)]) -> Result<()> {
    let mut c = Canvas::new(1400, 560);
    let loss: Vec<(f64, f64)> = epochs.iter().map(|e| (e.0, e.1)).collect();
    let f1: Vec<(f64, f64)> = epochs.iter().map(|e| (e.0, e.2)).collect();
    c.chart(
        (0, 0, 700, 560),
        &format!("{title}: training loss"),
        "epoch",
        "loss per target",
        &[("train loss".into(), Rgb([200, 60, 40]), loss)],
    );
    c.chart(
        (700, 0, 700, 560),
        "validation weighted F1",
        "epoch",
        "weighted F1 (%)",
        &[("validation".into(), Rgb([40, 90, 200]), f1)],
    );
    c.save(path)
}

impl Canvas {
    /// Draws a line chart into the box `(x, y, w, h)`.
    fn chart(
        &mut self,
        (ox, oy, w, h): (i64, i64, i64, i64),
        title: &str,
        x_label: &str,
        y_label: &str,
        series: &[Series],
    ) {
        let c = self;
        let (left, right, top, bottom) = (ox + 90, 30i64, oy + 60, 70i64);
        c.text(ox + 12, oy + 12, title, 2, BLACK);
        let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.2.iter().copied()).collect();
        if pts.is_empty() {
            return;
        }
        let (x_end, y_end) = (ox + w - right, oy + h - bottom);
        let xmax = pts.iter().map(|p| p.0).fold(f64::MIN, f64::max).max(1e-9);
        let ymax = pts.iter().map(|p| p.1).fold(f64::MIN, f64::max).max(1e-9) * 1.1;
        let px = |x: f64| left + ((x / xmax) * (x_end - left) as f64) as i64;
        let py = |y: f64| y_end - ((y / ymax) * (y_end - top) as f64) as i64;
        c.line(left, y_end, x_end, y_end, BLACK, 2);
        c.line(left, top, left, y_end, BLACK, 2);
        for k in 0..=4 {
            let yv = ymax * k as f64 / 4.0;
            let y = py(yv);
            c.line(left, y, x_end, y, GREY, 1);
            c.text(ox + 8, y - 4, &format!("{yv:.2}"), 1, BLACK);
            let xv = xmax * k as f64 / 4.0;
            // Whole numbers as such (epochs), fractions with one decimal.
            let label = if xv.fract() == 0.0 {
                format!("{xv:.0}")
            } else {
                format!("{xv:.1}")
            };
            c.text(px(xv) - 8, y_end + 8, &label, 1, BLACK);
        }
        c.text(
            ox + w / 2 - Canvas::text_width(x_label, 1) / 2,
            oy + h - 30,
            x_label,
            1,
            BLACK,
        );
        c.text(ox + 8, top - 20, y_label, 1, BLACK);
        for (k, (name, col, p)) in series.iter().enumerate() {
            for win in p.windows(2) {
                c.line(
                    px(win[0].0),
                    py(win[0].1),
                    px(win[1].0),
                    py(win[1].1),
                    *col,
                    3,
                );
            }
            for &(x, y) in p {
                c.rect(px(x) - 3, py(y) - 3, 7, 7, *col);
            }
            c.rect(left + 20, top + 10 + 18 * k as i64, 14, 10, *col);
            c.text(left + 40, top + 11 + 18 * k as i64, name, 1, BLACK);
        }
    }
}
