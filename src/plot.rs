//! PNG pictures: confusion matrices, line charts (benchmarks, load tests) and learning
//! curves, drawn with `plotters` into an RGB buffer and written with `image`. Text is set
//! in DejaVu Sans, embedded in the binary (assets/fonts, Bitstream Vera licence), so no
//! system fonts are needed.

use crate::error::{Error, Result};
use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontDesc, FontFamily, FontStyle, FontTransform};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};
use std::path::Path;
use std::sync::OnceLock;

/// DejaVu Sans 2.37 (Debian's fonts-dejavu-core), licence in assets/fonts/LICENSE-DejaVu.txt.
static DEJAVU_SANS: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The font family every text of the charts is set in (the embedded DejaVu Sans).
const SANS: &str = "sans-serif";

/// What drawing returns: plotters' errors, boxed; turned into [`Error`] by [`render`].
type Drawn = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
type Area<'a> = DrawingArea<Canvas<'a>, Shift>;

const INK: RGBColor = RGBColor(30, 30, 30);
const GRID: RGBColor = RGBColor(225, 225, 225);
const FRAME: RGBColor = RGBColor(170, 170, 170);

/// The embedded font, parsed once.
fn face() -> Option<&'static FontRef<'static>> {
    static FACE: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FACE.get_or_init(|| FontRef::try_from_slice(DEJAVU_SANS).ok())
        .as_ref()
}

/// `text` set on one line at `size` pixels (ascent to descent): each glyph's coverage
/// pixels `(x, y, coverage)`, with the top of the line at y = 0.
/// (plotters 0.3.7 places each glyph by its ink box instead of its origin, which leaves
/// gaps after narrow letters; this lays glyphs out by advance, kerning and bearing.)
fn set_line(font: &FontRef<'static>, text: &str, size: f64, mut pixel: impl FnMut(i32, i32, f32)) {
    let scale = PxScale::from(size as f32);
    let f = font.as_scaled(scale);
    let (mut x, ascent) = (0f32, f.ascent());
    let mut prev = None;
    for c in text.chars() {
        let id = f.glyph_id(c);
        if let Some(p) = prev {
            x += f.kern(p, id);
        }
        prev = Some(id);
        let glyph = id.with_scale_and_position(scale, ab_glyph::point(x, ascent));
        if let Some(g) = font.outline_glyph(glyph) {
            let b = g.px_bounds();
            g.draw(|gx, gy, cov| {
                pixel(b.min.x as i32 + gx as i32, b.min.y as i32 + gy as i32, cov)
            });
        }
        x += f.h_advance(id);
    }
}

/// plotters' bitmap backend with text drawn by [`set_line`]; everything else is passed on.
struct Canvas<'a>(BitMapBackend<'a>);

type CanvasError<'a> = DrawingErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>;

impl<'a> DrawingBackend for Canvas<'a> {
    type ErrorType = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }
    fn ensure_prepared(&mut self) -> std::result::Result<(), CanvasError<'a>> {
        self.0.ensure_prepared()
    }
    fn present(&mut self) -> std::result::Result<(), CanvasError<'a>> {
        self.0.present()
    }
    fn draw_pixel(
        &mut self,
        p: BackendCoord,
        c: BackendColor,
    ) -> std::result::Result<(), CanvasError<'a>> {
        self.0.draw_pixel(p, c)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> std::result::Result<(), CanvasError<'a>> {
        self.0.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        a: BackendCoord,
        b: BackendCoord,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), CanvasError<'a>> {
        self.0.draw_rect(a, b, style, fill)
    }
    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> std::result::Result<(), CanvasError<'a>> {
        self.0.draw_path(path, style)
    }
    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        centre: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> std::result::Result<(), CanvasError<'a>> {
        self.0.draw_circle(centre, radius, style, fill)
    }
    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> std::result::Result<(), CanvasError<'a>> {
        self.0.fill_polygon(vert, style)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> std::result::Result<(), CanvasError<'a>> {
        self.0.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> std::result::Result<(u32, u32), CanvasError<'a>> {
        Ok((text_width(text, style.size()), style.size().ceil() as u32))
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> std::result::Result<(), CanvasError<'a>> {
        let colour = style.color();
        if colour.alpha == 0.0 {
            return Ok(());
        }
        let font = face().ok_or_else(|| {
            DrawingErrorKind::FontError(Box::new(Error::msg("the embedded font does not load")))
        })?;
        let (w, h) = (
            text_width(text, style.size()) as i32,
            style.size().ceil() as i32,
        );
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -w,
            HPos::Center => -w / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -h / 2,
            VPos::Bottom => -h,
        };
        let turn = style.transform();
        let mut out = Ok(());
        set_line(font, text, style.size(), |x, y, cov| {
            if cov > 0.0 && out.is_ok() {
                let (x, y) = turn.transform(x + dx, y + dy);
                let c = BackendColor {
                    alpha: colour.alpha * f64::from(cov.min(1.0)),
                    rgb: colour.rgb,
                };
                out = self.0.draw_pixel((pos.0 + x, pos.1 + y), c);
            }
        });
        out
    }
}

/// Registers the embedded font with plotters, once per process.
fn font() -> Result<()> {
    static LOADED: OnceLock<bool> = OnceLock::new();
    let ok = *LOADED.get_or_init(|| register_font(SANS, FontStyle::Normal, DEJAVU_SANS).is_ok());
    if ok && face().is_some() {
        Ok(())
    } else {
        Err(Error::msg("the embedded DejaVu Sans font does not load"))
    }
}

fn sans(size: f64) -> FontDesc<'static> {
    FontDesc::new(FontFamily::Name(SANS), size, FontStyle::Normal)
}

/// The width in pixels of `s` in the chart font at `size` (an estimate if the font fails).
fn text_width(s: &str, size: f64) -> u32 {
    match face() {
        Some(font) => {
            let f = font.as_scaled(PxScale::from(size as f32));
            let mut prev = None;
            let mut x = 0f32;
            for c in s.chars() {
                let id = f.glyph_id(c);
                if let Some(p) = prev {
                    x += f.kern(p, id);
                }
                prev = Some(id);
                x += f.h_advance(id);
            }
            x.ceil() as u32
        }
        None => (s.chars().count() as f64 * size * 0.6) as u32,
    }
}

/// The largest font size up to `size` (and down to 10) at which `s` fits in `width` pixels.
fn fitting(s: &str, size: f64, width: u32) -> f64 {
    let mut z = size;
    while z > 10.0 && text_width(s, z) > width {
        z -= 1.0;
    }
    z
}

fn rgb(c: &Rgb<u8>) -> RGBColor {
    RGBColor(c.0[0], c.0[1], c.0[2])
}

/// A `w` x `h` picture drawn by `draw` on white, written to `path` atomically (a temporary
/// sibling renamed into place); drawing errors name the file.
fn render(path: &Path, (w, h): (u32, u32), draw: impl FnOnce(&Area) -> Drawn) -> Result<()> {
    font()?;
    let (w, h) = (w.max(1), h.max(1));
    let failed = |e: &dyn std::fmt::Display| {
        Error::msg(format!("{}: drawing the picture: {e}", path.display()))
    };
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = Canvas(BitMapBackend::with_buffer(&mut buf, (w, h))).into_drawing_area();
        draw(&root).map_err(|e| failed(&e))?;
        root.present().map_err(|e| failed(&e))?;
    }
    let img = RgbImage::from_raw(w, h, buf).ok_or_else(|| failed(&"buffer of the wrong size"))?;
    save(&img, path)
}

fn save(img: &RgbImage, path: &Path) -> Result<()> {
    let tmp = crate::util::tmp_sibling(path);
    crate::util::crash_point("write a picture");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::msg(format!("{}: {e}", tmp.display())))?;
    crate::util::crash_point("rename a picture");
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Draws `text` with the given size, colour and anchor at `(x, y)`.
fn label(area: &Area, text: &str, (x, y): (i32, i32), size: f64, c: RGBColor, at: Pos) -> Drawn {
    let style = TextStyle::from(sans(size)).color(&c).pos(at);
    area.draw(&Text::new(text.to_string(), (x, y), style))?;
    Ok(())
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
    font()?;
    let ncols = m.iter().map(Vec::len).max().unwrap_or(0).max(cols.len());
    let nrows = m.len();
    let (pad, title_size, head_size, name_size) = (16u32, 22.0, 16.0, 15.0);
    let cell_w = cols
        .iter()
        .map(|c| text_width(c, name_size))
        .max()
        .unwrap_or(0)
        .max(56)
        + 20;
    let cell_h = 48u32;
    let row_w = rows
        .iter()
        .map(|r| text_width(r, name_size))
        .max()
        .unwrap_or(0);
    // Left of the grid: the rotated "gold", then the row names, right-aligned.
    let left = pad + 26 + row_w + 12;
    let top = 112u32;
    let note = "rows: gold label; shade and %: share of the row";
    let grid_w = cell_w * ncols as u32;
    let w = (left + grid_w + pad)
        .max(text_width(title, title_size) + 2 * pad)
        .max(text_width(note, 13.0) + 2 * pad);
    let h = top + cell_h * nrows as u32 + 52;
    render(path, (w, h), |root| {
        root.fill(&WHITE)?;
        let size = fitting(title, title_size, w - 2 * pad);
        let centre = Pos::new(HPos::Center, VPos::Center);
        label(root, title, ((w / 2) as i32, 24), size, INK, centre)?;
        let (left, top) = (left as i32, top as i32);
        let (cell_w, cell_h) = (cell_w as i32, cell_h as i32);
        if ncols > 0 {
            let mid = left + cell_w * ncols as i32 / 2;
            label(root, "predicted", (mid, 62), head_size, INK, centre)?;
        }
        for (j, name) in cols.iter().enumerate() {
            let x = left + j as i32 * cell_w + cell_w / 2;
            label(root, name, (x, top - 16), name_size, INK, centre)?;
        }
        if nrows > 0 {
            let gold = TextStyle::from(sans(head_size).transform(FontTransform::Rotate270))
                .color(&INK)
                .pos(centre);
            let y = top + cell_h * nrows as i32 / 2;
            root.draw(&Text::new("gold", (pad as i32 + 10, y), gold))?;
        }
        for (i, row) in m.iter().enumerate() {
            let total: usize = row.iter().sum();
            let y = top + i as i32 * cell_h;
            let name = rows.get(i).map_or("", String::as_str);
            let right = Pos::new(HPos::Right, VPos::Center);
            label(
                root,
                name,
                (left - 12, y + cell_h / 2),
                name_size,
                INK,
                right,
            )?;
            for (j, &v) in row.iter().enumerate() {
                let share = if total > 0 {
                    v as f64 / total as f64
                } else {
                    0.0
                };
                let shade = |lo: f64, hi: f64| (lo + (hi - lo) * share).round() as u8;
                let fill = RGBColor(shade(247.0, 8.0), shade(251.0, 48.0), shade(255.0, 107.0));
                let x = left + j as i32 * cell_w;
                let cell = [(x, y), (x + cell_w - 2, y + cell_h - 2)];
                root.draw(&Rectangle::new(cell, fill.filled()))?;
                let fg = if share > 0.5 { WHITE } else { INK };
                let cx = x + cell_w / 2 - 1;
                if v == 0 {
                    // Empty cells recede: a light zero, no share.
                    let at = (cx, y + cell_h / 2 - 1);
                    label(root, "0", at, 18.0, FRAME, centre)?;
                } else {
                    label(root, &v.to_string(), (cx, y + 18), 18.0, fg, centre)?;
                    let pct = format!("{:.0}%", share * 100.0);
                    label(root, &pct, (cx, y + 36), 11.0, fg, centre)?;
                }
            }
        }
        let bottom = Pos::new(HPos::Left, VPos::Center);
        label(root, note, (pad as i32, h as i32 - 24), 13.0, INK, bottom)?;
        Ok(())
    })
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
    render(path, (900, 560), |root| {
        root.fill(&WHITE)?;
        chart(root, title, x_label, y_label, series)
    })
}

/// One chart of a row of charts: `(title, x label, y label, series)`.
pub type Panel<'a> = (&'a str, &'a str, &'a str, Vec<Series>);

/// Line charts side by side, 700 x 560 pixels each.
pub fn panels_png(path: &Path, panels: &[Panel]) -> Result<()> {
    render(path, (700 * panels.len().max(1) as u32, 560), |root| {
        root.fill(&WHITE)?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for ((title, x, y, series), area) in panels.iter().zip(&areas) {
            chart(area, title, x, y, series)?;
        }
        Ok(())
    })
}

/// A run's learning curves: training loss (left) and validation weighted F1 (right) per
/// epoch, from `(epoch (1-based), train loss, validation weighted F1)`.
pub fn curves_png(path: &Path, title: &str, epochs: &[(f64, f64, f64)]) -> Result<()> {
    let loss: Vec<(f64, f64)> = epochs.iter().map(|e| (e.0, e.1)).collect();
    let f1: Vec<(f64, f64)> = epochs.iter().map(|e| (e.0, e.2)).collect();
    let loss_title = format!("{title}: training loss");
    panels_png(
        path,
        &[
            (
                &loss_title,
                "epoch",
                "loss per target",
                vec![("train loss".into(), Rgb([200, 60, 40]), loss)],
            ),
            (
                "validation weighted F1",
                "epoch",
                "weighted F1 (%)",
                vec![("validation".into(), Rgb([40, 90, 200]), f1)],
            ),
        ],
    )
}

/// The axis range shown for values in `lo..=hi`: from 0 (or below, for negative values)
/// to the largest value, plus `headroom` of the span; never empty.
fn axis(lo: f64, hi: f64, headroom: f64) -> (f64, f64) {
    let lo = lo.min(0.0);
    let mut hi = hi.max(lo);
    hi += (hi - lo) * headroom;
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    (lo, hi)
}

/// How many decimals print every tick of `ticks` exactly (to a millionth of their step).
fn decimals(ticks: &[f64]) -> usize {
    let step = ticks
        .windows(2)
        .map(|w| (w[1] - w[0]).abs())
        .filter(|d| *d > 0.0)
        .fold(f64::INFINITY, f64::min);
    let tol = if step.is_finite() { step * 1e-6 } else { 1e-9 };
    (0..=9)
        .find(|&d| {
            ticks.iter().all(|&v| {
                let s = format!("{v:.d$}");
                s.parse::<f64>().is_ok_and(|p| (p - v).abs() <= tol)
            })
        })
        .unwrap_or(9)
}

/// A tick's label with `d` decimals, with no minus sign on zero.
fn tick(v: f64, d: usize) -> String {
    let s = format!("{v:.d$}");
    if s.trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        s.trim_start_matches('-').to_string()
    } else {
        s
    }
}

/// The tick values plotters puts on `lo..hi` when asked for at most `n`.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    use plotters::coord::ranged1d::Ranged;
    plotters::coord::types::RangedCoordf64::from(lo..hi).key_points(n)
}

/// Where the lines run, in fractions of the plot from its lower left corner: the points
/// and samples along each segment.
fn trace(series: &[Series], (x0, x1): (f64, f64), (y0, y1): (f64, f64)) -> Vec<(f64, f64)> {
    let at = |x: f64, y: f64| ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0));
    let mut out = Vec::new();
    for (_, _, p) in series {
        for w in p.windows(2) {
            for k in 0..16 {
                let f = k as f64 / 16.0;
                out.push(at(
                    w[0].0 + (w[1].0 - w[0].0) * f,
                    w[0].1 + (w[1].1 - w[0].1) * f,
                ));
            }
        }
        out.extend(p.last().map(|&(x, y)| at(x, y)));
    }
    out
}

const CORNERS: [SeriesLabelPosition; 4] = [
    SeriesLabelPosition::UpperLeft,
    SeriesLabelPosition::UpperRight,
    SeriesLabelPosition::LowerRight,
    SeriesLabelPosition::LowerLeft,
];

/// How many of `trace` a legend box `(w, h)` (fractions of the plot) covers in each of
/// [`CORNERS`].
fn under_legend(trace: &[(f64, f64)], (w, h): (f64, f64)) -> [usize; 4] {
    let mut n = [0; 4];
    for &(u, v) in trace {
        let (l, r, t, b) = (u <= w, u >= 1.0 - w, v >= 1.0 - h, v <= h);
        n[0] += (l && t) as usize;
        n[1] += (r && t) as usize;
        n[2] += (r && b) as usize;
        n[3] += (l && b) as usize;
    }
    n
}

/// Draws a line chart with its title, axes, round ticks, grid and legend into `area`.
/// Points that are not finite (or beyond 1e100) are left out; a chart without any says
/// "no data".
fn chart(area: &Area, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Drawn {
    let (w, h) = area.dim_in_pixel();
    let finite: Vec<Series> = series
        .iter()
        .map(|(n, c, p)| {
            let p = p
                .iter()
                .copied()
                .filter(|(x, y)| x.abs() < 1e100 && y.abs() < 1e100);
            (n.clone(), *c, p.collect())
        })
        .collect();
    let pts: Vec<(f64, f64)> = finite.iter().flat_map(|s| s.2.iter().copied()).collect();
    let title_size = fitting(title, 22.0, w.saturating_sub(32));
    if pts.is_empty() {
        let centre = Pos::new(HPos::Center, VPos::Center);
        label(area, title, ((w / 2) as i32, 26), title_size, INK, centre)?;
        label(
            area,
            "no data",
            ((w / 2) as i32, (h / 2) as i32),
            16.0,
            FRAME,
            centre,
        )?;
        return Ok(());
    }
    let fold = |f: fn(&(f64, f64)) -> f64, init: f64, m: fn(f64, f64) -> f64| {
        pts.iter().map(f).fold(init, m)
    };
    let (x0, x1) = axis(
        fold(|p| p.0, f64::INFINITY, f64::min),
        fold(|p| p.0, f64::NEG_INFINITY, f64::max),
        0.02,
    );
    let y_max = fold(|p| p.1, f64::NEG_INFINITY, f64::max);
    let (y0, mut y1) = axis(fold(|p| p.1, f64::INFINITY, f64::min), y_max, 0.1);
    // The legend goes in a corner where it hides no line; if there is none, the y axis
    // grows until the lines pass under the legend in an upper corner.
    let plot_w = f64::from(w.saturating_sub(150).max(100));
    let plot_h = f64::from(h.saturating_sub(60 + title_size as u32).max(100));
    let names_w = finite
        .iter()
        .map(|s| text_width(&s.0, 14.0))
        .max()
        .unwrap_or(0);
    let legend = (
        (f64::from(names_w) + 70.0) / plot_w,
        (20.0 * finite.len() as f64 + 30.0) / plot_h,
    );
    let hidden = under_legend(&trace(&finite, (x0, x1), (y0, y1)), legend);
    let mut corner = (0..4).find(|&k| hidden[k] == 0);
    if corner.is_none() && legend.1 < 0.4 {
        y1 = y0 + (y_max - y0) / (1.0 - legend.1);
        let hidden = under_legend(&trace(&finite, (x0, x1), (y0, y1)), legend);
        corner = (0..2).find(|&k| hidden[k] == 0);
    }
    let corner = corner.unwrap_or_else(|| (0..4).min_by_key(|&k| hidden[k]).unwrap_or(0));
    // Whole-numbered x values (epochs, utterances) get whole-numbered ticks.
    let whole = pts.iter().all(|p| p.0.fract() == 0.0);
    let x_n = if whole {
        ((x1 - x0) as usize).saturating_add(1).clamp(2, 10)
    } else {
        10
    };
    let y_n = 8;
    let (xd, yd) = (decimals(&ticks(x0, x1, x_n)), decimals(&ticks(y0, y1, y_n)));
    let y_ticks: Vec<String> = ticks(y0, y1, y_n).iter().map(|&v| tick(v, yd)).collect();
    let y_tick_w = y_ticks
        .iter()
        .map(|s| text_width(s, 14.0))
        .max()
        .unwrap_or(0);
    let mut c = ChartBuilder::on(area)
        .caption(title, sans(title_size).color(&INK))
        .margin(14)
        .margin_right(28)
        .x_label_area_size(52)
        .y_label_area_size(y_tick_w + 40)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let x_fmt = |v: &f64| tick(*v, xd);
    let y_fmt = |v: &f64| tick(*v, yd);
    c.configure_mesh()
        .x_labels(x_n)
        .y_labels(y_n)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(sans(14.0).color(&INK))
        .axis_desc_style(sans(16.0).color(&INK))
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(INK.stroke_width(1))
        .draw()?;
    for (name, colour, p) in &finite {
        let col = rgb(colour);
        // Markers on the points while they are few enough to tell apart.
        c.draw_series(LineSeries::new(p.iter().copied(), col.stroke_width(3)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], col.stroke_width(3)));
        if p.len() <= 40 {
            c.draw_series(p.iter().map(|&q| Circle::new(q, 4, col.filled())))?;
        }
    }
    c.configure_series_labels()
        .position(CORNERS[corner].clone())
        .margin(12)
        .legend_area_size(30)
        .label_font(sans(14.0).color(&INK))
        .background_style(WHITE.mix(0.9))
        .border_style(FRAME)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("farcer-plot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// How many pixels of `img` in columns `x0..x1` have exactly colour `c`.
    fn count(img: &RgbImage, c: Rgb<u8>, x0: u32, x1: u32) -> usize {
        img.enumerate_pixels()
            .filter(|(x, _, p)| (x0..x1).contains(x) && **p == c)
            .count()
    }

    /// Pixels that are neither white nor a series colour nor grey: text, antialiased.
    fn dark(img: &RgbImage, y0: u32, y1: u32) -> usize {
        img.enumerate_pixels()
            .filter(|(_, y, p)| (y0..y1).contains(y) && p.0.iter().all(|&v| v < 120))
            .count()
    }

    const RED: Rgb<u8> = Rgb([200, 40, 40]);
    const BLUE: Rgb<u8> = Rgb([40, 80, 200]);

    #[test]
    fn line_chart_draws_each_series_in_its_colour() {
        let d = tmp("line");
        let p = d.join("sweep.png");
        let s: Vec<Series> = vec![
            (
                "farcer".into(),
                RED,
                vec![(1.0, 0.35), (10.0, 0.9), (40.0, 2.8)],
            ),
            (
                "torch".into(),
                BLUE,
                vec![(1.0, 12.7), (10.0, 10.0), (40.0, 13.4)],
            ),
        ];
        line_chart(&p, "seconds per sample", "utterances", "seconds", &s).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (900, 560));
        assert!(count(&img, RED, 0, 900) > 200, "red line");
        assert!(count(&img, BLUE, 0, 900) > 200, "blue line");
        assert!(dark(&img, 0, 50) > 100, "a title");
        assert!(dark(&img, 480, 560) > 100, "x ticks and label");
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn curves_and_panels_put_each_chart_in_its_own_column() {
        let d = tmp("curves");
        let p = d.join("curves.png");
        curves_png(
            &p,
            "run",
            &[(1.0, 2.0, 40.0), (2.0, 1.2, 55.0), (3.0, 0.9, 61.0)],
        )
        .unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1400, 560));
        let (loss, f1) = (Rgb([200, 60, 40]), Rgb([40, 90, 200]));
        assert!(count(&img, loss, 0, 700) > 200 && count(&img, loss, 700, 1400) == 0);
        assert!(count(&img, f1, 700, 1400) > 200 && count(&img, f1, 0, 700) == 0);
        let q = d.join("panels.png");
        let one = |c| vec![("s".to_string(), c, vec![(0.0, 1.0), (5.0, 3.0)])];
        panels_png(
            &q,
            &[
                ("a", "x", "y", one(RED)),
                ("b", "x", "y", one(BLUE)),
                ("c", "x", "y", vec![]),
            ],
        )
        .unwrap();
        let img = image::open(&q).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (2100, 560));
        assert!(count(&img, RED, 0, 700) > 100 && count(&img, BLUE, 700, 1400) > 100);
        assert_eq!(
            count(&img, RED, 1400, 2100) + count(&img, BLUE, 1400, 2100),
            0
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn odd_series_still_make_a_picture() {
        let d = tmp("odd");
        for (i, pts) in [
            vec![],
            vec![(3.0, 0.0)],
            vec![(0.0, f64::NAN), (1.0, f64::INFINITY)],
            vec![(-2.0, -5.0), (2.0, -1.0)],
            vec![(0.0, 1e-7), (1.0, 3e-7)],
            vec![(0.0, 1e300), (f64::MAX, 1.0), (1.0, -1e99)],
        ]
        .into_iter()
        .enumerate()
        {
            let p = d.join(format!("{i}.png"));
            line_chart(&p, "t", "x", "y", &[("s".into(), RED, pts)]).unwrap();
            assert_eq!(image::open(&p).unwrap().to_rgb8().dimensions(), (900, 560));
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn confusion_cells_are_shaded_by_the_row_share() {
        let d = tmp("confusion");
        let p = d.join("confusion.png");
        let rows: Vec<String> = ["joy", "sadness", "neutral"].map(String::from).to_vec();
        let mut cols = rows.clone();
        cols.push("invalid".into());
        let m = vec![vec![7, 0, 0, 0], vec![1, 2, 1, 0], vec![0, 0, 0, 0]];
        confusion_png(&p, "demo (w-F1 50.0)", &rows, &cols, &m).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert!(
            img.width() > 300 && img.height() > 200,
            "{:?}",
            img.dimensions()
        );
        // A whole row's share: the darkest shade; an empty cell: the lightest.
        assert!(count(&img, Rgb([8, 48, 107]), 0, img.width()) > 1000);
        assert!(count(&img, Rgb([247, 251, 255]), 0, img.width()) > 1000);
        // Half of a row: the middle shade.
        assert!(count(&img, Rgb([128, 150, 181]), 0, img.width()) > 1000);
        // White digits on the dark cell.
        assert!(dark(&img, 0, 40) > 50, "a title");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn unwritable_paths_are_errors_naming_the_file() {
        let p = Path::new("/nonexistent-farcer-dir/x/c.png");
        let e = line_chart(p, "t", "x", "y", &[]).unwrap_err().to_string();
        assert!(e.contains("c.png"), "{e}");
        let e = confusion_png(p, "t", &[], &[], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.png"), "{e}");
    }

    /// Each glyph keeps its side bearings (plotters 0.3.7 drops them, so letters drift
    /// left by their left bearing and gaps open after narrow letters), and the line's ink
    /// stays within its box.
    #[test]
    fn glyphs_keep_their_side_bearings() {
        let font = face().expect("the embedded font parses");
        let ink = |text: &str| {
            let (mut x, mut y) = ((i32::MAX, i32::MIN), (i32::MAX, i32::MIN));
            set_line(font, text, 200.0, |px, py, c| {
                if c > 0.5 {
                    x = (x.0.min(px), x.1.max(px));
                    y = (y.0.min(py), y.1.max(py));
                }
            });
            (x, y)
        };
        // DejaVu Sans's n and o have left bearings of about 0.09 and 0.06 em.
        let (n, _) = ink("n");
        assert!((12..=22).contains(&n.0), "n's ink starts at {}", n.0);
        let (o, _) = ink("o");
        assert!((6..=16).contains(&o.0), "o's ink starts at {}", o.0);
        // After "rn", n is where it is alone, moved on by the advance of r (and kerning).
        let (rn, rows) = ink("rn");
        let pen = text_width("rn", 200.0) as i32 - text_width("n", 200.0) as i32;
        assert!((rn.1 - (n.1 + pen)).abs() <= 2, "{rn:?} {n:?} {pen}");
        assert!(rn.1 <= text_width("rn", 200.0) as i32);
        // Ascenders and descenders stay within the line (ascent to descent: 200 pixels).
        let (_, tall) = ink("lg");
        assert!(rows.0 > 0 && tall.0 >= 0 && tall.1 < 200, "{tall:?}");
    }

    #[test]
    fn ticks_print_round_values() {
        assert_eq!(decimals(&[0.0, 1.0, 2.0]), 0);
        assert_eq!(decimals(&[0.0, 0.5, 1.0]), 1);
        assert_eq!(decimals(&[0.1, 0.2, 0.30000000000000004]), 1);
        assert_eq!(decimals(&[0.0, 0.25, 0.5]), 2);
        assert_eq!(tick(-0.0, 1), "0.0");
        assert_eq!(tick(-1e-17, 0), "0");
        assert_eq!(tick(2.5, 1), "2.5");
        let t = ticks(0.0, 14.74, 8);
        assert!(t.len() >= 3 && t.len() <= 8, "{t:?}");
        assert!(t.iter().all(|v| (v - v.round()).abs() < 1e-9), "{t:?}");
    }
}
